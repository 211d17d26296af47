"""I/O settings on the larger-than-RAM model: O_DIRECT vs buffered + posix_fadvise(DONTNEED), with and
without the page-cache tier, and the read-ahead depth. layerstream only, max_ram=16GB by default, each
setting in a fresh subprocess with the page cache dropped before it (run as root), 4 greedy tokens.

Run (after `bench/big.py --make-only`):  .venv/bin/python bench/io_modes.py [--dir /work/bigmodel]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import big_model
import harness

SETTINGS = {
    "auto (O_DIRECT + page-cache tier), lookahead 2": dict(io="auto", lookahead=2),
    "O_DIRECT only, lookahead 2": dict(io="direct", lookahead=2),
    "fadvise DONTNEED + page-cache tier, lookahead 2": dict(io="fadvise", lookahead=2),
    "auto, lookahead 1": dict(io="auto", lookahead=1),
    "auto, lookahead 4": dict(io="auto", lookahead=4),
}


def child(d: str, budget: str, kw: dict, n: int) -> dict:
    from layerstream import AutoModel

    ids = big_model.prompt_ids(d)
    m = AutoModel.from_pretrained(d, max_ram=budget, store_path=str(pathlib.Path(d) / "ls-store"), progress=False,
                                  **kw)
    meter = harness.Meter()
    meter.start()
    m.generate(ids, max_new_tokens=n, do_sample=False, logits_processor=meter.processor())
    return dict(meter.result(), cached=len(m.plan.cached), direct=m.direct, bytes_per_sweep=m.plan.bytes_per_sweep)


def main() -> int:
    p = harness.parser(__doc__, wait_quiet=60.0)
    p.add_argument("--dir", default="/work/bigmodel")
    p.add_argument("--budget", default="16GB")
    p.add_argument("-n", type=int, default=4)
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        harness.emit(child(a.dir, a.budget, json.loads(a.child), a.n))
        return 0
    print(f"{a.dir}, max_ram={a.budget}, {a.n} tokens; decode s/token (page cache dropped before each)")
    rows = []
    for name, kw in SETTINGS.items():
        if a.wait_quiet > 0:
            harness.wait_until_quiet(a.wait_quiet)
        if not harness.drop_caches():
            print("  (cannot drop the page cache: not root; figures are flattered)")
        c = harness.run_child(harness.self_cmd(__file__, "--dir", a.dir, "--budget", a.budget, "-n", a.n,
                                               "--child", json.dumps(kw)))
        r = c.result
        print(f"  {name}: " + (f"{r['decode_s']:.2f} s/token" if r else f"failed: {c.note}"), flush=True)
        rows.append([name, harness.fmt(r and r["decode_s"]), r and r["cached"], r and r["direct"],
                     harness.fmt(c.others)])
    print()
    harness.table(["setting", "s/token", "page-cache tier units", "O_DIRECT", "others"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
