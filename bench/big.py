"""Larger than RAM, on CPU: layerstream against its peers on a ~31 GB Llama-shaped model, in one run.

Longer than 400 lines for a reason: five systems (layerstream at two budgets, Accelerate, llama.cpp, AirLLM),
each with its own way to load a 31 GB model and to be measured fairly, plus the disk probe and targets.

The model (random weights, bf16, hidden 5120, intermediate 13824, 40 heads, 8 KV heads, vocab 49152,
untied embeddings, 54 layers by default: about 31 GB on a 24 GiB machine) is written once by
``--make`` into ``--dir`` (bench/big_model.py) as a transformers checkpoint with ONE DECODER LAYER PER
SHARD, so that AirLLM 4.0 links its split instead of copying it and layerstream serves the shards in
place, plus ``model.gguf`` with the same weights for llama.cpp. Both are reused once complete; an
interrupted ``--make`` resumes at the first unfinished shard.

Then, in the same run:
  1. the disk's sequential read bandwidth: O_DIRECT reads of the model's shards (page cache dropped
     first), 1 reader and 4 parallel readers (threads, os.preadv, 16 MB aligned buffers); the best
     figure is the bandwidth of the "limit";
  2. every system in its own fresh subprocess, the page cache dropped before each, greedy generation
     of ``-n`` tokens from "The sea is": setup (load) time, time to the first token (prefill) and
     seconds per decode token = (time of token n - time of token 1) / (n - 1), peak RSS, and bytes
     the process read from disk (/proc/self/io read_bytes):
       ls       layerstream, max_ram = --budget (default 16GB)
       lsdef    layerstream, default budget (max_ram=None)
       offload  transformers + Accelerate disk offload, bf16, max_memory={"cpu": budget}
       airllm   AirLLM 4.0.0, CPU, bf16, use_cache=True
       llama    llama.cpp (llama-cpp-python), the GGUF, mmap, 2 threads
     layerstream's in-place index (a checksum of the whole model, once) and AirLLM's split (links)
     are made beforehand, in untimed subprocesses;
  3. a table, the ratios, and the targets: layerstream decode <= 1.15x the limit (bytes streamed
     per token / best bandwidth); at max_ram=16GB >= 1.3x Accelerate, >= 1.7x llama.cpp, >= 2x
     AirLLM; at the default budget >= 2x llama.cpp and >= 3x AirLLM; peak RSS <= budget + 300 MB.

Absolute times on a shared 2-core machine mean little: the "others" column says how busy the machine
was with other processes while a system ran (> 0.2 cores: the figure is disturbed).

Run (as root, to drop the page cache):
    python bench/big.py --make-only                     # once: ~31 GB checkpoint + ~31 GB GGUF
    python bench/big.py --json bench/out/big.json       # the benchmark (tens of minutes)
Small-scale check of the machinery:
    python bench/big.py --make --layers 4 --dir /tmp/bigsmall --budget 1GB --bw-bytes 1GB
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import mmap
import os
import pathlib
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import big_model
import harness
from big_model import GGUF_NAME, PROMPT, checkpoint_complete, gguf_complete
from harness import drop_caches, fmt_b

SYSTEMS = {"ls": "layerstream max_ram=BUDGET", "lsdef": "layerstream default budget",
           "offload": "accelerate disk offload", "airllm": "airllm 4.0.0", "llama": "llama.cpp"}


# ---------------------------------------------------------------------------- disk bandwidth

def read_bandwidth(files: list[pathlib.Path], readers: int, limit: int, chunk: int = 16 << 20) -> dict:
    """O_DIRECT sequential reads of `files` (in order, up to `limit` bytes) by `readers` threads taking
    16 MB chunks in turn (so parallel readers read neighbouring chunks: a queue depth of `readers`)."""
    jobs, total = [], 0
    for f in files:
        size, off = f.stat().st_size, 0
        while off < size and total < limit:
            jobs.append((f, off))
            total += min(chunk, size - off)
            off += chunk
        if total >= limit:
            break
    it, lock, got = iter(jobs), threading.Lock(), [0] * readers

    def work(k):
        buf, fds = mmap.mmap(-1, chunk), {}        # page-aligned
        try:
            while True:
                with lock:
                    f, off = next(it, (None, 0))
                if f is None:
                    return
                if f not in fds:
                    fds[f] = os.open(str(f), os.O_RDONLY | getattr(os, "O_DIRECT", 0))
                got[k] += os.preadv(fds[f], [buf], off)
        finally:
            for fd in fds.values():
                os.close(fd)
            buf.close()

    with ThreadPoolExecutor(readers) as pool:
        t0 = time.perf_counter()
        list(pool.map(work, range(readers)))      # raises a reader's error
        dt = time.perf_counter() - t0
    return {"readers": readers, "bytes": sum(got), "seconds": dt, "gb_s": sum(got) / dt / 1e9,
            "files": f"{jobs[0][0].name}..{jobs[-1][0].name}" if jobs else ""}


def layer_shards(d: pathlib.Path) -> list[pathlib.Path]:
    """The decoder-layer shards of the checkpoint in `d`, in order."""
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shards = sorted({d / f for f in index["weight_map"].values()})
    return shards[1:-2] or shards


def measure_bandwidth(d: pathlib.Path, limit: int, start: int = 0) -> tuple[list[dict], int]:
    """1 reader, then 4 readers, each over different decoder-layer shards (page cache dropped before each):
    the first from byte `start` of the layer shards taken in order (wrapping around), the next where the
    previous stopped. Returns the results and where the next measurement should start."""
    shards = layer_shards(d)
    sizes = [f.stat().st_size for f in shards]
    out = []
    for readers in (1, 4):
        k, acc = 0, 0
        pos = start % max(1, sum(sizes))
        while k < len(sizes) - 1 and acc + sizes[k] <= pos:
            acc += sizes[k]
            k += 1
        drop_caches()
        r = read_bandwidth(shards[k:] + shards[:k], readers, limit)
        start = acc + r["bytes"]
        out.append(r)
    return out, start


# ---------------------------------------------------------------------------- children: one system each

def system_name(key: str, budget: int) -> str:
    return SYSTEMS[key].replace("BUDGET", fmt_b(budget).replace(" ", ""))


def child(key: str, a) -> dict:
    import torch

    d = a.dir
    ids = big_model.prompt_ids(d)
    # the system's own imports count in the baseline
    __import__({"ls": "layerstream", "lsdef": "layerstream", "offload": "accelerate", "airllm": "airllm",
                "llama": "llama_cpp"}[key])
    if key == "offload":
        from transformers import AutoModelForCausalLM  # noqa: F401
    meter = harness.Meter()
    r = {"key": key, "name": system_name(key, a.budget), "tokens": None, "base_rss": harness.rss_now(),
         "prompt_tokens": ids.shape[1]}
    threads = f"torch threads={torch.get_num_threads()}"
    t0 = time.perf_counter()
    if key in ("ls", "lsdef"):
        from layerstream import AutoModel

        m = AutoModel.from_pretrained(str(d), max_ram=a.budget if key == "ls" else None,
                                      store_path=str(d / "ls-store"), progress=False)
        r["setup_s"] = time.perf_counter() - t0
        meter.start()
        out = m.generate(ids, max_new_tokens=a.new_tokens, do_sample=False, logits_processor=meter.processor())
        plan = m.plan
        r.update(bytes_per_sweep=plan.bytes_per_sweep, ram_budget=getattr(plan, "ram_budget", None),
                 direct=getattr(m, "direct", None), plan=plan.describe(),
                 last_stats={k: v for k, v in (m.last_stats or {}).items() if isinstance(v, (int, float))})
        note = (f"bf16; {fmt_b(plan.bytes_per_sweep)} streamed per sweep; O_DIRECT={r['direct']}; {threads}; "
                f"layerstream counted {fmt_b(r['last_stats'].get('bytes_per_token'))}/token")
    elif key == "offload":
        from transformers import AutoModelForCausalLM

        tmp = d / "offload-tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16, device_map="auto",
                                                         max_memory={"cpu": a.budget}, offload_folder=str(tmp)).eval()
            r["setup_s"] = time.perf_counter() - t0
            placement = dict(Counter(map(str, model.hf_device_map.values())))
            meter.start()
            with torch.inference_mode():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=a.new_tokens,
                                     do_sample=False, pad_token_id=2, logits_processor=meter.processor())
            files = sum(1 for p in tmp.rglob("*") if p.is_file())
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        r["placement"] = placement
        note = (f"bf16; max_memory cpu={fmt_b(a.budget)}; hf_device_map {placement}; offload_folder files={files}; "
                f"{threads}")
    elif key == "airllm":
        import airllm

        model = airllm.AutoModel.from_pretrained(str(d), device="cpu", dtype=torch.bfloat16)
        r["setup_s"] = time.perf_counter() - t0
        meter.start()
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=a.new_tokens, use_cache=True, return_dict_in_generate=True,
                                 logits_processor=meter.processor())
        out = out.sequences if hasattr(out, "sequences") else out
        note = f"bf16, device=cpu, prefetching on; split: {airllm_split_report(d)}; {threads}"
    else:
        from llama_cpp import Llama

        llm = Llama(model_path=str(d / GGUF_NAME), n_ctx=256, n_threads=2, n_threads_batch=2, use_mmap=True,
                    verbose=False)
        r["setup_s"] = time.perf_counter() - t0
        eos, got = llm.token_eos(), []
        meter.start()
        for t in llm.generate(ids[0].tolist(), top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,
                              reset=True):
            meter.mark()
            if t == eos:
                break
            got.append(int(t))
            if len(got) >= a.new_tokens:
                break
        out = torch.tensor([ids[0].tolist() + got])
        note = f"GGUF {(gguf_complete(d) or {}).get('dtype', '?')}, mmap, n_threads=2, greedy (top_k=1)"
    r.update(meter.result())
    r["tokens"] = out[0, ids.shape[1]:].tolist()
    r["note"] = note
    return r


def airllm_split_report(d: pathlib.Path) -> str:
    """How AirLLM's split relates to the checkpoint: hard links, symlinks or copies (and their bytes)."""
    sp = d / "splitted_model"
    if not sp.is_dir():
        return "no splitted_model/"
    src_inodes = {(p.stat().st_dev, p.stat().st_ino) for p in d.glob("model-*.safetensors")}
    hard = sym = copies = copied = 0
    for p in sp.glob("*.safetensors"):
        if p.is_symlink():
            sym += 1
        elif (p.stat().st_dev, p.stat().st_ino) in src_inodes:
            hard += 1
        else:
            copies += 1
            copied += p.stat().st_size
    return f"{hard} hard links, {sym} symlinks, {copies} copies ({fmt_b(copied)} copied)"


def prep(what: str, a) -> dict:
    """Untimed one-time preparation, each in its own subprocess."""
    if what == "ls":
        return harness.prep_store(a.dir)
    t0 = time.perf_counter()
    import airllm
    import torch

    airllm.AutoModel.from_pretrained(str(a.dir), device="cpu", dtype=torch.bfloat16)
    return {"what": "airllm split", "seconds": time.perf_counter() - t0, "split": airllm_split_report(a.dir)}


# ---------------------------------------------------------------------------- parent

def _self_cmd(a, *extra) -> list[str]:
    return harness.self_cmd(__file__, "--dir", a.dir, "--layers", a.layers, "--budget", a.budget,
                            "-n", a.new_tokens, *extra)


def main(argv=None) -> int:
    p = harness.parser(__doc__, wait_quiet=60.0)
    p.add_argument("--dir", type=pathlib.Path, default=pathlib.Path("/work/bigmodel"))
    p.add_argument("--layers", type=int, default=54)
    p.add_argument("--budget", type=harness.size_arg, default="16GB", help="max_ram of layerstream and "
                   "Accelerate's max_memory (default 16GB = 16e9 bytes)")
    p.add_argument("-n", "--new-tokens", type=int, default=4)
    p.add_argument("--make", action="store_true", help="write the model (checkpoint + GGUF) if not complete, then run")
    p.add_argument("--make-only", action="store_true", help="write the model if not complete, and stop")
    p.add_argument("--no-gguf", action="store_true", help="with --make: no GGUF (llama.cpp is then skipped)")
    p.add_argument("--gguf-type", default="bf16", choices=["bf16", "f16"])
    p.add_argument("--skip", action="append", default=[], choices=list(SYSTEMS))
    p.add_argument("--bw-bytes", type=harness.size_arg, default="6GB",
                   help="bytes read by each bandwidth measurement (default 6GB)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed to each system (default 3600)")
    p.add_argument("--json", type=pathlib.Path)
    p.add_argument("--child", choices=list(SYSTEMS), help=argparse.SUPPRESS)
    p.add_argument("--prep", choices=["ls", "airllm"], help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.new_tokens < 2:
        p.error("-n must be at least 2 (decode time needs a second token)")
    if a.child or a.prep:
        harness.emit(child(a.child, a) if a.child else prep(a.prep, a))
        return 0
    if a.make or a.make_only:
        t0 = time.perf_counter()
        rc = subprocess.run(harness.self_cmd(big_model.__file__, "--dir", a.dir, "--layers", a.layers, "--gguf-type",
                                             a.gguf_type, *(["--no-gguf"] if a.no_gguf else []))).returncode
        if rc:
            return rc
        print(f"--make: {time.perf_counter() - t0:.0f} s", flush=True)
        if a.make_only:
            return 0
    if checkpoint_complete(a.dir, a.layers) is None:
        sys.exit(f"big.py: error: no complete {a.layers}-layer model in {a.dir}; run with --make first")
    if os.geteuid() != 0:
        print("warning: not root: the page cache cannot be dropped; figures will include cached reads", flush=True)
    systems = [k for k in SYSTEMS if k not in a.skip]
    if "llama" in systems and gguf_complete(a.dir) is None:
        print(f"llama.cpp skipped: no complete {GGUF_NAME} in {a.dir} (made without --no-gguf?)", flush=True)
        systems.remove("llama")
    if "llama" in systems and importlib.util.find_spec("llama_cpp") is None:
        print("llama.cpp skipped: llama_cpp is not installed", flush=True)
        systems.remove("llama")
    logdir = a.dir / "bench-logs"
    logdir.mkdir(exist_ok=True)
    print(f"model: {a.dir}, {a.layers} layers, {fmt_b(checkpoint_complete(a.dir)['bytes'])} bf16; RAM "
          f"{fmt_b(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES'))}; budget {fmt_b(a.budget)}; "
          f"{a.new_tokens} new tokens from {PROMPT!r}, greedy", flush=True)

    # one-time preparation, untimed
    preps = {}
    for what in (["ls"] if {"ls", "lsdef"} & set(systems) else []) + (["airllm"] if "airllm" in systems else []):
        c = harness.run_child(_self_cmd(a, "--prep", what), show_stderr=True)
        preps[what] = c.result or {"failed": c.returncode}
        print(f"prep {what}: {c.wall:.0f} s {preps[what]}", flush=True)

    bw, next_start = measure_bandwidth(a.dir, a.bw_bytes)
    for r in bw:
        print(f"disk: {r['readers']} O_DIRECT reader(s), 16 MB chunks: {r['gb_s']:.2f} GB/s "
              f"({fmt_b(r['bytes'])} in {r['seconds']:.1f} s)", flush=True)

    results = []
    for key in systems:
        load = harness.wait_until_quiet(a.wait_quiet) if a.wait_quiet > 0 else None
        print(f"running {key} ...", flush=True)
        dropped = drop_caches()   # each system in its own process, the page cache dropped first
        c = harness.run_child(_self_cmd(a, "--child", key), timeout=a.timeout, log=logdir / f"{key}.log")
        r = c.result or {"key": key, "name": system_name(key, a.budget), "tokens": None,
                         "note": f"failed (exit {c.returncode}): {c.note}; log {logdir / (key + '.log')}"}
        r.update(wall_s=c.wall, others=c.others, cache_dropped=dropped, load_before=load,
                 peak_rss=c.peak_rss if c.result else None)
        results.append(r)
        if r.get("decode_s"):
            print(f"  {r['name']}: setup {r['setup_s']:.1f} s, first token {r['first_s']:.1f} s, "
                  f"{r['decode_s']:.2f} s/token, peak RSS {fmt_b(r['peak_rss'])} "
                  f"(others {r['others'] or 0:.2f} cores)", flush=True)
        else:
            print(f"  {r['name']}: {r.get('note')}", flush=True)

    bw += measure_bandwidth(a.dir, a.bw_bytes, next_start)[0]
    for r in bw[2:]:
        print(f"disk again: {r['readers']} reader(s): {r['gb_s']:.2f} GB/s", flush=True)
    # A decode sweep re-reads the same units every token; this virtual disk serves re-reads faster than
    # first reads (its host caches them), so measure that case too: the same bytes read twice, O_DIRECT,
    # page cache dropped, the second pass counted.
    drop_caches()
    read_bandwidth(layer_shards(a.dir), 4, a.bw_bytes)
    drop_caches()
    again = dict(read_bandwidth(layer_shards(a.dir), 4, a.bw_bytes), readers="4 (re-read)")
    bw.append(again)
    print(f"disk, the same {fmt_b(again['bytes'])} read a second time: {again['gb_s']:.2f} GB/s", flush=True)
    report(a, results, bw, max(r["gb_s"] for r in bw) * 1e9, preps)
    return 0


def report(a, results, bw, best, preps) -> None:
    by = {r["key"]: r for r in results if r.get("decode_s")}   # the systems that ran

    def limit_of(key):
        return by[key]["bytes_per_sweep"] / best if by.get(key, {}).get("bytes_per_sweep") is not None else None

    def speedup(x, y):
        return by[y]["decode_s"] / by[x]["decode_s"] if x in by and y in by else None

    lim16, limdef = limit_of("ls"), limit_of("lsdef")
    print(f"\n{a.layers}-layer Llama-shaped bf16 model ({fmt_b(checkpoint_complete(a.dir)['bytes'])}), CPU, greedy, "
          f"{a.new_tokens} new tokens; best disk bandwidth {best / 1e9:.2f} GB/s")
    if lim16:
        print(f"limit at max_ram={fmt_b(a.budget)}: {fmt_b(by['ls']['bytes_per_sweep'])} streamed per token / "
              f"{best / 1e9:.2f} GB/s = {lim16:.2f} s/token")
    if limdef:
        print(f"limit at the default budget ({fmt_b(by['lsdef'].get('ram_budget'))}): "
              f"{fmt_b(by['lsdef']['bytes_per_sweep'])} / {best / 1e9:.2f} GB/s = {limdef:.2f} s/token")
    print()
    rows = []
    for r in results:
        if r["key"] not in by:
            rows.append([r["name"] + " (failed / not run)"] + ["-"] * 8)
            continue
        lim = limdef if r["key"] == "lsdef" else lim16
        rows.append([r["name"], harness.fmt(r.get("setup_s"), ".1f"), harness.fmt(r.get("first_s"), ".1f"),
                     f"{r['decode_s']:.2f}", harness.ratio(r["decode_s"], lim), fmt_b(r.get("peak_rss")),
                     fmt_b(r["peak_rss"] - r["base_rss"]), fmt_b(r.get("read_per_token")),
                     harness.fmt(r.get("others"))])
    harness.table(["system", "setup s", "1st tok s", "s/token", "x limit", "peak RSS", "RSS-base", "read/token",
                   "others"], rows)
    print("(x limit: s/token over the limit of the same budget (peers: the max_ram budget); RSS-base: peak RSS "
          "minus the process's RSS after imports; others: cores busy with other processes on average, > 0.2 "
          "disturbs the figures)")

    # same tokens
    ref = next((r for r in results if r.get("tokens") is not None and r["key"] in ("ls", "lsdef")), None)
    if ref is not None:
        print()
        for r in results:
            if r.get("tokens") is None or r is ref:
                continue
            same = r["tokens"] == ref["tokens"]
            extra = "" if same or r["key"] != "llama" else " (llama.cpp computes differently; may differ)"
            print(f"tokens {r['name']} vs {ref['name']}: {'same' if same else 'DIFFER'}{extra}"
                  + ("" if same else f" {r['tokens']} vs {ref['tokens']}"))

    print()
    for x in ("ls", "lsdef"):
        parts = [f"{speedup(x, y):.2f}x {by[y]['name']}" for y in ("offload", "airllm", "llama") if speedup(x, y)]
        if parts:
            print(f"{by[x]['name']} decode is " + ", ".join(parts))
    print()
    targets = []
    for x, lim in (("ls", lim16), ("lsdef", limdef)):
        if lim:
            v = by[x]["decode_s"] / lim
            targets.append((f"{by[x]['name']} decode <= 1.15x its limit", v, v <= 1.15, f"{v:.2f}x"))
    for x, y, goal in (("ls", "offload", 1.3), ("ls", "llama", 1.7), ("ls", "airllm", 2.0),
                       ("lsdef", "llama", 2.0), ("lsdef", "airllm", 3.0)):
        v = speedup(x, y)
        targets.append((f"{system_name(x, a.budget)} >= {goal}x faster than {SYSTEMS[y]}", v,
                        v is not None and v >= goal, f"{v:.2f}x" if v else "not measured"))
    for x in ("ls", "lsdef"):
        r = by.get(x)
        budget = a.budget if x == "ls" else (r or {}).get("ram_budget")
        if r and r.get("peak_rss") and budget is not None:
            targets.append((f"{r['name']} peak RSS <= budget {fmt_b(budget)} + 300 MB", None,
                            r["peak_rss"] <= budget + 300e6,
                            f"{fmt_b(r['peak_rss'])} ({fmt_b(r['peak_rss'] - r['base_rss'])} above the "
                            f"{fmt_b(r['base_rss'])} after imports)"))
    for text, _, ok, shown in targets:
        print(f"target {text}: {shown}" + ("" if shown == "not measured" else f", {'met' if ok else 'MISSED'}"))
    print()
    for r in bw:
        print(f"- disk: {r['readers']} reader(s) {r['gb_s']:.2f} GB/s over {fmt_b(r['bytes'])}")
    for r in results:
        print(f"- {r['name']}: {r.get('note')}; per-token s {r.get('token_s')}; prefill read "
              f"{fmt_b(r.get('read_prefill'))}; wall with setup {r.get('wall_s', 0):.0f} s")
        if r.get("plan"):
            print("    " + r["plan"].replace("\n", "\n    "))
    if not all(r.get("cache_dropped", True) for r in results):
        print("WARNING: the page cache could not be dropped (not root?): figures include cached reads")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"results": results, "bandwidth": bw, "best_bandwidth": best,
                                      "limit_s": lim16, "limit_default_s": limdef, "prep": preps,
                                      "targets": [{"target": t, "value": v, "met": ok} for t, v, ok, _ in targets],
                                      "args": {k: str(v) for k, v in vars(a).items()}}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
