"""layerstream on Ray: beyond one machine without a network layer of its own.

`run_batch` spreads a batch job's requests over replicas (Ray actors, one engine each) and writes what a
single-process job writes; `Completions` is a callable class for Ray Data's `Dataset.map_batches`. Ray is an
optional dependency (`pip install 'layerstream[ray]'`): nothing here imports it until it is used.
"""

from __future__ import annotations

from ..errors import LayerstreamError

_EXPORTS = {"run_batch": "layerstream.ray.batch", "Completions": "layerstream.ray.data"}
__all__ = list(_EXPORTS) + ["require", "connect", "RESTARTS"]
RESTARTS = 3       # times Ray restarts an actor that died (a replica, a stage) before it is given up


def require():
    """The `ray` module, or an error that says how to install it."""
    try:
        import ray
    except ImportError:
        raise LayerstreamError("Ray is not installed: pip install 'layerstream[ray]' (or pip install 'ray>=2.40')") \
            from None
    return ray


def connect(address: str | None = None):
    """Ray, initialised: the cluster already connected to in this process, else the one at `address` (or
    `RAY_ADDRESS`), else a new local one."""
    ray = require()
    if not ray.is_initialized():
        import logging

        ray.init(address=address or None, logging_level=logging.WARNING)
    return ray


def failed_for_good(ray, error, deaths: int) -> bool:
    """After a call to an actor that died failed with `error` (the `deaths`-th such failure since it last
    answered): whether to give the actor up. Unavailable: Ray is still restarting it (calls wait for the new
    one once it is registered); died: each failure counts, and more than `RESTARTS` mean its restarts are used up."""
    return not isinstance(error, ray.exceptions.ActorUnavailableError) and deaths > RESTARTS


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'layerstream.ray' has no attribute {name!r}")
