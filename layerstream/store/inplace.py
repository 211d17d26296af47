"""Stores that point into their source's own files: no second copy of the model on disk.

A unit is a list of byte ranges of the source's files (contiguous tensors merged) and each tensor's place
in them; its xxh3 is computed when it is indexed, by reading the model once. Safetensors checkpoints
(`index_in_place`) and GGUF files (`index_gguf`) are indexed so; `can_serve_in_place` says whether a checkpoint
can be. A GGUF's quantized tensors stay the
file's own blocks (`<name>.q4_k` ...: uint8 [rows, bytes per row]), dequantized as they load exactly as gguf-py
(and so transformers) dequantizes them; rows that transformers reorders (Llama's attention q/k) are reordered
after the read. What transformers changes beyond an order (Gemma's norms, stored as 1 + w) is written once,
as transformers computes it, to a small file of the store (`extras/<unit>.safetensors`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from ..errors import SourceError
from ..utils import fmt_bytes, log
from .format import MANIFEST, Manifest, UnitInfo
from .io import (
    DTYPE_NAMES,
    aligned_empty,
    atomic_write_bytes,
    fsync_dir,
    in_place_slots,
    layout_xxh3,
    make_layout,
    read_header,
    read_layout,
    row_order,
)
from .writer import units_of

# a piece of a tensor in a file: (file, begin, end, shape, dtype)


def place_unit(name: str, kind: str, where: dict[str, list[tuple]], orders: dict[str, list] | None = None) -> UnitInfo:
    """A unit of an in-place store from where each of its tensors lies: one piece, or several joined along the
    first dimension (an expert's gate and up weights, stored apart). orders: tensors whose rows the model takes
    in another order (`io.reorder_rows`)."""
    orders = orders or {}
    ranges, placed = [], {}
    for f, b, e, *_ in sorted({p[:3] for ps in where.values() for p in ps}, key=lambda p: (str(p[0]), p[1])):
        if ranges and ranges[-1][0] == str(f) and ranges[-1][2] >= b:
            ranges[-1][2] = max(ranges[-1][2], e)
        else:
            ranges.append([str(f), b, e])
        placed[(f, b)] = len(ranges) - 1
    slots = {}
    for n, pieces in where.items():
        ps = [(placed[(f, b)], b - ranges[placed[(f, b)]][1], e - ranges[placed[(f, b)]][1]) for f, b, e, *_ in pieces]
        shape, dt = list(pieces[0][3]), DTYPE_NAMES[pieces[0][4]]
        if len(ps) > 1:   # joined along the first dimension
            shape[0] = sum(p[3][0] for p in pieces)
            if all(q[0] == p[0] and q[1] == p[2] for p, q in zip(ps, ps[1:])):
                ps = [(ps[0][0], ps[0][1], ps[-1][2])]   # already end to end in the file (gate, then up)
        if len(ps) == 1:
            slots[n] = [dt, shape, *ps[0]] + ([orders[n]] if orders.get(n) is not None else [])
        else:
            slots[n] = [dt, shape, [list(p) for p in ps]]
    return UnitInfo(name, kind, "", sum(e - b for _, b, e in ranges), "", "", sorted(where), ranges, slots)


def finish_in_place(src, out: Path, skeleton, lay, units: list[UnitInfo], dtype: torch.dtype, files: list[Path],
                    quantization: str | None = None, progress: bool = True) -> Path:
    """Checksum every unit (the model read once), then write the config, tokenizer and manifest: the store is
    complete when its manifest is there."""
    from tqdm import tqdm

    total = sum(u.bytes for u in units)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="checksum", disable=not progress, file=sys.stderr)
    for u in units:
        lt = make_layout([(Path(f), b, e) for f, b, e in u.ranges], in_place_slots(u.slots))
        buf = aligned_empty(lt.size)
        read_layout(lt, buf)
        u.xxh3 = layout_xxh3(lt, buf)
        bar.update(u.bytes)
    bar.close()
    out.mkdir(parents=True, exist_ok=True)
    src.config.save_pretrained(out)
    src.save_extras(out)
    arch = (getattr(src.config, "architectures", None) or [type(skeleton).__name__])[0]
    manifest = Manifest(architecture=arch, model_type=src.config.model_type, dtype=str(dtype).replace("torch.", ""),
                        source={"kind": src.kind, "path": str(src.path), "identity": src.identity}, units=units,
                        tied=lay.tied, quantization=quantization, in_place=True,
                        source_files={str(f): [f.stat().st_size, f.stat().st_mtime_ns] for f in files})
    fsync_dir(out)
    atomic_write_bytes(out / MANIFEST, manifest.to_json().encode())
    return out


# GGUF tensor types served as they lie in the file: floats, and the block types layerstream dequantizes
FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _gguf_piece(src, n: str, shape: tuple) -> tuple[str, list[tuple], list | None] | None:
    """(stored name, pieces, row order) of weight `n` as it lies in the GGUF file, or None where transformers
    computes it otherwise than by reading (and reordering) the file's values."""
    from ..quant import KEPT_GGUF, float_shape

    if n in src.experts:
        ts, j = src.experts[n]
    else:
        ts, j = src._mapping().get(n), None
        if not ts or len(ts) != 1:
            return None
    kinds = {t.tensor_type.name for t in ts}
    if len(kinds) != 1:
        return None
    kind = kinds.pop()
    if kind not in KEPT_GGUF and kind not in FLOATS:
        return None
    dtype = FLOATS.get(kind, torch.uint8)
    pieces = []
    for t in ts:
        data = t.data if j is None else t.data[j]
        size = int(t.n_bytes) if j is None else int(t.n_bytes) // t.data.shape[0]
        begin = int(t.data_offset) + (0 if j is None else j * size)
        dims = [int(d) for d in data.shape]
        if kind in FLOATS and data.dtype.itemsize != dtype.itemsize:   # BF16: gguf-py reads its bytes as uint8
            dims[-1] = dims[-1] * data.dtype.itemsize // dtype.itemsize
        pieces.append((src.path, begin, begin + size, tuple(dims), dtype))
    rows = sum(p[3][0] for p in pieces)
    if kind in FLOATS:
        got = (rows, *pieces[0][3][1:])
    else:
        if len(pieces[0][3]) != 2:
            return None
        got = float_shape(kind.lower(), (rows, pieces[0][3][1]))
    if shape is not None and tuple(got) != tuple(shape):   # (an expert's slice: its shape is the slice's)
        return None
    order = None
    if j is None:   # transformers' processor may reorder rows (Llama's q/k); anything else is computed instead
        perm = src.row_permutation(ts[0])
        if perm is None:
            return None
        order = row_order(perm)
    return (n if kind in FLOATS else f"{n}.{kind.lower()}"), pieces, order


def index_gguf(src, out, progress: bool = True) -> Path:
    """A store that serves a GGUF file in place: its blocks as they lie in the file, no copy (see the module's
    docstring). Only what transformers computes beyond reading the file (a few small tensors) is written."""
    from safetensors.torch import save


    out = Path(out)
    skeleton, lay, _ = units_of(src)
    shapes = {n: tuple(t.shape) for n, t in skeleton.state_dict(keep_vars=True).items()}
    units, extras_bytes, extra_files, kinds = [], 0, [], set()
    for u in lay.units:
        where, orders, computed = {}, {}, {}
        for n in u.params:
            found = _gguf_piece(src, n, shapes.get(n))
            if found is None:
                computed[n] = src.get(n).contiguous()
                continue
            stored, pieces, order = found
            where[stored], orders[stored] = pieces, order
            if stored != n:
                kinds.add(stored.rsplit(".", 1)[1].upper())
        if computed:
            (out / "extras").mkdir(parents=True, exist_ok=True)
            f = out / "extras" / f"{u.name}.safetensors"
            atomic_write_bytes(f, save(computed))
            extra_files.append(f)
            for slot in read_header(f)[0]:
                where[slot.name] = [(f, slot.begin, slot.end, slot.shape, slot.dtype)]
            extras_bytes += f.stat().st_size
        units.append(place_unit(u.name, u.kind, where, orders))
    total = sum(u.bytes for u in units)
    log(f"indexing {src.path} in place -> {out} ({len(units)} units, {fmt_bytes(total)}; "
        f"{', '.join(sorted(kinds)) or 'float'} blocks as they are in the file"
        + (f"; {fmt_bytes(extras_bytes)} computed by transformers' rules written to the store" if extras_bytes else "")
        + ")")
    return finish_in_place(src, out, skeleton, lay, units, torch.float32, [src.path, *extra_files],
                           quantization="gguf" if kinds else None, progress=progress)


def source_float_dtype(src, names) -> torch.dtype | None:
    """The one float dtype of the checkpoint's tensors `names` (None: several)."""
    dtypes = set()
    for f in src.files:
        slots, _ = read_header(f)
        dtypes |= {s.dtype for s in slots if s.name in names and s.dtype.is_floating_point}
    return dtypes.pop() if len(dtypes) == 1 else None


def index_in_place(src, out, progress: bool = True) -> Path:
    """A store that points into the source's own shards: no second copy of the model on disk. Each unit is
    a list of byte ranges of the shards (contiguous tensors merged); its xxh3 is computed now, by reading
    the model once."""
    out = Path(out)
    skeleton, lay, names = units_of(src)
    if src.needs_conversion():
        raise SourceError(f"{src.path}: some weights are stored in another layout than the model computes with "
                          f"(a conversion beyond joining an expert's weights); it cannot be served in place: "
                          f"split it")
    pieces = {n: src.pieces(n) for n in names}
    keys = {k for ps in pieces.values() for k, _ in ps}
    dtype = source_float_dtype(src, keys)
    if dtype is None:
        raise SourceError(f"{src.path}: weights of mixed float dtypes cannot be served in place; split it")
    found = {}
    for f in src.files:
        for slot in read_header(f)[0]:
            if slot.name in keys:
                if slot.begin % slot.dtype.itemsize:
                    raise SourceError(f"{f}: tensor {slot.name} is not aligned; split the model instead")
                found[slot.name] = (f, slot)

    def locate(key: str, row: int | None) -> tuple[Path, int, int, tuple, torch.dtype]:
        """(file, begin, end, shape, dtype) of a checkpoint tensor, or of one row of it."""
        f, slot = found[key]
        if row is None:
            return f, slot.begin, slot.end, tuple(slot.shape), slot.dtype
        size = (slot.end - slot.begin) // slot.shape[0]
        return f, slot.begin + row * size, slot.begin + (row + 1) * size, tuple(slot.shape[1:]), slot.dtype

    units = [place_unit(u.name, u.kind, {n: [locate(k, row) for k, row in pieces[n]] for n in u.params})
             for u in lay.units]
    log(f"indexing {src.path} in place -> {out} ({len(units)} units, {fmt_bytes(sum(u.bytes for u in units))}, "
        f"{dtype}; no copy)")
    return finish_in_place(src, out, skeleton, lay, units, dtype, list(src.files), progress=progress)

def can_serve_in_place(src, dtype: torch.dtype | None) -> bool:
    """Whether a safetensors checkpoint can be served as it is: every weight the model needs is there
    (SourceError if not), stored as the model computes with it (no FP8 blocks, no conversion beyond joining an
    expert's weights), in one float dtype, `dtype` if one is asked for. `index_in_place` refuses what this
    refuses."""
    _, _, names = units_of(src)   # (the source's names are mapped to the model's here)
    if src.fp8_block or src.needs_conversion():
        return False
    keys = {k for n in names for k, _ in src.pieces(n)}
    found = source_float_dtype(src, keys)
    return found is not None and (dtype is None or found == dtype)
