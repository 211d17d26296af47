"""The resumable split into a store (the in-place index of a checkpoint is inplace.py's).

A split reads its source tensor by tensor (memory-mapped), writes one unit at a time (temporary
name, fsync, rename), records each finished unit in `split-progress.jsonl`, and writes the manifest
last. Killed at any point, it resumes without redoing finished units.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from ..errors import DiskSpaceError, InputError, SourceError, StoreError
from ..sources import open_source
from ..utils import cache_dir, cores, fmt_bytes, log
from .format import MANIFEST, Manifest, Store, UnitInfo
from .io import atomic_write_bytes, fsync_dir

PROGRESS = "split-progress.jsonl"


def default_store_path(src, quant: str | None = None, dtype: torch.dtype | None = None, in_place: bool = False) -> Path:
    """Where a source's store goes by default: one per source, quantization and requested dtype (a GGUF served in
    place: `-gguf`, apart from the float store that earlier versions split it into)."""
    return cache_dir() / "stores" / (f"{src.name}-{src.identity}" + (f"-{quant}" if quant else "")
                                     + (f"-{str(dtype).replace('torch.', '')}" if dtype is not None else "")
                                     + ("-gguf" if in_place else ""))


def _write_unit(path: Path, tensors: dict[str, torch.Tensor]) -> tuple[int, str, str]:
    import xxhash
    from safetensors.torch import save

    data = save(tensors)
    try:
        atomic_write_bytes(path, data)
    except OSError as e:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            raise DiskSpaceError(f"disk full while writing {path}; free space and run the same split again "
                                 f"(finished units are kept)") from None
        raise
    return len(data), hashlib.sha256(data).hexdigest(), xxhash.xxh3_64_hexdigest(data)


def _unit_tensors(src, u, dtype: torch.dtype, quant: str | None, pool=None) -> dict[str, torch.Tensor]:
    """The tensors a unit's file holds: floats in the store dtype; with `quant`, the linear weights of the
    decoder layers and an untied head as int8/int4 blocks (a GGUF's own blocks kept exactly, the embedding's too),
    their chunks of rows quantized by `pool`'s threads when given."""
    from ..quant import quantizable, quantize

    tensors = {}
    quantized = quant is not None and u.kind != "embed"
    for n in u.params:
        # a GGUF's own blocks are kept wherever they are, its embedding's too (gathered as blocks, row by row)
        parts = src.get_quantized(n, quant) if quant is not None else None
        if parts is None:
            t = src.get(n)
            if quantized and t.is_floating_point() and quantizable(n, t.shape, quant):
                parts = quantize(t, quant, pool=pool)
        if parts is not None:
            tensors.update({n + suffix: v.contiguous() for suffix, v in parts.items()})
        else:
            tensors[n] = (t.to(dtype) if t.is_floating_point() else t).contiguous()
    return tensors


def units_of(src):
    """The skeleton of the source's architecture, its units, and the weight names they need (all present)."""
    from ..arch import build_skeleton, layout

    skeleton = build_skeleton(src.config, torch.float32, device="meta")
    lay = layout(skeleton)
    if hasattr(src, "map_names"):
        src.map_names(skeleton, lay)
    for u in lay.units:   # persistent buffers (a router's bias ...) come from the checkpoint when it has them
        u.params = [n for n in u.params if n not in lay.buffers or src.has(n)]
    names = [n for u in lay.units for n in u.params]
    missing = [n for n in names if not src.has(n)]
    if missing:
        raise SourceError(f"{src.path}: the checkpoint lacks {len(missing)} weights the model needs "
                          f"(e.g. {missing[0]}); is it complete and of this architecture?")
    return skeleton, lay, names



def split(source, out=None, dtype: torch.dtype | None = None, progress: bool = True, quantize=None,
          workers: int | None = None) -> Path:
    """Split `source` (a path or a source object) into a store at `out`; resumes an interrupted split.
    quantize: "int8" / "int4" (or "8bit" / "4bit") for block-wise quantized linear weights.
    workers: threads quantizing (default: one per core); the store is the same bytes whatever the number."""
    from ..quant import normalize

    quant = normalize(quantize)
    workers = cores() if workers is None else int(workers)
    if workers < 1:
        raise InputError(f"workers must be at least 1, not {workers}")
    from tqdm import tqdm

    src = source if hasattr(source, "get") else open_source(source)
    out = Path(out) if out is not None else default_store_path(src, quant, dtype)
    if Store.is_store(out):
        return out
    skeleton, lay, names = units_of(src)
    store_dtype = dtype
    if store_dtype is None:
        first = src.get(lay.units[0].params[0])
        store_dtype = first.dtype if first.is_floating_point() else torch.float32
    elem = torch.empty(0, dtype=store_dtype).element_size()
    embed_params = set(lay.units[0].params) if lay.units[0].kind == "embed" else set()
    per_weight = {"int4": 0.625, "int8": 1.07, None: None}[quant]   # bytes per quantized weight, scales included

    kept_bytes = getattr(src, "kept_bytes", lambda n: None)   # a GGUF's blocks kept as they are

    def est(n: str, quant=quant, per_weight=per_weight) -> float:
        k = src.numel(n)
        if quant and kept_bytes(n) is not None:
            return kept_bytes(n)
        if per_weight and n not in embed_params and (n.endswith(".weight") or ".experts." in n) and k > 4096:
            return k * per_weight
        return k * elem

    need = int(sum(est(n) for n in names))

    out.mkdir(parents=True, exist_ok=True)
    (out / "units").mkdir(exist_ok=True)
    ident = {"kind": src.kind, "path": str(src.path), "identity": src.identity, "dtype": str(store_dtype),
             "quantization": quant}
    state = out / "split-source.json"
    if state.is_file():
        if json.loads(state.read_text()) != ident:
            raise StoreError(f"{out}: holds a partial split of another source or dtype; choose another output "
                             f"directory or delete it")
    else:
        atomic_write_bytes(state, json.dumps(ident).encode())

    for stale in (out / "units").glob(".*.tmp"):   # a unit cut by a kill: redone below
        stale.unlink()
    done: dict[str, dict] = {}
    prog = out / PROGRESS
    if prog.is_file():
        for line in prog.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a record cut by a kill: its unit is redone
            f = out / rec["file"]
            if f.is_file() and f.stat().st_size == rec["bytes"]:
                done[rec["name"]] = rec
    have = sum(r["bytes"] for r in done.values())
    free = shutil.disk_usage(out).free
    kept = src.kept_types() if quant is None and hasattr(src, "kept_types") else set()
    if need - have > free:
        hint = ""
        if kept:
            small = int(sum(est(n, "int4", 0.625) for n in names))
            hint = (f"; or keep this GGUF's {', '.join(sorted(kept))} blocks as they are: serve it in place (the "
                    f"default without a dtype; `layerstream split --in-place`), no copy, or with compression='int4' "
                    f"(--quantize int4): about {fmt_bytes(small)}")
        raise DiskSpaceError(f"{out}: the store needs {fmt_bytes(need - have)} more but only {fmt_bytes(free)} is "
                             f"free; free space or choose another output directory (--out / store_path){hint}")
    if kept:
        log(f"note: {src.path.name} holds {', '.join(sorted(kept))} blocks; this store holds them as {store_dtype}. "
            f"Served in place (the default without a dtype; `layerstream split --in-place`) they stay as they are")
    what = str(store_dtype).replace("torch.", "")
    if quant:
        what = f"{quant} blocks for the linear weights, {what} for the rest"
    log(f"splitting {src.path} -> {out} ({len(lay.units)} units, {fmt_bytes(need)}, {what}"
        + (f"; resuming, {len(done)} done" if done else "") + ")")

    bar = tqdm(total=need, unit="B", unit_scale=True, desc="split", disable=not progress, file=sys.stderr)
    bar.update(have)
    todo = [u for u in lay.units if u.name not in done]
    with open(prog, "a") as progf, _Quantizers(workers if quant else 1) as pool:
        for u, tensors in pool.units(todo, lambda u: _unit_tensors(src, u, store_dtype, quant, pool.chunks)):
            rel = f"units/{u.name}.safetensors"
            size, sha, xx = _write_unit(out / rel, tensors)
            rec = {"name": u.name, "kind": u.kind, "file": rel, "bytes": size, "sha256": sha, "xxh3": xx,
                   "tensors": sorted(tensors)}
            progf.write(json.dumps(rec) + "\n")
            progf.flush()
            os.fsync(progf.fileno())
            done[u.name] = rec
            bar.update(size)
    bar.close()

    src.config.save_pretrained(out)
    src.save_extras(out)
    arch = (getattr(src.config, "architectures", None) or [type(skeleton).__name__])[0]
    manifest = Manifest(architecture=arch, model_type=src.config.model_type,
                        dtype=str(store_dtype).replace("torch.", ""),
                        source={"kind": src.kind, "path": str(src.path), "identity": src.identity},
                        units=[UnitInfo(**done[u.name]) for u in lay.units], tied=lay.tied, quantization=quant)
    for f in os.listdir(out):
        if f != MANIFEST and not f.startswith("."):
            p = out / f
            if p.is_file():
                with open(p, "rb") as fh:
                    os.fsync(fh.fileno())
    fsync_dir(out)
    atomic_write_bytes(out / MANIFEST, manifest.to_json().encode())
    return out


class _Quantizers:
    """The threads of a quantizing split: `workers` threads quantize the chunks of rows of one unit's weights
    (each with cores // workers torch threads: the search's small ops gain more from threads of their own
    than from torch's), and one more makes the next unit while the caller writes this one. At most two units
    are in flight, quantized (0.3-0.5x their float size) but for the tensor being quantized. With one worker
    there are no threads: the caller makes each unit itself, as a split without quantization does."""

    def __init__(self, workers: int):
        self.workers, self.chunks, self.ahead, self.before = workers, None, None, torch.get_num_threads()

    def __enter__(self):
        if self.workers > 1:
            from concurrent.futures import ThreadPoolExecutor

            intra = max(1, cores() // self.workers)
            self.chunks = ThreadPoolExecutor(self.workers, thread_name_prefix="quantize",
                                             initializer=torch.set_num_threads, initargs=(intra,))
            self.ahead = ThreadPoolExecutor(1, thread_name_prefix="split-ahead")
        return self

    def units(self, todo: list, make):
        """(unit, make(unit)) in order; with threads, the next unit is made while the caller handles this one."""
        if self.ahead is None:
            for u in todo:
                yield u, make(u)
            return
        nxt = self.ahead.submit(make, todo[0]) if todo else None
        for i, u in enumerate(todo):
            tensors = nxt.result()
            nxt = self.ahead.submit(make, todo[i + 1]) if i + 1 < len(todo) else None
            yield u, tensors

    def __exit__(self, *exc):
        # on an error or a kill's KeyboardInterrupt: queued chunks are cancelled, running ones (ms) end
        for ex in (self.ahead, self.chunks):
            if ex is not None:
                ex.shutdown(wait=False, cancel_futures=True)
        if self.chunks is not None:
            torch.set_num_threads(self.before)   # the workers' setting is also the default of later threads
        return False
