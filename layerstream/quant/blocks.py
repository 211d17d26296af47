"""Block-wise weight-only quantization of linear weights, stored as plain safetensors tensors.

int8: asymmetric, blocks of 64 along the input dimension, fp16 scale and min per block
      (`<name>.q8u` uint8 [out, in], `<name>.scale`, `<name>.min` fp16 [out, in/64]): 1.06 bytes per
      weight. (A GGUF's Q8_0 blocks are kept as they are: `<name>.q8` int8 and a scale, symmetric.)
int4: asymmetric, blocks of 32, fp16 scale and min per block, two values per byte in GGUF Q4_1's order
      (byte j of a block holds element j in its low nibble and element j+16 in its high nibble;
      `<name>.q4` uint8 [out, in/2], `<name>.scale`, `<name>.min` fp16 [out, in/32]): 0.625 bytes per
      weight, 0.3125x bf16. A GGUF's Q4_1 (and Q8_0) tensors are kept exactly, not re-rounded, and so are
      its Q4_0, Q5_0, Q5_1, Q4_K, Q5_K and Q6_K tensors, in their own layout (`GGML` below).

Both choose each block's scale and min by a search over candidate grids, each refitted by least squares
(`_grids`, `_best_fit`), not plain min/max.

Weights are dequantized (w = q * scale [+ min]) by the loader thread, off the compute's critical path,
on the CPU or on the accelerator.
"""

from __future__ import annotations

import torch

from .gguf import GGML, dequantize_ggml

KINDS = {"int8": "int8", "8bit": "int8", "int4": "int4", "4bit": "int4"}
BLOCK = {"int8": 64, "int4": 32}
# "int8" is stored asymmetric (uint8 codes, scale and min: `uint8` below); GGUF Q8_0 blocks are kept as
# they are, symmetric (`int8`: int8 codes and a scale)
SUFFIXES = {"int8": (".q8", ".scale"), "uint8": (".q8u", ".scale", ".min"), "int4": (".q4", ".scale", ".min")}
SUFFIXES.update({k: ("." + k,) for k in GGML})   # GGUF blocks kept as they are
LEVELS = {"int8": 255, "int4": 15}


def normalize(kind) -> str | None:
    if kind is None:
        return None
    if str(kind).lower() not in KINDS:
        from ..errors import InputError

        raise InputError(f"quantization {kind!r} is not one of int8, int4 (or AirLLM's 8bit, 4bit)")
    return KINDS[str(kind).lower()]


def quantizable(name: str, shape, kind: str) -> bool:
    """2-D linear weights: `*.weight`, and one expert's slice of a fused experts weight (`*.experts.<j>.<w>`).
    A MoE router's weight (`gate`, `router`, `shared_expert_gate`) stays float, as llama.cpp keeps its
    `ffn_gate_inp`: it is small, and rounding it changes which experts run."""
    if name.endswith(".weight") and name.split(".")[-2] in ROUTERS:
        return False
    return len(shape) == 2 and (name.endswith(".weight") or ".experts." in name) and shape[1] % BLOCK[kind] == 0


ROUTERS = ("gate", "router", "shared_expert_gate")


def _grids(lo: torch.Tensor, hi: torch.Tensor, levels: int, kind: str):
    """Starting grids (step, offset, refit) for a block whose values span lo..hi. First plain min/max. int4:
    the range shrunk from 100% to 80% in SEARCH_STEPS["int4"] steps (clipping the extremes pays at 15
    levels). int8: the step widened by 1 or 2 levels and the grid's phase moved over that slack in 8 steps
    (at 255 levels clipping does not pay, but where the values fall between the levels does)."""
    span = torch.where(hi > lo, hi - lo, 1.0)
    yield span / levels, lo, False
    if kind == "int4":
        steps = SEARCH_STEPS["int4"]
        mid = (hi + lo) / 2
        for k in range(steps):
            f = 1.0 - 0.2 * k / max(steps - 1, 1)
            yield span * f / levels, mid - span * f / 2, True
    else:
        yield span / levels, lo, True
        for widen in (1, 2):
            s = span / (levels - widen)
            for k in range(SEARCH_STEPS["int8"]):
                yield s, lo - s * widen * k / SEARCH_STEPS["int8"], True


def _best_fit(x: torch.Tensor, levels: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block of x [..., block]: scale and min (w = q * scale + min, q in 0..levels) with the least
    squared error among the starting grids of `_grids`, each refitted by least squares (the best scale and
    min for the rounding it gives; in the spirit of llama.cpp's k-quants search). The error is measured
    with the fp16 values actually stored."""
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    n = x.shape[-1]
    sx = x.sum(-1, keepdim=True)
    best_err = best_s = best_m = None
    for s, m, refit in _grids(lo, hi, levels, kind):
        if refit:
            q = torch.round((x - m) / s).clamp(0, levels)
            sq = q.sum(-1, keepdim=True)
            sqq, sqx = (q * q).sum(-1, keepdim=True), (q * x).sum(-1, keepdim=True)
            det = n * sqq - sq * sq
            ok = det > 0
            s2 = torch.where(ok, (n * sqx - sq * sx) / torch.where(ok, det, 1.0), s)
            m2 = torch.where(ok, (sx - s2 * sq) / n, m)
            good = s2 > 0
            s, m = torch.where(good, s2, s), torch.where(good, m2, m)
        s16, m16 = s.to(torch.float16).float(), m.to(torch.float16).float()
        back = torch.round((x - m16) / torch.where(s16 > 0, s16, 1.0)).clamp(0, levels) * s16 + m16
        err = ((back - x) ** 2).sum(-1, keepdim=True)
        if best_err is None:
            best_err, best_s, best_m = err, s16, m16
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s, best_m = torch.where(better, s16, best_s), torch.where(better, m16, best_m)
    return best_s, best_m


# int4: range fractions searched; int8: grid phases searched per widening (see _grids)
SEARCH_STEPS = {"int4": 8, "int8": 8}
CHUNK = 1 << 18   # elements quantized at a time: the search's many passes then run in the CPU's cache (9x faster)


def quantize(w: torch.Tensor, kind: str, block: int | None = None, pool=None) -> dict[str, torch.Tensor]:
    """{suffix: tensor} for a 2-D float weight. The search over grids (`_grids`) against plain min/max
    blocks, on SmolLM2 with weights off any 4-bit grid (bench/quality.py): int4 top-1 agreement 70.4% ->
    74.0%; int8 KL divergence 0.00114 -> 0.00098 (squared error -17%).

    pool: an executor whose threads quantize the chunks of rows (torch releases the GIL in its kernels); the
    result is the same bytes as without one. One thread per core, each with one torch thread: the search's
    small ops gain little from torch's own threads (here 1.2x from 2)."""
    block = block or BLOCK[kind]
    out_f, in_f = w.shape
    rows = max(1, CHUNK // in_f)
    chunks = [w[r:r + rows] for r in range(0, out_f, rows)]
    done = list(pool.map(_quantize_rows, chunks, [kind] * len(chunks), [block] * len(chunks)) if pool is not None
                else (_quantize_rows(c, kind, block) for c in chunks))
    q, s, m = (torch.cat(p) for p in zip(*done))
    if kind == "int8":
        return {".q8u": q.reshape(out_f, in_f), ".scale": s, ".min": m}
    half = block // 2
    packed = q[..., :half] | (q[..., half:] << 4)
    return {".q4": packed.reshape(out_f, in_f // 2), ".scale": s, ".min": m}


def _quantize_rows(w: torch.Tensor, kind: str, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes [rows, blocks, block] uint8, scale and min [rows, blocks] fp16 of a chunk of rows."""
    x = w.float().reshape(w.shape[0], -1, block)
    sc, mn = _best_fit(x, LEVELS[kind], kind)
    safe = torch.where(sc > 0, sc, 1.0)
    q = torch.where(sc > 0, torch.round((x - mn) / safe), 0).clamp(0, LEVELS[kind]).to(torch.uint8)
    return q, sc.squeeze(-1).to(torch.float16), mn.squeeze(-1).to(torch.float16)


DEQUANT_CHUNK = 1 << 19   # elements dequantized at a time on the CPU: the passes stay in cache (5-8x faster)


def dequantize(kind: str, parts: dict[str, torch.Tensor], dtype: torch.dtype,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """The float weight from {suffix: tensor}, computed in float32 (as GGUF's own dequantizer does), written
    into `out` when given. On the CPU a cache-sized chunk of rows at a time (measured here: 2.4 GB/s of
    bf16 out per thread for int4 and Q4_K, against 0.3 all at once); on an accelerator all at once."""
    if kind not in GGML:   # int8 names both layouts (.q8, .q8u): the parts say which
        kind = "int4" if ".q4" in parts else "uint8" if ".q8u" in parts else "int8"
    codes = parts[SUFFIXES[kind][0]]
    rows, cols = float_shape(kind, codes.shape)
    if out is None:
        out = torch.empty((rows, cols), dtype=dtype, device=codes.device)
    step = max(1, DEQUANT_CHUNK // cols) if codes.device.type == "cpu" else rows
    for r in range(0, rows, step):
        out[r:r + step].copy_(_dequantize_rows(kind, {k: v[r:r + step] for k, v in parts.items()}))
    return out


def _dequantize_rows(kind: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """float32 weights of some rows from their {suffix: tensor} (every part has the rows as dimension 0)."""
    if kind in GGML:
        return dequantize_ggml(kind, parts["." + kind])
    scale = parts[".scale"].float().unsqueeze(-1)
    codes = parts.get(".q8", parts.get(".q8u"))
    block = (codes.shape[1] if codes is not None else parts[".q4"].shape[1] * 2) // parts[".scale"].shape[1]
    if codes is not None:
        out_f, in_f = codes.shape
        w = codes.reshape(out_f, in_f // block, block).float() * scale
        if ".min" in parts:
            w += parts[".min"].float().unsqueeze(-1)
    else:
        q = parts[".q4"]
        out_f, in_f = q.shape[0], q.shape[1] * 2
        q = q.reshape(out_f, in_f // block, block // 2)
        w = torch.cat([q & 0xF, q >> 4], dim=-1).float() * scale + parts[".min"].float().unsqueeze(-1)
    return w.reshape(out_f, in_f)


def from_gguf(raw: torch.Tensor, ggml_type: str, rows: int) -> tuple[str, dict[str, torch.Tensor]] | None:
    """A GGUF Q4_1 / Q8_0 tensor's blocks as our int4 / int8 tensors, bit for bit (None for other types).
    raw: uint8 [rows, bytes per row]."""
    if ggml_type == "Q4_1":   # per block of 32: d fp16, m fp16, 16 bytes of nibbles
        b = raw.reshape(rows, -1, 20)
        return "int4", {".q4": b[..., 4:].reshape(rows, -1).contiguous(),
                        ".scale": b[..., 0:2].contiguous().view(torch.float16).reshape(rows, -1),
                        ".min": b[..., 2:4].contiguous().view(torch.float16).reshape(rows, -1)}
    if ggml_type == "Q8_0":   # per block of 32: d fp16, 32 int8
        b = raw.reshape(rows, -1, 34)
        return "int8", {".q8": b[..., 2:].contiguous().view(torch.int8).reshape(rows, -1),
                        ".scale": b[..., 0:2].contiguous().view(torch.float16).reshape(rows, -1)}
    return None


def stored_names(tensors: list[str]) -> dict[str, tuple[str, dict[str, str]]]:
    """From a unit's stored tensor names: {parameter: (kind, {suffix: stored name})} for quantized ones."""
    out = {}
    for t in tensors:
        for kind, (qsuf, *rest) in SUFFIXES.items():
            if t.endswith(qsuf):
                base = t[: -len(qsuf)]
                out[base] = (kind, {s: base + s for s in (qsuf, *rest)})
    return out


def float_shape(kind: str, shape) -> tuple[int, int]:
    """The dequantized weight's shape, from the shape of its codes tensor (the kind's first suffix)."""
    rows, cols = shape
    if kind in GGML:
        per, size = GGML[kind]
        return rows, cols // size * per
    return rows, cols * (2 if kind == "int4" else 1)


def float_bytes(shapes: dict[str, tuple], quant: dict, dtype: torch.dtype) -> int:
    """Bytes of a unit's dequantized weights in `dtype`."""
    total = 0
    for base, (kind, names) in quant.items():
        r, c = float_shape(kind, shapes[names[SUFFIXES[kind][0]]])
        total += r * c * dtype.itemsize
    return total
