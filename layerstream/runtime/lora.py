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
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..errors import InputError
from ..utils import fmt_bytes, log

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."


class Adapter:
    """A LoRA adapter hooked onto a model (`Loras`): its `name`, the `modules` it adapts, `bytes` resident,
    `identity` (sha256 of its two files: what a batch job's journal records)."""

    def __init__(self, path: Path, name: str, modules: list[str], nbytes: int, rank: int, identity: str):
        self.path, self.name, self.modules, self.bytes, self.rank = path, name, modules, nbytes, rank
        self.identity = identity

    def describe(self) -> str:
        return (f"LoRA adapter {self.name}: rank {self.rank}, {len(self.modules)} linear layers, "
                f"{fmt_bytes(self.bytes)} resident")


def read_adapter(path) -> tuple[dict, dict[str, torch.Tensor], str]:
    """(adapter_config.json, {module name: (A, B)} tensors, identity: sha256 of the two files' bytes) of a PEFT
    LoRA directory, checked; each file read once."""
    from safetensors.torch import load

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
    raw_cfg = (path / CONFIG).read_bytes()
    try:
        cfg = json.loads(raw_cfg)
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
    raw = (path / WEIGHTS).read_bytes()
    try:
        tensors = load(raw)
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
    identity = hashlib.sha256(raw_cfg + raw).hexdigest()[:16]
    return cfg, {name: (p["lora_A"], p["lora_B"]) for name, p in pairs.items()}, identity


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


class Loras:
    """The adapters hooked onto one model, by name, and which one each token of a forward gets.

    One forward hook per adapted linear layer serves every adapter. Outside the engine (`generate`, a plain
    call) the `default` adapter applies to every token (none: the base model). The engine packs several
    requests into one sweep, each with its own adapter: it sets `rows` (the adapter slot of each token of the
    sweep, -1 for none) around the forward (`routing`), and each layer adds each adapter's term to its own
    tokens only."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, device: torch.device):
        self.model, self.dtype, self.device = model, dtype, device
        self.adapters: dict[str, Adapter] = {}                  # name -> adapter; its slot is its index here
        self.weights: dict[str, dict[int, tuple]] = {}          # module name -> {slot: (A, B, scale)}; hooked
        self.default: int | None = None
        self.rows: torch.Tensor | None = None

    def slot(self, name: str | None) -> int:
        """The slot of the adapter named `name` (None: the default one, -1 when there is none)."""
        if name is None:
            return -1 if self.default is None else self.default
        names = list(self.adapters)
        if name not in names:
            raise InputError(f"no adapter named {name!r} here (adapters: {', '.join(names) or 'none'})")
        return names.index(name)

    @contextmanager
    def routing(self, rows: torch.Tensor | None):
        self.rows = None if rows is None else rows.to(self.device)
        try:
            yield
        finally:
            self.rows = None

    def add(self, path, name: str | None = None, default: bool = False) -> Adapter:
        """Read the adapter at `path` and hook it onto the model's linear layers as `name` (default: its
        directory's name); `default`: it applies where no adapter is asked for."""
        cfg, pairs, identity = read_adapter(path)
        path = Path(path).expanduser()
        name = name or path.name
        if name in self.adapters:
            raise InputError(f"two adapters named {name!r}: name them (NAME=DIR)")
        mods = dict(self.model.named_modules())
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        slot, found, nbytes, ranks = len(self.adapters), {}, 0, set()
        for mname, (a, b) in sorted(pairs.items()):
            mod = mods.get(mname)
            out_f, in_f = getattr(mod, "out_features", None), getattr(mod, "in_features", None)
            if mod is None or out_f is None or in_f is None:
                raise InputError(f"adapter {path}: it adapts {mname}, which this model does not have as a linear "
                                 f"layer (an adapter for another architecture, or for experts this model fuses into "
                                 f"one tensor)")
            if head is not None and mod is head:
                raise InputError(f"adapter {path}: LoRA on the output head ({mname}) is not supported")
            rank = a.shape[0]
            if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_f or b.shape != (out_f, rank):
                raise InputError(f"adapter {path}: {mname}'s lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do "
                                 f"not fit its {in_f} -> {out_f} layer: was the adapter trained on another model?")
            found[mname] = (mod, a.to(device=self.device, dtype=self.dtype),
                            b.to(device=self.device, dtype=self.dtype), _scale(cfg, mname, rank))
            nbytes += a.numel() * self.dtype.itemsize + b.numel() * self.dtype.itemsize
            ranks.add(rank)
        if not found:
            raise InputError(f"adapter {path}: {WEIGHTS} holds no LoRA weights")
        for mname, (mod, a, b, scale) in found.items():   # all checked: hook them (a module's first adapter)
            if mname not in self.weights:
                self.weights[mname] = {}
                mod.register_forward_hook(self._hook(self.weights[mname]))
            self.weights[mname][slot] = (a, b, scale)
        ad = Adapter(path, name, sorted(found), nbytes, max(ranks), identity)
        self.adapters[name] = ad
        if default:
            self.default = slot
        log(ad.describe())
        return ad

    def _hook(self, weights: dict):
        def add_lora(module, args, output):
            if not args:
                return output
            x = args[0]
            if self.rows is None:
                if self.default is None or self.default not in weights:
                    return output
                return output + _term(x, *weights[self.default], output.dtype)
            flat_x, y = x.reshape(-1, x.shape[-1]), output.reshape(-1, output.shape[-1]).clone()
            if flat_x.shape[0] != self.rows.shape[0]:
                raise InputError(f"a LoRA-adapted layer saw {flat_x.shape[0]} tokens where the sweep has "
                                 f"{self.rows.shape[0]}: per-request adapters do not work for this layer")
            for slot, (a, b, scale) in weights.items():
                idx = (self.rows == slot).nonzero().squeeze(1)
                if idx.numel():
                    y.index_add_(0, idx, _term(flat_x[idx], a, b, scale, y.dtype))
            return y.view_as(output)
        return add_lora


def _term(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """LoRA's term for inputs `x`: scale * B(A(x)), computed in the adapter's dtype."""
    return (x.to(a.dtype) @ a.T @ b.T).mul_(scale).to(dtype)


def attach_adapters(model: nn.Module, dtype: torch.dtype, device: torch.device, default=None,
                    named: dict | None = None) -> Loras:
    """A model's adapters: `default` (a path: applied wherever no adapter is asked for) and `named`
    ({name: path}: chosen per request, by the engine's SamplingParams.adapter or an OpenAI request's `model`)."""
    loras = Loras(model, dtype, device)
    if default:
        loras.add(default, default=True)
    for name, path in (named or {}).items():
        loras.add(path, name=name)
    return loras
