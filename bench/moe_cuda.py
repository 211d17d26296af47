"""A MoE model bigger than the GPU budget, on one GPU: experts computed by the CPU in RAM, or copied over PCIe.

The model: bench/moe.py's random-weight Qwen3-MoE-shaped checkpoint (bf16, one tensor per expert as on the hub),
here by default 24 layers x 64 experts (8 per token), hidden 2048, expert width 768: about 15 GB, served in
place. Each system in its own process, greedy, ``-n`` new tokens after bench/moe.py's 8-token prompt, at each
batch of ``--batches`` (the prompt repeated); seconds per decode step (the GPU synchronized at each), time to
the first token, peak GPU memory, tokens against transformers':
  hf        transformers, the whole model on the GPU (the reference tokens; skipped with --skip hf if it does not fit)
  ls-cpu    layerstream, max_gpu_memory=--budget, expert_device="cpu": the dense part on the GPU, the experts in
            RAM computed by the CPU where they lie (llama.cpp's --override-tensor exps=CPU)
  ls-pcie   layerstream, max_gpu_memory=--budget: the experts in pinned RAM, the routed ones copied to the GPU
  accel     transformers + Accelerate, device_map="auto", max_memory={0: --budget, "cpu": 80% of RAM}
Needs an NVIDIA GPU; without one it says so and stops. Not yet run on a GPU.

Run:  python bench/moe_cuda.py [--budget 4GB] [--batches 1 16] [-n 8] [--layers 24 --experts 64 --topk 8
                               --hidden 2048 --expert-width 768] [--json bench/out/moe_cuda.json]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time
from collections import Counter

import harness
import moe
from harness import fmt, fmt_b

SYSTEMS = {"hf": "transformers, whole model on the GPU",
           "ls-cpu": "layerstream max_gpu_memory=BUDGET, experts on the CPU",
           "ls-pcie": "layerstream max_gpu_memory=BUDGET, experts copied over PCIe",
           "accel": "Accelerate device_map=auto, max_memory BUDGET"}


def child(key: str, a) -> dict:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    ckpt = moe.make(a)
    ids = torch.tensor([moe.PROMPT] * a.batch, device="cuda")
    r = {"key": key, "batch": a.batch}
    t0 = time.perf_counter()
    gen = {"attention_mask": torch.ones_like(ids), "pad_token_id": 2}
    if key.startswith("ls"):
        from layerstream import AutoModel

        model = AutoModel.from_pretrained(str(ckpt), device="cuda", max_gpu_memory=a.budget, progress=False,
                                          store_path=str(moe.WORK / "store-cuda"),
                                          expert_device="cpu" if key == "ls-cpu" else None)
        r["plan"] = model.plan.describe()
        r["note"] = f"compute threads {model.threads}"
    else:
        from transformers import AutoModelForCausalLM

        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        place = {"device_map": "cuda"} if key == "hf" else \
            {"device_map": "auto", "max_memory": {0: a.budget, "cpu": int(ram * 0.8)}}
        model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.bfloat16, **place).eval()
        r["note"] = f"hf_device_map {dict(Counter(map(str, getattr(model, 'hf_device_map', {}).values())))}"
    r["setup_s"] = time.perf_counter() - t0
    out, first, decode = harness.stamped_generate(model, ids, a.new_tokens, **gen)
    r.update(first_s=first, decode_s=decode,
             tokens=out[:, ids.shape[1]:].tolist(), peak_gpu=torch.cuda.max_memory_allocated())
    return r


def main(argv=None) -> int:
    p = harness.parser(__doc__, wait_quiet=30.0)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--expert-width", type=int, default=768)
    p.add_argument("--budget", type=harness.size_arg, default="4GB", help="max_gpu_memory (default 4GB)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("-n", "--new-tokens", type=int, default=8)
    p.add_argument("--skip", action="append", default=[], choices=list(SYSTEMS))
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--json", type=pathlib.Path)
    p.add_argument("--child", choices=list(SYSTEMS), help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.new_tokens < 2:
        p.error("-n must be at least 2 (decode time needs a second token)")
    if a.child:
        harness.emit(child(a.child, a))
        return 0
    if a.check:
        import torch

        harness.emit({"cuda": torch.cuda.is_available(), "torch": torch.__version__})
        return 0
    c = harness.run_child(harness.self_cmd(__file__, "--check"))
    if not (c.result or {}).get("cuda"):
        sys.exit(f"moe_cuda.py: error: torch {(c.result or {}).get('torch', '?')} sees no CUDA device: this benchmark "
                 f"measures the GPU path; run it on a machine with an NVIDIA GPU")
    moe.WORK.mkdir(parents=True, exist_ok=True)
    harness.run_child(harness.self_cmd(__file__, *_shape(a), "--child", "ls-cpu", "--batch", 1, "-n", 2),
                      show_stderr=True)   # writes the checkpoint and the in-place index once, untimed
    name = {k: v.replace("BUDGET", fmt_b(a.budget).replace(" ", "")) for k, v in SYSTEMS.items()}
    results = []
    for b in sorted(set(a.batches)):
        for key in (k for k in SYSTEMS if k not in a.skip):
            c = harness.run_child(harness.self_cmd(__file__, *_shape(a), "--budget", a.budget, "-n", a.new_tokens,
                                                   "--child", key, "--batch", b),
                                  timeout=a.timeout, wait_quiet=a.wait_quiet)
            r = c.result or {"key": key, "batch": b, "note": f"failed: {c.note}"}
            r.update(peak_rss=c.peak_rss if c.result else None, others=c.others)
            results.append(r)
            print(f"  {key} batch {b}: " + (f"{r['decode_s']:.3f} s/step" if r.get("decode_s") else r["note"]),
                  flush=True)
    for b in sorted(set(a.batches)):
        ref = next((r for r in results if r["batch"] == b and r["key"] == "hf" and r.get("tokens")), None)
        rows = []
        for r in (r for r in results if r["batch"] == b):
            if not r.get("decode_s"):
                rows.append([name[r["key"]] + " (failed)"] + ["-"] * 6)
                continue
            same = "-" if ref is None or r is ref else ("same" if r["tokens"] == ref["tokens"] else "DIFFER")
            rows.append([name[r["key"]], fmt(r["setup_s"], ".1f"), fmt(r["first_s"], ".2f"), f"{r['decode_s']:.3f}",
                         fmt(b / r["decode_s"], ".1f"), fmt_b(r.get("peak_gpu")), same])
        print(f"\nbatch {b}:")
        harness.table(["system", "setup s", "1st tok s", "s/step", "tok/s", "peak GPU", "tokens vs hf"], rows)
    for r in results:
        print(f"- {r['key']} batch {r['batch']}: {r.get('note')}; peak RSS {fmt_b(r.get('peak_rss'))}")
        if r.get("plan") and r["batch"] == min(a.batches):
            print("    " + r["plan"].replace("\n", "\n    "))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"results": results, "args": {k: str(v) for k, v in vars(a).items()}}, indent=2))
    return 0


def _shape(a) -> list:
    return ["--layers", a.layers, "--experts", a.experts, "--topk", a.topk, "--hidden", a.hidden,
            "--expert-width", a.expert_width]


if __name__ == "__main__":
    sys.exit(main())
