"""Quantized weights: block formats (int8, int4), GGUF blocks kept as they are, and the int4 linear module."""

from .blocks import (
                     BLOCK,
                     KINDS,
                     SUFFIXES,
                     dequantize,
                     float_bytes,
                     float_shape,
                     from_gguf,
                     normalize,
                     quantizable,
                     quantize,
                     stored_names,
)
from .gguf import GGML, INT4_GGML, KEPT_GGUF, as_int4, dequantize_ggml
from .linear import Int4PackedLinear

__all__ = ["BLOCK", "GGML", "INT4_GGML", "KEPT_GGUF", "KINDS", "SUFFIXES", "Int4PackedLinear", "as_int4", "dequantize",
           "dequantize_ggml", "float_bytes", "float_shape", "from_gguf", "normalize", "quantizable", "quantize",
           "stored_names"]
