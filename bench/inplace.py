"""In place vs split: the same safetensors checkpoint served from its own shards or from a split store.

SmolLM2-135M-Instruct exported to a plain fp32 checkpoint (bench/peers.py), layerstream at max_ram=0
(everything streamed every token), greedy, 32 new tokens, each variant in its own subprocess, alternated
three times. Both read the same bytes; in place needs no second copy on disk.

Run:  .venv/bin/python bench/inplace.py
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from cpuload import child_result  # noqa: E402

WORK = pathlib.Path("/tmp/layerstream-bench")


def child(in_place: bool, n: int) -> dict:
    import peers
    from transformers import AutoTokenizer

    from layerstream import AutoModel

    hf = peers.export_hf_checkpoint(peers.embedded_gguf(), WORK / "hf")
    ids = peers.prompt_ids(AutoTokenizer.from_pretrained(str(hf)))
    store = WORK / ("inplace-store" if in_place else "split-store")
    m = AutoModel.from_pretrained(hf, max_ram=0, store_path=store, in_place=in_place, progress=False)
    m.generate(ids, max_new_tokens=2, do_sample=False)
    t0 = time.perf_counter()
    out = m.generate(ids, max_new_tokens=n, do_sample=False)
    dt = time.perf_counter() - t0
    disk = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
    return {"in_place": in_place, "tok_s": n / dt, "tokens": out[0, ids.shape[1]:].tolist(),
            "bytes_per_token": m.last_stats["bytes_per_token"], "store_disk_bytes": disk}


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print("RESULT " + json.dumps(child(sys.argv[2] == "1", 32)), flush=True)
        return 0
    runs = []
    for in_place in (True, False) * 3:
        r, tail = child_result([sys.executable, __file__, "--child", "1" if in_place else "0"])
        if r is None:
            raise SystemExit(f"a run failed: {tail}")
        runs.append(r)
    for name, flag in (("in place", True), ("split store", False)):
        rs = [r for r in runs if r["in_place"] == flag]
        rates = " ".join(f"{r['tok_s']:.2f}" for r in rs)
        print(f"{name:12s} {rates} tok/s, "
              f"{rs[0]['bytes_per_token'] / 1e6:.1f} MB read per token, store on disk {rs[0]['store_disk_bytes'] / 1e6:.1f} MB")
    same = len({tuple(r["tokens"]) for r in runs}) == 1
    med = {f: sorted(r["tok_s"] for r in runs if r["in_place"] == f)[1] for f in (True, False)}
    print(f"same tokens: {'yes' if same else 'NO'}; in place / split = {med[True] / med[False]:.2f}x "
          f"(medians of 3 alternated runs each)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
