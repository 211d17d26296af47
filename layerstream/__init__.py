"""layerstream: run language models larger than memory by streaming layers from disk or RAM."""

from __future__ import annotations

import warnings

__version__ = "0.1.0"
TESTED_TRANSFORMERS = ("5.24",)


def _check_transformers():
    try:
        from importlib.metadata import version

        v = version("transformers")
    except Exception:  # not installed: the import below fails with a clear message
        return
    if not v.startswith(TESTED_TRANSFORMERS):
        warnings.warn(f"layerstream {__version__} is tested with transformers {', '.join(TESTED_TRANSFORMERS)}.x; "
                      f"found {v}. It may work; if outputs look wrong, install transformers==5.24.*",
                      stacklevel=2)


_check_transformers()

from .errors import LayerstreamError  # noqa: E402
from .model import AutoModel, StreamedModel  # noqa: E402
from .split import split  # noqa: E402
from .store import Store  # noqa: E402

__all__ = ["AutoModel", "StreamedModel", "LayerstreamError", "Store", "split", "__version__"]
