"""The residency plan: each unit's home tier (device, ram, disk), fixed for the run, and what it costs."""

from .heat import EXPERT_COUNTS, read_expert_counts, record_expert_counts
from .planner import Machine, Plan, UnitPlan, choose_io, head_tied_to_embedding, make_plan
from .probes import device_free, measure_read_bandwidth

__all__ = ["EXPERT_COUNTS", "Machine", "Plan", "UnitPlan", "choose_io", "device_free", "head_tied_to_embedding",
           "make_plan",
           "measure_read_bandwidth", "read_expert_counts", "record_expert_counts"]
