"""Computing on a GGUF's blocks with bfloat16 activations on this CPU, per block type: dequantizing a weight
as it loads then a bf16 matmul (what a streamed or tight-budget unit does), a bf16 matmul on weights already
dequantized (a unit that fits as floats), and torch's int4 kernel on the blocks repacked once at load (Q4_0,
Q4_1, Q4_K: `layerstream.quant.as_int4` + `Int4PackedLinear`). Milliseconds per call, median of --reps, at
batch 1 (decode) and 8.

    .venv/bin/python bench/gguf_kernels.py [--reps 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from layerstream.quant import GGML, Int4PackedLinear, as_int4, dequantize, kernels  # noqa: E402

from gguf_tiny import random_blocks  # noqa: E402  (random blocks of a GGUF type, scales of a sane size)

SHAPES = {"SmolLM2 mlp (1536 x 576)": (1536, 576), "8B attention (4096 x 4096)": (4096, 4096),
          "8B mlp (14336 x 4096)": (14336, 4096)}
KINDS = ["q4_0", "q4_1", "q4_k", "q5_k", "q6_k", "q8_0"]


def ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ms per call (median of {a.reps})")
    print("| weight | type | batch | dequantize + bf16 matmul | bf16 matmul, dequantized once "
          "| int4 kernel, repacked | fp32 matmul, dequantized once | ggml on the blocks (fp32) |")
    print("|---|---|---|---|---|---|---|---|")
    for label in a.shapes:
        rows, cols = SHAPES[label]
        for kind in KINDS:
            if cols % GGML[kind][0]:
                continue   # (llama.cpp falls back to a 32-wide type there)
            raw = torch.from_numpy(random_blocks(rows, cols, kind.upper(), rng).copy())
            parts = {"." + kind: raw}
            w = dequantize(kind, parts, torch.bfloat16)
            w32 = w.float()
            blk = kernels.BlockLinear(cols, rows, kind) if kernels.available() else None
            if blk is not None:
                blk.bind(raw)
            lin = nn.Linear(cols, rows, bias=False)
            packed = as_int4(kind, raw)
            mod = Int4PackedLinear.from_blocks(lin, packed, torch.bfloat16) if packed is not None else None
            for batch in (1, 8, 16):
                x = torch.randn(batch, cols, dtype=torch.bfloat16)
                x32 = x.float()
                deq = ms(lambda: x @ dequantize(kind, parts, torch.bfloat16).T, a.reps)
                dense = ms(lambda: x @ w.T, a.reps)
                kern = f"{ms(lambda: mod(x), a.reps):.2f}" if mod is not None else "no kernel"
                dense32 = ms(lambda: x32 @ w32.T, a.reps)
                if blk is not None:
                    with kernels.threads(a.threads):
                        gg = f"{ms(lambda: blk(x32), a.reps):.2f}"
                else:
                    gg = "not installed"
                print(f"| {label} | {kind.upper()} | {batch} | {deq:.2f} | {dense:.2f} | {kern} | {dense32:.2f} "
                      f"| {gg} |", flush=True)


if __name__ == "__main__":
    with torch.no_grad():
        main()
