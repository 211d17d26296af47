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
from ..arch.skeleton import expert_param
from ..plan import Plan
from ..quant import INT4_GGML, Int4PackedLinear, as_int4, dequantize, stored_names
from ..quant.kernels import (
    REPACK_ROWS,
    BlockLinear,
    block_experts_forward,
    experts_on_blocks,
    kernel_kind,
    repack,
    repackable,
    to_ggml,
)
from ..store import Store, aligned_empty, release_rows_as_read, tensor_views
from ..utils import fmt_bytes
from .embedding import EmbeddingRows
from .experts import ExpertRouting
from .loader import Loader
from .profiler import Profiler
from .reader import FileReader


def block_weights(model: nn.Module, store: Store) -> dict[str, dict[str, tuple[str, str]]]:
    """The units whose linear layers can compute on their stored blocks with ggml (`quant/kernels.py`):
    {unit: {stored weight: (module, GGUF kind)}}. A unit qualifies when every quantized weight in it has a
    kernel and belongs to a plain `nn.Linear`; the embedding qualifies too (its rows are gathered as blocks),
    and when the head is tied to it, the head's linear layer computes on the embedding's blocks. An expert unit
    qualifies when its fused experts module follows transformers' experts contract in a form
    `block_experts_forward` computes (`experts_on_blocks`); others keep the dequantize path."""
    mods = dict(model.named_modules())
    out_emb = model.get_output_embeddings()
    head_name = next((n for n, m in mods.items() if m is out_emb), None)
    tied = bool(store.manifest.tied) and out_emb is not None and \
        out_emb.weight is model.get_input_embeddings().weight
    found = {}
    for u in store.manifest.units:
        shapes = {sl.name: tuple(sl.shape) for sl in store.slots(u.name)}
        quant = stored_names(list(shapes))
        if u.kind == "expert":
            weights = _expert_blocks(mods, shapes, quant)
            if weights:
                found[u.name] = weights
            continue
        weights = {}
        for base, (kind, names) in quant.items():
            gk = kernel_kind(kind, {sf: shapes[n] for sf, n in names.items()})
            mod_name, _, attr = base.rpartition(".")
            if u.kind == "embed":
                if not tied:
                    continue   # its rows are gathered as blocks; nothing computes on the whole matrix
                mod_name = head_name
            if gk is None or attr != "weight" or type(mods.get(mod_name)) is not nn.Linear:
                weights = None
                break
            weights[base] = (mod_name, gk)
        if quant and weights is not None:
            found[u.name] = weights
    return found


def repack_note(store: Store, plan: Plan, weights: dict) -> str | None:
    """What `Streamer` will repack of the units `plan` computes on their blocks (`weights`: `block_weights`'s
    answer), by GGUF type and bytes, for `layerstream plan` (it is decided per weight at load; the embedding's
    rows are gathered as stored)."""
    done, kept, streamed = defaultdict(int), defaultdict(int), False
    for u in plan.units:
        if u.name not in plan.blocks or u.kind == "embed":
            continue
        if u.tier == "disk":
            streamed = True
            continue
        slots = {sl.name: sl for sl in store.slots(u.name)}
        parts = stored_names(list(slots))
        for base, (_, gk) in weights[u.name].items():
            (done if repackable(gk) else kept)[gk] += sum(slots[n].end - slots[n].begin
                                                          for n in parts[base][1].values())

    def listed(d):
        return ", ".join(f"{fmt_bytes(b)} {k.upper()}" for k, b in sorted(d.items(), key=lambda kv: -kv[1]))
    parts = ([f"resident blocks repacked at load for ggml's GEMMs (llama.cpp's CPU_REPACK): {listed(done)}"]
             if done else []) + \
        ([f"resident blocks as stored (no repacking of their type on this CPU): {listed(kept)}"] if kept else []) + \
        ([f"streamed blocks repacked for calls of {REPACK_ROWS} rows or more"] if streamed else [])
    return "; ".join(parts) + " (none of it with --no-repack)" if parts else None


def _expert_blocks(mods: dict, shapes: dict, quant: dict) -> dict | None:
    """One expert unit's weights {stored weight: (experts module, GGUF kind)} when its experts module computes on
    blocks (`experts_on_blocks`) and every tensor of the unit is a weight ggml has a kernel for; else None."""
    if not quant or len({n for _, names in quant.values() for n in names.values()}) != len(shapes):
        return None   # a float tensor beside the blocks (a bias): the dequantize path
    weights = {}
    for base, (kind, names) in quant.items():
        try:
            mod_name, _, param = expert_param(base)
        except ValueError:
            return None
        mod = mods.get(mod_name)
        gk = kernel_kind(kind, {sf: shapes[n] for sf, n in names.items()})
        wanted = ("gate_up_proj" if getattr(mod, "has_gate", True) else "up_proj", "down_proj")
        if gk is None or mod is None or param not in wanted or not experts_on_blocks(mod):
            return None
        weights[base] = (mod_name, gk)
    return weights


class Streamer(ExpertRouting, EmbeddingRows):
    """Binds a skeleton's parameters to resident weights once and to streamed ones around each forward."""

    def __init__(self, model: nn.Module, lay: Layout, store: Store, plan: Plan, device: torch.device,
                 dtype: torch.dtype, prefetch: bool, profiler: Profiler, verify: str = "first", progress=None,
                 direct: bool = False, readers: int = 1, fadvise: bool = False, mapped: bool = False,
                 repack: bool = True):
        self.model, self.lay, self.store, self.plan = model, lay, store, plan
        self.repack = repack and device.type == "cpu"   # resident blocks repacked for ggml's faster kernels
        # linear layers that compute on their blocks (ggml): swapped in before the parameters are listed
        self.block_mods: dict[str, BlockLinear] = {}   # stored name of a weight's blocks -> its module
        self.block_kinds: dict[str, str] = {}          # stored weight -> the GGUF kind it computes as
        # experts modules computing on their experts' blocks -> {expert: {param: (GGUF kind, blocks)}} resident
        self.expert_blocks: dict[str, dict[int, dict[str, tuple[str, torch.Tensor]]]] = {}
        self.expert_items: dict[str, list] = {}        # experts module -> loaded items of its call, released after
        self.expert_units = {u.name: u for u in plan.units if u.kind == "expert"}
        self._swap_block_linears()
        if self.repack:   # streamed blocks are repacked for long calls (a prefill), resident ones once at load
            for mod in self.block_mods.values():
                mod.repack_rows = REPACK_ROWS
        self.device, self.dtype, self.prof = device, dtype, profiler
        self.params: dict[str, nn.Parameter] = dict(model.named_parameters(remove_duplicate=False))
        self.buffers = {n: (m, n.rsplit(".", 1)[-1], b) for mn, m in model.named_modules()
                        for n, b in ((f"{mn}.{k}" if mn else k, b) for k, b in m._buffers.items())}
        self.expert_views: dict[str, dict[str, torch.Tensor]] = {}   # resident experts, ready to stack
        self.expert_counts: dict[str, int] = defaultdict(int)   # routed calls per expert, not yet recorded
        self.reader = FileReader(store, verify, profiler, direct=direct, readers=readers, fadvise=fadvise,
                                 mapped=mapped)
        if direct or fadvise:
            self.reader.cached = set(plan.cached)
        self.reader.as_read = set(self.block_mods)   # blocks a BlockLinear computes on: outputs permuted instead
        self.empty = torch.empty(0, dtype=dtype, device=device)
        self.handles = []
        self.ram_units: dict[str, torch.Tensor] = {}
        self._load_resident(progress)
        self.fused: set[str] = set()       # experts modules with every expert resident: bound whole, once
        self._fuse_resident_experts()
        # mapped units need no read ahead: no I/O to overlap, and a loader thread beside the compute's would only
        # contend for the cores (the embedded model at max_ram=0: 368 ms a token with it, 26 without)
        self.loader = Loader(store, plan, device, self.ram_units, self.reader, profiler,
                             prefetch and not self.reader.mapped, dtype, keep=self.block_kinds)
        self._install_hooks()

    # -- resident units
    def _load_resident(self, progress):
        accel = self.device.type != "cpu"
        for u in self.plan.units:
            if u.tier == "disk":
                continue
            host = aligned_empty(self.store.layout(u.name).size, pin=self.device.type == "cuda" and u.tier == "ram")
            self.reader.read(u.name, host)
            release_rows_as_read(self.store.layout(u.name), host)   # q/k rows as read, dead once reordered
            if progress:
                progress(u.bytes)
            buf = host.to(self.device) if accel and u.tier == "device" else host
            if u.name in self.plan.blocks:
                self._bind_blocks(u.name, buf)
                continue
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

    def _swap_block_linears(self):
        """Each linear layer of a unit planned to compute on its blocks becomes a `BlockLinear` (bound later)."""
        if not self.plan.blocks:
            return
        mods = dict(self.model.named_modules())
        for unit, weights in block_weights(self.model, self.store).items():
            if unit not in self.plan.blocks:
                continue
            if unit in self.expert_units:   # its experts module computes on the routed experts' blocks
                for base, (mod_name, gk) in weights.items():
                    self.block_kinds[base] = gk
                    if mod_name not in self.expert_blocks:
                        self.expert_blocks[mod_name] = {}
                        mod = mods[mod_name]
                        mod.ls_blocks = {}
                        mod.forward = block_experts_forward.__get__(mod)
                continue
            for base, (mod_name, gk) in weights.items():
                old = mods[mod_name]
                new = BlockLinear.replacing(old, gk)
                parent, _, child = mod_name.rpartition(".")
                setattr(mods[parent] if parent else self.model, child, new)
                mods[mod_name] = new
                self.block_mods[f"{base}.{gk}"] = new
                self.block_kinds[base] = gk

    def _bind_blocks(self, unit: str, buf: torch.Tensor):
        """A resident unit that computes on its blocks: its linear layers bound to them once (our int4 / int8
        parts interleaved into GGUF blocks once); the embedding kept as blocks, its rows gathered per batch.
        Where ggml repacks a weight's type (`repack`), the weight is bound to its repacked copy and the rest of
        the unit copied out of `buf`, which is then freed: the unit holds its size in RAM, not twice it."""
        views = tensor_views(buf, self.store.slots(unit))
        if unit == "embed":
            self.ram_units[unit] = buf
        binds, repacked = [], False
        for base, (kind, names) in stored_names(list(views)).items():
            parts = {sf: views.pop(n) for sf, n in names.items()}
            if base in self.block_kinds:
                gk, raw = to_ggml(kind, parts)
                if self.repack and unit != "embed":   # (the embedding's rows are gathered from its blocks)
                    r = repack(gk, raw)
                    raw, repacked = (raw, repacked) if r is None else (r, True)
                binds.append((base, gk, raw))
        for base, gk, raw in binds:
            if repacked and isinstance(raw, torch.Tensor):
                raw = raw.clone()   # (not a view of buf, which is freed)
            if unit in self.expert_units:
                mod_name, j, param = expert_param(base)
                self.expert_blocks[mod_name].setdefault(j, {})[param] = (gk, raw)
            else:
                self.block_mods[f"{base}.{gk}"].bind(raw)
        if unit == "embed":
            return
        for name, t in views.items():
            self._bind(name, t.clone() if repacked else t)

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

    def _bind(self, name: str, t: torch.Tensor, perm: torch.Tensor | None = None):
        mod = self.block_mods.get(name)
        if mod is not None:   # a weight's blocks, for the linear layer that computes on them
            mod.bind(t, perm)
            return
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
            if n in self.block_mods:
                self.block_mods[n].unbind()
            elif n in self.buffers:
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
        if emb is not None and (emb.tier != self.plan.compute_tier or "embed" in self.plan.dequant_bytes
                                or "embed" in self.plan.blocks):
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
        # units whose every part is a view of its mapped file (CPU, in place, nothing dequantized or converted):
        # they stay bound between sweeps, re-checked (the files' sizes and mtimes) at each use, not rebound
        self.kept: dict[str, object] = {}
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
            kept = self.kept.pop(name, None)
            if kept is not None:
                if self.reader.still_mapped(kept.mapped):
                    self.bound[name] = (kept, time.perf_counter())
                    return
                self._unbind(kept.views)   # a file changed: read (and check) it again
            item = self.loader.get(name)
            perms = item.perms
            for pname, t in item.views.items():
                self._bind(pname, t, perms.get(pname) if perms else None)
            self.bound[name] = (item, time.perf_counter())
        return hook

    def _post(self, name):
        def hook(module, args, output):
            item, t0 = self.bound.pop(name)
            if self.prof.enabled and self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.prof.compute[name] += time.perf_counter() - t0
            self.prof.calls[name] += 1
            if item.all_mapped and not item.entries:
                self.kept[name] = item   # views of the page cache's pages: kept bound, they hold no memory
                return
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
