"""Mixture-of-experts layers: only the experts the router chose are brought in, when it has chosen them.

A layer whose experts are all resident is fused once and bound (transformers' own fused path, no
per-token stacking); otherwise the routed experts are loaded (in parallel), stacked for this call and
the router's indices remapped onto the stack. Routing counts feed the planner's expert heat.
"""

from __future__ import annotations

import time

import torch


class ExpertRouting:
    """Mixed into `Streamer`: uses its params, expert_views, expert_units, loader, prof and expert_counts."""

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
