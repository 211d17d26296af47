"""layerstream: run language models larger than memory by streaming layers from disk or RAM.

Imports are lazy so that the command line can say what it is doing before torch loads.
"""

from __future__ import annotations

__version__ = "0.1.0"
TESTED_TRANSFORMERS = ("5.24",)

_EXPORTS = {
    "AutoModel": "layerstream.api", "StreamedModel": "layerstream.engine", "ChatSession": "layerstream.engine",
    "Options": "layerstream.options", "split": "layerstream.store", "Store": "layerstream.store",
    "make_plan": "layerstream.plan", "LayerstreamError": "layerstream.errors",
}
__all__ = list(_EXPORTS) + ["__version__"]
_checked = False


def _check_transformers():
    """Say clearly when the installed transformers is not one the tests pass on."""
    global _checked
    if _checked:
        return
    _checked = True
    import warnings
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("transformers")
    except PackageNotFoundError:
        return
    if not v.startswith(TESTED_TRANSFORMERS):
        warnings.warn(f"layerstream {__version__} is tested with transformers {', '.join(TESTED_TRANSFORMERS)}.x; "
                      f"found {v}. It may work; if outputs look wrong, install transformers==5.24.*", stacklevel=3)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        _check_transformers()
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'layerstream' has no attribute {name!r}")
