"""Computing on a GGUF's blocks (ggml's kernels, layerstream/quant/kernels.py) against llama.cpp on the same file.

Two models, each system in its own process, one after the other (nothing else should run on the box):
- the embedded SmolLM2-135M-Instruct (Q4_1, its tied head Q8_0): layerstream at the default budget (resident,
  blocks; no type ggml repacks), in place at max_ram=0 (every unit streamed as blocks each token), and with
  kernels=False (the dequantize path: floats, resident);
- a 1.5B-class model of Qwen2.5-1.5B's shape (hidden 1536, 28 layers, FFN 8960, 12 heads, 2 KV heads) as a
  Llama-architecture GGUF with random weights in a Q4_K_M-like mix (Q4_K, Q6_K for attn_v / ffn_down of
  every other layer and the output, Q4_K embedding), written once under --dir (about 1 GB); its resident Q4_K
  weights are repacked for ggml's faster kernels by default, as llama.cpp does (`repack=False`: as stored).

Measured per system: prefill of a prompt (the chat prompt for SmolLM2; 512 tokens for the 1.5B) and the median
decode step over --tokens greedy tokens after it, tokens/s. llama.cpp (llama-cpp-python, optional: reported as
"not installed" when missing) runs with its defaults (its CPU repack on) and n_threads = the cores.

    .venv/bin/python bench/kernels.py [--dir DIR] [--tokens 32] [--only smollm2|1.5b|moe]

--only moe (not in the default run): a Qwen3-MoE-shaped Q4_K GGUF (bench/moe.py's shape, random weights, about
1 GB), its experts computed on their blocks per routed expert.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

import harness  # noqa: E402  (torch-free: where scenarios keep their files, a smoke run's own)

QWEN15 = {"hidden": 1536, "ff": 8960, "heads": 12, "kv": 2, "head_dim": 128, "vocab": 49152, "ctx": 1024}
LAYERS15 = 28


def q4_k_m(role: str, layer: int) -> str:
    """llama.cpp's Q4_K_M choice, simplified: Q6_K for the output and for attn_v / ffn_down of every other layer."""
    if role == "output" or (role in ("attn_v", "ffn_down") and layer % 2 == 0):
        return "Q6_K"
    return "Q4_K"


def make_15b(path: Path) -> Path:
    if not path.exists():
        from gguf_tiny import make_llama_gguf
        t = time.perf_counter()
        tmp = path.with_suffix(".tmp.gguf")
        make_llama_gguf(tmp, types=q4_k_m, layers=LAYERS15, dims=QWEN15)
        tmp.rename(path)
        print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t:.0f} s", flush=True)
    return path


def run_layerstream(gguf: str, prompt_ids: list, tokens: int, opts: dict, store: str) -> dict:
    import torch

    from layerstream import AutoModel
    from layerstream.engine.step import decode_step, prefill

    m = AutoModel.from_pretrained(gguf, store_path=store, progress=False, **opts)
    ids = torch.tensor([prompt_ids])
    blocks = sum(type(x).__name__ == "BlockLinear" for x in m.model.modules())
    with m.running():
        prefill(m, ids[:, :8])   # warm-up (graph caches, page cache)
        t = time.perf_counter()
        logits, cache = prefill(m, ids)
        pre = time.perf_counter() - t
        tok, steps = logits.argmax(-1), []
        out = [int(tok)]
        for _ in range(tokens):
            t = time.perf_counter()
            logits = decode_step(m, tok, cache)
            steps.append(time.perf_counter() - t)
            tok = logits.argmax(-1)
            out.append(int(tok))
    m.close()
    out = out[:tokens]
    return {"prefill_tok_s": len(prompt_ids) / pre, "decode_tok_s": 1 / statistics.median(steps),
            "tokens": out, "block_linears": blocks}


MOE = {"hidden": 1024, "heads": 16, "kv": 4, "head_dim": 64, "experts": 64, "topk": 8, "expert_ff": 512,
       "vocab": 49152, "ctx": 1024}
LAYERS_MOE = 16


def make_moe(path: Path) -> Path:
    """A Qwen3-MoE-shaped GGUF as llama.cpp's converter writes one (`ffn_{gate,up,down}_exps` [experts, rows,
    cols] per layer): bench/moe.py's shape (16 layers of 64 experts, 8 routed, hidden 1024, expert width 512),
    random weights, every matrix Q4_K but attn_v / ffn_down_exps of every other layer and the output in Q6_K."""
    if path.exists():
        return path
    import gguf
    import numpy as np

    from layerstream.sources import embedded_model

    from gguf_tiny import _copy_tokenizer, random_blocks

    t = time.perf_counter()
    d, arch, rng = MOE, "qwen3moe", np.random.default_rng(0)
    tmp = path.with_suffix(".tmp.gguf")
    w = gguf.GGUFWriter(str(tmp), arch)
    for key, val in {"context_length": d["ctx"], "embedding_length": d["hidden"], "block_count": LAYERS_MOE,
                     "feed_forward_length": 4 * d["hidden"], "expert_feed_forward_length": d["expert_ff"],
                     "attention.head_count": d["heads"], "attention.head_count_kv": d["kv"],
                     "attention.key_length": d["head_dim"], "attention.value_length": d["head_dim"],
                     "expert_count": d["experts"], "expert_used_count": d["topk"]}.items():
        w.add_uint32(f"{arch}.{key}", val)
    w.add_float32(f"{arch}.rope.freq_base", 10000.0)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    _copy_tokenizer(w, gguf.GGUFReader(embedded_model()), d["vocab"])

    def put(name: str, shape: tuple, qtype: str):
        *lead, rows, cols = shape
        if qtype == "F32":
            w.add_tensor(name, rng.uniform(0.5, 1.5, size=(cols,)).astype(np.float32) if not rows else
                         rng.normal(0, 0.05, size=shape).astype(np.float32))
            return
        n = int(np.prod(lead or [1]))
        raw = random_blocks(n * rows, cols, qtype, rng)
        w.add_tensor(name, raw.reshape(*lead, rows, -1), raw_dtype=getattr(gguf.GGMLQuantizationType, qtype))

    h, hd, e, ff = d["hidden"], d["head_dim"], d["experts"], d["expert_ff"]
    put("token_embd.weight", (d["vocab"], h), "Q4_K")
    put("output_norm.weight", (0, h), "F32")
    put("output.weight", (d["vocab"], h), "Q6_K")
    for i in range(LAYERS_MOE):
        put(f"blk.{i}.attn_q.weight", (d["heads"] * hd, h), "Q4_K")
        put(f"blk.{i}.attn_k.weight", (d["kv"] * hd, h), "Q4_K")
        put(f"blk.{i}.attn_v.weight", (d["kv"] * hd, h), q4_k_m("attn_v", i))
        put(f"blk.{i}.attn_output.weight", (h, d["heads"] * hd), "Q4_K")
        for norm in ("attn_norm", "ffn_norm"):
            put(f"blk.{i}.{norm}.weight", (0, h), "F32")
        for norm in ("attn_q_norm", "attn_k_norm"):
            put(f"blk.{i}.{norm}.weight", (0, hd), "F32")
        put(f"blk.{i}.ffn_gate_inp.weight", (e, h), "F32")
        put(f"blk.{i}.ffn_gate_exps.weight", (e, ff, h), "Q4_K")
        put(f"blk.{i}.ffn_up_exps.weight", (e, ff, h), "Q4_K")
        put(f"blk.{i}.ffn_down_exps.weight", (e, h, ff), q4_k_m("ffn_down", i))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.rename(path)
    print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t:.0f} s", flush=True)
    return path


def run_llama_cpp(gguf: str, prompt_ids: list, tokens: int) -> dict:
    """llama.cpp greedy: the prompt's evaluation (prefill) and then one token per step, each step timed from the
    token before it (its generator evaluates one token per yield)."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return {"error": "not installed"}
    n = os.cpu_count() or 1
    llm = Llama(model_path=gguf, n_ctx=1024, n_threads=n, n_threads_batch=n, verbose=False)
    list(zip(range(2), llm.generate(prompt_ids[:8], top_k=1, temp=0.0, repeat_penalty=1.0)))   # warm-up
    llm.reset()
    t = time.perf_counter()
    marks, out = [], []
    for tok in llm.generate(prompt_ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        marks.append(time.perf_counter())
        out.append(int(tok))
        if len(out) > tokens:
            break
    pre = marks[0] - t   # the prompt's evaluation and the first token's sampling
    steps = [b - a for a, b in zip(marks, marks[1:])]
    return {"prefill_tok_s": len(prompt_ids) / pre, "decode_tok_s": 1 / statistics.median(steps),
            "tokens": out[:tokens]}


def child(args):
    spec = json.loads(args.child)
    if spec["system"] == "llama.cpp":
        res = run_llama_cpp(spec["gguf"], spec["ids"], spec["tokens"])
    else:
        res = run_layerstream(spec["gguf"], spec["ids"], spec["tokens"], spec["opts"], spec["store"])
    print("RESULT " + json.dumps(res))


def in_process(spec: dict) -> dict:
    p = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": (p.stderr or p.stdout).strip().splitlines()[-1] if (p.stderr or p.stdout).strip() else "failed"}


def table(name: str, gguf: str, ids: list, tokens: int, store: str, systems: list) -> None:
    print(f"\n### {name}: prompt {len(ids)} tokens, {tokens} greedy tokens\n")
    print("| system | prefill tok/s | decode tok/s | decode vs llama.cpp | first tokens |")
    print("|---|---|---|---|---|")
    ref = None
    for label, system, opts in systems:
        r = in_process({"system": system, "gguf": gguf, "ids": ids, "tokens": tokens, "opts": opts, "store": store})
        if "error" in r:
            print(f"| {label} | {r['error']} | | | |", flush=True)
            continue
        if system == "llama.cpp":
            ref = r
        ratio = f"{r['decode_tok_s'] / ref['decode_tok_s']:.2f}x" if ref else "-"
        pre = f"{r['prefill_tok_s']:.1f}" + (f" ({r['prefill_tok_s'] / ref['prefill_tok_s']:.2f}x)" if ref and
                                              system != "llama.cpp" else "")
        print(f"| {label} | {pre} | {r['decode_tok_s']:.1f} | {ratio} | {r['tokens'][:8]} |", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=str(harness.WORK), help=f"where the models and stores go (default {harness.WORK})")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--only", choices=["smollm2", "1.5b", "moe"])
    ap.add_argument("--child")
    args = ap.parse_args()
    if args.child:
        return child(args)
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    from layerstream.quant import kernels
    from layerstream.sources import embedded_model

    print(f"ggml kernels: {'available' if kernels.available() else kernels.unavailable_reason()}; "
          f"{os.cpu_count()} cores")
    if args.only != "1.5b":
        from transformers import AutoTokenizer
        g = str(embedded_model())
        tok = AutoTokenizer.from_pretrained(Path(g).parent, gguf_file=Path(g).name)
        enc = tok.apply_chat_template([{"role": "user", "content": "Write a short poem about the sea."}],
                                      add_generation_prompt=True, return_tensors="pt")
        ids = enc["input_ids"][0].tolist()
        table("SmolLM2-135M-Instruct Q4_1 (embedded)", g, ids, args.tokens, str(d / "smollm2-store"), [
            ("llama.cpp", "llama.cpp", {}),
            ("layerstream default (blocks, resident)", "layerstream", {}),
            ("layerstream in place, max_ram=0 (blocks streamed)", "layerstream", {"max_ram": 0}),
            ("layerstream kernels=False (dequantized once, float32)", "layerstream", {"kernels": False}),
        ])
    if args.only == "moe":
        g = str(make_moe(d / "qwen3-moe-shape-q4_k.gguf"))
        ids = [(i * 7919) % 49000 + 100 for i in range(64)]
        table("Qwen3-MoE-shaped Q4_K (16 layers x 64 experts, 8 routed; random weights)", g, ids, args.tokens,
              str(d / "moe-store"), [
                  ("llama.cpp", "llama.cpp", {}),
                  ("layerstream default (blocks, resident)", "layerstream", {}),
                  ("layerstream repack=False (resident blocks as stored)", "layerstream", {"repack": False}),
                  ("layerstream in place, max_ram=0 (blocks; experts read when routed)", "layerstream",
                   {"max_ram": 0}),
                  ("layerstream kernels=False (dequantized once, float32)", "layerstream", {"kernels": False}),
              ])
        return
    if args.only != "smollm2":
        g = str(make_15b(d / "qwen2.5-1.5b-shape-q4_k_m.gguf"))
        ids = [(i * 7919) % 49000 + 100 for i in range(512)]
        table("Qwen2.5-1.5B-shaped Q4_K_M (random weights)", g, ids, args.tokens, str(d / "15b-store"), [
            ("llama.cpp", "llama.cpp", {}),
            ("layerstream default (blocks, resident)", "layerstream", {}),
            ("layerstream repack=False (resident blocks as stored)", "layerstream", {"repack": False}),
            ("layerstream in place, max_ram=0 (blocks streamed; repacked for the prefill)", "layerstream",
             {"max_ram": 0}),
            ("layerstream in place, max_ram=0, repack=False", "layerstream", {"max_ram": 0, "repack": False}),
            ("layerstream kernels=False (dequantized once, float32)", "layerstream", {"kernels": False}),
        ])


if __name__ == "__main__":
    main()
