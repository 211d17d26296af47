"""The background loader: brings streamed units in, in sweep order, ahead of the compute."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from ..plan import Plan, UnitPlan
from ..quant import SUFFIXES, dequantize, float_bytes, float_shape, stored_names
from ..quant.kernels import ggml_bytes, to_ggml
from ..store import Store, tensor_views
from .profiler import Profiler
from .reader import BufferPool, FileReader


@dataclass
class Loaded:
    name: str
    views: dict[str, torch.Tensor] = field(default_factory=dict)
    entries: list = field(default_factory=list)   # (pool, [buffer, event of its last use])
    event: object = None                  # copy finished (accelerators)
    error: BaseException | None = None
    copy_seconds: float = 0.0
    perms: dict[str, torch.Tensor] = field(default_factory=dict)   # views whose rows are as the file holds them
    mapped: dict[str, tuple] = field(default_factory=dict)   # part -> its files' key, for parts mapped in place
    all_mapped: bool = False                                  # every part mapped


# ---------------------------------------------------------------------------- loader

class Loader:
    """Brings streamed units in, in sweep order, `lookahead` units ahead of the compute (cyclic: the
    next sweep's first units load while this sweep's last ones compute)."""

    def __init__(self, store: Store, plan: Plan, device: torch.device, ram_units: dict[str, torch.Tensor],
                 reader: FileReader, profiler: Profiler, prefetch: bool, dtype: torch.dtype,
                 keep: dict[str, str] | None = None):
        self.store, self.plan, self.device = store, plan, device
        self.keep = keep or {}   # weights whose linear layer computes on their blocks: not dequantized
        self.ram_units = ram_units                 # host-resident unit bytes (accelerator RAM tier)
        self.reader, self.prof = reader, profiler
        self.order: list[UnitPlan] = plan.streamed
        self.index = {u.name: i for i, u in enumerate(self.order)}
        self.accel = device.type != "cpu"
        self.cuda = device.type == "cuda"
        self.pool = BufferPool(device, pin=False, profiler=profiler)
        self.fpool = BufferPool(device, pin=False, profiler=profiler)      # dequantized / converted weights
        self._out: dict[str, int] = {}
        self.dtype = dtype
        self.staging = BufferPool(torch.device("cpu"), pin=self.cuda, profiler=profiler) if self.accel else None
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.lookahead = max(1, plan.lookahead)
        self.cond = threading.Condition()
        self.ready: deque[Loaded] = deque()
        self.cidx = 0          # consumer's next index into order
        self.pidx = 0          # producer's next index
        self.epoch = 0
        self.stopped = False
        self.thread = None
        if prefetch and self.order:
            self.thread = threading.Thread(target=self._run, name="layerstream-loader", daemon=True)
            self.thread.start()

    # -- producer side
    def _bytes_of(self, p: str, buf: torch.Tensor, off: int, item: Loaded) -> torch.Tensor | None:
        """Part `p`'s bytes on the compute device: read or copied into buf[off:], or (resident quantized
        bytes already there) the resident buffer itself, returned."""
        n = self.store.layout(p).size
        tier = self.plan.tier(p)
        if tier == self.plan.compute_tier:
            return self.ram_units[p]
        if not self.accel:
            self.reader.read(p, buf[off:off + n])
            return None
        if tier == "disk":
            st = self.staging.acquire_idle(n, self.plan.staging)   # two: this read overlaps the last copy
            self.reader.read(p, st[0])
            src = st[0]
        else:
            st, src = None, self.ram_units[p]
        t0 = time.perf_counter()
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                buf[off:off + n].copy_(src, non_blocking=True)
            if st is not None:
                st[1] = torch.cuda.Event()
                st[1].record(self.copy_stream)
        else:
            buf[off:off + n].copy_(src)
        item.copy_seconds += time.perf_counter() - t0
        if st is not None:
            self.staging.release(st)
        return None

    def _load(self, u: UnitPlan) -> Loaded:
        item = Loaded(u.name)
        try:
            parts = self.plan.parts(u)
            # parts the page cache holds, taken as views of their mapped files (CPU, buffered reads): no buffer
            mapped = {p: v for p in parts if not self.accel and self.plan.tier(p) == "disk"
                      for v in [self.reader.mapped_unit(p)] if v is not None}
            copied = [p for p in parts if self.plan.tier(p) != self.plan.compute_tier and p not in mapped]
            item.all_mapped = len(mapped) == len(parts) > 0
            entry = self.pool.acquire(sum(self.store.layout(p).size for p in copied)) if copied else None
            out_bytes = sum(self._out_bytes(p) for p in parts)
            fentry = self.fpool.acquire(out_bytes) if out_bytes else None
            for e in (entry, fentry):
                if self.cuda and e is not None and e[1] is not None:
                    self.copy_stream.wait_event(e[1])  # the compute finished with this buffer
            off = foff = 0
            for p in parts:
                if p in mapped:
                    views, perms = mapped[p]
                    item.perms.update(perms)
                    item.mapped[p] = self.reader.view_cache[p][0]
                else:
                    resident = self._bytes_of(p, entry[0] if entry else None, off, item)
                    views = tensor_views(resident if resident is not None else entry[0], self.store.slots(p),
                                         0 if resident is not None else off)
                    if resident is None:
                        off += self.store.layout(p).size
                if self._out_bytes(p):
                    foff = self._finish(p, views, fentry[0], foff)
                item.views.update(views)
            if self.cuda:
                item.event = torch.cuda.Event()
                item.event.record(self.copy_stream)
            item.entries = [(pool, e) for pool, e in ((self.pool, entry), (self.fpool, fentry)) if e is not None]
        except BaseException as e:  # handed to the compute thread, raised there
            item.error = e
        return item

    def _out_bytes(self, p: str) -> int:
        """Bytes of float weights the loader makes for part `p`: dequantized weights, and weights converted
        to the compute dtype (off the compute thread's critical path)."""
        if p not in self._out:
            quant = stored_names([sl.name for sl in self.store.slots(p)])
            qnames = {n for _, names in quant.values() for n in names.values()}
            shapes = {sl.name: sl.shape for sl in self.store.slots(p)}
            kept = {b: q for b, q in quant.items() if b in self.keep}
            total = float_bytes(shapes, {b: q for b, q in quant.items() if b not in kept}, self.dtype)
            total += sum(ggml_bytes(kind, {sf: shapes[n] for sf, n in names.items()}) for kind, names in kept.values())
            for sl in self.store.slots(p):
                if sl.name not in qnames and sl.dtype.is_floating_point and sl.dtype != self.dtype:
                    total += (sl.end - sl.begin) // sl.dtype.itemsize * self.dtype.itemsize
            self._out[p] = total
        return self._out[p]

    def _finish(self, p: str, views: dict, fbuf: torch.Tensor, foff: int) -> int:
        """Replace a part's quantized tensors in `views` by float weights, and float weights of another
        dtype by converted ones, all written into fbuf[foff:]."""
        t0 = time.perf_counter()
        ctx = torch.cuda.stream(self.copy_stream) if self.cuda else contextlib.nullcontext()
        with ctx:
            for base, (kind, names) in stored_names(list(views)).items():
                if base in self.keep:   # computed on as blocks: a GGUF's as they are, our int4/int8 interleaved
                    parts = {s: views.pop(name) for s, name in names.items()}
                    n = ggml_bytes(kind, {s: tuple(t.shape) for s, t in parts.items()})
                    gk, raw = to_ggml(kind, parts, out=fbuf[foff:foff + n].view(
                        parts[".scale"].shape[0], -1) if n else None)
                    views[f"{base}.{gk}"] = raw
                    foff += n
                    continue
                shape = float_shape(kind, views[names[SUFFIXES[kind][0]]].shape)
                n = shape[0] * shape[1] * self.dtype.itemsize
                out = fbuf[foff:foff + n].view(self.dtype).view(shape)
                dequantize(kind, {s: views.pop(name) for s, name in names.items()}, self.dtype, out=out)
                views[base] = out
                foff += n
            for name, t in list(views.items()):
                if t.is_floating_point() and t.dtype != self.dtype:
                    n = t.numel() * self.dtype.itemsize
                    out = fbuf[foff:foff + n].view(self.dtype).view(t.shape)
                    out.copy_(t)
                    views[name] = out
                    foff += n
        self.prof.dequant[p] += time.perf_counter() - t0
        return foff

    def _run(self):
        while True:
            with self.cond:
                while not self.stopped and len(self.ready) >= self.lookahead:
                    self.cond.wait()
                if self.stopped:
                    return
                epoch, idx = self.epoch, self.pidx
            item = self._load(self.order[idx % len(self.order)])
            with self.cond:
                if epoch != self.epoch or self.stopped:
                    self._drop(item)
                    continue
                self.ready.append(item)
                self.pidx = (idx + 1) % len(self.order)
                self.cond.notify_all()

    def load_now(self, u: UnitPlan) -> Loaded:
        """A unit brought in on demand, outside the sweep order (a routed expert); hand it back with done()."""
        item = self._load(u)
        if self.cuda and item.event is not None:
            torch.cuda.current_stream(self.device).wait_event(item.event)
        self.prof.copy[u.name.rsplit(".expert.", 1)[0] + ".experts"] += item.copy_seconds
        return item

    def _drop(self, item: Loaded):
        for pool, e in item.entries:
            pool.release(e)

    # -- consumer side
    def get(self, name: str) -> Loaded:
        t0 = time.perf_counter()
        want = self.index[name]
        if self.thread is None:
            item = self._load(self.order[want])
        else:
            with self.cond:
                if self.cidx != want:
                    # out of order (a sweep was interrupted): restart the read-ahead at this unit
                    self.epoch += 1
                    while self.ready:
                        self._drop(self.ready.popleft())
                    self.cidx = self.pidx = want
                    self.cond.notify_all()
                while not self.ready:
                    self.cond.wait()
                item = self.ready.popleft()
                self.cidx = (self.cidx + 1) % len(self.order)
                self.cond.notify_all()
        if item.error is not None:
            err = item.error
            self._drop(item)
            raise err
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(item.event)
        self.prof.wait[name] += time.perf_counter() - t0
        self.prof.copy[name] += item.copy_seconds
        return item

    def done(self, item: Loaded):
        if self.cuda:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
            for _, e in item.entries:
                e[1] = ev
        self._drop(item)

    def close(self):
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join(timeout=10)
