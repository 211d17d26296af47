"""A Llama-3-70B-shaped Q4_K GGUF on this 24 GiB box: layerstream (computing on the blocks with ggml) against
llama.cpp's mmap on the same file.

The model: 80 layers, hidden 8192, FFN 28672, 64 heads, 8 KV heads, SmolLM2's 49152-token vocabulary; every
matrix Q4_K, norms F32: about 39 GB, written once with gguf-py's `GGUFWriter` in its incremental mode (each
matrix a tiled random block pattern with small fp16 scales: valid Q4_K, written at disk speed).

Each system runs in its own process with the page cache dropped first (root only; otherwise said):
- llama.cpp (llama-cpp-python, mmap, its CPU repack off: with it on llama.cpp refuses the file, its repack
  buffer would take 37 GB of RAM), 2 threads;
- layerstream at its default budget, and at max_ram=16GB;
- layerstream's engine, 16 sequences at once (`--batch`), with its resident Q4_K weights repacked for ggml's
  GEMMs (the default) and as stored (`repack=False`).
Printed per system: seconds per decode token (median of the tokens after the first), the prefill, the bytes
read from disk per token, the read rate `layerstream plan` measures on the store (the read limit: streamed bytes
per token / that rate), and the child's peak RSS.

    .venv/bin/python bench/big_q4k.py --make --dir /data/q4k    # writes the file (3-7 minutes), then runs all
    .venv/bin/python bench/big_q4k.py --dir /data/q4k --delete  # runs, then deletes the 39 GB file
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

NAME = "llama3-70b-shape-q4_k.gguf"
SHAPE = {"layers": 80, "hidden": 8192, "ff": 28672, "heads": 64, "kv": 8, "head_dim": 128, "vocab": 49152}
PROMPT = [1, 504, 6147, 282, 260, 5065, 28, 253, 14886, 17942, 351]   # 11 tokens


def q4k_rows(rows: int, cols: int, rng):
    """A [rows, cols/256*144] uint8 Q4_K matrix: a random 64-row pattern tiled, d and dmin small fp16."""
    import numpy as np

    per_row = cols // 256
    tile = rng.integers(0, 256, size=(min(rows, 64), per_row, 144), dtype=np.uint8)
    tile[..., 0:2] = np.full((1,), 2e-4, np.float16).view(np.uint8)
    tile[..., 2:4] = np.full((1,), 2e-4, np.float16).view(np.uint8)
    reps = -(-rows // tile.shape[0])
    return np.tile(tile, (reps, 1, 1))[:rows].reshape(rows, per_row * 144)


def make(path: Path) -> None:
    import gguf
    import numpy as np

    from layerstream.sources import embedded_model

    s = SHAPE
    if path.exists():
        print(f"{path} exists ({path.stat().st_size / 1e9:.1f} GB)")
        return
    t0 = time.perf_counter()
    tmp = path.with_suffix(".partial")
    w = gguf.GGUFWriter(str(tmp), "llama")
    arch = "llama"
    for k, v in {"context_length": 8192, "embedding_length": s["hidden"], "block_count": s["layers"],
                 "feed_forward_length": s["ff"], "attention.head_count": s["heads"],
                 "attention.head_count_kv": s["kv"], "rope.dimension_count": s["head_dim"]}.items():
        w.add_uint32(f"{arch}.{k}", v)
    w.add_float32(f"{arch}.rope.freq_base", 500000.0)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    tok = gguf.GGUFReader(str(embedded_model()))
    for key, field in tok.fields.items():
        if key.startswith("tokenizer."):
            main = field.types[0]
            w.add_key_value(key, field.contents(), main,
                            sub_type=field.types[-1] if main == gguf.GGUFValueType.ARRAY else None)
    q4k = gguf.GGMLQuantizationType.Q4_K
    h, ff, hd = s["hidden"], s["ff"], s["head_dim"]
    tensors = [("token_embd.weight", s["vocab"], h), ("output_norm.weight", 0, h), ("output.weight", s["vocab"], h)]
    for i in range(s["layers"]):
        tensors += [(f"blk.{i}.attn_norm.weight", 0, h), (f"blk.{i}.attn_q.weight", s["heads"] * hd, h),
                    (f"blk.{i}.attn_k.weight", s["kv"] * hd, h), (f"blk.{i}.attn_v.weight", s["kv"] * hd, h),
                    (f"blk.{i}.attn_output.weight", h, s["heads"] * hd), (f"blk.{i}.ffn_norm.weight", 0, h),
                    (f"blk.{i}.ffn_gate.weight", ff, h), (f"blk.{i}.ffn_up.weight", ff, h),
                    (f"blk.{i}.ffn_down.weight", h, ff)]
    for name, rows, cols in tensors:
        if rows == 0:
            w.add_tensor_info(name, (cols,), np.dtype(np.float32), cols * 4)
        else:
            w.add_tensor_info(name, (rows, cols // 256 * 144), np.dtype(np.uint8), rows * cols // 256 * 144,
                              raw_dtype=q4k)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    for n, (name, rows, cols) in enumerate(tensors):
        a = np.ones(cols, np.float32) if rows == 0 else q4k_rows(rows, cols, rng)
        w.write_tensor_data(a)
        if n % 90 == 0:
            print(f"  {n}/{len(tensors)} tensors, {time.perf_counter() - t0:.0f} s", flush=True)
    w.close()
    tmp.rename(path)
    print(f"wrote {path}: {path.stat().st_size / 1e9:.1f} GB in {time.perf_counter() - t0:.0f} s", flush=True)


def child(a) -> dict:
    import torch

    g = Path(a.dir) / NAME
    r = {"system": a.child, "base_rss": harness.rss_now()}
    meter = harness.Meter()
    t0 = time.perf_counter()
    if a.child == "llama.cpp":
        import llama_cpp

        default = llama_cpp.llama_cpp.llama_model_default_params

        def no_repack():
            p = default()
            p.use_extra_bufts = False   # llama.cpp's CPU repack would copy every Q4_K weight into 37 GB of RAM
            return p

        llama_cpp.llama_cpp.llama_model_default_params = no_repack
        llama_cpp.llama.llama_cpp.llama_model_default_params = no_repack
        llm = llama_cpp.Llama(model_path=str(g), n_ctx=256, n_threads=2, n_threads_batch=2, use_mmap=True,
                              verbose=False)
        r["setup_s"] = time.perf_counter() - t0
        meter.start()
        got = []
        for t in llm.generate(PROMPT, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            meter.mark()
            got.append(int(t))
            if len(got) >= a.tokens:
                break
        r["tokens"] = got
    else:
        from layerstream import AutoModel

        opts = {"max_ram": a.budget} if a.child == "layerstream-budget" else {}
        if a.child.endswith("-stored"):   # resident Q4_K blocks as stored, not repacked (ggml's plain mul_mat)
            opts["repack"] = False
        m = AutoModel.from_pretrained(str(g), store_path=str(Path(a.dir) / "ls-store"), progress=False, **opts)
        r["setup_s"] = time.perf_counter() - t0
        r["plan"] = m.plan.describe()
        r["bytes_per_sweep"] = m.plan.bytes_per_sweep
        ids = torch.tensor([PROMPT])
        if a.child.startswith("layerstream-batch"):
            from layerstream.engine.scheduler import Engine, SamplingParams

            eng = Engine(m, max_batch=a.batch)
            meter.start()
            t1 = time.perf_counter()
            handles = [eng.submit(ids[0, : 2 + i % 3], SamplingParams(max_tokens=a.tokens, temperature=0))
                       for i in range(a.batch)]
            sweep_s = []   # each sweep's time: the first prefills the prompts, the rest decode a token per row
            while not all(h.done for h in handles):
                t2 = time.perf_counter()
                eng.step()
                sweep_s.append(time.perf_counter() - t2)
            r["batch_s"] = time.perf_counter() - t1
            r["batch_tokens"] = sum(len(h.result().token_ids) for h in handles)
            r["sweeps"] = m.profiler.sweeps
            r["sweep_s"] = [round(x, 3) for x in sweep_s]
        else:
            meter.start()
            out = m.generate(ids, max_new_tokens=a.tokens, do_sample=False, logits_processor=meter.processor())
            r["tokens"] = out[0, ids.shape[1]:].tolist()
        m.close()
    r.update(meter.result())
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", required=True, help="where the 39 GB file goes (outside the checkout)")
    ap.add_argument("--make", action="store_true", help="write the file first when missing")
    ap.add_argument("--delete", action="store_true", help="delete the file and the store when done")
    ap.add_argument("--tokens", type=int, default=4, help="greedy tokens per system (default 4)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--budget", default="16GB")
    ap.add_argument("--skip", nargs="*", default=[], help="systems not to run")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        harness.emit(child(a))
        return 0
    d = Path(a.dir)
    d.mkdir(parents=True, exist_ok=True)
    g = d / NAME
    if a.make:
        make(g)
    if not g.exists():
        print(f"{g} is missing: run with --make", file=sys.stderr)
        return 2
    from layerstream.plan import measure_read_bandwidth
    from layerstream.store import Store, resolve

    store = Store(resolve(str(g), store_path=str(d / "ls-store"), progress=True))
    harness.drop_caches()
    bw = measure_read_bandwidth(store)
    print(f"file {g.stat().st_size / 1e9:.1f} GB; read rate measured on the store {bw / 1e9:.2f} GB/s", flush=True)
    results = {}
    for system in ("llama.cpp", "layerstream", "layerstream-budget", "layerstream-batch", "layerstream-batch-stored"):
        if system in a.skip:
            continue
        dropped = harness.drop_caches()
        cmd = [sys.executable, __file__, "--dir", a.dir, "--child", system, "--tokens", str(a.tokens),
               "--batch", str(a.batch), "--budget", a.budget]
        c = harness.run_child(cmd, timeout=3600, log=d / f"{system}.log")
        res = c.result or {"error": c.note}
        res.update(peak_rss=c.peak_rss, wall_s=c.wall, page_cache_dropped=dropped)
        results[system] = res
        print(json.dumps({k: v for k, v in res.items() if k != "plan"}), flush=True)
    print("\n| system | s/token (median after the first) | prefill + first token s | read/token | "
          "limit s/token | vs llama.cpp | peak RSS |")
    print("|---|---|---|---|---|---|---|")
    ref = None
    for system, r in results.items():
        steps = r.get("token_s") or []
        med = statistics.median(steps) if steps else None
        if system == "llama.cpp":
            ref = med
        limit = r.get("bytes_per_sweep", 0) / bw if r.get("bytes_per_sweep") else None
        if system.startswith("layerstream-batch"):
            agg = r.get("batch_tokens", 0) / r["batch_s"] if r.get("batch_s") else None
            how = ", resident blocks as stored (repack=False)" if system.endswith("-stored") else ""
            # decode sweeps (after the prompts' sweep) against one sequence's decode tokens, as batch 1 is timed
            dec = statistics.median(r["sweep_s"][1:]) if len(r.get("sweep_s") or []) > 1 else None
            one = (results.get("layerstream") or {}).get("token_s") or []
            vs = f" = {a.batch * statistics.median(one) / dec:.1f}x one sequence" if dec and one else ""
            print(f"| engine, {a.batch} sequences{how} | decode sweep {harness.fmt(dec)} s: "
                  f"{harness.fmt(a.batch / dec) if dec else '-'} tok/s{vs}; with the prompts' sweep "
                  f"{harness.fmt(agg)} tok/s over {r.get('sweeps')} sweeps | | | | | "
                  f"{harness.fmt_b(r.get('peak_rss'))} |")
            continue
        print(f"| {system} | {harness.fmt(med)} | {harness.fmt(r.get('first_s'))} | "
              f"{harness.fmt_b(r.get('read_per_token'))} | {harness.fmt(limit)} | "
              f"{harness.ratio(ref, med) if ref and med else '-'} | {harness.fmt_b(r.get('peak_rss'))} |")
    if a.delete:
        import shutil

        g.unlink()
        shutil.rmtree(d / "ls-store", ignore_errors=True)
        print(f"deleted {g} and the store")
    return 0


if __name__ == "__main__":
    sys.exit(main())
