"""Quantized stores on the embedded model: speed and agreement with the float model, in one run.

SmolLM2-135M-Instruct: the fp32 store and the int4 store made from the same GGUF (its Q4_1 blocks kept
exactly). For each setting: greedy tokens/s (32 new tokens after a 2-token warm-up, chat prompt) and,
over a fixed text (teacher forcing), top-1 next-token agreement and mean KL(float || setting) against the
fp32 float model. Each setting in its own subprocess. Then the time `quantize` takes on one random
4096x4096 float32 weight (the shape of a 7B model's attention projections; normal(0, 0.02)), int8 and
int4, and the time `dequantize` takes to turn it back into bfloat16 (what the loader does per unit when
a quantized store streams), with one torch thread and with all of them, best of 3.

Run:  .venv/bin/python bench/quant.py
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

import harness

WORK = pathlib.Path("/tmp/layerstream-bench")
SETTINGS = {
    "fp32, fully resident": dict(quant=None, max_ram=None, dtype=None),
    "int4, dequantized once at load (fits as floats)": dict(quant="int4", max_ram=None, dtype=None),
    "int4, packed int4 kernel, bf16 compute (max_ram=300MB)": dict(quant="int4", max_ram="300MB", dtype="bfloat16"),
    "int4, streamed and dequantized per sweep (max_ram=0)": dict(quant="int4", max_ram=0, dtype=None),
}


def child(name: str) -> dict:
    import torch

    from layerstream import AutoModel
    from layerstream.quant import Int4PackedLinear
    from layerstream.sources import embedded_model
    from layerstream.store import resolve

    from peers import TEXT, prompt_ids

    s = SETTINGS[name]
    ref_store = resolve(embedded_model(), store_path=WORK / "store", progress=False)
    store = resolve(embedded_model(), store_path=WORK / f"store-{s['quant']}", quantize=s["quant"],
                    progress=False) if s["quant"] else ref_store
    m = AutoModel.from_pretrained(store, max_ram=s["max_ram"], dtype=s["dtype"], progress=False)
    tokens, seconds = harness.timed_generate(m, prompt_ids(m.tokenizer), 32)
    text = m.tokenizer(TEXT, return_tensors="pt")["input_ids"]
    logits = m(text).logits.float()
    m.close()
    ref = AutoModel.from_pretrained(ref_store, progress=False)
    with torch.no_grad():
        want = ref(text).logits.float()
    agree = (logits.argmax(-1) == want.argmax(-1)).float().mean().item()
    kl = torch.nn.functional.kl_div(logits.log_softmax(-1), want.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1).mean().item()
    return {"tok_s": len(tokens) / seconds, "agree": agree, "kl": kl, "tokens": text.shape[1],
            "store_bytes": sum(u.bytes for u in m.store.manifest.units),
            "packed": sum(isinstance(mod, Int4PackedLinear) for mod in m.model.modules())}


def quantize_speed(threads: int) -> dict:
    import time

    import torch

    from layerstream.quant import dequantize, quantize

    torch.set_num_threads(threads)
    w = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0)) * 0.02
    out = {}
    for kind in ("int8", "int4"):
        best = best_d = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            parts = quantize(w, kind)
            best = min(best, time.perf_counter() - t0)
        dest = torch.empty(w.shape, dtype=torch.bfloat16)
        for _ in range(3):
            t0 = time.perf_counter()
            dequantize("uint8" if kind == "int8" else kind, parts, torch.bfloat16, out=dest)
            best_d = min(best_d, time.perf_counter() - t0)
        out[kind] = best
        out[kind + " dequantize"] = best_d
    return out


def main() -> int:
    p = harness.parser(__doc__, wait_quiet=60.0)
    p.add_argument("--child", choices=list(SETTINGS), help=argparse.SUPPRESS)
    p.add_argument("--speed", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child or a.speed:
        harness.emit(child(a.child) if a.child else quantize_speed(a.speed))
        return 0
    rows, tokens = [], None
    for name in SETTINGS:
        c = harness.run_child(harness.self_cmd(__file__, "--child", name), wait_quiet=a.wait_quiet)
        r = c.result
        print(f"  {name}: " + (f"{r['tok_s']:.2f} tok/s" if r else f"failed: {c.note}"), flush=True)
        if r is None:
            rows.append([name, "failed", "-", "-", "-", "-"])
            continue
        tokens = r["tokens"]
        rows.append([name, f"{r['tok_s']:.2f}", f"{r['store_bytes'] / 1e6:.1f} MB", f"{r['agree']:.1%}",
                     f"{r['kl']:.5f}", r["packed"] or "-"])
    print()
    harness.table(["setting", "tok/s", "store", "top-1", "KL", "linear layers on the int4 kernel"], rows)
    print(f"(top-1 and KL over {tokens} tokens of a fixed text, against the fp32 model)")
    for threads in sorted({1, os.cpu_count() or 1}):
        c = harness.run_child(harness.self_cmd(__file__, "--speed", threads), wait_quiet=a.wait_quiet)
        r = c.result
        if r is None:
            print(f"quantize speed, {threads} threads: failed: {c.note}")
            continue
        print(f"one 4096x4096 weight, {threads} thread{'s' if threads > 1 else ''}: quantize "
              + ", ".join(f"{k} {r[k]:.2f} s ({4096 * 4096 / r[k] / 1e6:.0f} M weights/s)" for k in ("int8", "int4"))
              + "; dequantize to bf16 " + ", ".join(f"{k} {r[k + ' dequantize'] * 1e3:.1f} ms "
                                                    f"({4096 * 4096 * 2 / r[k + ' dequantize'] / 1e9:.2f} GB/s out)"
                                                    for k in ("int8", "int4")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
