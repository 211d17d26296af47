"""A .gguf file, read tensor by tensor (memory-mapped); quantized blocks can be kept as they are.

(Over 400 lines: the GGUF name and layout map of every family transformers reads, which belongs in one place.)"""

from __future__ import annotations

import copy
import functools
import importlib.util
import os
from contextlib import contextmanager
from pathlib import Path

import torch

from ..errors import SourceError
from ..utils import file_identity, log


@contextmanager
def _parsed_once(memo: dict):
    """transformers reads a GGUF's metadata with `load_gguf_checkpoint` for the config, again for the
    tokenizer's config and again for the tensor map, and each call parses the whole file, its vocabulary
    too (seconds each for a 49k-token vocabulary); `get_gguf_hf_weights_map` builds gguf's tensor-name map
    anew for each of the model's modules. Within this block one `GGUFReader` per file serves layerstream and
    transformers, the first parse serves the later ones (a deep copy each: callers may change what they get)
    and each name map is built once. The memo lives in the source that opens the file."""
    import gguf
    import transformers.modeling_gguf_pytorch_utils as mg

    load, names, reader = mg.load_gguf_checkpoint, gguf.get_tensor_name_map, gguf.GGUFReader

    def load_once(path, return_tensors=False, *args, **kwargs):
        if return_tensors or args or kwargs:
            return load(path, return_tensors, *args, **kwargs)
        key = ("parsed", os.path.realpath(path))
        if key not in memo:
            memo[key] = load(path, return_tensors=False)
        return copy.deepcopy(memo[key])

    def reader_once(path, mode="r"):   # read only: load_gguf_checkpoint and layerstream share one
        key = ("reader", os.path.realpath(path), mode)
        if key not in memo:
            memo[key] = reader(path, mode)
        return memo[key]

    mg.load_gguf_checkpoint, gguf.get_tensor_name_map = load_once, functools.lru_cache(maxsize=None)(names)
    gguf.GGUFReader = reader_once
    try:
        yield
    finally:
        mg.load_gguf_checkpoint, gguf.get_tensor_name_map, gguf.GGUFReader = load, names, reader


# GGUF value types: fixed sizes of the scalars (8: a string, 9: an array)
_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _UINT32 = 8, 9, 4


class _Bad(Exception):
    pass


def check_gguf(path: Path) -> None:
    """Walk a GGUF file's header as the spec lays it out, every length, count, type and offset checked against
    the file's size before anything is read or allocated: magic and version, the metadata (keys, value types,
    string lengths, array counts, UTF-8), the tensor infos (names, dims, types, offsets) and the data (aligned,
    inside the file, no two tensors overlapping). gguf-py's reader trusts all of these (a count too large makes
    it loop without end; a truncated file, an IndexError). One SourceError naming the file and the fault."""
    import mmap
    import struct

    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise _Bad(f"{size} bytes, shorter than a GGUF header")
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise SourceError(f"{path}: cannot be read ({e.strerror})") from None
    except _Bad as e:
        raise SourceError(f"{path}: not a valid GGUF file ({e}); it is damaged or truncated: download it again") \
            from None
    pos = 0

    def take(n: int, what: str) -> int:
        nonlocal pos
        if n < 0 or pos + n > size:
            raise _Bad(f"{what} at byte {pos} runs past the end of the file ({size} bytes): truncated")
        pos += n
        return pos - n

    def num(fmt: str, what: str) -> int:
        return struct.unpack_from(order + fmt, mm, take(struct.calcsize(fmt), what))[0]

    def string(what: str) -> str:
        n = num("Q", f"the length of {what}")
        at = take(n, what)
        try:
            return mm[at:at + n].decode("utf-8")
        except UnicodeDecodeError:
            raise _Bad(f"{what} at byte {at} is not UTF-8") from None

    def value(vtype: int, what: str, depth: int = 0) -> int | None:
        """Skip one value (checked); an UINT32's value is returned."""
        if vtype in _SCALARS:
            at = take(_SCALARS[vtype], what)
            return struct.unpack_from(order + "I", mm, at)[0] if vtype == _UINT32 else None
        if vtype == _STRING:
            string(what)
        elif vtype == _ARRAY and depth < 4:
            itype, count = num("I", f"the type of {what}"), num("Q", f"the length of {what}")
            if itype in _SCALARS:
                take(count * _SCALARS[itype], what)
            elif itype in (_STRING, _ARRAY):   # each item at least its 8-byte length (an array: 12 bytes)
                if count * (8 if itype == _STRING else 12) > size - pos:
                    raise _Bad(f"{what} claims {count} items, more than the file holds: truncated or damaged")
                for _ in range(count):
                    value(itype, f"an item of {what}", depth + 1)
            else:
                raise _Bad(f"{what} is an array of type {itype}, which GGUF does not have")
        else:
            raise _Bad(f"{what} has the value type {vtype}, which GGUF does not have"
                       + (" (or arrays nested deeper than 4)" if vtype == _ARRAY else ""))
        return None

    try:
        order = "<"
        if mm[:4] != b"GGUF":
            raise _Bad("it does not start with GGUF's magic bytes")
        pos = 4
        version = num("I", "the version")
        if version & 0xFFFF == 0:   # a big-endian file (gguf-py reads those too)
            order, version = ">", struct.unpack_from(">I", mm, 4)[0]
        if version not in (2, 3):
            raise _Bad(f"GGUF version {version}; versions 2 and 3 are read")
        n_tensors, n_kv = num("Q", "the tensor count"), num("Q", "the metadata count")
        if n_kv * 12 > size - pos or n_tensors * 24 > size - pos:
            raise _Bad(f"it claims {n_kv} metadata entries and {n_tensors} tensors, more than its {size} bytes "
                       f"can hold: truncated or damaged")
        keys, alignment = set(), 32
        for i in range(n_kv):
            key = string(f"metadata key {i}")
            shown = repr(key[:60])
            if key in keys:
                raise _Bad(f"metadata key {shown} appears twice")
            keys.add(key)
            got = value(num("I", f"the type of {shown}"), f"the value of {shown}")
            if key == "general.alignment":
                if got is None or got == 0 or got & (got - 1):
                    raise _Bad("general.alignment is not a power of two (UINT32)")
                alignment = got
        tensors, names = [], set()
        for i in range(n_tensors):
            name = string(f"tensor name {i}")
            shown = name if name.isprintable() and len(name) <= 60 else repr(name[:60])
            if name in names:
                raise _Bad(f"tensor {shown} appears twice")
            names.add(name)
            n_dims = num("I", f"tensor {shown}'s dimension count")
            if not 1 <= n_dims <= 4:
                raise _Bad(f"tensor {shown} has {n_dims} dimensions (1 to 4)")
            dims = [num("Q", f"tensor {shown}'s dimensions") for _ in range(n_dims)]
            if 0 in dims:
                raise _Bad(f"tensor {shown} has a dimension of 0")
            ttype = num("I", f"tensor {shown}'s type")
            try:
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
            except (ValueError, KeyError):
                raise _Bad(f"tensor {shown} has the type {ttype}, which this gguf package does not know") from None
            offset = num("Q", f"tensor {shown}'s offset")
            if dims[0] % block:
                raise _Bad(f"tensor {shown}'s rows ({dims[0]}) are not whole blocks of its type "
                           f"{GGMLQuantizationType(ttype).name} ({block})")
            if offset % alignment:
                raise _Bad(f"tensor {shown}'s offset {offset} is not aligned to {alignment}")
            numel = 1
            for d in dims:
                numel *= d
            tensors.append((offset, offset + numel // block * type_size, shown))
        data = -(-pos // alignment) * alignment
        end = 0
        for begin, stop, name in sorted(tensors):
            if begin < end and stop > begin:
                raise _Bad(f"tensor {name}'s data overlaps another tensor's")
            if data + stop > size:
                raise _Bad(f"tensor {name}'s data (bytes {data + begin}..{data + stop}) runs past the end of the "
                           f"file ({size} bytes): truncated")
            end = max(end, stop)
    except (_Bad, struct.error) as e:
        raise SourceError(f"{path}: not a valid GGUF file ({e}); it is damaged or truncated: download it again") \
            from None
    finally:
        mm.close()


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
        self.path = path
        self._parsed: dict = {}   # the file's reader and transformers' parse of it, shared (_parsed_once)
        check_gguf(path)
        try:
            with _parsed_once(self._parsed):
                import gguf

                self.reader = gguf.GGUFReader(path)
                self.config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        except (ValueError, KeyError, OSError) as e:
            raise SourceError(f"{path}: not a readable GGUF model ({e})") from None
        except Exception as e:   # metadata of an odd type trips transformers' reader in many ways
            raise SourceError(f"{path}: not a readable GGUF model (its metadata: {type(e).__name__}: "
                              f"{' '.join(str(e).split())[:300]}); "
                              f"is it a complete, undamaged GGUF of a supported architecture?") from None
        self._check_sizes()
        arch = self._field("general.architecture")
        for key, attr in self.SIZES.items():
            value = self._field(f"{arch}.{key}")
            if value is not None and hasattr(self.config, attr) and getattr(self.config, attr) != value:
                setattr(self.config, attr, int(value))
        self.identity = file_identity([path])
        self.name = path.stem
        self._map = None
        self.experts: dict[str, tuple[list, int]] = {}   # store name of expert j's weight -> (GGUF tensors, j)

    def _check_sizes(self) -> None:
        """The metadata's layer count and width against the tensors the file holds: a value edited to a huge
        number would otherwise build a model of that size."""
        import re

        text = self.config.get_text_config()
        layers = {int(m[1]) for t in self.reader.tensors if (m := re.match(r"blk\.(\d+)\.", t.name))}
        n = getattr(text, "num_hidden_layers", None)
        if isinstance(n, int) and n > len(layers):
            raise SourceError(f"{self.path}: its metadata says {n} layers but it holds the tensors of {len(layers)}; "
                              f"the file is damaged: download it again")
        embed = next((t for t in self.reader.tensors if t.name == "token_embd.weight"), None)
        hidden = getattr(text, "hidden_size", None)
        if embed is not None and isinstance(hidden, int) and int(embed.shape[0]) != hidden:
            raise SourceError(f"{self.path}: its metadata says a width of {hidden} but token_embd.weight is "
                              f"{int(embed.shape[0])} wide; the file is damaged: download it again")

    def _field(self, key: str):
        f = self.reader.fields.get(key)
        return None if f is None else f.contents()

    def _mapping(self):
        """{transformers name: [GGUF tensors]}: one tensor, or several stacked along dim 1 (a MoE layer's
        gate and up experts, which transformers holds as one gate_up tensor: gate rows first)."""
        if self._map is None:
            from transformers.modeling_gguf_pytorch_utils import (
                TENSOR_PROCESSORS,
                TensorProcessor,
                get_gguf_hf_weights_map,
            )

            from ..arch import build_skeleton

            with _parsed_once(self._parsed):
                import transformers.modeling_gguf_pytorch_utils as mg

                parsed = mg.load_gguf_checkpoint(str(self.path), return_tensors=False)
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
            want = {n: t.numel() for n, t in skeleton.state_dict(keep_vars=True).items()}
            for hf, ts in self._map.items():
                if hf in want and sum(int(t.n_elements) for t in ts) != want[hf]:
                    raise SourceError(f"{self.path}: tensor {ts[0].name} holds {sum(int(t.n_elements) for t in ts)} "
                                      f"values but the model its metadata describes needs {want[hf]} for {hf}; the "
                                      f"file is damaged: download it again")
        return self._map

    def _kept(self, name: str) -> list | None:
        """The GGUF tensors of a weight whose blocks a quantized store keeps as they are: all of one kept
        type (None otherwise: the weight is then dequantized and quantized to the store's kind)."""
        from ..quant import KEPT_GGUF

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
        from ..quant import KEPT_GGUF

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
        try:
            return self._get(name)
        except NotImplementedError as e:   # a block type gguf-py cannot dequantize (I32, Q8_1 ...)
            raise SourceError(f"{self.path}: weight {name} cannot be read ({e}); layerstream reads the float and "
                              f"quantized block types gguf-py dequantizes") from None
        except ValueError as e:   # transformers' processor cannot reshape it: not the shape the metadata implies
            raise SourceError(f"{self.path}: weight {name} does not have the shape the file's metadata implies "
                              f"({e}); the file is damaged: download it again") from None

    def _get(self, name: str) -> torch.Tensor:
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

        from ..quant import from_gguf

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
            if raw.dim() != 2:
                return None
            perm = self.row_permutation(ts[0])
            if perm is None:
                return None   # the processor does more than reorder rows: go through the float weight
            raws = [raw[torch.from_numpy(perm)]]
        if ggml in ("Q4_1", "Q8_0"):
            parts = [from_gguf(r, ggml, r.shape[0])[1] for r in raws]
        else:
            parts = [{"." + ggml.lower(): r.contiguous()} for r in raws]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def row_permutation(self, t):
        """How transformers' tensor processor orders the rows of GGUF tensor `t`: new row k = old row perm[k]
        (int64; the identity for most tensors, Llama's q/k interleaving undone for others). None where it does
        more than reorder rows (Gemma's norms, stored as 1 + w; a transpose): the tensor is then computed."""
        import numpy as np

        rows = int(t.data.shape[0])
        self._mapping()   # (makes the processor)
        probe = np.arange(rows, dtype=np.float64).reshape(rows, 1)
        perm = np.asarray(self.processor.process(weights=probe, name=t.name, tensor_key_mapping={},
                                                 parsed_parameters={}).weights)
        if perm.shape != (rows, 1) or not np.array_equal(np.sort(perm[:, 0]), np.arange(rows)):
            return None
        return perm[:, 0].astype(np.int64)

    def save_extras(self, out: Path) -> None:
        from transformers import AutoTokenizer, GenerationConfig

        log("reading the tokenizer from the GGUF file")
        try:
            with _parsed_once(self._parsed):
                tok = AutoTokenizer.from_pretrained(self.path.parent, gguf_file=self.path.name)
        except Exception as e:   # a damaged vocabulary or merges list fails in tokenizers' Rust code, in many ways
            raise SourceError(f"{self.path}: its tokenizer cannot be built ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:200]}); the file is damaged: download it again") from None
        tok.save_pretrained(out)
        GenerationConfig.from_model_config(self.config).save_pretrained(out)
