"""Safe writing (temporary name, fsync, rename) and reading units: safetensors headers, byte layouts,
aligned buffers, O_DIRECT and parallel reads."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
import xxhash

from ..errors import LayerstreamError, SourceError, StoreError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def file_digests(path: Path, chunk: int = 16 << 20) -> tuple[str, str]:
    """(sha256, xxh3_64) of a file, read once."""
    sha, xx = hashlib.sha256(), xxhash.xxh3_64()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            sha.update(block)
            xx.update(block)
    return sha.hexdigest(), xx.hexdigest()


# ---------------------------------------------------------------------------- reading units

@dataclass
class TensorSlot:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int   # offset from the start of the file
    end: int


def read_header(path: Path, source: bool = False) -> tuple[list[TensorSlot], int]:
    """Parse a safetensors header: tensor slots (file offsets) and the file size it implies. Nothing in it is
    trusted: its length is checked against the file before it is read, and each tensor's dtype, shape and
    offsets (shape x dtype = its bytes, inside the data region, no two overlapping, the data region ending
    where the file ends). Any fault is one StoreError naming the file (a SourceError for a checkpoint's own
    file, `source`)."""
    if source:
        err, what, todo = SourceError, "safetensors checkpoint file", "the checkpoint is damaged: download it again"
    else:
        err, what, todo = StoreError, "safetensors unit file", "run `layerstream verify` on the store or split it again"

    def bad(why: str) -> LayerstreamError:
        return err(f"{path}: not a readable {what} ({why}); {todo}")

    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            raw = f.read(8)
            if len(raw) != 8:
                raise bad("shorter than a safetensors header")
            (n,) = struct.unpack("<Q", raw)
            if n > 100 << 20:
                raise bad(f"header length is implausible: {n} bytes")
            if 8 + n > size:
                raise bad(f"header length {n} runs past the end of the file ({size} bytes): truncated")
            header = json.loads(f.read(n))
    except OSError as e:
        raise bad(e.strerror or str(e)) from None
    except (ValueError, RecursionError) as e:   # not JSON, not UTF-8, nested too deep
        raise bad(f"the header is not JSON: {type(e).__name__}") from None
    if not isinstance(header, dict):
        raise bad(f"malformed header: a JSON {type(header).__name__}, not an object")
    base = 8 + n
    slots = []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict):
                raise bad("malformed header: __metadata__ is not an object")
            continue
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise bad(f"malformed header: tensor {name} is not an object with dtype, shape and data_offsets")
        dt, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dt, str) or dt not in DTYPES:
            raise bad(f"tensor {name} has unsupported dtype {dt}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise bad(f"malformed header: tensor {name}'s shape {shape!r} is not a list of sizes")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets) \
                or not 0 <= offsets[0] <= offsets[1]:
            raise bad(f"malformed header: tensor {name}'s data_offsets {offsets!r} are not [begin, end]")
        numel = 1
        for d in shape:
            numel *= d
        if numel * DTYPES[dt].itemsize != offsets[1] - offsets[0]:
            raise bad(f"malformed header: tensor {name} is {dt} {shape}, {numel * DTYPES[dt].itemsize} bytes, "
                      f"but its data_offsets span {offsets[1] - offsets[0]}")
        slots.append(TensorSlot(name, DTYPES[dt], tuple(shape), base + offsets[0], base + offsets[1]))
    end = base
    for s in sorted(slots, key=lambda s: (s.begin, s.end)):
        if s.begin < end and s.end > s.begin:
            raise bad(f"malformed header: tensor {s.name}'s bytes overlap another tensor's")
        end = max(end, s.end)
    if end != size:
        raise bad(f"the header describes {end} bytes but the file has {size}"
                  + (": truncated" if end > size else ""))
    return slots, end


ALIGN = 4096


@dataclass
class UnitLayout:
    """Where a unit's bytes come from and where they land in a load buffer. Each range is read from
    its 4096-aligned start (O_DIRECT-ready) into a 4096-aligned place in the buffer."""

    reads: list[tuple[Path, int, int, int]]     # (file, aligned begin, aligned end, buffer offset)
    data: list[tuple[int, int]]                 # per range: (buffer offset of its first byte, length)
    slots: list[TensorSlot]                     # begin/end are buffer offsets
    size: int                                   # buffer bytes needed
    file_offset: dict[str, tuple[Path, int]]    # tensor -> (file, offset of its first byte)
    # tensors made of pieces: (buffer offset of the joined tensor, [(buffer offset of a piece, bytes)]),
    # copied end to end after the reads
    joins: list[tuple[int, list[tuple[int, int]]]] = field(default_factory=list)
    # tensors whose rows the model takes in another order than the file holds them (a GGUF's attention q/k
    # rows, which llama.cpp's converter interleaves): (buffer offset of the reordered tensor, buffer offset of
    # the rows as read, rows, bytes per row, order), reordered after the reads; order is [a, b, c] (rows seen
    # as [a, b, c], the last two swapped) or the list of source rows
    perms: list[tuple[int, int, int, int, list]] = field(default_factory=list)


def aligned_empty(size: int, device="cpu", pin: bool = False) -> torch.Tensor:
    """A flat uint8 buffer whose first byte is 4096-aligned (what O_DIRECT needs) on the host."""
    if torch.device(device).type != "cpu":
        return torch.empty(size, dtype=torch.uint8, device=device)
    raw = torch.empty(size + ALIGN, dtype=torch.uint8, pin_memory=pin)
    off = (-raw.data_ptr()) % ALIGN
    return raw[off: off + size]


def make_layout(ranges: list[tuple[Path, int, int]], slots: list[tuple]) -> UnitLayout:
    """slots: (slot, range index) with begin/end inside that range, or (slot, range index, order) for rows
    reordered after the read (`UnitLayout.perms`); or (slot, [(range index, begin, end) ...]) for a tensor
    joined from pieces (its slot's begin/end are then unused)."""
    reads, data, off = [], [], 0
    for path, b, e in ranges:
        a0, a1 = b - b % ALIGN, -(-e // ALIGN) * ALIGN
        reads.append((path, a0, a1, off))
        data.append((off + b - a0, e - b))
        off += a1 - a0
    out, where, joins, perms = [], {}, [], []
    for slot, ri, *order in slots:
        if order and order[0] is not None:   # reordered rows, at the end of the buffer
            size = slot.end - slot.begin
            perms.append((off, data[ri][0] + slot.begin, slot.shape[0], size // slot.shape[0], order[0]))
            out.append(TensorSlot(slot.name, slot.dtype, slot.shape, off, off + size))
            off += -(-size // 64) * 64
            continue
        if isinstance(ri, list):   # joined after the reads, at the end of the buffer
            pieces = [(data[r][0] + b, e - b) for r, b, e in ri]
            size = sum(n for _, n in pieces)
            joins.append((off, pieces))
            out.append(TensorSlot(slot.name, slot.dtype, slot.shape, off, off + size))
            where[slot.name] = (ranges[ri[0][0]][0], ranges[ri[0][0]][1] + ri[0][1])
            off += -(-size // 64) * 64
            continue
        base = data[ri][0]
        out.append(TensorSlot(slot.name, slot.dtype, slot.shape, base + slot.begin, base + slot.end))
        where[slot.name] = (ranges[ri][0], ranges[ri][1] + slot.begin)
    return UnitLayout(reads, data, out, off, where, joins, perms)


def in_place_slots(slots: dict) -> list[tuple]:
    """A manifest's in-place slot entries as make_layout takes them: [dtype, shape, range index, begin, end]
    (and an order of the rows, when the model takes them reordered), or [dtype, shape, pieces]."""
    out = []
    for n, entry in slots.items():
        dt, shape, *rest = entry
        if len(rest) == 1:   # pieces
            out.append((TensorSlot(n, DTYPES[dt], tuple(shape), 0, 0), [tuple(p) for p in rest[0]]))
        else:
            ri, b, e, *order = rest
            out.append((TensorSlot(n, DTYPES[dt], tuple(shape), b, e), ri, *order))
    return out


def layout_xxh3(layout: UnitLayout, buf: torch.Tensor) -> str:
    """xxh3 of a unit's bytes as they lie in a filled load buffer (for a split unit: of its whole file)."""
    xx = xxhash.xxh3_64()
    mv = memoryview(buf.numpy()).cast("B")
    for off, n in layout.data:
        xx.update(mv[off:off + n])
    return xx.hexdigest()


def tensor_views(buf: torch.Tensor, slots: list[TensorSlot], offset: int = 0) -> dict[str, torch.Tensor]:
    """Views into a flat uint8 buffer holding a unit file at `offset`: no copies."""
    out = {}
    for s in slots:
        t = buf[offset + s.begin: offset + s.end]
        out[s.name] = t.view(s.dtype).view(s.shape) if s.shape else t.view(s.dtype)[0]
    return out


def read_layout(layout: UnitLayout, dest: torch.Tensor, direct: bool = False, pool=None, chunk: int = 16 << 20,
                drop: bool = False):
    """Read a unit's ranges into `dest` (a buffer of at least layout.size bytes, 4096-aligned for O_DIRECT).
    With `pool` (a ThreadPoolExecutor), ranges are read as parallel chunks: several requests in flight.
    drop: buffered reads followed by posix_fadvise(DONTNEED), so the pages read leave the page cache."""
    mv = memoryview(dest.numpy()).cast("B")
    jobs = []
    for path, a0, a1, off in layout.reads:
        for c0 in range(a0, a1, chunk):
            jobs.append((path, c0, min(a1, c0 + chunk), off + c0 - a0))

    def one(job):
        path, b, e, off = job
        flags = os.O_RDONLY | (getattr(os, "O_DIRECT", 0) if direct else 0)
        try:
            fd = os.open(path, flags)
        except OSError:
            if not direct:
                raise
            fd = os.open(path, os.O_RDONLY)   # a file system without O_DIRECT (tmpfs): buffered
        try:
            got = 0
            while b + got < e:
                n = os.preadv(fd, [mv[off + got: off + e - b]], b + got)
                if n <= 0:
                    break   # end of file: the aligned tail past it is padding
                got += n
            if drop and not direct:
                os.posix_fadvise(fd, b, e - b, os.POSIX_FADV_DONTNEED)
            return got
        finally:
            os.close(fd)

    if pool is None or len(jobs) == 1:
        got = [one(j) for j in jobs]
    else:
        got = list(pool.map(one, jobs))
    for off, pieces in layout.joins:   # tensors stored in pieces, laid end to end
        for src, n in pieces:
            dest[off: off + n].copy_(dest[src: src + n])
            off += n
    for off, src, rows, width, order in layout.perms:   # rows the model takes in another order
        reorder_rows(dest[src: src + rows * width].view(rows, width), dest[off: off + rows * width].view(rows, width),
                     order)
    return sum(got)


def mapped_views(layout: UnitLayout, file_bytes, plain: bool = True, built: bool = True,
                 as_read: dict | None = None) -> dict[str, torch.Tensor]:
    """A unit's tensors as views of its files mapped in memory (`file_bytes(path)`: the whole file as a uint8
    tensor), with no copy: what a read into a buffer followed by `tensor_views` gives, for bytes the page cache
    already holds. Tensors the layout builds after the read (rows reordered, pieces joined) are built from the
    mapped bytes into tensors of their own. plain / built: which of the two kinds to give. as_read: {name: None}
    of reordered tensors wanted as the file holds them, as views like the plain ones (counted as plain); each
    name's value is set to its row permutation (new row k = file row perm[k], a LongTensor)."""
    def at(x: int, n: int) -> torch.Tensor:   # buffer bytes [x, x + n) -> the mapped file bytes
        for path, a0, a1, off in layout.reads:
            if off <= x and x + n <= off + (a1 - a0):
                return file_bytes(path)[a0 + x - off: a0 + x - off + n]
        raise ValueError(f"buffer bytes {x}..{x + n} are not read from a file")

    perms = {off: (src, rows, width, order) for off, src, rows, width, order in layout.perms}
    joins = dict(layout.joins)
    out = {}
    as_read = {} if as_read is None else as_read
    for s in layout.slots:
        n = s.end - s.begin
        kept = s.name in as_read and s.begin in perms
        if not (built if (s.begin in perms and not kept) or s.begin in joins else plain):
            continue
        if kept:
            src, rows, width, order = perms[s.begin]
            raw = at(src, rows * width)
            as_read[s.name] = row_permutation(rows, order)
        elif s.begin in perms:
            src, rows, width, order = perms[s.begin]
            raw = torch.empty(n, dtype=torch.uint8)
            reorder_rows(at(src, rows * width).view(rows, width), raw.view(rows, width), order)
        elif s.begin in joins:
            raw = torch.cat([at(x, k) for x, k in joins[s.begin]]) if n else torch.empty(0, dtype=torch.uint8)
        else:
            raw = at(s.begin, n)
        out[s.name] = (raw.view(s.dtype).view(s.shape) if s.shape else raw.view(s.dtype)[0]) if n else \
            torch.empty(s.shape, dtype=s.dtype)
    return out


def release_rows_as_read(layout: UnitLayout, buf: torch.Tensor) -> int:
    """Give back to the OS the pages of a filled buffer that only held rows as read before their reordering
    (`UnitLayout.perms`): once reordered they are dead, and in a resident unit they would stay resident for
    nothing (a Llama-3-70B-shaped GGUF's q and k rows: 42 MB a layer, 1.8 GB over 43 resident layers). The
    buffer's size is unchanged; those pages are never read again. Bytes released."""
    if not layout.perms or buf.device.type != "cpu":
        return 0
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    page = os.sysconf("SC_PAGE_SIZE")
    base, done = buf.data_ptr(), 0
    for _, src, rows, width, _ in layout.perms:
        a = -(-(base + src) // page) * page
        b = (base + src + rows * width) // page * page
        if b > a and libc.madvise(ctypes.c_void_p(a), ctypes.c_size_t(b - a), 4) == 0:   # MADV_DONTNEED
            done += b - a
    return done


def row_permutation(rows: int, order: list) -> torch.Tensor:
    """The permutation `reorder_rows(src, out, order)` applies, as indices: out row k = src row perm[k]."""
    perm = torch.empty((rows, 1), dtype=torch.long)
    reorder_rows(torch.arange(rows).view(rows, 1), perm, order)
    return perm.view(rows)


def reorder_rows(src: torch.Tensor, out: torch.Tensor, order: list) -> None:
    """out = src's rows in `order`: [a, b, c] (rows seen as [a, b, c], the last two swapped: how llama.cpp's
    converter interleaves each attention head's q/k rows, undone) or the list of source rows."""
    if len(order) == 3 and len(order) != src.shape[0]:
        a, b, c = order
        out.view(a, c, b, -1).copy_(src.view(a, b, c, -1).transpose(1, 2))
    else:
        torch.index_select(src, 0, torch.tensor(order, dtype=torch.long), out=out)


def row_order(perm) -> list | None:
    """A row permutation (new row k = old row perm[k]) as `reorder_rows` takes it: None for the identity,
    [a, b, c] where it is that swap, else the list itself."""
    import numpy as np

    perm = np.asarray(perm).reshape(-1)
    rows = len(perm)
    if np.array_equal(perm, np.arange(rows)):
        return None
    divisors = [d for d in range(1, rows + 1) if rows % d == 0]
    for a in divisors:
        for b in (d for d in divisors if (rows // a) % d == 0):
            c = rows // a // b
            swapped = np.arange(rows).reshape(a, b, c).transpose(0, 2, 1).reshape(-1)
            if b > 1 and c > 1 and np.array_equal(perm, swapped):
                return [a, b, c]
    return [int(x) for x in perm]
