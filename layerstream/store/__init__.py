"""The layer store: its format (format.py), safe I/O (io.py), the writer (writer.py: split), stores that point
into their source's own files (inplace.py) and the choice of store for a source (resolver.py).

The writer and resolve read sources, which read safetensors headers with io.py: they are imported when
first used, so that `sources` can import `store.io` without a cycle.
"""

from .format import MANIFEST, Manifest, Store, UnitInfo
from .io import (
    aligned_empty,
    atomic_write_bytes,
    fsync_dir,
    read_header,
    read_layout,
    release_rows_as_read,
    tensor_views,
)

_LATER = {"resolve": "resolver", "split": "writer", "index_in_place": "inplace", "default_store_path": "writer",
          "PROGRESS": "writer"}
__all__ = ["MANIFEST", "Manifest", "Store", "UnitInfo", "aligned_empty", "atomic_write_bytes", "fsync_dir",
           "read_header", "read_layout", "release_rows_as_read", "tensor_views", *_LATER]


def __getattr__(name):
    if name in _LATER:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LATER[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
