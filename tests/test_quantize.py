"""Quantized stores: block-wise int8/int4, GGUF Q4_1 kept exactly, dequantized per sweep or once."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from layerstream import AutoModel, Store
from layerstream.quant import BLOCK, Int4PackedLinear, dequantize, quantizable, quantize

from conftest import make_model_dir, run_cli


def _min_max(w, kind):
    """Plain min/max blocks (fp16 scale and min, as stored), dequantized: what the search must beat."""
    x = w.reshape(w.shape[0], -1, BLOCK[kind])
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    levels = {"int8": 255, "int4": 15}[kind]
    s, m = ((hi - lo) / levels).half().float(), lo.half().float()
    return (torch.round((x - m) / s).clamp(0, levels) * s + m).reshape(w.shape), s


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_round_trip_error_beats_min_max_blocks(kind):
    """The grids searched per block give, block by block, no more squared error than plain min/max blocks,
    and clearly less overall; int8 stays within about half a step of every weight (nothing is clipped)."""
    torch.manual_seed(0)
    w = torch.randn(48, 256) * torch.linspace(0.1, 3, 256)
    parts = quantize(w, kind)
    back = dequantize(kind, parts, torch.float32)
    nbytes = sum(t.numel() * t.element_size() for t in parts.values())
    assert nbytes / (w.numel() * 2) <= {"int8": 0.54, "int4": 0.32}[kind]   # vs bf16
    plain, _ = _min_max(w, kind)
    per_block = lambda b: ((b - w) ** 2).reshape(48, -1, BLOCK[kind]).sum(-1)   # noqa: E731
    assert torch.all(per_block(back) <= per_block(plain) + 1e-9)
    assert per_block(back).sum() < {"int8": 0.9, "int4": 0.97}[kind] * per_block(plain).sum()
    if kind == "int8":
        step = parts[".scale"].float().repeat_interleave(BLOCK[kind], dim=1)
        assert torch.all((back - w).abs() <= 0.6 * step)


def test_quantizing_in_chunks_changes_nothing(monkeypatch):
    """Rows are quantized a chunk at a time (cache-sized): the result is the same as all at once."""
    import layerstream.quant.blocks as q

    torch.manual_seed(1)
    w = torch.randn(40, 128)
    whole = q.quantize(w, "int4")
    monkeypatch.setattr(q, "CHUNK", 3 * 128)   # 3 rows at a time, the last chunk short
    chunked = q.quantize(w, "int4")
    assert whole.keys() == chunked.keys()
    assert all(torch.equal(whole[k], chunked[k]) for k in whole)


@pytest.mark.parametrize("kind, spelling", [("int8", "8bit"), ("int4", "int4")])
@pytest.mark.parametrize("max_ram", [0, None])
def test_quantized_store_matches_transformers_on_the_same_weights(tmp_path, kind, spelling, max_ram):
    """The reference is transformers with each linear weight replaced by its dequantized self: streaming a
    quantized store must give exactly its tokens."""
    src = make_model_dir(tmp_path / "src", "qwen2", tie=False, layers=3)
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "embed_tokens" not in name and quantizable(name, p.shape, kind):
                p.copy_(dequantize(kind, quantize(p, kind), torch.float32))
    m = AutoModel.from_pretrained(src, compression=spelling, max_ram=max_ram, store_path=tmp_path / "store",
                                  progress=False, kernels=False)   # the reference path (ggml: test_kernels)
    assert m.store.manifest.quantization == kind
    assert bool(m.plan.dequant_bytes) == (max_ram == 0)   # per sweep when streaming; once when it fits
    ids = torch.tensor([[1, 7, 3, 99, 45]])
    with torch.no_grad():
        want = ref(ids).logits
    torch.testing.assert_close(m(ids).logits, want, rtol=1e-4, atol=1e-4)
    assert m.generate(ids, max_new_tokens=10, do_sample=False).tolist() == \
        ref.generate(ids, max_new_tokens=10, do_sample=False).tolist()


@pytest.mark.slow
def test_embedded_int4_is_lossless_and_small(tmp_path, smol_reference):
    """The embedded GGUF's Q4_1 blocks are kept as they are: the same tokens as the float model, computed on the
    blocks with ggml (our int4 parts interleaved back into Q4_1 blocks, resident once, streamed each sweep) and on
    the dequantize path, whose logits are the float model's."""
    r = run_cli("split", "--quantize", "int4", __import__("layerstream.sources", fromlist=["x"]).embedded_model(),
                tmp_path / "int4")
    assert r.returncode == 0, r.stderr
    assert "int4 blocks for the linear weights" in r.stderr and "torch." not in r.stderr, r.stderr[-2000:]
    s = Store(tmp_path / "int4")
    for u in s.manifest.units:
        if u.kind == "layer":
            params = sum(sl.shape[0] * sl.shape[1] * (2 if sl.name.endswith(".q4") else 1)
                         for sl in s.slots(u.name) if sl.name.endswith((".q4", ".q8", ".q8u")))
            assert u.bytes <= 0.32 * params * 2   # <= 0.32x the unit in bf16
    enc = None
    for budget in (0, None):
        m = AutoModel.from_pretrained(tmp_path / "int4", max_ram=budget, progress=False)
        enc = m.tokenizer.apply_chat_template([{"role": "user", "content": "Write a short poem about the sea."}],
                                              add_generation_prompt=True, return_tensors="pt")["input_ids"]
        got = m.generate(enc, max_new_tokens=20, do_sample=False)
        want = smol_reference.generate(enc, max_new_tokens=20, do_sample=False)
        assert got.tolist() == want.tolist(), budget
        m.close()
        m = AutoModel.from_pretrained(tmp_path / "int4", max_ram=budget, progress=False, kernels=False)
        torch.testing.assert_close(m(enc).logits, smol_reference(enc).logits, rtol=0, atol=1e-4)
        m.close()


def test_resident_int4_computes_on_packed_weights_in_bf16(tmp_path):
    """Resident int4 units that do not fit as floats run torch's int4 kernel on the packed blocks (bf16
    compute); streamed ones are dequantized. Against float32 math on the dequantized weights, the packed
    path is as close as bf16 compute on dequantized weights is."""
    src = make_model_dir(tmp_path / "src", "qwen2", tie=False, layers=6, dtype=torch.bfloat16)
    truth = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in truth.named_parameters():
            if "embed_tokens" not in name and quantizable(name, p.shape, "int4"):
                p.copy_(dequantize("int4", quantize(p.to(torch.bfloat16), "int4"), torch.float32))
    store = tmp_path / "store"
    streamed = AutoModel.from_pretrained(src, compression="int4", max_ram=0, store_path=store, progress=False,
                                         kernels=False)
    dense = sum(streamed.plan.dequant_bytes.get(u.name, u.bytes) for u in Store(store).manifest.units)
    # packed fits, floats do not; without ggml (kernels=False), torch's int4 kernel
    m = AutoModel.from_pretrained(store, max_ram=dense - 1, progress=False, kernels=False)
    packed = [n for n, mod in m.model.named_modules() if isinstance(mod, Int4PackedLinear)]
    assert packed, m.plan.describe()
    ids = torch.tensor([[1, 7, 3, 99, 45, 12, 8, 64]])
    with torch.no_grad():
        want = truth(ids).logits
    err_dequant = (streamed(ids).logits.float() - want).abs().max()
    err_packed = (m(ids).logits.float() - want).abs().max()
    assert err_packed <= 2 * err_dequant + 1e-3, (err_packed, err_dequant)
    assert (m(ids).logits.argmax(-1) == want.argmax(-1)).float().mean() >= 0.85


@pytest.mark.slow
@pytest.mark.parametrize("max_ram", [0, None])
def test_gguf_k_quants_kept_exactly(tmp_path, max_ram):
    """A GGUF in Q4_K_M's mix (Q4_K, Q6_K, and Q8_0 where llama.cpp falls back to it) and Q4_0, Q5_0, Q5_1,
    Q5_K tensors: with `int4` its blocks are kept as they are (stored as `<name>.q4_k` ..., Q8_0 as int8
    blocks: no re-rounding) and dequantized as gguf-py does, so the logits and tokens are transformers' own
    from the same file; the store is about the GGUF's size, not float's."""
    from gguf_tiny import make_llama_gguf

    g = make_llama_gguf(tmp_path / "tiny-k.gguf")
    ref = AutoModelForCausalLM.from_pretrained(g.parent, gguf_file=g.name, dtype=torch.float32).eval()
    m = AutoModel.from_pretrained(g, compression="int4", max_ram=max_ram, store_path=tmp_path / "store",
                                  progress=False, kernels=False)
    names = {t for u in m.store.manifest.units for t in u.tensors}
    for suffix in (".q4_k", ".q5_k", ".q6_k", ".q4_0", ".q5_0", ".q5_1", ".q8"):
        assert any(t.endswith(suffix) for t in names), suffix
    embed = next(u for u in m.store.manifest.units if u.kind == "embed")
    assert embed.tensors == ["model.embed_tokens.weight.q4_k"]   # the embedding's blocks kept too
    layers = sum(u.bytes for u in m.store.manifest.units if u.kind == "layer")
    floats = sum(p.numel() * 4 for n, p in ref.named_parameters() if ".layers." in n)
    assert layers < 0.2 * floats   # 4.5-6.6 bits per weight against 32
    ids = torch.tensor([[1, 7, 3, 99, 45, 12]])
    with torch.no_grad():
        torch.testing.assert_close(m(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)
    assert m.generate(ids, max_new_tokens=8, do_sample=False).tolist() == \
        ref.generate(ids, max_new_tokens=8, do_sample=False).tolist()
    m.close()


@pytest.mark.parametrize("kind", ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q4_k", "q5_k", "q6_k"])
def test_ggml_block_dequantization_is_gguf_pys(kind):
    """layerstream's torch dequantizer of each kept GGUF block type gives gguf-py's values bit for bit."""
    import gguf
    import numpy as np

    from layerstream.quant import dequantize_ggml

    from gguf_tiny import random_blocks

    qtype = kind.upper()
    per = gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, qtype)][0]
    raw = random_blocks(5, 3 * per, qtype, np.random.default_rng(1))
    want = gguf.quants.dequantize(raw, getattr(gguf.GGMLQuantizationType, qtype))
    got = dequantize_ggml(kind, torch.from_numpy(raw.copy()))
    assert got.shape == want.shape and torch.equal(got, torch.from_numpy(want))


@pytest.mark.parametrize("kind", ["q4_0", "q4_1", "q4_k"])
def test_4bit_gguf_blocks_as_int4_blocks_are_the_same_values(kind):
    """A GGUF's 4-bit blocks repacked as int4 blocks of 32 (what torch's int4 kernel is built from) dequantize
    to exactly gguf-py's values."""
    import numpy as np

    from layerstream.quant import as_int4, dequantize_ggml

    from gguf_tiny import random_blocks

    raw = torch.from_numpy(random_blocks(6, 512, kind.upper(), np.random.default_rng(2)).copy())
    parts = as_int4(kind, raw)
    assert parts[".q4"].shape == (6, 256) and parts[".scale"].shape == (6, 16)
    assert torch.equal(dequantize("int4", parts, torch.float32), dequantize_ggml(kind, raw))


@pytest.mark.slow
def test_gguf_too_big_as_floats_says_how_to_keep_its_blocks(tmp_path):
    """On a disk with room for the GGUF's blocks but not for its float32 weights, the split refuses before
    writing and names the option that keeps the blocks; with that option it fits (the estimate counts the
    blocks' own bytes)."""
    import subprocess

    from layerstream.errors import DiskSpaceError
    from layerstream.store import split

    from gguf_tiny import make_llama_gguf
    from test_store import _tmpfs

    g = make_llama_gguf(tmp_path / "tiny-k.gguf")
    disk = tmp_path / "disk"
    _tmpfs(disk, "8m")   # the float32 store needs about 13 MB, the blocks about 3
    try:
        with pytest.raises(DiskSpaceError, match=r"compression='int4' \(--quantize int4\): about"):
            split(g, disk / "float", progress=False)
        store = split(g, disk / "int4", progress=False, quantize="int4")
        assert Store(store).verify() == []
    finally:
        subprocess.run(["umount", str(disk)])


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_split_quantized_by_many_threads_is_the_same_store(tmp_path, kind, monkeypatch):
    """workers=1 (the caller alone, torch's threads as they are) and workers=3 (chunks of rows on 3 threads,
    the next unit made while this one is written): the same unit files, manifest and journal, byte for byte;
    torch's thread count is as it was."""
    import layerstream.quant.blocks as q
    from layerstream.store import PROGRESS, split

    monkeypatch.setattr(q, "CHUNK", 5 * 96)   # several chunks a weight, the last one short
    src = make_model_dir(tmp_path / "src", "llama", tie=False, layers=4)
    threads = torch.get_num_threads()
    one = split(src, tmp_path / "one", quantize=kind, progress=False, workers=1)
    many = split(src, tmp_path / "many", quantize=kind, progress=False, workers=3)
    assert torch.get_num_threads() == threads
    files = sorted(p.relative_to(one) for p in (one / "units").iterdir())
    assert files == sorted(p.relative_to(many) for p in (many / "units").iterdir()) and len(files) == 6
    for f in [*files, "manifest.json", PROGRESS]:
        assert (one / f).read_bytes() == (many / f).read_bytes(), f


def test_split_refuses_zero_workers(tmp_path):
    from layerstream.errors import InputError
    from layerstream.store import split

    with pytest.raises(InputError, match="workers must be at least 1"):
        split(make_model_dir(tmp_path / "src", "llama"), tmp_path / "out", quantize="int4", workers=0)
