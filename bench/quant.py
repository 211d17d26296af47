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

import json
import pathlib
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from cpuload import child_result  # noqa: E402

WORK = pathlib.Path("/tmp/layerstream-bench")
TEXT = ("The sea is vast and deep. Sailors have crossed it for thousands of years, guided by the stars and by "
        "the wind. Today ships carry most of the goods we use, and scientists study the currents that shape "
        "our climate. ") * 4
SETTINGS = {
    "fp32, fully resident": dict(quant=None, max_ram=None, dtype=None),
    "int4, dequantized once at load (fits as floats)": dict(quant="int4", max_ram=None, dtype=None),
    "int4, packed int4 kernel, bf16 compute (max_ram=300MB)": dict(quant="int4", max_ram="300MB", dtype="bfloat16"),
    "int4, streamed and dequantized per sweep (max_ram=0)": dict(quant="int4", max_ram=0, dtype=None),
}


def child(name: str) -> dict:
    import torch

    from layerstream import AutoModel
    from layerstream.split import embedded_model, resolve

    s = SETTINGS[name]
    ref_store = resolve(embedded_model(), store_path=WORK / "store", progress=False)
    store = resolve(embedded_model(), store_path=WORK / f"store-{s['quant']}", quantize=s["quant"],
                    progress=False) if s["quant"] else ref_store
    m = AutoModel.from_pretrained(store, max_ram=s["max_ram"], dtype=s["dtype"], progress=False)
    tok = m.tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": "Write a short poem about the sea."}],
                                  add_generation_prompt=True, return_tensors="pt")["input_ids"]
    m.generate(ids, max_new_tokens=2, do_sample=False)
    t0 = time.perf_counter()
    m.generate(ids, max_new_tokens=32, do_sample=False)
    tok_s = 32 / (time.perf_counter() - t0)
    text = tok(TEXT, return_tensors="pt")["input_ids"]
    logits = m(text).logits.float()
    m.close()
    ref = AutoModel.from_pretrained(ref_store, progress=False)
    with torch.no_grad():
        want = ref(text).logits.float()
    agree = (logits.argmax(-1) == want.argmax(-1)).float().mean().item()
    kl = torch.nn.functional.kl_div(logits.log_softmax(-1), want.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1).mean().item()
    bytes_ = sum(u.bytes for u in m.store.manifest.units)
    return {"tok_s": tok_s, "agree": agree, "kl": kl, "tokens": text.shape[1], "store_bytes": bytes_,
            "packed": sum(1 for mod in m.model.modules() if hasattr(mod, "_ls_packed"))}


def quantize_speed(threads: int) -> dict:
    import torch

    from layerstream.quantize import dequantize, quantize

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
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        print("RESULT " + json.dumps(child(sys.argv[2])), flush=True)
        return 0
    if len(sys.argv) > 2 and sys.argv[1] == "--speed":
        print("RESULT " + json.dumps(quantize_speed(int(sys.argv[2]))), flush=True)
        return 0
    print(f"{'setting':58s} {'tok/s':>7s} {'store':>9s} {'top-1':>7s} {'KL':>9s}")
    for name in SETTINGS:
        r, tail = child_result([sys.executable, __file__, "--child", name])
        if r is None:
            print(f"{name:58s} failed: {tail}")
            continue
        print(f"{name:58s} {r['tok_s']:7.2f} {r['store_bytes'] / 1e6:7.1f}MB {r['agree']:7.1%} {r['kl']:9.5f}"
              + (f"  ({r['packed']} linear layers on the int4 kernel)" if r["packed"] else ""), flush=True)
    print(f"(top-1 and KL over {r['tokens']} tokens of a fixed text, against the fp32 model)")
    import os

    for threads in sorted({1, os.cpu_count() or 1}):
        r, tail = child_result([sys.executable, __file__, "--speed", str(threads)])
        if r is None:
            print(f"quantize speed, {threads} threads: failed: {tail}")
            continue
        print(f"one 4096x4096 weight, {threads} thread{'s' if threads > 1 else ''}: quantize "
              + ", ".join(f"{k} {r[k]:.2f} s ({4096 * 4096 / r[k] / 1e6:.0f} M weights/s)" for k in ("int8", "int4"))
              + "; dequantize to bf16 " + ", ".join(f"{k} {r[k + ' dequantize'] * 1e3:.1f} ms "
                                                    f"({4096 * 4096 * 2 / r[k + ' dequantize'] / 1e9:.2f} GB/s out)"
                                                    for k in ("int8", "int4")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
