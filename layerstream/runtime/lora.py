"""LoRA adapters (PEFT's format) on a streamed model, kept resident and unmerged.

An adapter is small (megabytes) beside the model it adapts, so it is read once and kept on the compute
device; the base weights stay exactly as the store holds them (streamed, resident, in place, quantized),
and one store serves any number of adapters. Each adapted linear layer gets a forward hook that adds
PEFT's LoRA term to its output, `scale * B(A(x))` with `scale = lora_alpha / r` (`/ sqrt(r)` with rsLoRA),
as `peft`'s `lora.Linear` computes it (dropout is off at inference). PEFT itself wraps each adapted module
in a new one (`q_proj` becomes `q_proj.base_layer`), which would rename the weights the streamer binds by
name; hooks leave the module tree as transformers builds it.

Read: `adapter_config.json` and `adapter_model.safetensors` (safetensors only, as everywhere in layerstream).
Refused with a message: DoRA, LoRA on embeddings, `fan_in_fan_out` (Conv1D layers), trained biases,
`modules_to_save`, and modules that this model does not have as a linear layer (a fused MoE expert tensor).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import torch
from torch import nn

from ..errors import InputError
from ..utils import fmt_bytes, log

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."


class Adapter:
    """A LoRA adapter attached to a model: `modules` adapted, `bytes` resident, `identity` (sha256 of its two
    files: what a batch job's journal records); `detach()` removes it."""

    def __init__(self, path: Path, hooks: list, modules: list[str], nbytes: int, rank: int):
        self.path, self.hooks, self.modules, self.bytes, self.rank = path, hooks, modules, nbytes, rank
        h = hashlib.sha256()
        for name in (CONFIG, WEIGHTS):
            with open(path / name, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        self.identity = h.hexdigest()[:16]

    def describe(self) -> str:
        return (f"LoRA adapter {self.path.name}: rank {self.rank}, {len(self.modules)} linear layers, "
                f"{fmt_bytes(self.bytes)} resident")

    def detach(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []


def read_adapter(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json, {module name: (A, B)} tensors) of a PEFT LoRA directory, checked."""
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    if not path.is_dir():
        raise InputError(f"adapter {path}: not a directory (a PEFT LoRA adapter is a directory holding {CONFIG} "
                         f"and {WEIGHTS})")
    if not (path / CONFIG).is_file():
        raise InputError(f"adapter {path}: no {CONFIG}; is it a PEFT adapter directory?")
    if not (path / WEIGHTS).is_file():
        other = [f.name for f in path.glob("adapter_model.*")]
        hint = f" (found {', '.join(other)}: layerstream loads safetensors only; convert it with peft's " \
               f"save_pretrained(..., safe_serialization=True))" if other else ""
        raise InputError(f"adapter {path}: no {WEIGHTS}{hint}")
    try:
        cfg = json.loads((path / CONFIG).read_text())
    except ValueError as e:
        raise InputError(f"adapter {path}: {CONFIG} is not valid JSON ({e})") from None
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    refuse = {"peft_type": peft_type != "LORA", "use_dora": bool(cfg.get("use_dora")),
              "fan_in_fan_out": bool(cfg.get("fan_in_fan_out")), "bias": cfg.get("bias", "none") not in (None, "none"),
              "modules_to_save": bool(cfg.get("modules_to_save"))}
    bad = [k for k, v in refuse.items() if v]
    if bad:
        raise InputError(f"adapter {path}: {', '.join(f'{k}={cfg.get(k)!r}' for k in bad)} is not supported; "
                         f"layerstream runs plain LoRA adapters of linear layers")
    try:
        tensors = load_file(path / WEIGHTS)
    except Exception as e:   # safetensors raises its own error types for damaged files
        raise InputError(f"adapter {path}: {WEIGHTS} is not readable ({e})") from None
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if "lora_embedding_" in key:
            raise InputError(f"adapter {path}: LoRA on embeddings ({key}) is not supported")
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in key:
                name = key.split(marker)[0].removeprefix(PREFIX)
                pairs.setdefault(name, {})[part] = t
                break
        else:
            raise InputError(f"adapter {path}: unexpected tensor {key} (only lora_A / lora_B weights are supported)")
    for name, p in pairs.items():
        if set(p) != {"lora_A", "lora_B"}:
            raise InputError(f"adapter {path}: {name} has {', '.join(sorted(p))} but not both lora_A and lora_B")
    return cfg, {name: (p["lora_A"], p["lora_B"]) for name, p in pairs.items()}


def _scale(cfg: dict, name: str, rank: int) -> float:
    """PEFT's scaling of one module: lora_alpha / r (rsLoRA: / sqrt(r)). r is the module's own rank (its
    lora_A's rows: what `rank_pattern` set it to); `alpha_pattern` keys match the module's name as PEFT
    matches them (`get_pattern_key`: a regex for the name's tail)."""
    alpha = cfg.get("lora_alpha", rank)
    for key, value in (cfg.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            alpha = value
            break
    return alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank


def attach_adapter(path, model: nn.Module, dtype: torch.dtype, device: torch.device) -> Adapter:
    """Read the adapter at `path` and hook it onto `model`'s linear layers (see the module's docstring)."""
    cfg, pairs = read_adapter(path)
    mods = dict(model.named_modules())
    hooks, nbytes, ranks = [], 0, set()
    for name, (a, b) in sorted(pairs.items()):
        mod = mods.get(name)
        out_f, in_f = getattr(mod, "out_features", None), getattr(mod, "in_features", None)
        if mod is None or out_f is None or in_f is None:
            raise InputError(f"adapter {path}: it adapts {name}, which this model does not have as a linear layer "
                             f"(an adapter for another architecture, or for experts this model fuses into one "
                             f"tensor)")
        rank = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_f or b.shape != (out_f, rank):
            raise InputError(f"adapter {path}: {name}'s lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not "
                             f"fit its {in_f} -> {out_f} layer: was the adapter trained on another model?")
        a, b = a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)
        scale = _scale(cfg, name, rank)
        hooks.append(mod.register_forward_hook(_hook(a, b, scale)))
        nbytes += a.numel() * a.element_size() + b.numel() * b.element_size()
        ranks.add(rank)
    if not hooks:
        raise InputError(f"adapter {path}: {WEIGHTS} holds no LoRA weights")
    ad = Adapter(Path(path).expanduser(), hooks, sorted(pairs), nbytes, max(ranks))
    log(ad.describe())
    return ad


def _hook(a: torch.Tensor, b: torch.Tensor, scale: float):
    def add_lora(module, args, output):
        x = args[0] if args else None
        if x is None:
            return output
        return output + (x.to(a.dtype) @ a.T @ b.T).mul_(scale).to(output.dtype)
    return add_lora
