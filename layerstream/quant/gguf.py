"""GGUF block types kept bit for bit in a quantized store, and their dequantization with torch."""

from __future__ import annotations

import torch

# GGUF block types kept bit for bit: (values per block, bytes per block). Stored as `<name>.<type>` (uint8
# [rows, bytes per row], the file's own bytes) and dequantized with torch, as gguf-py (and so transformers)
# computes them, in float32. A split with compression="int4" stores Q4_1 and Q8_0 as int4 and int8 blocks
# (blocks.py: the same values, split into codes and scales); a GGUF served in place keeps them as they lie.
GGML = {"q4_0": (32, 18), "q4_1": (32, 20), "q5_0": (32, 22), "q5_1": (32, 24), "q8_0": (32, 34),
        "q4_k": (256, 144), "q5_k": (256, 176), "q6_k": (256, 210)}
KEPT_GGUF = {k.upper() for k in GGML}   # every GGUF block type kept as it is


def _f16(b: torch.Tensor) -> torch.Tensor:
    """fp16 values from their bytes [..., 2] -> float32 [..., 1]."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor, width: int) -> torch.Tensor:
    """[..., n * width/2] bytes -> [..., n, 2, width/2]: low nibbles of each group, then high nibbles."""
    qs = qs.reshape(*qs.shape[:-1], -1, 1, width // 2)
    return torch.cat([qs & 0x0F, qs >> 4], dim=-2)


def _bits(qh: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` bits of each uint32 (little-endian bytes [..., 4]) as [..., count] in 0/1."""
    v = qh.contiguous().view(torch.int32)
    return (v >> torch.arange(count, dtype=torch.int32)) & 1


def _k_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: the 8 six-bit scales and mins packed in 12 bytes."""
    d, m, md = scales.reshape(-1, 3, 4).unbind(1)
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.float(), mn.float()


def dequantize_ggml(kind: str, raw: torch.Tensor) -> torch.Tensor:
    """float32 [rows, cols] from a GGUF tensor's blocks (uint8 [rows, bytes per row])."""
    per, size = GGML[kind]
    rows = raw.shape[0]
    b = raw.reshape(-1, size)
    if kind == "q4_0":
        q = _nibbles(b[:, 2:], 32).reshape(-1, 32).float() - 8
        w = _f16(b[:, :2]) * q
    elif kind == "q4_1":
        w = _f16(b[:, :2]) * _nibbles(b[:, 4:], 32).reshape(-1, 32).float() + _f16(b[:, 2:4])
    elif kind == "q8_0":
        w = _f16(b[:, :2]) * b[:, 2:].contiguous().view(torch.int8).float()
    elif kind in ("q5_0", "q5_1"):
        off = 2 if kind == "q5_0" else 4
        low = _nibbles(b[:, off + 4:], 32).reshape(-1, 32)
        q = (low | (_bits(b[:, off:off + 4], 32).to(torch.uint8) << 4)).float()
        w = _f16(b[:, :2]) * (q - 16) if kind == "q5_0" else _f16(b[:, :2]) * q + _f16(b[:, 2:4])
    elif kind in ("q4_k", "q5_k"):
        d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
        sc, mn = _k_scales(b[:, 4:16])
        qs = b[:, -128:]
        q = _nibbles(qs, 64).reshape(-1, 8, 32)
        if kind == "q5_k":
            qh = b[:, 16:48].reshape(-1, 1, 32)
            hi = (qh >> torch.arange(8, dtype=torch.uint8).reshape(1, 8, 1)) & 1
            q = q | (hi << 4)
        w = (d * sc).unsqueeze(-1) * q.float() - (dmin * mn).unsqueeze(-1)
    elif kind == "q6_k":
        ql, qh, scales, d = b[:, :128], b[:, 128:192], b[:, 192:208], _f16(b[:, 208:210])
        low = _nibbles(ql, 128).reshape(-1, 8, 32)
        hi = (qh.reshape(-1, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)) & 3
        q = (low | (hi.reshape(-1, 8, 32) << 4)).to(torch.int16) - 32
        w = (d * scales.contiguous().view(torch.int8).float()).reshape(-1, 16, 1) * q.reshape(-1, 16, 16).float()
    else:
        raise ValueError(kind)
    return w.reshape(rows, -1)


INT4_GGML = ("q4_0", "q4_1", "q4_k")   # 4-bit block types torch's int4 kernel can take (`as_int4`)


def as_int4(kind: str, raw: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """A GGUF tensor's 4-bit blocks (Q4_0, Q4_1, Q4_K; uint8 [rows, bytes per row]) as int4 blocks of 32
    (`.q4` codes in GGUF Q4_1's nibble order, `.scale` and `.min` in float32, w = q * scale + min): the same
    values, in the layout torch's int4 kernel is built from (`Int4PackedLinear`). None for other types: 5, 6
    and 8-bit blocks have no torch kernel that takes them as they are."""
    if kind not in INT4_GGML:
        return None
    rows = raw.shape[0]
    b = raw.reshape(rows, -1, GGML[kind][1])
    if kind == "q4_0":
        d = _f16(b[..., :2])
        q, scale, low = _nibbles(b[..., 2:], 32), d, -8 * d
    elif kind == "q4_1":
        q, scale, low = _nibbles(b[..., 4:], 32), _f16(b[..., :2]), _f16(b[..., 2:4])
    else:   # eight sub-blocks of 32 per block of 256, each with a six-bit scale and min
        sc, mn = _k_scales(b[..., 4:16].reshape(-1, 12))
        q = _nibbles(b[..., 16:], 64)
        scale = _f16(b[..., :2]) * sc.reshape(rows, -1, 8)
        low = -(_f16(b[..., 2:4]) * mn.reshape(rows, -1, 8))
    q = q.reshape(rows, -1, 32)
    return {".q4": (q[..., :16] | (q[..., 16:] << 4)).reshape(rows, -1), ".scale": scale.reshape(rows, -1),
            ".min": low.reshape(rows, -1)}
