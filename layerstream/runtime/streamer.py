"""The streaming runtime: a background loader and the hooks that swap weights in and out.

For each streamed unit, a hook before its forward waits for its weights (read ahead by the loader
thread into reusable buffers) and points the unit's parameters at them; a hook after its forward
points them back at empty tensors and hands the buffer back. Resident units are bound once.
"""

from __future__ import annotations

import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from ..arch import Layout
from ..plan import Plan
from ..quant import INT4_GGML, Int4PackedLinear, as_int4, dequantize, stored_names
from ..store import Store, aligned_empty, tensor_views
from .embedding import EmbeddingRows
from .experts import ExpertRouting
from .loader import Loader
from .profiler import Profiler
from .reader import FileReader


class Streamer(ExpertRouting, EmbeddingRows):
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
                packed = {n for q in quant.values() for n in q[1].values()}
                views = {n: t.clone() for n, t in views.items() if n not in packed} | \
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
        todo = []
        for base, (kind, names) in quant.items():
            mod_name, attr = base.rsplit(".", 1)
            parts = {s: views[n] for s, n in names.items()}
            if kind in INT4_GGML:   # a GGUF's 4-bit blocks as they lie in the file: the same values as int4 blocks
                kind, parts = "int4", as_int4(kind, parts["." + kind])
            if kind != "int4" or attr != "weight" or not Int4PackedLinear.supported(mods[mod_name], parts, self.dtype):
                return False   # this unit goes through the loader (dequantized each use)
            todo.append((mod_name, parts))
        for mod_name, parts in todo:
            old = mods[mod_name]
            parent, _, child = mod_name.rpartition(".")
            setattr(mods[parent] if parent else self.model, child,
                    Int4PackedLinear.from_blocks(old, parts, self.dtype, bias=old.bias))
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
        self.handles.append(emb_mod.register_forward_pre_hook(self._sweep_start, with_kwargs=True))
        if emb is not None and (emb.tier != self.plan.compute_tier or "embed" in self.plan.dequant_bytes):
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

    def _sweep_start(self, module, args, kwargs):
        self.prof.sweeps += 1
        ids = args[0] if args else next(iter(kwargs.values()), None)
        self.prof.sweep_tokens.append(int(ids.shape[-1]) if torch.is_tensor(ids) and ids.dim() else 1)

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

    def close(self):
        for h in self.handles:
            h.remove()
        if self.expert_pool is not None:
            self.expert_pool.shutdown(wait=False)
        self.loader.close()
        self.reader.close()
