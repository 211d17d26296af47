"""In place vs split: the same safetensors checkpoint served from its own shards or from a split store.

SmolLM2-135M-Instruct exported to a plain fp32 checkpoint (bench/peers.py), layerstream at max_ram=0
(everything streamed every token), greedy, 32 new tokens, each variant in its own subprocess, alternated
three times. Both read the same bytes; in place needs no second copy on disk.

Run:  .venv/bin/python bench/inplace.py
"""

from __future__ import annotations

import argparse
import sys

import harness

WORK = harness.WORK


def child(in_place: bool, n: int) -> dict:
    from transformers import AutoTokenizer

    from layerstream import AutoModel
    from layerstream.sources import embedded_model

    import peers

    hf = peers.export_hf_checkpoint(embedded_model(), WORK / "hf")
    ids = peers.prompt_ids(AutoTokenizer.from_pretrained(str(hf)))
    store = WORK / ("inplace-store" if in_place else "split-store")
    m = AutoModel.from_pretrained(hf, max_ram=0, store_path=store, in_place=in_place, progress=False)
    tokens, seconds = harness.timed_generate(m, ids, n)
    disk = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
    return {"in_place": in_place, "tok_s": len(tokens) / seconds, "tokens": tokens,
            "bytes_per_token": m.last_stats["bytes_per_token"], "store_disk_bytes": disk}


def main() -> int:
    p = harness.parser(__doc__, wait_quiet=60.0)
    p.add_argument("--child", choices=["0", "1"], help=argparse.SUPPRESS)
    p.add_argument("--rounds", type=int, default=3, help="alternated runs of each variant (default 3)")
    a = p.parse_args()
    if a.child:
        harness.emit(child(a.child == "1", 32))
        return 0
    runs = []
    for in_place in (True, False) * a.rounds:
        c = harness.run_child(harness.self_cmd(__file__, "--child", int(in_place)), wait_quiet=a.wait_quiet)
        if c.result is None:
            raise SystemExit(f"a run failed: {c.note}")
        runs.append(c.result)
    rows = []
    for name, flag in (("in place", True), ("split store", False)):
        rs = [r for r in runs if r["in_place"] == flag]
        rows.append([name, " / ".join(f"{r['tok_s']:.2f}" for r in rs), f"{rs[0]['bytes_per_token'] / 1e6:.1f}",
                     f"{rs[0]['store_disk_bytes'] / 1e6:.1f}"])
    harness.table(["store", f"tok/s ({a.rounds} alternated runs)", "MB read per token", "store on disk MB"], rows)
    same = len({tuple(r["tokens"]) for r in runs}) == 1
    med = {f: sorted(r["tok_s"] for r in runs if r["in_place"] == f)[a.rounds // 2] for f in (True, False)}
    print(f"same tokens: {'yes' if same else 'NO'}; in place / split = {harness.ratio(med[True], med[False])} "
          f"(medians of {a.rounds} alternated runs each)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
