"""A streamed embedding reads only the rows of the tokens in the batch (a few KB instead of the matrix)."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InputError
from ..plan import UnitPlan
from ..quant import dequantize, stored_names
from ..store import tensor_views


class EmbeddingRows:
    """Mixed into `Streamer`: hooks the embedding module to gather only the rows its ids need. A quantized
    embedding (a GGUF's blocks) is gathered as blocks, the rows of each of its parts, and only those rows are
    dequantized."""

    def _embed_setup(self, emb: UnitPlan, module: nn.Module):
        slots = {s.name: s for s in self.store.slots("embed")}
        quant = stored_names(list(slots))
        if quant:
            ((weight_name, (kind, names)),) = quant.items()
            parts = {suffix: slots[n] for suffix, n in names.items()}
        else:
            ((weight_name, slot),) = slots.items()
            kind, parts = None, {"": slot}
        rows = next(iter(parts.values())).shape[0]
        if emb.tier == "disk" and self.reader.verify != "never":
            self.store.check_streaming("embed")   # checked once before any row is used, 16 MB at a time

        def gather(uniq: torch.Tensor) -> torch.Tensor:
            if emb.tier != "disk":   # resident (in host RAM for an accelerator, or kept as blocks)
                host = tensor_views(self.ram_units["embed"], list(parts.values()))
                got = {sf: host[sl.name][uniq.to(host[sl.name].device)] for sf, sl in parts.items()}
            else:
                got = {sf: self.reader.read_rows("embed", sl.name, sl, uniq.tolist()) for sf, sl in parts.items()}
            if kind is None:
                return got[""]
            return dequantize(kind, got, self.dtype)

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
