"""I/O settings on the larger-than-RAM model: O_DIRECT vs buffered + posix_fadvise(DONTNEED), with and
without the page-cache tier, and the read-ahead depth. layerstream only, max_ram=16GB by default, each
setting in a fresh subprocess with the page cache dropped before it (run as root), 4 greedy tokens.

Run (after `bench/big.py --make-only`):  .venv/bin/python bench/io_modes.py [--dir /work/bigmodel]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from cpuload import child_result  # noqa: E402

SETTINGS = {
    "auto (O_DIRECT + page-cache tier), lookahead 2": dict(io="auto", lookahead=2),
    "O_DIRECT only, lookahead 2": dict(io="direct", lookahead=2),
    "fadvise DONTNEED + page-cache tier, lookahead 2": dict(io="fadvise", lookahead=2),
    "auto, lookahead 1": dict(io="auto", lookahead=1),
    "auto, lookahead 4": dict(io="auto", lookahead=4),
}


def child(d: str, budget: str, kw: dict, n: int) -> dict:
    import torch
    from transformers import AutoTokenizer

    from layerstream import AutoModel

    ids = torch.tensor([AutoTokenizer.from_pretrained(d)("The sea is", add_special_tokens=False)["input_ids"]])
    m = AutoModel.from_pretrained(d, max_ram=budget, store_path=str(pathlib.Path(d) / "ls-store"), progress=False,
                                  **kw)
    stamps = []

    def stamp(input_ids, scores):
        stamps.append(time.perf_counter())
        return scores

    m.generate(ids, max_new_tokens=n, do_sample=False, logits_processor=[stamp])
    decode = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
    return {"decode_s": decode, "first_s": stamps[0], "cached": len(m.plan.cached), "direct": m.direct,
            "bytes_per_sweep": m.plan.bytes_per_sweep}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", default="/work/bigmodel")
    p.add_argument("--budget", default="16GB")
    p.add_argument("-n", type=int, default=4)
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print("RESULT " + json.dumps(child(a.dir, a.budget, json.loads(a.child), a.n)), flush=True)
        return 0
    print(f"{a.dir}, max_ram={a.budget}, {a.n} tokens; decode s/token (page cache dropped before each)")
    for name, kw in SETTINGS.items():
        subprocess.run(["sync"])
        try:
            pathlib.Path("/proc/sys/vm/drop_caches").write_text("3\n")
        except OSError:
            print("  (cannot drop the page cache: not root; figures are flattered)")
        res, tail = child_result([sys.executable, __file__, "--dir", a.dir, "--budget", a.budget, "-n", str(a.n),
                                  "--child", json.dumps(kw)])
        if res is None:
            print(f"  {name:50s} failed: {tail}")
            continue
        print(f"  {name:50s} {res['decode_s']:6.2f} s/token  (page-cache tier: {res['cached']} units, "
              f"O_DIRECT: {res['direct']})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
