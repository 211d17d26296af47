"""The GPU path against its peers on one GPU: a Llama-3-8B-shaped model, batch 1 and 64, in one run.

The model: random weights (N(0, 0.02), bf16), Llama-3-8B's shape (hidden 4096, intermediate 14336, 32 heads,
8 KV heads, 32 layers) with the embedded SmolLM2's tokenizer (vocab 49152), untied: about 14.8 GB, written
once into ``--dir`` by bench/big_model.py's writer (one decoder layer per shard; resumable) with ``--make``.

Then, in the same run:
  1. the host-to-device link: a ``--probe-bytes`` copy from pinned and from pageable host memory, best of 5;
     the store's read bandwidth as `layerstream plan` measures it (O_DIRECT, 4 readers) and through the page
     cache (4 readers; the checkpoint was read just before by the in-place index, so it is cached where it fits);
  2. every system in its own fresh process, greedy, ``-n`` new tokens after seeded prompts of 8 token ids (the
     same in every process), at each batch of ``--batches``: setup (load) time, time to the first token,
     seconds per decode step = (time of step n - time of step 1) / (n - 1) (the GPU synchronized at each step),
     peak GPU memory (torch.cuda.max_memory_allocated), bytes over PCIe per step:
       hf        transformers, the whole model on the GPU (device_map="cuda")
       ls        layerstream, default budget (free GPU memory minus 1 GB: all of it on the GPU)
       ls-ram    layerstream, max_gpu_memory=--budget (3GB), the rest resident in pinned RAM
       ls-disk   layerstream, max_gpu_memory=--budget, max_ram=0 (every streamed layer read each step)
       accel     transformers + Accelerate, device_map="auto", max_memory={0: --budget, "cpu": 80% of RAM}
       airllm    AirLLM on cuda:0 (batch 1 only; when installed)
     layerstream's in-place index (a checksum of the model, once) and AirLLM's split are made before, untimed;
  3. a table per batch. "PCIe limit" is the least time a step can take moving those bytes at the pinned
     bandwidth (ls-disk: or reading them, at the read bandwidth of the mode it chose, if that is slower);
     "x PCIe limit" = limit / s per step, the share of the link's speed a system reaches (1.00 = at the
     link's speed). Targets (issue 14): ls-ram >= 0.9x, ls-disk >= 0.7x. "same tokens": equal to hf's at
     the same batch (batched bf16 math may differ in the last places).

Needs an NVIDIA GPU (torch.cuda); without one it says so and stops. Nothing here has been measured on a CPU.

Run:  python bench/cuda.py --make [--dir /tmp/layerstream-cuda] [--budget 3GB] [--batches 1 64] [-n 6]
                           [--json bench/out/cuda.json]
Small-scale check of the machinery:  python bench/cuda.py --make --layers 2 --dir /tmp/cudasmall --budget 1GB
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import sys
import time
from collections import Counter

import big_model
import harness
from harness import fmt, fmt_b

SYSTEMS = {"hf": "transformers, whole model on the GPU", "ls": "layerstream, default budget",
           "ls-ram": "layerstream max_gpu_memory=BUDGET, rest in RAM",
           "ls-disk": "layerstream max_gpu_memory=BUDGET, max_ram=0",
           "accel": "Accelerate device_map=auto, max_memory BUDGET", "airllm": "AirLLM"}
PROMPT_LEN = 8
_BIG_CONFIG = big_model.model_config


def llama3_config(layers: int) -> dict:
    """Llama-3-8B's shape, bench/big_model.py's vocabulary (its tokenizer) and conventions."""
    return {**_BIG_CONFIG(layers), "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 8192,
            "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}}


def make(d: pathlib.Path, layers: int) -> None:
    big_model.model_config = llama3_config   # big_model's resumable writer, with this shape
    big_model.make(d, layers, gguf=False, gguf_type="bf16")


def prompts(batch: int) -> list[list[int]]:
    """`batch` distinct prompts of PROMPT_LEN token ids, the same in every process."""
    import torch

    g = torch.Generator().manual_seed(20240)
    return torch.randint(1000, 40000, (batch, PROMPT_LEN), generator=g).tolist()


def no_cuda() -> str | None:
    """Why this machine cannot run the benchmark (None: it can)."""
    import torch

    if not torch.cuda.is_available():
        return (f"torch {torch.__version__} sees no CUDA device (torch.cuda.is_available() is False): this "
                f"benchmark measures the GPU path; run it on a machine with an NVIDIA GPU")
    return None


# ---------------------------------------------------------------------------- children

def probe_link(a) -> dict:
    """Host-to-device copy bandwidth from pinned and from pageable memory (bytes/s, best of 5)."""
    import torch

    why = no_cuda()
    if why:
        return {"cuda": False, "why": why}
    n = a.probe_bytes
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    out = {"cuda": True, "gpu": torch.cuda.get_device_name(),
           "gpu_bytes": torch.cuda.get_device_properties(0).total_memory}
    for kind, pin in (("pinned", True), ("pageable", False)):
        host = torch.ones(n, dtype=torch.uint8).pin_memory() if pin else torch.ones(n, dtype=torch.uint8)
        best = float("inf")
        for _ in range(5):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            dev.copy_(host, non_blocking=pin)
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        out[kind] = n / best
        del host
    return out


def probe_read(a) -> dict:
    """The store's read bandwidth: as `layerstream plan` measures it (O_DIRECT), and through the page cache."""
    from layerstream.plan import measure_read_bandwidth
    from layerstream.store import Store

    store = Store(a.dir / "ls-store")
    return {"direct": measure_read_bandwidth(store, direct=True, readers=4),
            "buffered": measure_read_bandwidth(store, direct=False, readers=4)}


def prep(what: str, a) -> dict:
    """Untimed one-time preparation, each in its own process."""
    if what == "ls":
        return harness.prep_store(a.dir)
    t0 = time.perf_counter()
    import airllm
    import torch

    airllm.AutoModel.from_pretrained(str(a.dir), device="cuda:0", dtype=torch.bfloat16)
    return {"what": "airllm split", "seconds": time.perf_counter() - t0}


def child(key: str, a) -> dict:
    import torch

    why = no_cuda()
    if why:
        raise SystemExit(why)
    __import__({"hf": "transformers", "accel": "accelerate", "airllm": "airllm"}.get(key, "layerstream"))
    d, B = a.dir, a.batch
    ids = torch.tensor(prompts(B), device="cuda")
    r = {"key": key, "batch": B, "base_rss": harness.rss_now(), "threads": torch.get_num_threads()}
    t0 = time.perf_counter()
    gen = {"attention_mask": torch.ones_like(ids), "pad_token_id": 2}
    if key.startswith("ls"):
        from layerstream import AutoModel

        budget = {"ls": {}, "ls-ram": {"max_gpu_memory": a.budget},
                  "ls-disk": {"max_gpu_memory": a.budget, "max_ram": 0}}[key]
        model = AutoModel.from_pretrained(str(d), device="cuda", store_path=str(d / "ls-store"), progress=False,
                                          **budget)
        plan = model.plan
        r.update(pcie_bytes=sum(plan.unit_bytes[n] for u in plan.streamed for n in plan.parts(u)
                                if plan.tier(n) != plan.compute_tier),
                 disk_bytes=plan.bytes_per_sweep, direct=model.direct, plan=plan.describe())
        r["note"] = f"O_DIRECT={model.direct}; {fmt_b(plan.bytes_per_sweep)} read from disk per step"
    elif key in ("hf", "accel"):
        from transformers import AutoModelForCausalLM

        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        place = {"device_map": "cuda"} if key == "hf" else \
            {"device_map": "auto", "max_memory": {0: a.budget, "cpu": int(ram * 0.8)}}
        model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16, **place).eval()
        r["pcie_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type != "cuda")
        r["note"] = f"hf_device_map {dict(Counter(map(str, getattr(model, 'hf_device_map', {}).values())))}"
    else:
        import airllm

        model = airllm.AutoModel.from_pretrained(str(d), device="cuda:0", dtype=torch.bfloat16)
        r["pcie_bytes"] = sum(f.stat().st_size for f in d.glob("model-*.safetensors"))   # every layer, every step
        gen = {"use_cache": True, "return_dict_in_generate": True}
        r["note"] = "device cuda:0, prefetching on"
    r["setup_s"] = time.perf_counter() - t0
    out, first, decode = harness.stamped_generate(model, ids, a.new_tokens, **gen)
    r.update(first_s=first, decode_s=decode,
             tokens=out[:, ids.shape[1]:].tolist(), peak_gpu=torch.cuda.max_memory_allocated(),
             peak_gpu_reserved=torch.cuda.max_memory_reserved())
    return r


# ---------------------------------------------------------------------------- parent

def _cmd(a, *extra) -> list[str]:
    return harness.self_cmd(__file__, "--dir", a.dir, "--layers", a.layers, "--budget", a.budget, "-n", a.new_tokens,
                            "--probe-bytes", a.probe_bytes, *extra)


def main(argv=None) -> int:
    p = harness.parser(__doc__, wait_quiet=30.0)
    p.add_argument("--dir", type=pathlib.Path, default=pathlib.Path("/tmp/layerstream-cuda"))
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--make", action="store_true", help="write the model if not complete, then run")
    p.add_argument("--budget", type=harness.size_arg, default="3GB",
                   help="max_gpu_memory of ls-ram and ls-disk, Accelerate's GPU max_memory (default 3GB = 3e9 bytes)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("-n", "--new-tokens", type=int, default=6)
    p.add_argument("--skip", action="append", default=[], choices=list(SYSTEMS))
    p.add_argument("--probe-bytes", type=harness.size_arg, default="1GiB", help="bytes of each PCIe probe copy")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed to each system (default 1800)")
    p.add_argument("--json", type=pathlib.Path)
    p.add_argument("--child", choices=list(SYSTEMS), help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--prep", choices=["ls", "airllm"], help=argparse.SUPPRESS)
    p.add_argument("--probe", choices=["link", "read"], help=argparse.SUPPRESS)
    p.add_argument("--write-model", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.new_tokens < 2:
        p.error("-n must be at least 2 (decode time needs a second token)")
    if a.write_model:
        make(a.dir, a.layers)
        return 0
    if a.child:
        harness.emit(child(a.child, a))
        return 0
    if a.prep or a.probe:
        harness.emit(prep(a.prep, a) if a.prep else (probe_link(a) if a.probe == "link" else probe_read(a)))
        return 0

    c = harness.run_child(_cmd(a, "--probe", "link"))
    link = c.result
    if link is None:
        sys.exit(f"cuda.py: error: the PCIe probe failed: {c.note}")
    if not link["cuda"]:
        sys.exit(f"cuda.py: error: {link['why']}")
    print(f"{link['gpu']} ({fmt_b(link['gpu_bytes'])}): host to device {link['pinned'] / 1e9:.1f} GB/s pinned, "
          f"{link['pageable'] / 1e9:.1f} GB/s pageable ({fmt_b(a.probe_bytes)} copies, best of 5)", flush=True)
    if a.make:
        c = harness.run_child(_cmd(a, "--write-model"), show_stderr=True)
        if c.returncode:
            sys.exit(f"cuda.py: error: writing the model failed: {c.note}")
    if big_model.checkpoint_complete(a.dir, a.layers) is None:
        sys.exit(f"cuda.py: error: no complete {a.layers}-layer model in {a.dir}; run with --make first")
    systems = [k for k in SYSTEMS if k not in a.skip]
    if "airllm" in systems and importlib.util.find_spec("airllm") is None:
        print("AirLLM skipped: airllm is not installed", flush=True)
        systems.remove("airllm")
    preps = {}
    for what in ["ls"] + (["airllm"] if "airllm" in systems else []):
        c = harness.run_child(_cmd(a, "--prep", what), show_stderr=True)
        preps[what] = c.result or {"failed": c.note}
        print(f"prep {what}: {c.wall:.0f} s {preps[what]}", flush=True)
    c = harness.run_child(_cmd(a, "--probe", "read"))
    read = c.result or {}
    print(f"store read bandwidth: {fmt(read.get('direct', 0) / 1e9)} GB/s O_DIRECT (as `layerstream plan`), "
          f"{fmt(read.get('buffered', 0) / 1e9)} GB/s through the page cache; 4 readers", flush=True)
    logdir = a.dir / "bench-logs"
    logdir.mkdir(exist_ok=True)
    results = []
    for b in sorted(set(a.batches)):
        for key in systems:
            if key == "airllm" and b > 1:
                continue
            print(f"running {key} batch {b} ...", flush=True)
            c = harness.run_child(_cmd(a, "--child", key, "--batch", b), timeout=a.timeout, wait_quiet=a.wait_quiet,
                                  log=logdir / f"cuda-{key}-{b}.log")
            r = c.result or {"key": key, "batch": b, "note": f"failed: {c.note}; log {logdir / f'cuda-{key}-{b}.log'}"}
            r.update(others=c.others, peak_rss=c.peak_rss if c.result else None, wall_s=c.wall)
            results.append(r)
            print(f"  {key}: " + (f"{r['decode_s']:.3f} s/step" if r.get("decode_s") else r["note"]), flush=True)
    report(a, link, read, results)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"link": link, "read": read, "prep": preps, "results": results,
                                      "args": {k: str(v) for k, v in vars(a).items()}}, indent=2))
    return 0


def limit_s(r: dict, link: dict, read: dict) -> float | None:
    """The least time a step can take moving its bytes over PCIe (pinned), or reading them (ls-disk)."""
    if not r.get("pcie_bytes"):
        return None
    lim = r["pcie_bytes"] / link["pinned"]
    bw = read.get("direct" if r.get("direct") else "buffered")
    if r.get("disk_bytes") and bw:
        lim = max(lim, r["disk_bytes"] / bw)
    return lim


def report(a, link: dict, read: dict, results: list[dict]) -> None:
    name = {k: v.replace("BUDGET", fmt_b(a.budget).replace(" ", "")) for k, v in SYSTEMS.items()}
    info = big_model.checkpoint_complete(a.dir) or {}
    print(f"\n{a.layers}-layer Llama-3-8B-shaped bf16 model ({fmt_b(info.get('bytes'))}), {link['gpu']}, greedy, "
          f"{a.new_tokens} new tokens after {PROMPT_LEN}-token prompts; PCIe host to device {link['pinned'] / 1e9:.1f} "
          f"GB/s pinned, {link['pageable'] / 1e9:.1f} GB/s pageable")
    for b in sorted({r["batch"] for r in results}):
        rows, ref = [], next((r for r in results if r["batch"] == b and r["key"] == "hf" and r.get("tokens")), None)
        for r in (r for r in results if r["batch"] == b):
            if not r.get("decode_s"):
                rows.append([name[r["key"]] + " (failed)"] + ["-"] * 9)
                continue
            lim = limit_s(r, link, read)
            same = "-" if ref is None or r is ref else ("same" if r["tokens"] == ref["tokens"] else "DIFFER")
            rows.append([name[r["key"]], fmt(r["setup_s"], ".1f"), fmt(r["first_s"], ".2f"), f"{r['decode_s']:.3f}",
                         fmt(b / r["decode_s"], ".1f"), fmt_b(r.get("pcie_bytes")), fmt(lim, ".3f"),
                         harness.ratio(lim, r["decode_s"]), fmt_b(r.get("peak_gpu")), same])
        print(f"\nbatch {b}:")
        harness.table(["system", "setup s", "1st tok s", "s/step", "tok/s", "PCIe/step", "PCIe limit s",
                       "x PCIe limit", "peak GPU", "tokens vs hf"], rows)
    by = {(r["key"], r["batch"]): r for r in results if r.get("decode_s")}
    print()
    for key, goal in (("ls-ram", 0.9), ("ls-disk", 0.7)):
        for b in sorted(set(a.batches)):
            r = by.get((key, b))
            lim = limit_s(r, link, read) if r else None
            if lim:
                v = lim / r["decode_s"]
                print(f"target {name[key]} batch {b} >= {goal}x the PCIe limit: {v:.2f}x, "
                      f"{'met' if v >= goal else 'MISSED'}")
    for r in results:
        print(f"- {r['key']} batch {r['batch']}: {r.get('note')}; peak RSS {fmt_b(r.get('peak_rss'))}; peak GPU "
              f"reserved {fmt_b(r.get('peak_gpu_reserved'))}; others {fmt(r.get('others'))} cores")
        if r.get("plan") and r["batch"] == min(a.batches):
            print("    " + r["plan"].replace("\n", "\n    "))


if __name__ == "__main__":
    sys.exit(main())
