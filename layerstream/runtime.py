"""The streaming runtime: a background loader and the hooks that swap weights in and out.

For each streamed unit, a hook before its forward waits for its weights (read ahead by the loader
thread into reusable buffers) and points the unit's parameters at them; a hook after its forward
points them back at empty tensors and hands the buffer back. Resident units are bound once.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from collections import defaultdict, deque
from dataclasses import dataclass, field

import torch
from torch import nn

from .adapters import Layout
from .errors import InputError, StoreError
from .plan import Plan, UnitPlan
from .quantize import SUFFIXES, dequantize, float_bytes, float_shape, int4_linear, stored_names
from .store import Store, aligned_empty, read_layout, tensor_views
from .utils import fmt_bytes


# ---------------------------------------------------------------------------- profiling

class Profiler:
    """Per-unit time waiting for I/O, copying to the device and computing; bytes read."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.wait = defaultdict(float)
        self.copy = defaultdict(float)
        self.dequant = defaultdict(float)
        self.compute = defaultdict(float)
        self.calls = defaultdict(int)
        self.bytes_read = 0
        self.read_seconds = 0.0
        self.sweeps = 0
        self.allocations = 0
        # mixture of experts: one entry per experts call, (layer unit, experts routed, of which read from disk)
        self.experts: list[tuple[str, tuple[int, ...], int]] = []

    def reset(self):
        self.__init__(self.enabled)

    def report(self) -> str:
        names = list(self.calls)
        sweeps = max(self.sweeps, 1)
        lines = [f"{'unit':>10s} {'calls':>6s} {'wait ms':>9s} {'copy ms':>9s} {'compute ms':>11s}   (per call)"]
        for n in names:
            c = max(self.calls[n], 1)
            lines.append(f"{n:>10s} {self.calls[n]:6d} {1e3 * self.wait[n] / c:9.2f} {1e3 * self.copy[n] / c:9.2f} "
                         f"{1e3 * self.compute[n] / c:11.2f}")
        tw, tc, tk = sum(self.wait.values()), sum(self.copy.values()), sum(self.compute.values())
        td = sum(self.dequant.values())
        if self.experts:
            routed = sum(len(e[1]) for e in self.experts)
            lines.append(f"experts: {len(self.experts)} calls, {routed / len(self.experts):.2f} routed per call, "
                         f"{sum(e[2] for e in self.experts) / len(self.experts):.2f} of them read from disk")
        lines.append(f"total: wait {tw:.2f} s, copy {tc:.2f} s, compute {tk:.2f} s over {self.sweeps} sweeps; "
                     + (f"dequantize/convert {td:.2f} s on the loader; " if td else "") +
                     f"read {fmt_bytes(self.bytes_read)} ({fmt_bytes(self.bytes_read / sweeps)} per sweep"
                     + (f", {fmt_bytes(self.bytes_read / self.read_seconds)}/s on the loader" if self.read_seconds else "")
                     + f"); buffer allocations {self.allocations}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------- reading files

class FileReader:
    """Reads units into caller-owned buffers, checking them against the manifest: file sizes (and, in
    place, mtimes) on every read, the xxh3 of the content on the first read and whenever a file changed.

    io: "buffered" (page cache; best when the model fits in RAM), "direct" (O_DIRECT into aligned
    buffers: no copy through the page cache, and streamed units do not evict anything), "fadvise"
    (buffered, then posix_fadvise DONTNEED), or "auto"."""

    def __init__(self, store: Store, verify: str, profiler: Profiler, direct: bool = False, readers: int = 1,
                 fadvise: bool = False):
        if verify not in ("first", "always", "never"):
            raise ValueError("verify must be 'first', 'always' or 'never'")
        self.store, self.verify, self.prof, self.direct = store, verify, profiler, direct
        self.fadvise = fadvise             # buffered reads dropped from the page cache after (io="fadvise")
        self.cached: set[str] = set()     # read through the page cache and kept (the plan's cache tier)
        self.seen: dict[str, tuple] = {}
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(readers, thread_name_prefix="layerstream-read") if readers > 1 else None

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

    def close(self):
        if self.pool is not None:
            self.pool.shutdown(wait=False)


class BufferPool:
    """Reusable flat byte buffers, by exact size: no allocation per token once warm."""

    def __init__(self, device: torch.device, pin: bool, profiler: Profiler):
        self.device, self.pin, self.prof = device, pin, profiler
        self.free: dict[int, list] = defaultdict(list)
        self.lock = threading.Lock()    # the loader acquires, the compute thread releases

    def acquire(self, size: int):
        with self.lock:
            if self.free[size]:
                return self.free[size].pop()
            self.prof.allocations += 1
        return [aligned_empty(size, self.device, self.pin), None]

    def release(self, entry) -> None:
        with self.lock:
            self.free[entry[0].numel()].append(entry)


@dataclass
class Loaded:
    name: str
    views: dict[str, torch.Tensor] = field(default_factory=dict)
    entries: list = field(default_factory=list)   # (pool, [buffer, event of its last use])
    event: object = None                  # copy finished (accelerators)
    error: BaseException | None = None
    copy_seconds: float = 0.0


# ---------------------------------------------------------------------------- loader

class Loader:
    """Brings streamed units in, in sweep order, `lookahead` units ahead of the compute (cyclic: the
    next sweep's first units load while this sweep's last ones compute)."""

    def __init__(self, store: Store, plan: Plan, device: torch.device, ram_units: dict[str, torch.Tensor],
                 reader: FileReader, profiler: Profiler, prefetch: bool, dtype: torch.dtype):
        self.store, self.plan, self.device = store, plan, device
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
            st = self.staging.acquire(n)
            if st[1] is not None:
                st[1].synchronize()
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
            copied = [p for p in parts if self.plan.tier(p) != self.plan.compute_tier]
            entry = self.pool.acquire(sum(self.store.layout(p).size for p in copied)) if copied else None
            out_bytes = sum(self._out_bytes(p) for p in parts)
            fentry = self.fpool.acquire(out_bytes) if out_bytes else None
            for e in (entry, fentry):
                if self.cuda and e is not None and e[1] is not None:
                    self.copy_stream.wait_event(e[1])  # the compute finished with this buffer
            off = foff = 0
            for p in parts:
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
            total = float_bytes({sl.name: sl.shape for sl in self.store.slots(p)}, quant, self.dtype)
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


# ---------------------------------------------------------------------------- hooks

class Streamer:
    """Binds a skeleton's parameters to resident weights once and to streamed ones around each forward."""

    def __init__(self, model: nn.Module, lay: Layout, store: Store, plan: Plan, device: torch.device,
                 dtype: torch.dtype, prefetch: bool, profiler: Profiler, verify: str = "first", progress=None,
                 direct: bool = False, readers: int = 1, fadvise: bool = False):
        self.model, self.lay, self.store, self.plan = model, lay, store, plan
        self.device, self.dtype, self.prof = device, dtype, profiler
        self.params: dict[str, nn.Parameter] = dict(model.named_parameters(remove_duplicate=False))
        self.buffers = {n: (m, n.rsplit(".", 1)[-1], b) for mn, m in model.named_modules()
                        for n, b in ((f"{mn}.{k}" if mn else k, b) for k, b in m._buffers.items())}
        self.expert_views: dict[str, dict[str, torch.Tensor]] = {}   # resident experts, ready to stack
        self.expert_units = {u.name: u for u in plan.units if u.kind == "expert"}
        self.expert_counts: dict[str, int] = defaultdict(int)   # routed calls per expert, not yet recorded
        self.reader = FileReader(store, verify, profiler, direct=direct, readers=readers, fadvise=fadvise)
        if direct or fadvise:
            self.reader.cached = set(plan.cached)
        self.empty = torch.empty(0, dtype=dtype, device=device)
        self.handles = []
        self.ram_units: dict[str, torch.Tensor] = {}
        self._load_resident(progress)
        self.fused: set[str] = set()       # experts modules with every expert resident: bound whole, once
        self._fuse_resident_experts()
        self.loader = Loader(store, plan, device, self.ram_units, self.reader, profiler, prefetch, dtype)
        self._install_hooks()

    # -- resident units
    def _load_resident(self, progress):
        accel = self.device.type != "cpu"
        for u in self.plan.units:
            if u.tier == "disk":
                continue
            host = aligned_empty(self.store.layout(u.name).size, pin=self.device.type == "cuda" and u.tier == "ram")
            self.reader.read(u.name, host)
            if progress:
                progress(u.bytes)
            buf = host.to(self.device) if accel and u.tier == "device" else host
            if not accel and u.kind != "expert" and u.name in self.plan.dequant_bytes and \
                    self._compute_packed(u.name, buf):
                continue
            if u.name in self.plan.dequant_bytes or (accel and u.tier == "ram"):
                self.ram_units[u.name] = buf       # dequantized, or copied to the device, on each use
                continue
            views = tensor_views(buf, self.store.slots(u.name))
            quant = stored_names(list(views))
            if quant:   # a quantized store that fits as floats: dequantize once, and free the packed bytes
                views = {n: t.clone() for n, t in views.items() if not any(n in q[1].values() for q in quant.values())} | \
                    {base: dequantize(kind, {sf: views[n] for sf, n in names.items()}, self.dtype)
                     for base, (kind, names) in quant.items()}
            if u.kind == "expert":     # stacked with the routed ones at each use
                self.expert_views[u.name] = {n: t.to(self.dtype) if t.is_floating_point() else t
                                             for n, t in views.items()}
                continue
            for name, t in views.items():
                self._bind(name, t)
        self.prof.bytes_read = 0
        self.prof.read_seconds = 0.0

    def _compute_packed(self, unit: str, buf: torch.Tensor) -> bool:
        """A resident int4 unit on the CPU: its linear layers compute on the packed blocks directly (no
        dequantization per sweep); it then needs no loader. False when some weight cannot (int8, odd shapes)."""
        views = tensor_views(buf, self.store.slots(unit))
        quant = stored_names(list(views))
        mods = dict(self.model.named_modules())
        if any(kind != "int4" for kind, _ in quant.values()):
            return False
        done = []
        for base, (kind, names) in quant.items():
            mod_name, attr = base.rsplit(".", 1)
            if attr != "weight" or not int4_linear(mods[mod_name], {s: views[n] for s, n in names.items()},
                                                     self.dtype):
                for mn in done:   # undo: this unit goes through the loader after all
                    for a in ("_ls_packed", "_ls_sz", "_ls_shape", "forward"):
                        mods[mn].__dict__.pop(a, None)
                return False
            done.append(mod_name)
        packed = {n for _, names in quant.values() for n in names.values()}
        for name, t in views.items():
            if name not in packed:
                self._bind(name, t.clone())
        del self.plan.dequant_bytes[unit]
        return True

    def _bind(self, name: str, t: torch.Tensor):
        if name in self.buffers:   # a persistent buffer kept in the checkpoint, in its own dtype
            mod, attr, default = self.buffers[name]
            mod._buffers[attr] = t.to(device=self.device, dtype=default.dtype)
            return
        p = self.params[name]
        want = p.dtype if p.dtype == torch.float32 else self.dtype   # modules transformers keeps in fp32 stay so
        if t.is_floating_point() and t.dtype != want:
            t = t.to(want)   # resident units, once (the loader converts streamed ones)
        p.data = t

    def _unbind(self, names):
        for n in names:
            if n in self.buffers:
                mod, attr, default = self.buffers[n]
                mod._buffers[attr] = default
            else:
                self.params[n].data = self.empty

    # -- hooks
    def _install_hooks(self):
        mods = dict(self.model.named_modules())
        streamed = {u.name for u in self.plan.streamed}
        emb = next((u for u in self.plan.units if u.kind == "embed"), None)
        emb_mod = mods[self.lay.embed_module]
        self.handles.append(emb_mod.register_forward_pre_hook(self._sweep_start))
        if emb is not None and emb.tier != self.plan.compute_tier:
            self._embed_setup(emb, emb_mod)
        for u in self.lay.units:
            if u.name not in streamed:
                continue
            if u.kind == "layer":
                m = mods[f"{self.lay.layers_prefix}.{u.name.split('.')[1]}"]
                self.handles.append(m.register_forward_pre_hook(self._pre(u.name)))
                self.handles.append(m.register_forward_hook(self._post(u.name)))
            elif u.kind == "head":
                out_emb = self.model.get_output_embeddings()
                last = next((n for n, m in mods.items() if m is out_emb), u.modules[-1])
                for mn in u.modules:
                    self.handles.append(mods[mn].register_forward_pre_hook(self._pre(u.name, once=True)))
                self.handles.append(mods[last].register_forward_hook(self._post(u.name)))
        for ex in self.lay.experts.values():
            self.handles.append(mods[ex.module].register_forward_pre_hook(self._experts_pre(ex), with_kwargs=True))
            self.handles.append(mods[ex.module].register_forward_hook(self._experts_post(ex)))
        self.bound: dict[str, tuple] = {}
        self.expert_pool = ThreadPoolExecutor(4, thread_name_prefix="layerstream-experts") \
            if any(u.tier != self.plan.compute_tier for u in self.expert_units.values()) else None

    def _fuse_resident_experts(self):
        """A layer whose experts are all resident in compute memory runs as transformers runs it: its fused
        [num_experts, ...] weights are assembled once (the per-expert buffers then freed) and stay bound,
        so no expert is copied per token."""
        for ex in self.lay.experts.values():
            units = [ex.unit(j) for j in range(ex.num_experts)]
            if not all(u in self.expert_views for u in units):
                continue
            for p in ex.params:
                fused = torch.stack([self.expert_views[u][ex.tensor(j, p)] for j, u in enumerate(units)])
                self.params[f"{ex.module}.{p}"].data = fused.to(self.dtype) if fused.is_floating_point() else fused
            for u in units:
                del self.expert_views[u]
            self.fused.add(ex.module)

    # -- experts: only the ones the router chose are brought in, when it has chosen them
    def _experts_pre(self, ex):
        def hook(mod, args, kwargs):
            args = list(args)
            names = ("hidden_states", "top_k_index")
            for i, key in enumerate(names):   # positional in every family; keywords accepted too
                if len(args) <= i:
                    k = key if key in kwargs else next(k for k in kwargs if k not in names[:i] and
                                                         ("index" in k or "indices" in k or i == 0))
                    args.append(kwargs.pop(k))
            idx = args[1]
            routed = [j for j in torch.unique(idx).tolist() if 0 <= j < ex.num_experts]
            if ex.module in self.fused:   # all resident and bound: count the routing only
                self._record_routing(ex, routed, 0)
                return tuple(args), kwargs
            t0 = time.perf_counter()
            if not routed:
                routed = [0]
            todo = [self.expert_units[ex.unit(j)] for j in routed if ex.unit(j) not in self.expert_views]
            if self.expert_pool is not None and len(todo) > 1:
                items = list(self.expert_pool.map(self.loader.load_now, todo))
            else:
                items = [self.loader.load_now(u) for u in todo]
            try:
                for item in items:
                    if item.error is not None:
                        raise item.error
                views = {it.name: it.views for it in items} | self.expert_views
                for p in ex.params:
                    stacked = torch.stack([views[ex.unit(j)][ex.tensor(j, p)] for j in routed])
                    self.params[f"{ex.module}.{p}"].data = stacked.to(self.dtype) if stacked.is_floating_point() \
                        else stacked
            finally:
                for item in items:
                    self.loader.done(item)
            remap = torch.full((ex.num_experts + 1,), len(routed), dtype=idx.dtype, device=idx.device)
            remap[torch.tensor(routed, device=idx.device)] = torch.arange(len(routed), dtype=idx.dtype,
                                                                          device=idx.device)
            args[1] = remap[idx]
            mod.num_experts = len(routed)
            self.prof.wait[ex.layer + ".experts"] += time.perf_counter() - t0
            self._record_routing(ex, routed, sum(u.tier == "disk" for u in todo))
            return tuple(args), kwargs
        return hook

    def _record_routing(self, ex, routed: list[int], read: int) -> None:
        """Count the experts chosen (for the store's expert counts) and log the call for the profiler."""
        for j in routed:
            self.expert_counts[ex.unit(j)] += 1
        self.prof.experts.append((ex.layer, tuple(routed), read))

    def _experts_post(self, ex):
        def hook(mod, args, output):
            if ex.module in self.fused:
                return
            mod.num_experts = ex.num_experts
            self._unbind([f"{ex.module}.{p}" for p in ex.params])
            self.prof.calls[ex.layer + ".experts"] += 1
        return hook

    def _sweep_start(self, module, args):
        self.prof.sweeps += 1

    def _pre(self, name, once=False):
        def hook(module, args):
            if once and name in self.bound:
                return
            item = self.loader.get(name)
            for pname, t in item.views.items():
                self._bind(pname, t)
            self.bound[name] = (item, time.perf_counter())
        return hook

    def _post(self, name):
        def hook(module, args, output):
            item, t0 = self.bound.pop(name)
            if self.prof.enabled and self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.prof.compute[name] += time.perf_counter() - t0
            self.prof.calls[name] += 1
            self._unbind(item.views)
            self.loader.done(item)
        return hook

    # -- embedding rows: a streamed embedding reads only the rows of the tokens in the batch
    def _embed_setup(self, emb: UnitPlan, module: nn.Module):
        (slot,) = self.store.slots("embed")
        weight_name = slot.name
        rows, hidden = slot.shape
        row_bytes = hidden * slot.dtype.itemsize
        path, first = self.store.layout("embed").file_offset[weight_name]
        if emb.tier == "disk" and self.reader.verify != "never":
            self.store.check_streaming("embed")   # checked once before any row is used, 16 MB at a time

        def gather(uniq: torch.Tensor) -> torch.Tensor:
            if emb.tier == "ram":   # accelerator with the embedding in host RAM
                host = tensor_views(self.ram_units["embed"], [slot])[weight_name]
                return host[uniq]
            out = torch.empty((len(uniq), hidden), dtype=slot.dtype)
            mv = memoryview(out.view(torch.uint8).numpy()).cast("B")
            try:
                fd = os.open(path, os.O_RDONLY)
                try:
                    for i, r in enumerate(uniq.tolist()):
                        n = os.preadv(fd, [mv[i * row_bytes:(i + 1) * row_bytes]], first + r * row_bytes)
                        if n != row_bytes:
                            raise StoreError(f"{path}: short read of embedding row {r} (unit embed); "
                                             f"re-split the model")
                finally:
                    os.close(fd)
            except OSError as e:
                raise StoreError(f"{path}: cannot read unit embed ({e.strerror}); the store or its source is "
                                 f"missing or moved: run `layerstream verify {self.store.path}`") from None
            self.prof.bytes_read += len(uniq) * row_bytes
            return out

        state = {}

        def pre(mod, args, kwargs):
            ids = args[0] if args else next(iter(kwargs.values()))
            uniq, inv = torch.unique(ids, return_inverse=True)
            if len(uniq) and (int(uniq[0]) < 0 or int(uniq[-1]) >= rows):
                bad = int(uniq[0]) if int(uniq[0]) < 0 else int(uniq[-1])
                raise InputError(f"token id {bad} is outside the vocabulary (0..{rows - 1})")
            w = gather(uniq.cpu()).to(self.device)
            # a tied head bound before the embedding runs (its unit holds weights of the model's own module,
            # bound when the model starts: ZAYA) keeps its full weight once the rows are done with
            state["prev"] = self.params[weight_name].data
            self._bind(weight_name, w)
            state["pad"] = getattr(mod, "padding_idx", None)
            if state["pad"] is not None:
                mod.padding_idx = None
            inv = inv.to(ids.device)
            if args:
                return (inv,) + tuple(args[1:]), kwargs
            key = next(iter(kwargs))
            return args, {**kwargs, key: inv}

        def post(mod, args, kwargs, output):
            self.params[weight_name].data = state.pop("prev")
            if state.get("pad") is not None:
                mod.padding_idx = state["pad"]

        self.handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        self.handles.append(module.register_forward_hook(post, with_kwargs=True))

    def close(self):
        for h in self.handles:
            h.remove()
        if self.expert_pool is not None:
            self.expert_pool.shutdown(wait=False)
        self.loader.close()
        self.reader.close()
