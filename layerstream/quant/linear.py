"""`Int4PackedLinear`: a linear layer that computes on int4 blocks with torch's CPU int4 kernel.

Resident int4 units on the CPU are swapped to this module once at load (gpt-fast's
`WeightOnlyInt4Linear` idea): no dequantization per sweep and no float weight ever made.
"""

from __future__ import annotations

import torch
from torch import nn

_ops = torch.ops.aten


class Int4PackedLinear(nn.Module):
    """y = x @ dequant(W).T + b with W held as torch's int4 pack (`_weight_int4pack_mm_for_cpu`).

    Built from our int4 (GGUF Q4_1-order) blocks: d * q + m per block of 32; the kernel computes
    (q - 8) * scale + zero, so zero = m + 8 d."""

    GROUP = 32

    def __init__(self, packed: torch.Tensor, scale_zero: torch.Tensor, in_features: int, out_features: int,
                 bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("scale_zero", scale_zero, persistent=False)
        self.bias = bias

    @staticmethod
    def supported(linear: nn.Module, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> bool:
        """The kernel exists, the module is a plain nn.Linear and its blocks are 32 wide. bf16 only: measured
        here, 72 GB/s bf16-equivalent with bf16 activations, 2.3 with float32 ones (slower than dequantizing)."""
        if dtype != torch.bfloat16 or type(linear) is not nn.Linear:
            return False
        if not (hasattr(_ops, "_weight_int4pack_mm_for_cpu") and hasattr(_ops, "_convert_weight_to_int4pack_for_cpu")):
            return False
        q, d = parts[".q4"], parts[".scale"]
        return q.shape[1] * 2 // d.shape[1] == Int4PackedLinear.GROUP

    @classmethod
    def from_blocks(cls, linear: nn.Linear, parts: dict[str, torch.Tensor], dtype: torch.dtype,
                    bias: torch.Tensor | None = None) -> "Int4PackedLinear":
        q, d, m = parts[".q4"], parts[".scale"].float(), parts[".min"].float()
        n, k = q.shape[0], q.shape[1] * 2
        q = q.reshape(n, k // cls.GROUP, cls.GROUP // 2)
        vals = torch.cat([q & 0xF, q >> 4], dim=-1).reshape(n, k).to(torch.int32)
        packed = _ops._convert_weight_to_int4pack_for_cpu(vals, 2)
        sz = torch.stack([d, m + 8 * d], dim=-1).transpose(0, 1).contiguous().to(dtype)
        return cls(packed, sz, k, n, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _ops._weight_int4pack_mm_for_cpu(x.reshape(-1, self.in_features).contiguous(), self.packed,
                                             self.GROUP, self.scale_zero)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 group {self.GROUP}"
