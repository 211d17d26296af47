"""The engine's decode step against batch x context (issue 21): B requests of P-token prompts, median decode step
(every sequence one token, one sweep), for the engine's two KV paths:

- slabs: each sequence's own KV (engine/kv.py), each row attending its own columns: the default of paged families;
- masked: one shared cache of every sequence's columns, a [new tokens, all columns] mask (the engine before slabs,
  kept for families that cannot page). Its sequences are prefilled one by one and packed into the engine's state as
  its own joint prefill sweep would leave them (a 16 x 1,000 joint sweep would score 16,000 x 16,000 pairs).

Run: PYTHONPATH=. .venv/bin/python bench/engine_kv.py [cases...]   (default: 1x64 16x64 1x1000 16x1000)
Embedded SmolLM2-135M (its GGUF, resident). The targets: the 16x1000 step <= 2x the 16x64 step, and aggregate
tok/s at 16x1000 >= 8x that at 1x1000."""

import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from paged_spike import STEPS, decode_steps, prompts_for, time_engine  # noqa: I001

from layerstream import AutoModel
from layerstream.engine.scheduler import Engine, SamplingParams


def time_slabs(m, prompts):
    eng = Engine(m, max_batch=len(prompts), prefix_cache=0, paged=True)
    eng.eos = set()
    hs = [eng.submit(p, SamplingParams(max_tokens=STEPS + 8)) for p in prompts]
    t0 = time.perf_counter()
    eng.step()   # every prompt prefilled in one sweep: each attends its own slab, so this is linear too
    prefill = time.perf_counter() - t0
    del hs
    return decode_steps(eng, len(prompts)), prefill


def main():
    cases = sys.argv[1:] or ["1x64", "16x64", "1x1000", "16x1000"]
    m = AutoModel.from_pretrained(None, progress=False)
    vocab = m.config.get_text_config().vocab_size
    print(f"embedded model, threads {torch.get_num_threads()}; median of {STEPS} decode steps (seconds), "
          f"tok/s = B / step")
    steps = {}
    for case in cases:
        b, p = map(int, case.split("x"))
        ps = prompts_for(b, p, vocab)
        slab, prefill = time_slabs(m, ps)
        masked = time_engine(m, ps)
        steps[case] = (slab, masked)
        print(f"{case:>8}  slabs {slab:.3f} s ({b / slab:6.1f} tok/s; joint prefill {prefill:.1f} s)   "
              f"masked {masked:.3f} s ({b / masked:6.1f} tok/s)   masked/slabs {masked / slab:.2f}x", flush=True)
    for name, i in (("slabs", 0), ("masked", 1)):
        if "16x1000" in steps and "16x64" in steps:
            print(f"{name}: step 16x1000 / 16x64 = {steps['16x1000'][i] / steps['16x64'][i]:.2f}x (target <= 2x)")
        if "16x1000" in steps and "1x1000" in steps:
            agg = (16 / steps["16x1000"][i]) / (1 / steps["1x1000"][i])
            print(f"{name}: tok/s 16x1000 / 1x1000 = {agg:.2f}x (target >= 8x)")


if __name__ == "__main__":
    main()
