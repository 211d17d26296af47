"""Architectures: build transformers' own model as a weightless skeleton and name its units.

layerstream owns the weights, not the math: every family runs transformers' modeling code. An
adapter only says where the decoder layers, embeddings and head live, found generically here.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import UnsupportedModelError
from .families import ALLOW_UNTESTED_ENV, TESTED_MODEL_TYPES


@dataclass
class Unit:
    name: str                 # "embed" | "layer.<i>" | "layer.<i>.expert.<j>" | "head"
    kind: str                 # "embed" | "layer" | "expert" | "head"
    params: list[str] = field(default_factory=list)   # tensor names owned (tied aliases excluded)
    modules: list[str] = field(default_factory=list)  # module names that own those params


@dataclass
class Experts:
    """A mixture-of-experts block's experts: transformers keeps them fused, one [num_experts, ...] tensor
    per weight; the store keeps each expert's slices as a unit of its own, named `<module>.<j>.<param>`."""
    module: str               # e.g. "model.layers.3.mlp.experts"
    layer: str                # its layer unit, "layer.3"
    num_experts: int
    params: list[str]         # the fused parameters' attribute names ("gate_up_proj", "down_proj", ...)

    def unit(self, j: int) -> str:
        return f"{self.layer}.expert.{j}"

    def tensor(self, j: int, param: str) -> str:
        return f"{self.module}.{j}.{param}"


def expert_param(name: str) -> tuple[str, int, str]:
    """(experts module, expert, parameter) of an expert's tensor `<module>.<j>.<param>` (`Experts.tensor`);
    ValueError for another name."""
    parent, _, param = name.rpartition(".")
    module, _, j = parent.rpartition(".")
    if not (module and param and j.isdigit()):
        raise ValueError(f"{name!r} is not an expert's tensor")
    return module, int(j), param


@dataclass
class Layout:
    units: list[Unit]
    tied: dict[str, str]      # alias parameter name -> owner parameter name
    embed_module: str
    layers_prefix: str
    experts: dict[str, Experts] = field(default_factory=dict)   # by module name
    buffers: set[str] = field(default_factory=set)   # persistent buffers (e.g. a router's bias), by name

    def unit(self, name: str) -> Unit:
        return next(u for u in self.units if u.name == name)


def _routed_experts(mod: nn.Module) -> bool:
    """transformers' fused experts module called as experts(hidden_states, top_k_index, top_k_weights):
    the routing is known before its weights are needed, so each expert can be its own unit."""
    n = getattr(mod, "num_experts", None)
    if not isinstance(n, int) or n < 1 or not mod._parameters or isinstance(mod, nn.ModuleList):
        return False
    try:
        params = [p for p in inspect.signature(type(mod).forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return False
    return len(params) >= 4     # self, hidden_states, top_k_index, top_k_weights


def check_supported(config) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    mt = getattr(config, "model_type", None)
    arch = (getattr(config, "architectures", None) or [mt])[0]
    tested = f"{len(TESTED_MODEL_TYPES)} tested families, listed in docs/families.md"
    if mt not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UnsupportedModelError(f"architecture {arch} (model_type {mt!r}) is not a causal language model "
                                    f"that transformers can build (layerstream runs decoder-only LMs: {tested})")
    if mt not in TESTED_MODEL_TYPES and not os.environ.get(ALLOW_UNTESTED_ENV):
        raise UnsupportedModelError(f"architecture {arch} (model_type {mt!r}) is not supported yet: it is not among "
                                    f"the {tested}; set {ALLOW_UNTESTED_ENV}=1 to try it anyway (outputs are "
                                    f"not checked)")


def build_skeleton(config, dtype: torch.dtype, device: torch.device | str = "cpu") -> nn.Module:
    """transformers' model with no weight memory: parameters are empty tensors on `device`, buffers
    (rotary inv_freq …) real. Tied parameters stay one object. On the meta device (the split's skeleton) the
    parameters keep their shapes, which cost nothing there: transformers' Split conversion sizes its pieces
    by them (a fused q|k|v or in_proj checkpoint tensor)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    check_supported(config)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if getattr(config, "tie_word_embeddings", False) or getattr(config.get_text_config(), "tie_word_embeddings", False):
        model.tie_weights()
    model.eval()
    replaced: dict[int, nn.Parameter] = {}
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is None:
                continue
            if id(p) not in replaced:
                shape = p.shape if torch.device(device).type == "meta" else (0,)
                replaced[id(p)] = nn.Parameter(torch.empty(shape, dtype=p.dtype, device=device), requires_grad=False)
            mod._parameters[name] = replaced[id(p)]
    for mod in model.modules():
        for name, b in list(mod._buffers.items()):
            if b is not None and b.device.type == "meta":
                raise UnsupportedModelError(f"{type(mod).__name__}.{name} is a buffer without a value in the skeleton")
            if b is not None:
                mod._buffers[name] = b.to(device)
    return model


def layout(model: nn.Module) -> Layout:
    """Units of a skeleton: embed, one per decoder layer, head (final norm, lm_head, anything else)."""
    text = model.config.get_text_config()
    n_layers = text.num_hidden_layers
    layers_prefix = None
    # num_hidden_layers counts the decoder layers; where it counts sublayers instead (LongCat-Flash: two
    # attention blocks per layer), the stack has the config's num_layers entries
    for n in dict.fromkeys((n_layers, getattr(text, "num_layers", n_layers))):
        for name, mod in model.named_modules():
            if isinstance(mod, nn.ModuleList) and len(mod) == n:
                layers_prefix, n_layers = name, n
                break
        if layers_prefix is not None:
            break
    if layers_prefix is None:
        raise UnsupportedModelError(f"{type(model).__name__}: cannot find its {n_layers} decoder layers")
    emb = model.get_input_embeddings()
    embed_module = next(n for n, m in model.named_modules() if m is emb)

    owners: dict[int, str] = {}
    tied: dict[str, str] = {}
    names = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in owners:
            tied[name] = owners[id(p)]
        else:
            owners[id(p)] = name
            names.append(name)

    experts: dict[str, Experts] = {}
    for mod_name, mod in model.named_modules():
        if mod_name.startswith(layers_prefix + ".") and _routed_experts(mod):
            i = int(mod_name[len(layers_prefix) + 1:].split(".")[0])
            experts[mod_name] = Experts(mod_name, f"layer.{i}", mod.num_experts, list(mod._parameters))
    params = set(names)
    buffers = {n for n in model.state_dict(keep_vars=True) if n not in params and n not in tied}
    names += sorted(buffers)

    units = {"embed": Unit("embed", "embed")}
    for i in range(n_layers):
        units[f"layer.{i}"] = Unit(f"layer.{i}", "layer")
        for ex in experts.values():
            if ex.layer == f"layer.{i}":
                for j in range(ex.num_experts):
                    units[ex.unit(j)] = Unit(ex.unit(j), "expert", [ex.tensor(j, p) for p in ex.params],
                                             [ex.module])
    units["head"] = Unit("head", "head")

    def layer_of(name: str) -> str | None:
        return name[len(layers_prefix) + 1:].split(".")[0] if name.startswith(layers_prefix + ".") else None

    # a weight tied across decoder layers (Zamba's shared attention block) must stay bound while any of them
    # runs: it goes to the head unit, which is bound from its first use to the end of the sweep
    shared = {owner for alias, owner in tied.items()
              if layer_of(owner) is not None and layer_of(alias) != layer_of(owner)}
    for name in names:
        mod_name = name.rsplit(".", 1)[0]
        if mod_name in experts:
            continue
        if mod_name == embed_module:
            u = units["embed"]
        elif layer_of(name) is not None and name not in shared:
            u = units[f"layer.{int(layer_of(name))}"]
        else:
            u = units["head"]
        u.params.append(name)
        if mod_name not in u.modules:
            u.modules.append(mod_name)
    modules = dict(model.named_modules())
    for alias, owner in tied.items():
        mod_name = alias.rsplit(".", 1)[0]
        if (owner.rsplit(".", 1)[0] == embed_module or owner in shared) and mod_name in modules \
                and mod_name not in units["head"].modules:
            units["head"].modules.append(mod_name)
    return Layout([u for u in units.values() if u.params or u.modules], tied, embed_module, layers_prefix, experts,
                  buffers)
