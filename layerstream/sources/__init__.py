"""Checkpoint readers: each source yields a model's config, its tensors by name, and its tokenizer files.

A source object has `kind`, `path`, `identity`, `name`, `config`, `has(name)`, `get(name)`,
`numel(name)`, `get_quantized(name, kind)`, `map_names(skeleton, layout)` and `save_extras(out)`.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import SourceError
from .gguf import GGUFSource
from .hub import download_hub, embedded_model, looks_like_hub_id
from .safetensors import SafetensorsSource


def open_source(source) -> SafetensorsSource | GGUFSource:
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return GGUFSource(path)
    if path.is_dir():
        return SafetensorsSource(path)
    if path.is_file():
        raise SourceError(f"{path}: not a model (expected a .gguf file, a model directory or a store)")
    raise SourceError(f"{path}: no such file or directory")



__all__ = ["GGUFSource", "SafetensorsSource", "download_hub", "embedded_model", "looks_like_hub_id", "open_source"]
