"""Expert heat: how often the router chose each expert in earlier runs, kept beside the store.

The planner keeps the most chosen experts resident; a run adds its counts when the model closes.
"""

from __future__ import annotations

import fcntl
import json

from ..store import Store, atomic_write_bytes

EXPERT_COUNTS = "expert-counts.json"


def _read_all(store: Store) -> dict[str, int]:
    try:
        d = json.loads((store.path / EXPERT_COUNTS).read_text())
        return {str(k): int(v) for k, v in d.items()}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


def read_expert_counts(store: Store) -> dict[str, int]:
    """{expert unit: times the router chose it}, recorded by earlier runs on this store (absent: {})."""
    return {k: v for k, v in _read_all(store).items() if k in store.units}


def record_expert_counts(store: Store, new: dict[str, int]) -> None:
    """Add this run's counts to the store's (written atomically; a read-only store keeps none). Several
    processes may share a store (Ray replicas, pipeline stages, each seeing only its own units): the
    read-add-write holds a lock, and keeps the counts of units this process does not see."""
    if not new:
        return
    try:
        with open(store.path / ".expert-counts.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            total = _read_all(store)
            for k, v in new.items():
                total[k] = total.get(k, 0) + v
            atomic_write_bytes(store.path / EXPERT_COUNTS, json.dumps(total, sort_keys=True).encode())
    except OSError:
        pass
