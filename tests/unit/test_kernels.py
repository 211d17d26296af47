"""ggml's matmuls on quantized blocks (quant/kernels.py) against the reference: dequantize + F.linear.

ggml rounds the activations to 8-bit blocks before its dot products (as llama.cpp does), so a row's result
differs from the float reference by that rounding. Measured against the size that rounding can reach (the
activations' norm times the weights' norm, per element: `scaled_err`), it was 0.9-1.8 % on these random blocks
over 15 seeds (the K types and those with minimums highest); a raw relative error can be far larger where a
row's outputs nearly cancel, so it is not used. The bound, 4 %, still fails for any mistake of layout, type or
shape (those give errors near 100 %). The data are seeded per block type, so every run checks the same."""

import zlib

import numpy as np
import pytest
import torch

from layerstream.quant import dequantize, quantize
from layerstream.quant import kernels as k

from gguf_tiny import random_blocks

pytestmark = pytest.mark.skipif(not k.available(), reason="ggml-python is not installed (./install.sh builds it)")

KINDS = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q4_k", "q5_k", "q6_k"]
TOL = 4e-2   # see the module's docstring


def scaled_err(got: torch.Tensor, want: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> float:
    """The error of each row of the batch, relative to what rounding its activations can cause: norm(x) times
    the weights' norm per input column."""
    scale = x.float().norm(dim=-1) * w.float().norm() / w.shape[1] ** 0.5
    return float(((got.float() - want.float()).norm(dim=-1) / scale).max())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_linear_matches_dequantize_and_linear(kind, dtype):
    """Every block type, odd output sizes, batch sizes 1..64, float32 and bfloat16 activations, with a bias and
    leading batch dimensions."""
    seed = zlib.crc32(kind.encode())
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    per = 256 if kind.endswith("_k") else 32
    for rows, cols in ((37, 3 * per), (130, 2 * per)):
        raw = torch.from_numpy(random_blocks(rows, cols, kind.upper(), rng).copy())
        w = dequantize(kind, {"." + kind: raw}, torch.float32)
        bias = torch.randn(rows)
        mod = k.BlockLinear(cols, rows, kind, torch.nn.Parameter(bias.to(dtype), requires_grad=False))
        mod.bind(raw)
        for batch in (1, 2, 7, 31, 32, 64):
            x = torch.randn(1, batch, cols).to(dtype)
            want = torch.nn.functional.linear(x.float(), w, bias)
            got = mod(x)
            assert got.dtype == dtype and got.shape == (1, batch, rows)
            err = scaled_err(got[0], want[0], x[0], w)
            assert err < TOL, (kind, rows, cols, batch, err)


@pytest.mark.parametrize("kind", KINDS)
def test_a_row_gives_the_same_bits_whatever_shares_its_call(kind):
    """A row's result does not depend on the other rows of the batch (ggml rounds and sums each row alone): the
    engine relies on it for greedy requests to give `generate`'s tokens whatever shares their sweep."""
    rng = np.random.default_rng(3)
    per = 256 if kind.endswith("_k") else 32
    raw = torch.from_numpy(random_blocks(96, 2 * per, kind.upper(), rng).copy())
    x = torch.randn(40, 2 * per)
    alone = torch.cat([k.mul_mat(kind, raw, x[i:i + 1].contiguous(), torch.empty(1, 96)) for i in range(40)])
    for m in (2, 17, 40):
        assert torch.equal(k.mul_mat(kind, raw, x[:m].contiguous(), torch.empty(m, 96)), alone[:m]), m


def test_threads_give_the_same_result():
    rng = np.random.default_rng(1)
    raw = torch.from_numpy(random_blocks(300, 512, "Q4_K", rng).copy())
    x = torch.randn(3, 512)
    out = {}
    for n in (1, 2):
        with k.threads(n):
            y = torch.empty(3, 300)
            out[n] = k.mul_mat("q4_k", raw, x, y).clone()
    torch.testing.assert_close(out[1], out[2], rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_our_blocks_interleave_into_gguf_blocks_bit_for_bit(kind):
    """Our int4 store is Q4_1 split into codes, scales and mins; a GGUF's Q8_0 kept as int8 parts is Q8_0:
    interleaved back (`to_ggml`), they dequantize to exactly the same weights, and ggml computes on them."""
    torch.manual_seed(1)
    w = torch.randn(48, 128)
    if kind == "int4":
        parts = quantize(w, "int4")
    else:   # symmetric int8 blocks of 32, as a GGUF's Q8_0 split (`quant.from_gguf`)
        raw = torch.from_numpy(random_blocks(48, 128, "Q8_0", np.random.default_rng(2)).copy())
        from layerstream.quant import from_gguf
        _, parts = from_gguf(raw, "Q8_0", 48)
    gk, blocks = k.to_ggml(kind, parts)
    assert gk == {"int4": "q4_1", "int8": "q8_0"}[kind]
    torch.testing.assert_close(dequantize(gk, {"." + gk: blocks}, torch.float32),
                               dequantize(kind, parts, torch.float32), rtol=0, atol=0)
    mod = k.BlockLinear(128, 48, gk)
    mod.bind(blocks)
    x = torch.randn(2, 128)
    ref = dequantize(kind, parts, torch.float32)
    assert scaled_err(mod(x), x @ ref.T, x, ref) < TOL


def test_asymmetric_int8_has_no_kernel():
    parts = quantize(torch.randn(8, 128), "int8")
    assert k.kernel_kind("uint8", {s: tuple(t.shape) for s, t in parts.items()}) is None
    with pytest.raises(ValueError, match="no ggml kernel"):
        k.to_ggml("uint8", parts)


def test_wrong_blocks_are_refused():
    mod = k.BlockLinear(256, 4, "q4_k")
    with pytest.raises(ValueError, match="do not make a 4 x 256 weight"):
        mod.bind(torch.zeros(4, 100, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="no blocks bound"):
        mod(torch.randn(1, 256))


@pytest.mark.parametrize("kind", ["q4_1", "q8_0", "q4_k", "q6_k"])
def test_experts_on_blocks_match_transformers_experts(kind):
    """`block_experts_forward` (each routed expert's gate/up and down on its blocks) against transformers' own
    experts module holding the dequantized weights, for 1 and 9 tokens routed top-2 over 4 experts (one never
    routed): per token within the activations' rounding (twice the bound of one matmul: the expert's
    intermediate is rounded to 8 bits again), and to float precision the sum of `BlockLinear`s token by token."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    seed = zlib.crc32(b"experts" + kind.encode())
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    per = 256 if kind.endswith("_k") else 32
    hidden, ff, n = per, 2 * per, 4
    cfg = Qwen3MoeConfig(hidden_size=hidden, moe_intermediate_size=ff, num_experts=n, num_experts_per_tok=2)
    ref = Qwen3MoeExperts(cfg).eval()
    assert k.experts_on_blocks(ref)
    blocks = {}
    for e in range(n):
        gate_up = torch.from_numpy(random_blocks(2 * ff, hidden, kind.upper(), rng).copy())
        down = torch.from_numpy(random_blocks(hidden, ff, kind.upper(), rng).copy())
        blocks[e] = {"gate_up_proj": (kind, gate_up), "down_proj": (kind, down)}
        ref.gate_up_proj.data[e] = dequantize(kind, {"." + kind: gate_up}, torch.float32)
        ref.down_proj.data[e] = dequantize(kind, {"." + kind: down}, torch.float32)
    mod = Qwen3MoeExperts(cfg).eval()
    mod.ls_blocks = blocks
    for tokens in (1, 9):
        x = torch.randn(tokens, hidden)
        idx = torch.stack([torch.randperm(3)[:2] for _ in range(tokens)])   # expert 3 never routed
        wts = torch.rand(tokens, 2).softmax(-1)
        with torch.no_grad():
            want = ref(x, idx, wts)
            got = k.block_experts_forward(mod, x, idx, wts)
        assert got.shape == want.shape and got.dtype == want.dtype
        scale = x.norm(dim=-1, keepdim=True) * ref.down_proj.data.norm() / ref.down_proj.data.numel() ** 0.5 * \
            ref.gate_up_proj.data.norm() / ref.gate_up_proj.data.shape[-1] ** 0.5
        err = float(((got - want).norm(dim=-1, keepdim=True) / (want.norm(dim=-1, keepdim=True) + scale)).max())
        assert err < 2 * TOL, (kind, tokens, err)   # two matmuls, the intermediate rounded to 8 bits again
        # exactly the composition of BlockLinears, token by token (a row's result is the same bits in any batch)
        lin = {(e, p): k.BlockLinear(*(hidden, 2 * ff) if p == "gate_up_proj" else (ff, hidden), kind)
               for e in range(n) for p in ("gate_up_proj", "down_proj")}
        for (e, p), m in lin.items():
            m.bind(blocks[e][p][1])
        exact = torch.stack([sum(wts[t, j] * lin[int(idx[t, j]), "down_proj"](
            mod._apply_gate(lin[int(idx[t, j]), "gate_up_proj"](x[t:t + 1]))) for j in range(2))[0]
            for t in range(tokens)])
        torch.testing.assert_close(got, exact, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["q4_0", "q4_k"])
def test_repacked_blocks_give_the_blocks_results(kind):
    """A weight repacked for ggml's faster kernels (where this CPU has them) gives the blocks' results as
    stored to float rounding (its kernels sum in another order), batch sizes 1..64; a call of fewer than 4 rows
    (ggml's GEMV) gives each row the bits it has alone."""
    rng = np.random.default_rng(7)
    per = 256 if kind.endswith("_k") else 32
    raw = torch.from_numpy(random_blocks(136, 3 * per, kind.upper(), rng).copy())
    r = k.repack(kind, raw)
    if r is None:
        pytest.skip(f"ggml has no {kind} repacking on this CPU")
    mod = k.BlockLinear(3 * per, 136, kind)
    mod.bind(r)
    assert "repacked" in repr(mod)
    for batch in (1, 2, 3, 4, 5, 31, 64):
        x = torch.randn(batch, 3 * per)
        want = k.mul_mat(kind, raw, x, torch.empty(batch, 136))
        got = mod(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    x = torch.randn(3, 3 * per)
    alone = torch.cat([mod(x[i:i + 1]) for i in range(3)])
    assert torch.equal(mod(x), alone)
    r.close()


def test_what_ggml_cannot_repack_is_used_as_stored():
    """Types without repacked kernels, and shapes they do not take (rows not a multiple of 8), give None:
    the blocks are then computed on as they are; a repacked weight of another type or shape is refused."""
    rng = np.random.default_rng(8)
    for kind, rows in (("q4_1", 64), ("q5_0", 64), ("q4_0", 37)):
        raw = torch.from_numpy(random_blocks(rows, 64, kind.upper(), rng).copy())
        assert k.repack(kind, raw) is None, kind
    r = k.repack("q4_0", torch.from_numpy(random_blocks(64, 64, "Q4_0", rng).copy()))
    if r is not None:
        with pytest.raises(ValueError, match="do not make"):
            k.BlockLinear(64, 64, "q4_1").bind(r)
        with pytest.raises(ValueError, match="do not make"):
            k.BlockLinear(64, 32, "q4_0").bind(r)


def test_blocks_as_stored_are_repacked_for_long_calls():
    """A BlockLinear bound to blocks as stored (a streamed unit's) repacks them for a call of `repack_rows` rows
    or more: the result is the repacked weight's bit for bit; a type with no repacking stops asking."""
    rng = np.random.default_rng(9)
    raw = torch.from_numpy(random_blocks(64, 512, "Q4_K", rng).copy())
    r = k.repack("q4_k", raw)
    if r is None:
        pytest.skip("ggml has no q4_k repacking on this CPU")
    packed, stored = k.BlockLinear(512, 64, "q4_k"), k.BlockLinear(512, 64, "q4_k")
    packed.bind(r)
    stored.bind(raw)
    stored.repack_rows = 8
    x = torch.randn(9, 512)
    assert torch.equal(stored(x), packed(x))
    torch.testing.assert_close(stored(x[:5]), packed(x[:5]), rtol=1e-5, atol=1e-4)
    q41 = k.BlockLinear(512, 64, "q4_1")
    q41.bind(torch.from_numpy(random_blocks(64, 512, "Q4_1", rng).copy()))
    q41.repack_rows = 8
    q41(x)
    assert q41.repack_rows is None


def test_every_input_layout_gives_the_same_bits():
    """The direct call (float32, contiguous: no reshape or copy) and the general one (other dtypes, strided
    inputs, rows out of order) compute the same bits; an input whose last size is not the layer's is refused,
    not read as more rows."""
    rng = np.random.default_rng(5)
    raw = torch.from_numpy(random_blocks(48, 64, "Q4_1", rng).copy())
    mod = k.BlockLinear(64, 48, "q4_1")
    mod.bind(raw)
    x = torch.randn(2, 3, 64)
    want = k.mul_mat("q4_1", raw, x.reshape(6, 64), torch.empty(6, 48)).view(2, 3, 48)
    assert torch.equal(mod(x), want)
    assert torch.equal(mod(x.transpose(0, 1).contiguous().transpose(0, 1)), want)   # strided: copied first
    assert torch.equal(mod(x[:, 1]), want[:, 1])
    assert mod(x[:, :0]).shape == (2, 0, 48)
    with pytest.raises(ValueError, match="64 features"):
        mod(torch.randn(1, 128))
    with pytest.raises(ValueError, match="64 features"):
        mod(torch.randn(2, 32))
    mod.unbind()
    with pytest.raises(RuntimeError, match="no blocks bound"):
        mod(x)
