"""Mixture-of-experts layers: only the experts the router chose are brought in, when it has chosen them.

A layer whose experts are all resident is fused once and bound (transformers' own fused path, no
per-token stacking); otherwise the routed experts are loaded (in parallel), stacked for this call and
the router's indices remapped onto the stack. Routing counts feed the planner's expert heat.

expert_device="cpu" (the plan's): each experts module runs on the CPU, on a twin of the module whose weights
are the experts in host RAM where they lie (those on disk read into host memory when routed), as llama.cpp's
`--override-tensor exps=CPU` and KTransformers do: a token's hidden state goes to the CPU and its output comes
back (a few KB), instead of the routed experts' weights crossing PCIe.
"""

from __future__ import annotations

import time

import torch

from ..arch.skeleton import expert_param


class ExpertRouting:
    """Mixed into `Streamer`: uses its params, expert_views, expert_units, loader, prof and expert_counts."""

    def _fuse_resident_experts(self):
        """A layer whose experts are all resident in compute memory runs as transformers runs it: its fused
        [num_experts, ...] weights are assembled once (the per-expert buffers then freed) and stay bound,
        so no expert is copied per token."""
        self.cpu_experts: dict[str, torch.nn.Module] = {}   # experts module -> its twin on the CPU
        if self.plan.expert_device == "cpu":
            self._cpu_experts_setup()
            return
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
            if ex.module in self.cpu_experts:   # computed on the CPU by its own forward
                return None
            args = _routing_args(args, kwargs)
            idx = args[1]
            routed = [j for j in torch.unique(idx).tolist() if 0 <= j < ex.num_experts]
            if ex.module in self.expert_blocks:   # computed on the routed experts' blocks: nothing stacked
                self._bind_expert_blocks(ex, mod, routed)
                return tuple(args), kwargs
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

    def _bind_expert_blocks(self, ex, mod, routed: list[int]) -> None:
        """The routed experts' blocks for `block_experts_forward`: resident ones as bound at load, the others
        read now (in parallel), kept as blocks by the loader, and handed back after the call."""
        t0 = time.perf_counter()
        self._release_expert_blocks(ex, mod)   # a call that raised before its post hook left its items bound
        resident = self.expert_blocks[ex.module]
        todo = [self.expert_units[ex.unit(j)] for j in routed if j not in resident]
        if self.expert_pool is not None and len(todo) > 1:
            items = list(self.expert_pool.map(self.loader.load_now, todo))
        else:
            items = [self.loader.load_now(u) for u in todo]
        self.expert_items[ex.module] = items
        bound = {j: resident[j] for j in routed if j in resident}
        for item in items:
            if item.error is not None:
                self._release_expert_blocks(ex, mod)
                raise item.error
            for name, t in item.views.items():
                base, _, gk = name.rpartition(".")
                _, j, param = expert_param(base)
                bound.setdefault(j, {})[param] = (gk, t)
        mod.ls_blocks = bound
        self.prof.wait[ex.layer + ".experts"] += time.perf_counter() - t0
        self._record_routing(ex, routed, len(todo))

    def _release_expert_blocks(self, ex, mod) -> None:
        mod.ls_blocks = {}
        for item in self.expert_items.pop(ex.module, []):
            self.loader.done(item)

    def _record_routing(self, ex, routed: list[int], read: int) -> None:
        """Count the experts chosen (for the store's expert counts) and log the call for the profiler."""
        for j in routed:
            self.expert_counts[ex.unit(j)] += 1
        self.prof.experts.append((ex.layer, tuple(routed), read))

    def _experts_post(self, ex):
        def hook(mod, args, output):
            if ex.module in self.expert_blocks:
                self._release_expert_blocks(ex, mod)
                self.prof.calls[ex.layer + ".experts"] += 1
                return
            if ex.module in self.fused or ex.module in self.cpu_experts:
                return
            mod.num_experts = ex.num_experts
            self._unbind([f"{ex.module}.{p}" for p in ex.params])
            self.prof.calls[ex.layer + ".experts"] += 1
        return hook

    # -- expert_device="cpu": experts computed where they lie, in host RAM
    def _cpu_experts_setup(self):
        """A CPU twin of every experts module (its weights the experts' host memory: views, not copies, where
        the store's dtype is the compute dtype), and the module's forward replaced by one that runs the twin.
        A layer whose experts are all in RAM and unquantized is fused once, as transformers holds it."""
        import copy

        from ..quant import stored_names
        from ..store import tensor_views

        self.cpu_views: dict[str, dict[str, torch.Tensor]] = {}
        for name, u in self.expert_units.items():
            if name in self.expert_views:            # a CPU device: bound as floats by _load_resident
                self.cpu_views[name] = self.expert_views.pop(name)
            elif name in self.ram_units:             # an accelerator: its bytes in pinned host memory
                self.cpu_views[name] = tensor_views(self.ram_units.pop(name), self.store.slots(name))
        mods = dict(self.model.named_modules())
        for ex in self.lay.experts.values():
            mod = mods[ex.module]
            twin = copy.deepcopy(mod)
            for p, t in twin._parameters.items():
                if t is not None:
                    twin._parameters[p] = torch.nn.Parameter(torch.empty(0, dtype=t.dtype), requires_grad=False)
            for b, t in twin._buffers.items():
                if t is not None:
                    twin._buffers[b] = t.to("cpu")
            units = [ex.unit(j) for j in range(ex.num_experts)]
            if all(u in self.cpu_views and not stored_names(list(self.cpu_views[u])) for u in units):
                for p in ex.params:
                    twin._parameters[p].data = torch.stack([self._cpu_weight(units[j], ex.tensor(j, p))
                                                            for j in range(ex.num_experts)])
                for u in units:
                    del self.cpu_views[u]
                twin.ls_fused = True
            self.cpu_experts[ex.module] = twin
            mod.forward = self._cpu_forward(ex, twin)

    def _cpu_weight(self, unit: str, name: str, views=None) -> torch.Tensor:
        """One expert tensor as the CPU computes with it: dequantized, in the compute dtype."""
        from ..quant import dequantize, stored_names

        views = views if views is not None else self.cpu_views[unit]
        quant = stored_names(list(views))
        if name in quant:
            kind, names = quant[name]
            return dequantize(kind, {s: views[n] for s, n in names.items()}, self.dtype)
        t = views[name]
        return t.to(self.dtype) if t.is_floating_point() and t.dtype != self.dtype else t

    def _cpu_forward(self, ex, twin):
        def forward(*args, **kwargs):
            from ..store import aligned_empty, tensor_views

            args = _routing_args(args, kwargs)
            device = args[0].device
            args = [a.to("cpu") if torch.is_tensor(a) else a for a in args]
            kwargs = {k: v.to("cpu") if torch.is_tensor(v) else v for k, v in kwargs.items()}
            idx = args[1]
            routed = [j for j in torch.unique(idx).tolist() if 0 <= j < ex.num_experts]
            t0 = time.perf_counter()
            if getattr(twin, "ls_fused", False):
                self._record_routing(ex, routed, 0)
                out = twin(*args, **kwargs)
            else:
                routed = routed or [0]
                views, read = {}, 0
                for j in routed:
                    u = ex.unit(j)
                    if u not in self.cpu_views:   # on disk: read into host memory now
                        buf = aligned_empty(self.store.layout(u).size)
                        self.reader.read(u, buf)
                        views[u] = tensor_views(buf, self.store.slots(u))
                        read += 1
                for p in ex.params:
                    twin._parameters[p].data = torch.stack(
                        [self._cpu_weight(ex.unit(j), ex.tensor(j, p), views.get(ex.unit(j))) for j in routed])
                remap = torch.full((ex.num_experts + 1,), len(routed), dtype=idx.dtype)
                remap[torch.tensor(routed)] = torch.arange(len(routed), dtype=idx.dtype)
                args[1] = remap[idx]
                twin.num_experts = len(routed)
                try:
                    out = twin(*args, **kwargs)
                finally:
                    twin.num_experts = ex.num_experts
                    for p in ex.params:
                        twin._parameters[p].data = torch.empty(0, dtype=twin._parameters[p].dtype)
                self._record_routing(ex, routed, read)
            self.prof.compute[ex.layer + ".experts (cpu)"] += time.perf_counter() - t0
            self.prof.calls[ex.layer + ".experts"] += 1
            return out.to(device)
        return forward


def _routing_args(args, kwargs) -> list:
    """An experts call's arguments with hidden_states and top_k_index first, positional (every family passes
    them so; keywords are moved out of `kwargs`)."""
    args = list(args)
    names = ("hidden_states", "top_k_index")
    for i, key in enumerate(names):
        if len(args) <= i:
            k = key if key in kwargs else next(k for k in kwargs if k not in names[:i] and
                                                 ("index" in k or "indices" in k or i == 0))
            args.append(kwargs.pop(k))
    return args
