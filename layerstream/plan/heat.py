"""Expert heat: how often the router chose each expert in earlier runs, kept beside the store.

The planner keeps the most chosen experts resident; a run adds its counts when the model closes.
"""

from __future__ import annotations

import json

from ..store import Store, atomic_write_bytes

EXPERT_COUNTS = "expert-counts.json"


def read_expert_counts(store: Store) -> dict[str, int]:
    """{expert unit: times the router chose it}, recorded by earlier runs on this store (absent: {})."""
    try:
        d = json.loads((store.path / EXPERT_COUNTS).read_text())
        return {k: int(v) for k, v in d.items() if k in store.units}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


def record_expert_counts(store: Store, new: dict[str, int]) -> None:
    """Add this run's counts to the store's (written atomically; a read-only store keeps none)."""
    if not new:
        return
    total = read_expert_counts(store)
    for k, v in new.items():
        total[k] = total.get(k, 0) + v
    try:
        atomic_write_bytes(store.path / EXPERT_COUNTS, json.dumps(total, sort_keys=True).encode())
    except OSError:
        pass
