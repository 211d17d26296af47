"""Quantized GGUF files served as they are: by default a GGUF's blocks are read in place from the file (no copy,
the embedding's included), and the output is transformers' own on the same file."""

import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from layerstream import AutoModel
from layerstream.errors import StoreError
from layerstream.store import Store

from conftest import run_cli
from gguf_tiny import make_gemma_gguf, make_llama_gguf

# every test reads a GGUF (parsing its 49k-token vocabulary takes seconds) and indexes or splits it
pytestmark = pytest.mark.slow

IDS = torch.tensor([[1, 7, 3, 99, 45, 12, 500, 4000]])
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "config.json", "generation_config.json"}


@pytest.fixture(scope="module", params=["llama", "gemma"])
def gguf_model(request, tmp_path_factory):
    """(family, GGUF path, its default store (made by opening the file with no options), transformers' logits
    and greedy tokens on IDS from the same file)."""
    d = tmp_path_factory.mktemp(request.param)
    g = {"llama": make_llama_gguf, "gemma": make_gemma_gguf}[request.param](d / f"tiny-{request.param}.gguf")
    ref = AutoModelForCausalLM.from_pretrained(g.parent, gguf_file=g.name, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = ref(IDS).logits
    tokens = ref.generate(IDS, max_new_tokens=8, do_sample=False)
    AutoModel.from_pretrained(g, store_path=d / "store", progress=False).close()
    return request.param, g, d / "store", logits, tokens


def store_files(store):
    return {f.relative_to(store): f.stat().st_size for f in store.rglob("*") if f.is_file()}


@pytest.mark.parametrize("max_ram", [None, 0])
def test_quantized_gguf_served_in_place_by_default(gguf_model, tmp_path, max_ram):
    """With no options, a K-quant GGUF (Llama: Q4_K, Q5_K, Q6_K, Q4_0, Q5_0, Q5_1, Q8_0; Gemma: Q4_K and Q6_K,
    its embedding tied) is served from the file itself: the store holds a manifest and the tokenizer, and, for
    Gemma, its norms as transformers computes them (the file holds 1 + w): a few KB beside the file. Resident
    and streamed, on the dequantize path, the logits and greedy tokens are transformers' own from the same file
    (computing on the blocks is tested against this path: test_kernels_on_gguf_blocks_match_the_dequantize_path)."""
    family, g, store, logits, tokens = gguf_model
    m = AutoModel.from_pretrained(store, max_ram=max_ram, progress=False, kernels=False)   # the reference path
    man = m.store.manifest
    assert man.in_place and man.quantization == "gguf" and str(g) in man.source_files
    files = store_files(store)
    weights = sum(size for f, size in files.items() if f.name not in TOKENIZER_FILES)
    assert weights < 0.01 * g.stat().st_size, files   # no copy of the weights: the manifest (+ Gemma's norms)
    extras = {f for f in files if f.parts[0] == "extras"}
    if family == "gemma":
        from safetensors import safe_open

        computed = [k for f in extras for k in safe_open(store / f, "pt").keys()]
        assert computed and all(k.endswith("norm.weight") for k in computed), computed
    else:
        assert not extras
        # Llama's q/k rows, which llama.cpp's converter interleaves, are reordered as they load (an order in the
        # manifest, [heads, head_dim / 2, 2]): not written out again
        layer = next(u for u in man.units if u.kind == "layer")
        q = layer.slots["model.layers.0.self_attn.q_proj.weight.q4_k"]
        assert q[-1] == [4, 32, 2], q
    embed = next(u for u in man.units if u.kind == "embed")
    assert len(embed.tensors) == 1 and embed.tensors[0].endswith((".q4_k", ".q6_k"))   # the embedding as blocks
    with torch.no_grad():
        torch.testing.assert_close(m(IDS).logits, logits, rtol=1e-4, atol=1e-4)
    assert m.generate(IDS, max_new_tokens=8, do_sample=False).tolist() == tokens.tolist()
    if max_ram == 0 and family == "llama":   # an untied embedding: only the batch's rows are read, as blocks
        per_sweep = sum(u.bytes for u in man.units if u.kind != "embed")
        # (within one unit: the first sweep's first unit may be read ahead before the count starts)
        assert 0.7 * per_sweep < m.last_stats["bytes_per_token"] < per_sweep + 0.1 * embed.bytes, \
            (m.last_stats, per_sweep, embed.bytes)
    m.close()


def test_gguf_store_refuses_a_changed_file(gguf_model, tmp_path):
    """An in-place store reads the GGUF itself: once the file changes (here: its recorded mtime no longer
    matches), opening the store says so and how to index it again, instead of reading other bytes than it
    checked."""
    import json
    import shutil

    _, g, store, *_ = gguf_model
    moved = tmp_path / "store"
    shutil.copytree(store, moved)
    man = json.loads((moved / "manifest.json").read_text())
    man["source_files"][str(g)][1] -= 1
    (moved / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(StoreError, match=f"{g}: source file changed since it was indexed"):
        AutoModel.from_pretrained(moved, max_ram=0, progress=False)


def test_an_index_of_another_copy_is_made_again(gguf_model, tmp_path):
    """An in-place store at a given path that indexes another copy of the file (moved, deleted) or an older
    version of it is indexed again from the source given, with a line that says so; it is never served
    pointing at files that are gone or changed. (The store path alone still refuses: tested above.)"""
    import os
    import shutil

    _, g, _, logits, _ = gguf_model
    a, b, store = tmp_path / "a" / g.name, tmp_path / "b" / g.name, tmp_path / "store"
    for f in (a, b):
        f.parent.mkdir()
        shutil.copy(g, f)
    AutoModel.from_pretrained(a, store_path=store, max_ram=0, progress=False).close()
    a.unlink()
    r = run_cli("run", "hi", "--model", b, "--store", store, "--max-ram", "0", "-n", "1", "--greedy")
    assert r.returncode == 0 and f"indexes {a}, not {b}; indexing {b} again" in r.stderr, r.stderr
    assert Store(store).manifest.source["path"] == str(b)
    os.utime(b, ns=(b.stat().st_atime_ns, b.stat().st_mtime_ns + 10**9))   # the same path, changed since
    m = AutoModel.from_pretrained(b, store_path=store, max_ram=0, progress=False, kernels=False)   # (reference)
    assert list(m.store.manifest.source_files.values())[0][1] == b.stat().st_mtime_ns
    with torch.no_grad():
        torch.testing.assert_close(m(IDS).logits, logits, rtol=1e-4, atol=1e-4)
    m.close()


@pytest.mark.parametrize("gguf_model", ["llama"], indirect=True)
def test_gguf_float_store_on_request(gguf_model, tmp_path):
    """A float store stays available: with in_place=False (`--copy`) the GGUF is split into float weights
    (float32, or the dtype asked), dequantized as transformers dequantizes them (its size is the floats')."""
    family, g, _, logits, _ = gguf_model
    m = AutoModel.from_pretrained(g, in_place=False, store_path=tmp_path / "store", max_ram=0, progress=False)
    assert not m.store.manifest.in_place and not m.store.manifest.quantization
    assert sum(u.bytes for u in m.store.manifest.units) > 4 * g.stat().st_size
    with torch.no_grad():
        torch.testing.assert_close(m(IDS).logits, logits, rtol=1e-4, atol=1e-4)
    m.close()


def test_4bit_gguf_blocks_run_torch_int4_kernel_in_bf16(tmp_path):
    """Without ggml (kernels=False), Q4_0, Q4_1 and Q4_K blocks, resident on the CPU with bfloat16 compute, run
    torch's int4 kernel on the file's blocks repacked once at load (no float weight made, none dequantized per
    sweep): as close to transformers' float32 logits as bf16 compute on the dequantized weights is."""
    from layerstream.quant import Int4PackedLinear

    types = {"token_embd": "Q4_K", "output": "Q4_K", "attn_q": "Q4_K", "attn_k": "Q4_0", "attn_v": "Q4_1",
             "attn_output": "Q4_K", "ffn_gate": "Q4_K", "ffn_up": "Q4_0", "ffn_down": "Q4_K"}
    g = make_llama_gguf(tmp_path / "tiny-q4.gguf", types=types)
    ref = AutoModelForCausalLM.from_pretrained(g.parent, gguf_file=g.name, dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(IDS).logits
    store = tmp_path / "store"
    streamed = AutoModel.from_pretrained(g, store_path=store, max_ram=0, dtype=torch.bfloat16, progress=False,
                                         kernels=False)
    m = AutoModel.from_pretrained(store, dtype=torch.bfloat16, progress=False, kernels=False)   # without ggml
    packed = [n for n, mod in m.model.named_modules() if isinstance(mod, Int4PackedLinear)]
    assert len(packed) == 2 * 7 + 1, packed   # every linear weight of both layers, and the head
    with torch.no_grad():
        err_dequant = (streamed(IDS).logits.float() - want).abs().max()
        got = m(IDS).logits.float()
    err_packed = (got - want).abs().max()
    assert err_packed <= 2 * err_dequant + 1e-3, (err_packed, err_dequant)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.85
    streamed.close()
    m.close()


def test_float_gguf_tensors_served_in_place(tmp_path):
    """F16 and BF16 tensors of a GGUF (gguf-py reads BF16 as bytes) are served in place as they are, Llama's
    interleaved q/k rows reordered whatever their dtype, and converted to the compute dtype as they load."""
    types = {**{k: "Q8_0" for k in ("token_embd", "output", "attn_v", "attn_output", "ffn_gate", "ffn_up",
                                    "ffn_down")}, "attn_q": "BF16", "attn_k": "F16"}
    g = make_llama_gguf(tmp_path / "tiny-f.gguf", types=types)
    ref = AutoModelForCausalLM.from_pretrained(g.parent, gguf_file=g.name, dtype=torch.float32).eval()
    m = AutoModel.from_pretrained(g, store_path=tmp_path / "store", max_ram=0, progress=False, kernels=False)
    layer = next(u for u in m.store.manifest.units if u.kind == "layer")
    assert layer.slots["model.layers.0.self_attn.q_proj.weight"][:2] == ["BF16", [256, 256]]
    assert layer.slots["model.layers.0.self_attn.k_proj.weight"][0] == "F16"
    assert not (tmp_path / "store" / "extras").exists() or not any((tmp_path / "store" / "extras").iterdir())
    with torch.no_grad():
        torch.testing.assert_close(m(IDS).logits, ref(IDS).logits, rtol=1e-4, atol=1e-4)
    m.close()


def test_opening_a_gguf_parses_it_once(gguf_model, tmp_path, monkeypatch):
    """Config, tensor map and tokenizer come from one parse of the file (each parse of a 49k-token vocabulary
    costs seconds), and gguf and transformers are as they were afterwards."""
    import gguf
    import transformers.modeling_gguf_pytorch_utils as mg

    from layerstream.sources import open_source
    from layerstream.store.writer import units_of

    family, g, _, _, _ = gguf_model
    parses = []
    init = gguf.gguf_reader.GGUFReader.__init__
    monkeypatch.setattr(gguf.gguf_reader.GGUFReader, "__init__",
                        lambda self, *a, **k: (parses.append(a), init(self, *a, **k))[1])
    load, reader = mg.load_gguf_checkpoint, gguf.GGUFReader
    src = open_source(g)
    _, lay, _ = units_of(src)
    src.save_extras(tmp_path)
    assert len(parses) == 1 and (tmp_path / "tokenizer.json").exists() and lay.units
    assert mg.load_gguf_checkpoint is load and gguf.GGUFReader is reader


@pytest.mark.parametrize("max_ram", [None, 0])
def test_kernels_on_gguf_blocks_match_the_dequantize_path(gguf_model, max_ram):
    """By default (ggml installed) every linear layer of a GGUF computes on the file's blocks with llama.cpp's
    kernels, resident or streamed (the head on the tied embedding's blocks for Gemma), no unit dequantized:
    the next-token distributions are the dequantize path's within ggml's 8-bit rounding of the activations, and
    the top token is the same wherever the reference's top two are further apart than that rounding."""
    from layerstream.quant import kernels, stored_names

    if not kernels.available():
        pytest.skip("ggml-python is not installed (./install.sh builds it)")
    family, g, store, _, _ = gguf_model
    ref = AutoModel.from_pretrained(store, max_ram=max_ram, progress=False, kernels=False)
    m = AutoModel.from_pretrained(store, max_ram=max_ram, progress=False)
    blocks = [n for n, mod in m.model.named_modules() if isinstance(mod, kernels.BlockLinear)]
    assert len(blocks) == 2 * 7 + 1, blocks   # every linear layer of both layers, and the head
    quantized = {u.name for u in m.store.manifest.units if stored_names(u.tensors)}   # Gemma's head: a norm
    assert not m.plan.dequant_bytes and m.plan.blocks == quantized
    with torch.no_grad():
        want, got = ref(IDS).logits, m(IDS).logits
    assert_near_ties_only(got, want)
    ref.close()
    m.close()


def test_resident_blocks_are_repacked_where_ggml_has_faster_kernels(gguf_model, capfd):
    """Resident Q4_0 / Q4_K weights (where this CPU has ggml's repacked kernels) are bound to repacked copies,
    the rest to their blocks as stored; the logits are those of the blocks as stored (`repack=False`, and
    streamed at max_ram=0, which never repacks) to float rounding, and the greedy tokens the same."""
    from layerstream.quant import kernels

    if not kernels.available() or kernels.repack("q4_0", torch.zeros(8, 18, dtype=torch.uint8)) is None:
        pytest.skip("no ggml repacking on this machine")
    family, g, store, _, _ = gguf_model
    runs = {}
    for name, kw in {"repacked": {}, "as stored": {"repack": False}, "streamed": {"max_ram": 0}}.items():
        m = AutoModel.from_pretrained(store, progress=False, **kw)
        mods = {n: mod for n, mod in m.model.named_modules() if isinstance(mod, kernels.BlockLinear)}
        packed = {n for n, mod in mods.items() if isinstance(mod.blocks, kernels.Repacked)}
        with torch.no_grad():
            runs[name] = m(IDS).logits, m.generate(IDS, max_new_tokens=8, do_sample=False), packed
        if name == "repacked":   # every Q4_0 / Q4_K layer of both layers (Llama: q and o; Gemma: five a layer)
            assert "repack" not in capfd.readouterr().err   # (ggml's debug line per weight is not printed)
            want = {"llama": {"q_proj", "o_proj"}, "gemma": {"q_proj", "k_proj", "o_proj", "gate_proj", "up_proj"}}
            assert {n.rsplit(".", 1)[1] for n in packed} == want[family] and len(packed) == 2 * len(want[family])
            assert all("repacked" in repr(mods[n]) for n in packed)
        m.close()
    assert not runs["as stored"][2] and not runs["streamed"][2]
    for other in ("as stored", "streamed"):
        torch.testing.assert_close(runs["repacked"][0], runs[other][0], rtol=1e-4, atol=1e-4)
        assert runs["repacked"][1].tolist() == runs[other][1].tolist()
    # a prompt of REPACK_ROWS tokens or more: streamed blocks are repacked for the call, and the logits are the
    # resident model's bit for bit (the same kernels on the same rows)
    long_ids = torch.arange(3, 3 + kernels.REPACK_ROWS + 6)[None] % 200
    logits = []
    for kw in ({}, {"max_ram": 0}):
        m = AutoModel.from_pretrained(store, progress=False, **kw)
        with torch.no_grad():
            logits.append(m(long_ids).logits)
        m.close()
    assert torch.equal(logits[0], logits[1])


def test_plan_says_which_blocks_will_be_repacked(gguf_model):
    """`layerstream plan` names, by type and bytes, the resident blocks ggml repacks at load and those kept as
    stored; with everything streamed, that streamed blocks are repacked for long calls only."""
    from layerstream.quant import kernels

    if not kernels.available() or not kernels.repackable("q4_k"):
        pytest.skip("no ggml repacking on this machine")
    family, g, store, _, _ = gguf_model
    if family != "llama":   # (its mix of types covers the cases; each CLI run costs ~15 s)
        pytest.skip("checked on the Llama GGUF")
    r = run_cli("plan", store, "--no-measure")
    assert r.returncode == 0, r.stderr
    note = next(line for line in r.stdout.splitlines() if "repacked at load" in line)
    repacked, _, stored = note.partition("as stored")
    assert "Q4_K" in repacked and "Q4_0" in repacked and "Q6_K" not in repacked, note
    assert {"Q6_K", "Q5_K", "Q5_0", "Q5_1", "Q8_0"} <= set(stored.replace(",", " ").split()), note
    r = run_cli("plan", store, "--no-measure", "--max-ram", "0")
    assert r.returncode == 0, r.stderr
    assert "streamed blocks repacked for calls of 64 rows or more" in r.stdout and "at load" not in r.stdout


def assert_near_ties_only(got: torch.Tensor, want: torch.Tensor, kl_mean: float = 0.02, kl_max: float = 0.1):
    """got's next-token distributions are want's within ggml's 8-bit rounding of the activations (KL divergence
    per position; llama.cpp computes the same way: on the embedded model the mean KL is about 0.006), and where
    the top tokens differ, the reference's logit of got's top token is within the difference between the two of
    its best (a near-tie that the rounding may tip; random tiny models have many)."""
    got, want = got.reshape(-1, got.shape[-1]).float(), want.reshape(-1, want.shape[-1]).float()
    lp, lq = want.log_softmax(-1), got.log_softmax(-1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    assert float(kl.mean()) < kl_mean and float(kl.max()) < kl_max, kl
    top_got, top_want = got.argmax(-1), want.argmax(-1)
    gap = want.max(-1).values - want.gather(1, top_got[:, None])[:, 0]
    slack = 2 * (got - want).abs().max(-1).values
    assert bool((gap <= slack).all()), (top_got, top_want, gap, slack)
    assert (top_got == top_want).float().mean() >= 0.5


@pytest.mark.parametrize("gguf_model", ["llama"], indirect=True)
def test_streamed_units_in_the_page_cache_are_mapped_not_copied(gguf_model):
    """At max_ram=0 with the file in the page cache (io "auto" -> "mmap"), a unit is read and checked once, and
    from then on taken as views of the mapped file: no load buffer per sweep; the q/k rows, which llama.cpp's
    converter interleaves, stay as the file holds them where ggml computes on them (the outputs are permuted), and
    are copied into order otherwise; the tokens are those of copying reads (io="buffered")."""
    from layerstream.quant import kernels

    _, g, store, _, _ = gguf_model
    copied = AutoModel.from_pretrained(store, max_ram=0, progress=False, io="buffered")
    m = AutoModel.from_pretrained(store, max_ram=0, progress=False)
    assert m.streamer.reader.mapped and not copied.streamer.reader.mapped
    want = copied.generate(IDS, max_new_tokens=6, do_sample=False)
    got = m.generate(IDS, max_new_tokens=6, do_sample=False)
    assert got.tolist() == want.tolist()
    assert set(m.streamer.reader.view_cache) == {u.name for u in m.plan.streamed}
    reads, read = [], m.streamer.reader.read
    m.streamer.reader.read = lambda unit, dest: (reads.append(unit), read(unit, dest))[1]   # a spy on the copies
    m.generate(IDS, max_new_tokens=3, do_sample=False)
    assert reads == [] and m.last_stats["bytes_per_token"] > 0   # streamed, with no unit copied into a buffer
    layer = next(iter(m.streamer.reader.view_cache))
    views, perms = m.streamer.reader.mapped_unit(layer)
    q = next(n for n in views if "q_proj" in n)
    maps = m.streamer.reader.maps
    base = next(iter(maps.values()))[1]

    def mapped(t):
        return base.data_ptr() <= t.data_ptr() < base.data_ptr() + base.numel()

    assert mapped(next(t for n, t in views.items() if "down_proj" in n))   # a view of the mapped file
    if kernels.available():   # computed on by ggml: q's rows stay as the file holds them, its outputs permuted
        assert any(isinstance(mod, kernels.BlockLinear) for mod in m.model.modules())
        assert q in m.streamer.reader.view_cache[layer][1] and mapped(views[q])
        rows = views[q].shape[0]
        assert sorted(perms[q].tolist()) == list(range(rows)) and perms[q].tolist() != list(range(rows))
    else:
        assert q not in m.streamer.reader.view_cache[layer][1] and not perms   # reordered rows: a copy
    # mapped units stay bound between sweeps, but each use re-checks the file: a new mtime means a new read and
    # content check of every streamed unit, then views again
    kept = set(m.streamer.kept)
    assert kept == {u.name for u in m.plan.streamed}
    st = g.stat()
    try:
        os.utime(g, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        assert m.generate(IDS, max_new_tokens=3, do_sample=False).tolist() == want[:, :IDS.shape[1] + 3].tolist()
        assert kept <= set(reads)   # read (and checked) again
        reads.clear()
        m.generate(IDS, max_new_tokens=2, do_sample=False)
        assert reads == []
    finally:
        os.utime(g, ns=(st.st_atime_ns, st.st_mtime_ns))
    copied.close()
    m.close()
