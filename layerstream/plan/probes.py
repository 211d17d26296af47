"""What the planner asks the machine: free device memory, and the store's read bandwidth."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import torch

from ..store import Store, aligned_empty, read_layout
from ..utils import available_ram


def device_free(device: str) -> int:
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return free
    mod = getattr(torch, dev.type, None)
    if mod is not None and hasattr(mod, "mem_get_info"):
        try:
            return mod.mem_get_info()[0]
        except Exception:  # backends without the query
            pass
    return available_ram()


def measure_read_bandwidth(store: Store, direct: bool = True, readers: int = 4, seconds: float = 2.0) -> float:
    """Bytes/s reading this store's units the way the loader does (largest units first), for about `seconds`.
    With O_DIRECT the page cache cannot flatter the figure."""
    units = sorted(store.manifest.units, key=lambda u: -u.bytes)
    pool = ThreadPoolExecutor(readers) if readers > 1 else None
    done, t0 = 0, time.perf_counter()
    try:
        for u in units:
            lt = store.layout(u.name)
            buf = aligned_empty(lt.size)
            done += read_layout(lt, buf, direct=direct, pool=pool)
            if time.perf_counter() - t0 > seconds:
                break
    finally:
        if pool:
            pool.shutdown()
    return done / max(time.perf_counter() - t0, 1e-9)
