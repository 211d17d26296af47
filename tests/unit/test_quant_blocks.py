"""layerstream.quant: int8 / int4 blocks (quantize, dequantize), the names and shapes of stored parts."""

import pytest
import torch

from layerstream.errors import InputError
from layerstream.quant import (
    BLOCK,
    GGML,
    KINDS,
    dequantize,
    float_bytes,
    float_shape,
    normalize,
    quantizable,
    quantize,
    stored_names,
)

LEVELS = {"int8": 255, "int4": 15}


def weight(rows=16, cols=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * torch.linspace(0.05, 2.0, cols)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_parts_layout(kind):
    w = weight()
    parts = quantize(w, kind)
    blocks = 256 // BLOCK[kind]
    if kind == "int8":
        assert set(parts) == {".q8u", ".scale", ".min"}
        assert parts[".q8u"].dtype == torch.uint8 and parts[".q8u"].shape == (16, 256)
    else:
        assert set(parts) == {".q4", ".scale", ".min"}
        assert parts[".q4"].dtype == torch.uint8 and parts[".q4"].shape == (16, 128)   # two codes a byte
    for k in (".scale", ".min"):
        assert parts[k].dtype == torch.float16 and parts[k].shape == (16, blocks)


@pytest.mark.parametrize("kind, max_rel_rms, max_steps", [("int8", 0.006, 0.6), ("int4", 0.09, 1.0)])
def test_round_trip_error_bounds(kind, max_rel_rms, max_steps):
    w = weight()
    back = dequantize(kind, quantize(w, kind), torch.float32)
    assert back.shape == w.shape and back.dtype == torch.float32
    x = w.reshape(16, -1, BLOCK[kind])
    err = (back - w).reshape(x.shape)
    step = (x.amax(-1) - x.amin(-1)) / LEVELS[kind]        # a plain min/max grid's step, per block
    # relative RMS error, block by block (a block's error is measured against its own spread)
    rel = err.pow(2).mean(-1).sqrt() / x.std(-1)
    assert rel.mean() < max_rel_rms and rel.max() < 1.6 * max_rel_rms
    # int8: within about half a step of every weight (nothing clipped); int4: within a step even where the
    # search shrank the range (clipping the extremes)
    assert torch.all(err.abs() <= max_steps * step.unsqueeze(-1))


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_dequantized_values_lie_on_each_blocks_grid(kind):
    w = weight(rows=4, cols=128)
    parts = quantize(w, kind)
    back = dequantize(kind, parts, torch.float32).reshape(4, -1, BLOCK[kind])
    s = parts[".scale"].float().unsqueeze(-1)
    m = parts[".min"].float().unsqueeze(-1)
    q = (back - m) / s
    assert torch.allclose(q, q.round(), atol=1e-3)
    assert q.round().min() >= 0 and q.round().max() <= LEVELS[kind]


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_constant_and_zero_blocks_are_exact(kind):
    w = torch.zeros(3, 128)
    w[1] = 0.5
    w[2, :64] = -2.0   # a whole block (of either kind) at -2, the next at 0
    back = dequantize(kind, quantize(w, kind), torch.float32)
    assert torch.equal(back, w)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_dequantize_into_out_and_other_dtypes(kind):
    w = weight(rows=8, cols=64)
    parts = quantize(w, kind)
    ref = dequantize(kind, parts, torch.float32)
    out = torch.empty(8, 64, dtype=torch.bfloat16)
    got = dequantize(kind, parts, torch.bfloat16, out=out)
    assert got is out and torch.equal(out, ref.to(torch.bfloat16))
    # "int8" names both int8 layouts: the parts say which
    assert torch.equal(dequantize("int8" if kind == "int8" else "int4", parts, torch.float32), ref)


def test_int4_packing_order_is_gguf_q4_1s():
    """Byte j of a 32-block: element j in the low nibble, element j + 16 in the high nibble."""
    w = torch.arange(32, dtype=torch.float32).reshape(1, 32) / 31 * 15   # codes 0..15, each twice
    parts = quantize(w, "int4")
    codes = torch.cat([parts[".q4"] & 0xF, parts[".q4"] >> 4], dim=-1)[0]
    want = torch.round((w[0] - parts[".min"].float()[0]) / parts[".scale"].float()[0]).clamp(0, 15)
    assert torch.equal(codes, want.to(torch.uint8))
    assert codes[0] <= codes[15] <= codes[16] <= codes[31]


def test_stored_names():
    tensors = ["a.weight.q4", "a.weight.scale", "a.weight.min", "b.weight", "n.bias",
               "c.weight.q8u", "c.weight.scale", "c.weight.min", "d.weight.q4_k", "e.weight.q8", "e.weight.scale",
               "f.weight.q6_k"]
    got = stored_names(tensors)
    assert got == {
        "a.weight": ("int4", {".q4": "a.weight.q4", ".scale": "a.weight.scale", ".min": "a.weight.min"}),
        "c.weight": ("uint8", {".q8u": "c.weight.q8u", ".scale": "c.weight.scale", ".min": "c.weight.min"}),
        "d.weight": ("q4_k", {".q4_k": "d.weight.q4_k"}),
        "e.weight": ("int8", {".q8": "e.weight.q8", ".scale": "e.weight.scale"}),
        "f.weight": ("q6_k", {".q6_k": "f.weight.q6_k"}),
    }
    assert stored_names(["x.weight", "y.bias", "z.scale"]) == {}


@pytest.mark.parametrize("kind, codes, want", [
    ("int4", (10, 16), (10, 32)),
    ("int8", (10, 64), (10, 64)),
    ("uint8", (3, 128), (3, 128)),
    ("q4_0", (2, 18 * 4), (2, 128)),
    ("q5_1", (2, 24), (2, 32)),
    ("q4_k", (2, 144 * 3), (2, 768)),
    ("q6_k", (1, 210), (1, 256)),
])
def test_float_shape(kind, codes, want):
    assert float_shape(kind, codes) == want


def test_float_shape_of_every_kept_ggml_type():
    for kind, (per, size) in GGML.items():
        assert float_shape(kind, (5, 7 * size)) == (5, 7 * per)


def test_float_bytes():
    quant = stored_names(["a.q4", "a.scale", "a.min", "b.q8u", "b.scale", "b.min"])
    shapes = {"a.q4": (8, 32), "a.scale": (8, 2), "a.min": (8, 2), "b.q8u": (4, 64), "b.scale": (4, 1),
              "b.min": (4, 1)}
    assert float_bytes(shapes, quant, torch.bfloat16) == (8 * 64 + 4 * 64) * 2
    assert float_bytes(shapes, quant, torch.float32) == (8 * 64 + 4 * 64) * 4


def test_normalize():
    assert normalize(None) is None
    assert {k: normalize(k) for k in KINDS} == {"int8": "int8", "8bit": "int8", "int4": "int4", "4bit": "int4"}
    assert normalize("INT4") == "int4" and normalize("8BIT") == "int8"
    with pytest.raises(InputError, match="'int3' is not one of int8, int4"):
        normalize("int3")


@pytest.mark.parametrize("name, shape, kind, want", [
    ("model.layers.0.self_attn.q_proj.weight", (8, 64), "int8", True),
    ("model.layers.0.self_attn.q_proj.weight", (8, 32), "int8", False),   # not a whole block of 64
    ("model.layers.0.self_attn.q_proj.weight", (8, 32), "int4", True),
    ("model.layers.0.input_layernorm.weight", (64,), "int4", False),      # 1-D
    ("model.layers.0.mlp.gate.weight", (8, 64), "int8", False),           # a MoE router stays float
    ("model.layers.0.mlp.router.weight", (8, 64), "int4", False),
    ("model.layers.0.mlp.shared_expert_gate.weight", (1, 64), "int4", False),
    ("model.layers.0.mlp.gate_proj.weight", (96, 64), "int4", True),      # not a router
    ("model.layers.0.mlp.experts.3.down_proj", (64, 32), "int4", True),   # one expert's slice
    ("model.layers.0.self_attn.q_proj.bias", (8, 64), "int8", False),
])
def test_quantizable(name, shape, kind, want):
    assert quantizable(name, shape, kind) is want


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_chunks_quantized_by_a_pool_of_threads_give_the_same_bytes(kind, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    import layerstream.quant.blocks as q

    monkeypatch.setattr(q, "CHUNK", 3 * 256)   # 3 rows a chunk: 6 chunks, the last one short
    w = weight(rows=17)
    alone = quantize(w, kind)
    with ThreadPoolExecutor(4) as pool:
        pooled = quantize(w, kind, pool=pool)
    assert alone.keys() == pooled.keys()
    assert all(torch.equal(alone[k], pooled[k]) for k in alone)
