"""The larger-than-RAM model as an int4 store: does it turn a disk-bound run into a RAM-bound one?

Splits /work/bigmodel (bench/big.py --make-only) into an int4 store once (about 10 GB; quantizing 30.7 GB
takes minutes on 2 cores), then generates 4 greedy tokens at max_ram=16GB and prints decode seconds per
token, how many linear layers run on torch's int4 kernel, and peak RSS. Compare with bench/big.py's
bf16 figures at the same budget.

Run:  .venv/bin/python bench/big_int4.py [--dir /work/bigmodel] [--budget 16GB]
"""

from __future__ import annotations

import sys
import time

import big_model
import harness


def main() -> int:
    p = harness.parser(__doc__, wait_quiet=60.0)
    p.add_argument("--dir", default="/work/bigmodel")
    p.add_argument("--budget", default="16GB")
    p.add_argument("-n", type=int, default=4)
    a = p.parse_args()

    from layerstream import AutoModel
    from layerstream.quant import Int4PackedLinear
    from layerstream.utils import peak_rss

    t0 = time.perf_counter()
    m = AutoModel.from_pretrained(a.dir, compression="int4", max_ram=a.budget, store_path=f"{a.dir}/ls-int4")
    print(f"setup {time.perf_counter() - t0:.0f} s (split once, then load)\n{m.plan.describe()}", flush=True)
    ids = big_model.prompt_ids(a.dir)
    if a.wait_quiet > 0:
        harness.wait_until_quiet(a.wait_quiet)
    meter = harness.Meter()
    meter.start()
    out = m.generate(ids, max_new_tokens=a.n, do_sample=False, logits_processor=meter.processor())
    packed = sum(isinstance(mod, Int4PackedLinear) for mod in m.model.modules())
    print(f"tokens {out[0, ids.shape[1]:].tolist()}")
    print(f"decode {meter.result()['decode_s']:.2f} s/token; {packed} linear layers on the int4 "
          f"kernel; peak RSS {peak_rss() / 1e9:.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
