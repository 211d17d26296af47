"""A transformers model directory with safetensors weights, read tensor by tensor (memory-mapped)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch

from ..errors import SourceError
from ..store.io import read_header
from ..utils import file_identity

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "added_tokens.json")


def _weight_map(index: Path) -> dict[str, str]:
    """A sharded checkpoint's index: {tensor: shard}, checked (a JSON object whose weight_map names shards
    inside the model directory: no absolute path, no `..`)."""
    fix = "the index is damaged: download the model again"
    try:
        d = json.loads(index.read_text())
    except OSError as e:
        raise SourceError(f"{index}: cannot be read ({e.strerror})") from None
    except (ValueError, RecursionError) as e:   # not JSON, not UTF-8, nested too deep
        raise SourceError(f"{index}: not JSON ({type(e).__name__}); {fix}") from None
    wm = d.get("weight_map") if isinstance(d, dict) else None
    if not isinstance(wm, dict) or not wm or not all(isinstance(v, str) for v in wm.values()):
        raise SourceError(f"{index}: no weight_map of tensor names to shard files; {fix}")
    for f in set(wm.values()):
        p = PurePosixPath(f)
        if not f or p.is_absolute() or PureWindowsPath(f).is_absolute() or ".." in p.parts or "\\" in f:
            raise SourceError(f"{index}: names the shard {f!r}, outside the model directory; only files inside "
                              f"{index.parent} are read: {fix}")
    return wm


class SafetensorsSource:
    """A transformers model directory with safetensors weights (one file or sharded with an index)."""

    kind = "safetensors"

    def __init__(self, path: Path):
        from transformers import AutoConfig

        self.path = path
        if not (path / "config.json").is_file():
            raise SourceError(f"{path}: not a model directory (no config.json); pass a transformers model "
                              f"directory, a .gguf file, a hub id or a layerstream store")
        index = path / "model.safetensors.index.json"
        self._handles = {}   # shard -> {tensor: slot}, every shard's header read and checked at open
        if index.is_file():
            weight_map = _weight_map(index)
        elif (path / "model.safetensors").is_file():
            self._handles["model.safetensors"] = {sl.name: sl for sl in
                                                  read_header(path / "model.safetensors", source=True)[0]}
            weight_map = dict.fromkeys(self._handles["model.safetensors"], "model.safetensors")
        elif any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth")):
            raise SourceError(f"{path}: has only pickle weights (.bin/.pt); layerstream loads safetensors only, "
                              f"for safety. Convert them to safetensors first")
        else:
            raise SourceError(f"{path}: no model.safetensors or model.safetensors.index.json found")
        self.weight_map = weight_map
        self.files = sorted({path / f for f in weight_map.values()})
        for fname in sorted(set(weight_map.values())):
            if not (path / fname).is_file():
                raise SourceError(f"{path / fname}: shard named in the index is missing")
            if fname not in self._handles:
                self._handles[fname] = {sl.name: sl for sl in read_header(path / fname, source=True)[0]}
        for key, fname in weight_map.items():
            if key not in self._handles[fname]:
                raise SourceError(f"{index}: names tensor {key} in {fname}, which does not hold it; the index "
                                  f"does not match its shards: download the model again")
        try:
            self.config = AutoConfig.from_pretrained(path)
        except Exception as e:   # transformers' config classes refuse a field of the wrong type in many ways
            raise SourceError(f"{path}/config.json: cannot be read by transformers ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:300]})") from None
        self.identity = file_identity(self.files + [path / "config.json"])
        self.name = path.name
        # names as the model holds them, where the checkpoint's differ (map_names fills these)
        self.alias: dict[str, str] = {}                       # skeleton name -> checkpoint key
        self.parts: dict[str, tuple[list[str], list]] = {}    # expert tensor -> (checkpoint keys, per-expert ops)
        self.fused: dict[str, tuple[str, int]] = {}           # expert tensor -> (fused checkpoint key, expert)
        self.converted: dict[str, tuple] = {}                 # dense tensor -> (converter, first target, keys)
        # FP8 checkpoints (DeepSeek-V3 / Qwen style): float8 e4m3 weights with a float32 scale per block in
        # `<weight>_scale_inv`; dequantized here, tensor by tensor, into a float store.
        qc = getattr(self.config, "quantization_config", None)
        qc = qc.to_dict() if hasattr(qc, "to_dict") else qc
        self.fp8_block = None
        if qc:
            if str(qc.get("quant_method", "")).lower().endswith("fp8"):
                self.fp8_block = tuple(qc.get("weight_block_size") or (128, 128))
                del self.config.quantization_config
            else:
                raise SourceError(f"{path}: checkpoints quantized with {qc.get('quant_method')!r} are not supported; "
                                  f"use a float, FP8 or GGUF checkpoint")

    def map_names(self, skeleton, lay) -> None:
        """Name the checkpoint's tensors as the skeleton does, with transformers' own conversion mapping
        (renamings; experts stored one tensor per expert, which transformers fuses into [num_experts, ...]).
        Each store tensor of expert j is assembled from that expert's checkpoint tensors alone."""
        import re

        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            Concatenate,
            MergeModulelist,
            WeightConverter,
            apply_converters,
            apply_renamings,
        )

        transforms = get_model_conversion_mapping(skeleton)
        renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        self.alias, self.parts, self.fused, self.converted = {}, {}, {}, {}
        groups: dict[tuple[str, int], dict[int, str]] = {}
        ops_of: dict[str, list] = {}
        converted_groups: dict[tuple, tuple] = {}      # (converter, first target) -> (converter, keys)
        self._skeleton = skeleton
        per_expert = {ex.module + "." + p for ex in lay.experts.values() for p in ex.params}
        for key in self.weight_map:
            renamed = apply_renamings(key, renamings)
            target, pattern = apply_converters(renamed, converters)
            if pattern is None:
                if target != key:
                    self.alias[target] = key
                continue
            conv = next(c for c in converters if pattern in c.source_patterns)
            rx = re.escape(pattern).replace(r"\*", r"(\d+)")
            m = re.search(rx, renamed)
            if m is None and "*" in pattern:   # a pattern written as a regex (`\.experts.*.w1.weight`), as
                m = re.search(pattern.replace("*", r"(\d+)", 1), renamed)   # transformers also reads it
            if m is None or not m.groups() or target not in per_expert:
                # a dense tensor stored in another layout (q/k/v convolutions concatenated, a fused
                # gate+up split in two ...), or the experts of a layer streamed whole, stored one tensor per
                # expert: the targets are made from their group of checkpoint tensors (by expert) with
                # transformers' own operations
                group = converted_groups.setdefault((id(conv), target), (conv, {}))
                group[1].setdefault(pattern, []).append((int(m.group(1)) if m and m.groups() else 0, key))
                continue
            groups.setdefault((target, int(m.group(1))), {})[conv.source_patterns.index(pattern)] = key
            ops_of[target] = conv.operations
        for (_, first), (conv, keys) in converted_groups.items():
            for tp in conv.target_patterns:
                self.converted[first.replace(conv.target_patterns[0], tp, 1)] = (conv, first, keys)
        for ex in lay.experts.values():
            for p in ex.params:
                fused = ex.module + "." + p
                src_fused = fused if fused in self.weight_map or fused in self.converted else self.alias.get(fused)
                for j in range(ex.num_experts):
                    name = ex.tensor(j, p)
                    if src_fused is not None:
                        self.fused[name] = (src_fused, j)
                    elif (fused, j) in groups:
                        keys = [k for _, k in sorted(groups[(fused, j)].items())]
                        per_expert = []
                        for op in ops_of[fused]:
                            if isinstance(op, MergeModulelist) and op.dim == 0:
                                continue        # stacks the experts: one expert needs no stacking
                            if isinstance(op, Concatenate) and op.dim >= 1:
                                per_expert.append(("cat", op.dim - 1))
                                continue
                            raise SourceError(f"{self.path}: experts stored as {keys[0]} need the conversion "
                                              f"{type(op).__name__}, which layerstream cannot apply per expert yet")
                        self.parts[name] = (keys, per_expert)
        self._check_shapes(skeleton)

    def _check_shapes(self, skeleton) -> None:
        """Each tensor the model takes as it lies in the checkpoint (no conversion) has the shape the model's
        config gives it: a damaged header or a config of another model is refused before anything is read."""
        for n, t in skeleton.state_dict(keep_vars=True).items():
            key = self.key(n)
            if n in self.converted or n in self.parts or key not in self.weight_map:
                continue
            fname, slot = self._slot(key)
            if tuple(slot.shape) != tuple(t.shape):
                raise SourceError(f"{self.path / fname}: tensor {key} has shape {list(slot.shape)} but the model "
                                  f"of {self.path / 'config.json'} needs {list(t.shape)}; the checkpoint is "
                                  f"damaged or not this config's model: download it again")

    def needs_conversion(self) -> bool:
        """Whether some tensor is made by more than joining checkpoint bytes (the store must be split, not
        served in place)."""
        return any(self.pieces(n) is None for n in (*self.converted, *self.parts, *self.fused))

    def pieces(self, name: str) -> list[tuple[str, int | None]] | None:
        """The checkpoint bytes a store tensor is, as [(checkpoint key, row of it or None for all of it)], laid
        end to end: one tensor; one expert's row of a fused tensor; an expert's weights joined along their
        first dimension (gate rows, then up rows). None when it takes a real conversion (or FP8 scaling)."""
        if name in self.converted:
            return None
        if name in self.parts:
            keys, ops = self.parts[name]
            return [(k, None) for k in keys] if all(dim == 0 for _, dim in ops) else None
        if name in self.fused:
            key, j = self.fused[name]
            if key in self.converted or self._slot(key)[1].dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                return None
            return [(key, j)]
        return [(self.key(name), None)]

    def _convert(self, name: str) -> torch.Tensor:
        """A tensor made by one of transformers' conversions from its group of checkpoint tensors (the group's
        other outputs are kept for the next call: the targets of a group are asked for one after another)."""
        conv, first, keys = self.converted[name]
        cache = getattr(self, "_converted_cache", None)
        if cache is None or cache[0] != (id(conv), first):
            tensors = {pat: [self.get(k) for _, k in sorted(ks)] for pat, ks in keys.items()}
            for op in conv.operations:
                tensors = op.convert(tensors, source_patterns=conv.source_patterns,
                                     target_patterns=conv.target_patterns, full_layer_name=first,
                                     model=self._skeleton, config=self._skeleton.config)
            out = {}
            for pat, t in tensors.items():
                full = first.replace(conv.target_patterns[0], pat, 1)
                out[full] = t[0] if isinstance(t, list) else t
            cache = self._converted_cache = ((id(conv), first), out)
        if name not in cache[1]:
            raise SourceError(f"{self.path}: cannot make {name} from "
                              f"{', '.join(k for ks in keys.values() for _, k in ks)}")
        return cache[1][name]

    def key(self, name: str) -> str:
        return self.alias.get(name, name)

    def has(self, name: str) -> bool:
        return self.key(name) in self.weight_map or name in self.parts or name in self.fused or \
            name in self.converted

    def _slot(self, key: str):
        fname = self.weight_map[key]
        return fname, self._handles[fname][key]

    def _raw(self, name: str, row: int | None = None) -> torch.Tensor:
        """One tensor, read with plain file reads (no memory map: a split must not leave the whole
        checkpoint mapped into the process)."""
        fname, sl = self._slot(name)
        begin, size, shape = sl.begin, sl.end - sl.begin, list(sl.shape)
        if row is not None:     # one slice along the first dimension (an expert of a fused tensor)
            size //= shape[0]
            begin += row * size
            shape = shape[1:]
        out = torch.empty(size, dtype=torch.uint8)
        with open(self.path / fname, "rb", buffering=0) as f:
            f.seek(begin)
            mv, got = memoryview(out.numpy()), 0
            while got < len(mv):
                n = f.readinto(mv[got:])
                if not n:
                    raise SourceError(f"{self.path / fname}: truncated (tensor {name}); the checkpoint is damaged")
                got += n
        return out.view(sl.dtype).reshape(shape) if shape else out.view(sl.dtype)[0]

    def get_quantized(self, name: str, kind: str) -> None:
        """Already-quantized blocks to keep as they are: none in a float (or FP8) checkpoint."""
        return None

    def get(self, name: str) -> torch.Tensor:
        if name in self.converted:
            return self._convert(name)
        if name in self.parts:
            keys, ops = self.parts[name]
            ts = [self.get(k) for k in keys]
            for op, dim in ops:
                ts = [torch.cat(ts, dim=dim)]
            if len(ts) != 1:
                raise SourceError(f"{self.path}: cannot assemble {name} from {', '.join(keys)}")
            return ts[0]
        if name in self.fused:
            key, j = self.fused[name]
            if key in self.converted:   # a fused tensor stored in another layout (gate|up interleaved)
                return self._convert(key)[j]
            if self._slot(key)[1].dtype in (torch.float8_e4m3fn, torch.float8_e5m2):   # scaled as a whole
                return self.get(key)[j]
            return self._raw(key, j)
        name = self.key(name)
        t = self._raw(name)
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) and name + "_scale_inv" in self.weight_map:
            scale = self._raw(name + "_scale_inv").float()
            (b0, b1), (rows, cols) = self.fp8_block or (128, 128), t.shape
            full = scale.repeat_interleave(b0, 0)[:rows].repeat_interleave(b1, 1)[:, :cols]
            return t.float() * full
        return t

    def numel(self, name: str) -> int:
        """Number of elements of a tensor (from the shard's header)."""
        if name in self.converted:   # as the model holds it
            return self._convert(name).numel()
        if name in self.parts:
            return sum(self.numel(k) for k in self.parts[name][0])
        if name in self.fused:
            key, _ = self.fused[name]
            if key in self.converted:
                return self._convert(key)[0].numel()
            return self.numel(key) // self._slot(key)[1].shape[0]
        n = 1
        for d in self._slot(self.key(name))[1].shape:
            n *= d
        return n

    def save_extras(self, out: Path) -> None:
        for f in TOKENIZER_FILES + ("generation_config.json",):
            if (self.path / f).is_file():
                shutil.copyfile(self.path / f, out / f)
