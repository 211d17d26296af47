"""A streamed embedding reads only the rows of the tokens in the batch (a few KB instead of the matrix)."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InputError
from ..plan import UnitPlan
from ..store import tensor_views


class EmbeddingRows:
    """Mixed into `Streamer`: hooks the embedding module to gather only the rows its ids need."""

    def _embed_setup(self, emb: UnitPlan, module: nn.Module):
        (slot,) = self.store.slots("embed")
        weight_name = slot.name
        rows, hidden = slot.shape
        if emb.tier == "disk" and self.reader.verify != "never":
            self.store.check_streaming("embed")   # checked once before any row is used, 16 MB at a time

        def gather(uniq: torch.Tensor) -> torch.Tensor:
            if emb.tier == "ram":   # accelerator with the embedding in host RAM
                host = tensor_views(self.ram_units["embed"], [slot])[weight_name]
                return host[uniq]
            return self.reader.read_rows("embed", weight_name, slot, uniq.tolist())

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
