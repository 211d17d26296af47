"""Architectures: transformers' own model built as a weightless skeleton, and its units named."""

from .families import TESTED_DENSE, TESTED_MODEL_TYPES, TESTED_MOE, TESTED_MOE_WHOLE_LAYER
from .skeleton import Experts, Layout, Unit, build_skeleton, check_supported, layout

__all__ = ["Experts", "Layout", "TESTED_DENSE", "TESTED_MODEL_TYPES", "TESTED_MOE", "TESTED_MOE_WHOLE_LAYER", "Unit",
           "build_skeleton", "check_supported", "layout"]
