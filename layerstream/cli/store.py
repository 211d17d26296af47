"""`layerstream split`, `info` and `verify`: making and checking stores."""

from __future__ import annotations

import sys

from ..utils import log


def cmd_split(a) -> int:
    log("importing torch and transformers …")
    from ..engine.model import parse_dtype
    from ..sources import open_source
    from ..store import index_in_place, split

    if a.in_place:
        from ..store.inplace import index_gguf

        src = open_source(a.source)
        out = (index_gguf if src.kind == "gguf" else index_in_place)(src, a.out)
    else:
        out = split(a.source, a.out, dtype=parse_dtype(a.dtype), quantize=a.quantize, workers=a.workers)
    log(f"store ready: {out}")
    return 0


def cmd_info(a) -> int:
    from ..store import Store
    from ..utils import fmt_bytes

    s = Store(a.store)
    m = s.manifest
    print(f"store      {s.path}\narchitecture {m.architecture} ({m.model_type})\ndtype      {m.dtype}"
          f"\nquantization {m.quantization or 'none'}\nsource     {m.source.get('kind')}: {m.source.get('path')}"
          f"\nunits      {len(m.units)} ({sum(u.kind == 'layer' for u in m.units)} layers)"
          f"\nsize       {fmt_bytes(m.total_bytes)}"
          f"\ntied       {', '.join(f'{k} = {v}' for k, v in m.tied.items()) or 'none'}")
    return 0


def cmd_verify(a) -> int:
    from tqdm import tqdm

    from ..store import Store

    s = Store(a.store)
    with tqdm(total=s.manifest.total_bytes, unit="B", unit_scale=True, desc="verify", file=sys.stderr) as bar:
        problems = s.verify(progress=bar.update)
    if problems:
        for p in problems:
            print(f"damaged: {p}", file=sys.stderr)
        log(f"{len(problems)} damaged unit file(s): split the model again into a new directory "
            f"(`layerstream split SRC OUT`)")
        return 1
    log(f"ok: {len(s.manifest.units)} units match their xxh3 checksums")
    return 0
