"""From any source (None, a path, a .gguf, a hub id, a store) to a store path, made once and reused."""

from __future__ import annotations

from pathlib import Path

from ..errors import SourceError, StoreError
from ..sources import download_hub, embedded_model, looks_like_hub_id, open_source
from ..utils import file_identity, log
from .format import MANIFEST, Store
from .inplace import can_serve_in_place, index_gguf, index_in_place
from .writer import default_store_path, split


def _gguf_key(path: Path):
    """What `default_store_path` takes from a GGUF source (its name and identity), without opening it."""
    from types import SimpleNamespace

    return SimpleNamespace(name=path.stem, identity=file_identity([path]))


def _stale_index(st: Store, path: Path) -> bool:
    """Whether the in-place store `st` indexes files other than the source `path` as it is now (another copy
    of the model, moved or changed since): such an index is made again from `path`, not served."""
    m, out = st.manifest, st.path
    if not m.in_place or not path.exists():
        return False
    why = None
    if Path(m.source.get("path", "")).resolve() != path.resolve():
        why = f"indexes {m.source.get('path')}, not {path}"
    else:
        try:
            st.check_files()
        except StoreError as e:
            why = f"is out of date ({e})"
    if why:
        log(f"the in-place store at {out} {why}; indexing {path} again")
    return why is not None


def resolve(source=None, store_path=None, dtype=None, progress=True, in_place=None, quantize=None) -> Path:
    """A store path for any source: an existing store, or one made now (or reused from the cache).

    in_place: serve a safetensors source from its own shards (None: whenever it needs no dtype conversion), a
    GGUF from its own blocks (None: unless a quantization is asked; its blocks are dequantized to the compute
    dtype as they load); otherwise the source is split into a store of its own."""
    if source is None:
        source = embedded_model()
    if Store.is_store(source):
        return Path(source)
    path = Path(str(source)).expanduser()
    if not path.exists() and looks_like_hub_id(str(source)):
        path = download_hub(str(source))
    from ..quant import normalize

    quant = normalize(quantize)
    is_gguf = path.is_file() and path.suffix == ".gguf"
    # a GGUF is served as it is (its blocks dequantized to the compute dtype as they load) unless a copy
    # (in_place=False: float weights, in `dtype` or float32) or a quantization is asked
    gguf_in_place = is_gguf and in_place is not False and quant is None
    # a GGUF's default store is named by the file's name, size and mtime: found without parsing the file (its
    # metadata and vocabulary take seconds), so a second start opens the store at once
    src = None if is_gguf else open_source(path)
    out = Path(store_path) if store_path is not None else \
        default_store_path(src or _gguf_key(path), quant, None if gguf_in_place else dtype, in_place=gguf_in_place)
    st = Store(out) if Store.is_store(out) else None
    if st is not None and _stale_index(st, path):
        (out / MANIFEST).unlink()   # (an index holds no weights: made again below, its manifest written last)
        st = None
    if st is not None:
        m = st.manifest
        if m.quantization != quant and quantize is not None:
            raise StoreError(f"{out}: the store there is {m.quantization or 'not quantized'}, not {quant}; choose "
                             f"another store_path")
        if dtype is not None and m.dtype != str(dtype).replace("torch.", "") and not m.quantization:
            log(f"the store at {out} holds {m.dtype} weights; they are converted to {dtype} as they load")
        log(f"using store {out}")
        return out
    if src is None:
        src = open_source(path)
    if quant:
        return split(src, out, dtype=dtype, progress=progress, quantize=quant)
    if in_place is None and src.kind == "safetensors":
        in_place = can_serve_in_place(src, dtype)
    if gguf_in_place:
        return index_gguf(src, out, progress=progress)
    if in_place:
        if src.kind != "safetensors":
            raise SourceError(f"{src.path}: only safetensors and GGUF files can be served in place; split it")
        return index_in_place(src, out, progress=progress)
    return split(src, out, dtype=dtype, progress=progress)
