"""Spike (issue 21): median decode step, B sequences of P-token contexts, for the paged prototype
(layerstream/engine/paged.py: per-sequence SDPA, and transformers' own block-diagonal SDPA) and today's Engine.

Run: [RUNS=paged-per-seq,slab-per-seq,...] PYTHONPATH=. python bench/paged_spike.py [cases...]
(cases like 16x64 16x1000; default: 1x64 16x64 1x1000 16x1000)
Each sequence is prefilled alone (for the Engine: alone into its own DynamicCache, then the caches are packed into the
engine's state as its own prefill sweep would have left them, since a 16x1000 joint prefill sweep would score
16,000 x 16,000 pairs); then STEPS decode steps with every sequence in one forward are timed."""

import os
import statistics
import sys
import time

import torch

from layerstream import AutoModel
from layerstream.engine import paged
from layerstream.engine.kv import SlabStep
from layerstream.engine.scheduler import Engine, SamplingParams
from layerstream.engine.step import forward, new_cache

STEPS = 5
WHICH = os.environ.get("RUNS", "paged-per-seq,slab-per-seq,paged-tf-sdpa,engine").split(",")


def prompts_for(b, p, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(100, vocab - 100, (p,), generator=g).tolist() for _ in range(b)]


def time_paged(m, prompts, attn):
    if attn == "slab":
        r = SlabStep(m)
        for i, p in enumerate(prompts):   # reserved up front, as the engine knows prompt + max_tokens
            r.kv.reserve(f"s{i}", len(p) + STEPS + 8)
    else:
        r = paged.PagedRunner(m, num_blocks=sum(len(p) for p in prompts) // 64 + 2 * len(prompts) + 4,
                              page_size=64, max_batch_tokens=2048, attn=attn)
    toks = {}
    for i, p in enumerate(prompts):
        toks[f"s{i}"] = int(r.step([(f"s{i}", p)])[0].argmax())
    times = []
    for _ in range(STEPS + 1):
        t0 = time.perf_counter()
        lg = r.step([(s, [t]) for s, t in toks.items()])
        times.append(time.perf_counter() - t0)
        toks = dict(zip(toks, lg.argmax(-1).tolist()))
    m.model.set_attn_implementation("sdpa")
    return statistics.median(times[1:])


def time_engine(m, prompts):
    """The engine's shared masked cache (its path before slabs, kept for families that cannot page)."""
    eng = Engine(m, max_batch=len(prompts), prefix_cache=0, paged=False)
    eng.eos = set()
    hs = [eng.submit(p, SamplingParams(max_tokens=STEPS + 8)) for p in prompts]
    caches, firsts = [], []
    for p in prompts:   # each prompt's own prefill, as the engine's joint sweep would compute it
        c = new_cache(m)
        firsts.append(int(forward(m, torch.tensor([p]), c)[0].argmax()))
        caches.append(c)
    packed = new_cache(m)
    for li, layer in enumerate(packed.layers):
        layer.update(torch.cat([c.layers[li].keys for c in caches], -2),
                     torch.cat([c.layers[li].values for c in caches], -2))
    seqs = list(eng.sched.waiting)
    eng.sched.waiting.clear()
    mc = eng.cache   # the MaskedCache: its DynamicCache and each column's sequence and position
    mc.cache = packed
    mc.owner = torch.cat([torch.full((len(s.prompt),), s.slot) for s in seqs])
    mc.pos = torch.cat([torch.arange(len(s.prompt)) for s in seqs])
    for s, t in zip(seqs, firsts):
        s.real, s.tokens = len(s.prompt), [t]
    eng.sched.active = seqs
    del hs
    return decode_steps(eng, len(prompts))


def decode_steps(eng, rows: int) -> float:
    """The median of STEPS decode steps of an engine whose `rows` sequences are all running (one warm-up first)."""
    times = []
    for _ in range(STEPS + 1):
        t0 = time.perf_counter()
        eng.step()
        times.append(time.perf_counter() - t0)
    assert len(eng.sched.active) == rows, "a sequence finished during the timed steps"
    return statistics.median(times[1:])


def main():
    cases = sys.argv[1:] or ["1x64", "16x64", "1x1000", "16x1000"]
    m = AutoModel.from_pretrained(None, progress=False)
    vocab = m.config.get_text_config().vocab_size
    print(f"threads {torch.get_num_threads()} (model: {m.threads}); median of {STEPS} decode steps, seconds")
    for case in cases:
        b, p = map(int, case.split("x"))
        ps = prompts_for(b, p, vocab)
        runs = {"paged-per-seq": lambda: time_paged(m, ps, paged.PAGED),
                "slab-per-seq": lambda: time_paged(m, ps, "slab"),
                "paged-tf-sdpa": lambda: time_paged(m, ps, "sdpa"), "engine": lambda: time_engine(m, ps)}
        row = {k: f() for k, f in runs.items() if k in WHICH}
        print(case, "  ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)


if __name__ == "__main__":
    main()
