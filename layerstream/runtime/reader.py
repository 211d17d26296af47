"""Reading units into caller-owned buffers, checked against the manifest; reusable buffers."""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import torch

from ..errors import StoreError
from ..store import Store, aligned_empty, read_layout
from ..store.io import mapped_views
from .profiler import Profiler


class FileReader:
    """Reads units into caller-owned buffers, checking them against the manifest: file sizes (and, in
    place, mtimes) on every read, the xxh3 of the content on the first read and whenever a file changed.

    io: "buffered" (page cache; best when the model fits in RAM), "direct" (O_DIRECT into aligned
    buffers: no copy through the page cache, and streamed units do not evict anything), "fadvise"
    (buffered, then posix_fadvise DONTNEED), or "auto".

    mapped: buffered units, once read and checked, are then taken as views of their files mapped in memory
    (`mapped`): the page cache's own pages, no copy into a buffer per sweep (how llama.cpp reads a model that
    the page cache holds)."""

    def __init__(self, store: Store, verify: str, profiler: Profiler, direct: bool = False, readers: int = 1,
                 fadvise: bool = False, mapped: bool = False):
        if verify not in ("first", "always", "never"):
            raise ValueError("verify must be 'first', 'always' or 'never'")
        self.store, self.verify, self.prof, self.direct = store, verify, profiler, direct
        self.fadvise = fadvise             # buffered reads dropped from the page cache after (io="fadvise")
        self.cached: set[str] = set()     # read through the page cache and kept (the plan's cache tier)
        self.seen: dict[str, tuple] = {}
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(readers, thread_name_prefix="layerstream-read") if readers > 1 else None
        self.mapped = mapped and not direct and not fadvise
        self.maps: dict = {}    # path -> (mmap, its bytes as a uint8 tensor)
        self.view_cache: dict = {}   # unit -> (file key, its tensors that are plain views of the maps, perms)
        # reordered tensors taken as the file holds them (a linear layer on blocks permutes its outputs instead,
        # `BlockLinear.bind`): no copy of their rows each use
        self.as_read: set[str] = set()

    def _stat(self, unit: str) -> tuple:
        m = self.store.manifest
        key = []
        for path in dict.fromkeys(r[0] for r in self.store.layout(unit).reads):
            try:
                st = os.stat(path)
            except OSError as e:
                raise StoreError(f"{path}: cannot read unit {unit} ({e.strerror}); the store or its source is "
                                 f"missing or moved: run `layerstream verify {self.store.path}`") from None
            want = m.source_files.get(str(path), [None])[0] if m.in_place else self.store.units[unit].bytes
            if st.st_size != want:
                raise StoreError(f"{path}: {st.st_size} bytes, the manifest says {want} (truncated or replaced); "
                                 f"unit {unit} cannot be used: re-split the model")
            key.append((st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(key)

    def read(self, unit: str, dest: torch.Tensor) -> None:
        layout = self.store.layout(unit)
        t0 = time.perf_counter()
        key = self._stat(unit)
        try:
            streamed = unit not in self.cached
            read_layout(layout, dest, direct=self.direct and streamed, pool=self.pool,
                        drop=self.fadvise and streamed)
        except OSError as e:
            raise StoreError(f"{self.store.where(unit)}: read error ({e.strerror})") from None
        if self.verify == "always" or (self.verify == "first" and self.seen.get(unit) != key):
            self.store.check_content(unit, dest)
            self.seen[unit] = key
        with self.lock:   # routed experts are read on several threads at once
            self.prof.bytes_read += sum(n for _, n in layout.data)
            self.prof.read_seconds += time.perf_counter() - t0

    def mapped_unit(self, unit: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None:
        """A unit's tensors as views of its mapped files, once a read has checked its content and the files are
        unchanged since (sizes and mtimes checked every time, as `read` does), and {name: row permutation} of
        those in `as_read` given as the file holds them; None until then, or when this reader does not map."""
        if not self.mapped:
            return None
        t0 = time.perf_counter()
        key = self._stat(unit)
        if self.verify == "always" or (self.verify == "first" and self.seen.get(unit) != key):
            return None   # the next read checks it
        layout = self.store.layout(unit)
        hit = self.view_cache.get(unit)
        if hit is None or hit[0] != key:   # views of the page cache's pages: kept, they hold no memory
            perms = {s.name: None for s in layout.slots if s.name in self.as_read}
            views = mapped_views(layout, self._file_bytes, built=False, as_read=perms)
            hit = self.view_cache[unit] = (key, views, {n: p for n, p in perms.items() if p is not None})
        views = dict(hit[1])
        if len(layout.perms) > len(hit[2]) or layout.joins:   # other reordered rows, joined pieces: copies, each use
            views.update(mapped_views(layout, self._file_bytes, plain=False, as_read=dict.fromkeys(hit[2])))
        with self.lock:
            self.prof.bytes_read += sum(n for _, n in layout.data)
            self.prof.read_seconds += time.perf_counter() - t0
        return views, hit[2]

    def still_mapped(self, parts: dict[str, tuple]) -> bool:
        """Whether views `mapped_unit` gave of these parts ({part: its files' key then}) still stand: the files
        unchanged since (sizes and mtimes checked, as every use checks them). Counts their bytes as read."""
        t0 = time.perf_counter()
        for p, key in parts.items():
            if self._stat(p) != key:
                return False
        with self.lock:
            self.prof.bytes_read += sum(n for p in parts for _, n in self.store.layout(p).data)
            self.prof.read_seconds += time.perf_counter() - t0
        return True

    def _file_bytes(self, path) -> torch.Tensor:
        with self.lock:
            got = self.maps.get(path)
            if got is None:
                import mmap

                with open(path, "rb") as f:
                    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)   # private: never written back
                got = self.maps[path] = (mm, torch.frombuffer(mm, dtype=torch.uint8))
        return got[1]

    def read_rows(self, unit: str, tensor: str, slot, rows: list[int]) -> torch.Tensor:
        """Rows `rows` of a 2-D tensor of a unit, each read with its own pread (an embedding lookup)."""
        path, first = self.store.layout(unit).file_offset[tensor]
        hidden = slot.shape[1]
        row_bytes = hidden * slot.dtype.itemsize
        out = torch.empty((len(rows), hidden), dtype=slot.dtype)
        mv = memoryview(out.view(torch.uint8).numpy()).cast("B")
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                for i, r in enumerate(rows):
                    n = os.preadv(fd, [mv[i * row_bytes:(i + 1) * row_bytes]], first + r * row_bytes)
                    if n != row_bytes:
                        raise StoreError(f"{path}: short read of row {r} of {tensor} (unit {unit}); "
                                         f"re-split the model")
            finally:
                os.close(fd)
        except OSError as e:
            raise StoreError(f"{path}: cannot read unit {unit} ({e.strerror}); the store or its source is "
                             f"missing or moved: run `layerstream verify {self.store.path}`") from None
        with self.lock:
            self.prof.bytes_read += len(rows) * row_bytes
        return out

    def close(self):
        if self.pool is not None:
            self.pool.shutdown(wait=False)
        self.view_cache.clear()
        self.maps.clear()   # the maps close when the last view of them is gone


class BufferPool:
    """Reusable flat byte buffers, by exact size: no allocation per token once warm."""

    def __init__(self, device: torch.device, pin: bool, profiler: Profiler):
        self.device, self.pin, self.prof = device, pin, profiler
        self.free: dict[int, list] = defaultdict(list)
        self.made: dict[int, int] = defaultdict(int)   # buffers of each size acquire_idle has made
        self.lock = threading.Lock()    # the loader acquires, the compute thread releases

    def acquire(self, size: int):
        with self.lock:
            if self.free[size]:
                return self.free[size].pop()
            self.prof.allocations += 1
        return [aligned_empty(size, self.device, self.pin), None]

    def acquire_idle(self, size: int, most: int):
        """A buffer of `size` whose last use has finished, waiting as little as possible: a free one whose
        event has completed, else a new one while fewer than `most` of this size exist, else the free one
        used longest ago, once its event completes. Pinned staging: with two, a read fills one while the
        other's copy to the device runs."""
        with self.lock:
            free = self.free[size]
            for i, e in enumerate(free):
                if e[1] is None or e[1].query():
                    return free.pop(i)
            if free and self.made[size] >= most:
                e = free.pop(0)
            else:
                e = None
                self.made[size] += 1
                self.prof.allocations += 1
        if e is None:
            return [aligned_empty(size, self.device, self.pin), None]
        e[1].synchronize()
        return e

    def release(self, entry) -> None:
        with self.lock:
            self.free[entry[0].numel()].append(entry)
