"""Mixture of experts: each expert is its own unit, and only the experts the router chose are read."""

import json

import pytest
import torch

from layerstream import AutoModel, Store
from layerstream.errors import SourceError
from layerstream.plan import make_plan
from layerstream.quant import dequantize, quantizable, quantize

from conftest import assert_like_transformers, make_moe_dir, reference, run_cli

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3"]
IDS = torch.tensor([[1, 17, 33, 5, 90, 64, 12]])


def routing_of(ref, ids, max_new_tokens):
    """The experts transformers itself routes to, per experts call: [(layer index, sorted expert ids)]."""
    calls = []
    hooks = []
    for name, mod in ref.named_modules():
        if name.endswith(".experts") and hasattr(mod, "num_experts"):
            layer = int(name.split(".layers.")[1].split(".")[0])
            hooks.append(mod.register_forward_pre_hook(
                lambda m, args, layer=layer: calls.append((layer, tuple(sorted(set(args[1].flatten().tolist())))))))
    out = ref.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    for h in hooks:
        h.remove()
    return out, calls


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("max_ram", [0, None])
def test_moe_matches_transformers(tmp_path, family, max_ram):
    src = make_moe_dir(tmp_path / "src", family)
    ref = reference(src)
    m = AutoModel.from_pretrained(src, max_ram=max_ram, store_path=tmp_path / "store", progress=False)
    experts = [u for u in m.store.manifest.units if u.kind == "expert"]
    layers_with_experts = 2 if family.startswith("deepseek") else 3   # DeepSeek: the first layer is dense
    assert len(experts) == 8 * layers_with_experts
    assert all(len(u.tensors) >= 2 for u in experts)
    assert_like_transformers(m, ref, IDS, 12)
    # everything resident: each layer's experts fused once and bound, as transformers holds them
    assert m.streamer.fused == (set(m.layout.experts) if max_ram is None else set())
    assert all(read == 0 for _, _, read in m.profiler.experts) == (max_ram is None)
    if family == "deepseek_v3":   # the router's bias is a buffer kept in the checkpoint: loaded, not zeros
        names = {t for u in m.store.manifest.units for t in u.tensors}
        assert "model.layers.1.mlp.gate.e_score_correction_bias" in names
    m.close()


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_only_routed_experts_are_read(tmp_path, family):
    """max_ram=0: per experts call, the expert units read are exactly the ones transformers routes to, and
    the bytes read are the dense units of every sweep plus those experts (plus the embedding rows)."""
    src = make_moe_dir(tmp_path / "src", family)
    want_ids, want_calls = routing_of(reference(src), IDS, 12)
    # prefetch off: no read-ahead of the next sweep's first units, so the bytes read add up exactly
    m = AutoModel.from_pretrained(src, max_ram=0, store_path=tmp_path / "store", progress=False, prefetch=False)
    got_ids = m.generate(IDS, max_new_tokens=12, do_sample=False)
    assert got_ids.tolist() == want_ids.tolist()
    prof = m.profiler
    assert [(int(layer.split(".")[1]), routed) for layer, routed, _ in prof.experts] == want_calls
    assert all(read == len(routed) for _, routed, read in prof.experts)   # nothing resident: all from disk
    decode = [routed for _, routed, _ in prof.experts][-len(set(c[0] for c in want_calls)):]
    assert all(len(r) == 2 for r in decode)  # one token, two experts per token: 2 of 8 experts read

    units = {u.name: u.bytes for u in m.store.manifest.units}
    dense = sum(b for n, b in units.items() if ".expert." not in n and n != "embed")
    experts = sum(units[f"{layer}.expert.{j}"] for layer, routed, _ in prof.experts for j in routed)
    (slot,) = m.store.slots("embed")
    rows = len(set(IDS[0].tolist())) + prof.sweeps - 1        # the prompt's distinct tokens, then one per step
    assert prof.bytes_read == prof.sweeps * dense + experts + rows * slot.shape[1] * slot.dtype.itemsize
    all_experts = sum(b for n, b in units.items() if ".expert." in n)
    assert experts / prof.sweeps < 0.5 * all_experts   # far below a dense sweep of every expert
    m.close()


def test_partial_budget_keeps_experts_resident(tmp_path):
    src = make_moe_dir(tmp_path / "src", "qwen3_moe")
    ref = reference(src)
    store = tmp_path / "store"
    units = AutoModel.from_pretrained(src, max_ram=0, store_path=store, progress=False).store.units
    dense = sum(u.bytes for n, u in units.items() if ".expert." not in n)
    expert = units["layer.0.expert.0"].bytes
    m = AutoModel.from_pretrained(store, max_ram=int((dense + 12 * expert + 2 * 2 * expert) / 0.9) + 4096 * 8,
                                  progress=False)
    tiers = {u.name: u.tier for u in m.plan.units}
    resident = [n for n, t in tiers.items() if ".expert." in n and t == "ram"]
    assert 0 < len(resident) < 24
    # dense parts before experts (the untied embedding stays on disk: only its rows are read)
    assert all(t == "ram" for n, t in tiers.items() if ".expert." not in n and n != "embed")
    # spread over the layers: expert 0 of every layer before expert 1 of any
    assert {f"layer.{i}.expert.0" for i in range(3)} <= set(resident)
    want = ref.generate(IDS, max_new_tokens=10, do_sample=False)
    assert m.generate(IDS, max_new_tokens=10, do_sample=False).tolist() == want.tolist()
    for layer, routed, read in m.profiler.experts:
        assert read == sum(tiers[f"{layer}.expert.{j}"] == "disk" for j in routed)
    assert "experts of 3 layers" in m.plan.describe()


def test_fused_checkpoint_and_quantized_experts(tmp_path):
    """A checkpoint that already holds [num_experts, ...] tensors is sliced per expert; an int8 store
    quantizes every expert's weights too, and streams exactly what transformers computes on the same
    (dequantized) weights."""
    src = make_moe_dir(tmp_path / "src", "mixtral", fused=True)
    ref = reference(src)
    m = AutoModel.from_pretrained(src, max_ram=0, store_path=tmp_path / "store", progress=False)
    want = ref.generate(IDS, max_new_tokens=10, do_sample=False)
    assert m.generate(IDS, max_new_tokens=10, do_sample=False).tolist() == want.tolist()

    q = AutoModel.from_pretrained(src, max_ram=0, compression="int8", store_path=tmp_path / "q8", progress=False)
    unit = q.store.manifest.units[[u.name for u in q.store.manifest.units].index("layer.1.expert.3")]
    assert any(t.endswith(".q8u") for t in unit.tensors)
    assert unit.bytes < 0.6 * m.store.units["layer.1.expert.3"].bytes
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if ".experts." in name:
                for j in range(p.shape[0] if quantizable(name, p.shape[1:], "int8") else 0):
                    p[j] = dequantize("int8", quantize(p[j], "int8"), torch.float32)
            elif "embed_tokens" not in name and quantizable(name, p.shape, "int8"):
                p.copy_(dequantize("int8", quantize(p, "int8"), torch.float32))
        want_logits = ref(IDS).logits
    torch.testing.assert_close(q(IDS).logits, want_logits, rtol=1e-4, atol=1e-4)
    assert q.generate(IDS, max_new_tokens=10, do_sample=False).tolist() == \
        ref.generate(IDS, max_new_tokens=10, do_sample=False).tolist()


@pytest.mark.parametrize("family, fused", [("qwen2_moe", False), ("mixtral", False), ("mixtral", True)])
def test_moe_checkpoint_served_in_place(tmp_path, family, fused):
    """A hub MoE checkpoint is served from its own shards, no copy: an expert unit is its slices of the
    checkpoint. A weight that transformers fuses from two (gate and up, stored per expert) is one slot
    where they lie end to end in the shard (Qwen's gate_proj, up_proj), and is joined from its pieces as
    it loads where they do not (Mixtral's w1 and w3 have w2 between them). Same logits and tokens as
    transformers, only the routed experts read, and the same as a split store."""
    src = make_moe_dir(tmp_path / "src", family, fused=fused)
    ref = reference(src)
    m = AutoModel.from_pretrained(src, max_ram=0, store_path=tmp_path / "store", progress=False, prefetch=False)
    man = m.store.manifest
    assert man.in_place and not list((tmp_path / "store" / "units").glob("*"))
    joined = [n for u in man.units if u.kind == "expert" for n, e in u.slots.items() if len(e) == 3]
    if family == "mixtral" and not fused:   # gate_up_proj of every expert, from its w1 and w3 tensors
        assert len(joined) == 8 * 3 and all(n.endswith("gate_up_proj") for n in joined)
    else:
        assert joined == []
    want = assert_like_transformers(m, ref, IDS, 10)
    assert all(read == len(routed) for _, routed, read in m.profiler.experts)
    assert Store(tmp_path / "store").verify() == []
    m.close()
    s = AutoModel.from_pretrained(src, max_ram=0, in_place=False, store_path=tmp_path / "split", progress=False)
    assert not s.store.manifest.in_place
    torch.testing.assert_close(s(IDS).logits, want, rtol=1e-4, atol=1e-4)
    s.close()


def test_converted_checkpoint_is_split_not_served_in_place(tmp_path):
    """Weights that transformers converts beyond joining (olmo_hybrid's q/k/v convolutions) cannot be read
    in place: in_place=True says so, and by default the checkpoint is split."""
    from families_tiny import make_family_dir

    src = make_family_dir(tmp_path / "src", "olmo_hybrid")
    with pytest.raises(SourceError, match="cannot be served in place: split it"):
        AutoModel.from_pretrained(src, in_place=True, store_path=tmp_path / "a", progress=False)
    m = AutoModel.from_pretrained(src, store_path=tmp_path / "b", progress=False)
    assert not m.store.manifest.in_place
    assert Store(tmp_path / "b").verify() == []


@pytest.mark.slow
def test_cli_plan_and_a_store_without_tokenizer(tmp_path):
    src = make_moe_dir(tmp_path / "src", "deepseek_v3")
    store = AutoModel.from_pretrained(src, max_ram=0, store_path=tmp_path / "store", progress=False).store.path
    r = run_cli("plan", store, "--max-ram", "0")
    assert r.returncode == 0, r.stderr
    assert "16 experts of 2 layers" in r.stdout + r.stderr
    r = run_cli("run", "--model", store, "--max-new-tokens", "3", "hello")
    assert r.returncode != 0
    assert "has no usable tokenizer" in r.stderr and "Traceback" not in r.stderr


def test_router_counts_choose_the_resident_experts(tmp_path):
    """Each run records which experts the router chose (expert-counts.json in the store); a later plan
    with room for some experts keeps the most chosen ones resident."""
    src = make_moe_dir(tmp_path / "src", "qwen3_moe")
    m = AutoModel.from_pretrained(src, max_ram=0, store_path=tmp_path / "store", progress=False)
    m.generate(IDS, max_new_tokens=6, do_sample=False)
    calls = list(m.profiler.experts)
    m.close()
    counts = json.loads((tmp_path / "store" / "expert-counts.json").read_text())
    assert sum(counts.values()) == sum(len(r) for _, r, _ in calls)
    assert counts[f"{calls[-1][0]}.expert.{calls[-1][1][0]}"] >= 1

    units = Store(tmp_path / "store").units
    dense = sum(u.bytes for n, u in units.items() if ".expert." not in n)
    expert = units["layer.0.expert.0"].bytes
    # a hot spot: expert 5 of layer 1 chosen far more often than anything else
    (tmp_path / "store" / "expert-counts.json").write_text(json.dumps({**counts, "layer.1.expert.5": 10_000}))
    plan = make_plan(Store(tmp_path / "store"), "cpu", int((dense + 2 * expert + 2 * 2 * expert) / 0.9) + 4096 * 8)
    resident = [u.name for u in plan.units if u.kind == "expert" and u.tier == "ram"]
    assert 2 <= len(resident) < 24 and "layer.1.expert.5" in resident
    heat = {**counts, "layer.1.expert.5": 10_000}
    others = [u.name for u in plan.units if u.kind == "expert" and u.tier == "disk"]
    assert min(heat.get(n, 0) for n in resident) >= max(heat.get(n, 0) for n in others)   # the most chosen
    assert any("router chose" in n for n in plan.notes)


@pytest.mark.slow
@pytest.mark.parametrize("qtype, compression", [("Q4_1", None), ("Q4_1", "int4"), ("Q8_0", "int8"), ("F32", None)])
def test_moe_gguf_streams_per_expert(tmp_path, qtype, compression):
    """A Qwen3-MoE GGUF (experts stacked per layer in `ffn_*_exps`, as llama.cpp writes them): each expert's
    slice is its own unit (by default served in place: byte ranges of the file), only the routed experts are
    read, and the tokens and logits are transformers' own from the same GGUF. With int4/int8 the GGUF's
    Q4_1/Q8_0 expert blocks are kept bit for bit (so still exactly transformers' dequantized model). The experts
    are 64 wide, which transformers' GGUF config reader misses (it keeps Qwen3-MoE's default of 768):
    layerstream reads the size from the file."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from gguf_tiny import MOE_FF, make_moe_gguf

    g = make_moe_gguf(tmp_path / "tiny-moe.gguf", qtype)
    cfg = AutoConfig.from_pretrained(g.parent, gguf_file=g.name)
    assert cfg.moe_intermediate_size != MOE_FF   # transformers alone gets this wrong
    cfg.moe_intermediate_size = MOE_FF
    ref = AutoModelForCausalLM.from_pretrained(g.parent, gguf_file=g.name, config=cfg, dtype=torch.float32).eval()
    want_ids, want_calls = routing_of(ref, IDS, 8)
    m = AutoModel.from_pretrained(g, max_ram=0, store_path=tmp_path / "store", compression=compression,
                                  progress=False, prefetch=False, kernels=False)   # the reference path
    experts = [u for u in m.store.manifest.units if u.kind == "expert"]
    assert len(experts) == 2 * 8
    if compression:   # the GGUF's own blocks kept: the experts' tensors are stored quantized
        suffix = {"int4": ".q4", "int8": ".q8"}[compression]
        assert all(any(t.endswith(suffix) for t in u.tensors) for u in experts)
    else:   # served in place: each expert's slices of the stacked tensors, as they lie in the file
        assert m.store.manifest.in_place and not (tmp_path / "store" / "units").exists()
        if qtype == "Q4_1":
            assert all(any(t.endswith(".q4_1") for t in u.tensors) for u in experts)
    with torch.no_grad():
        torch.testing.assert_close(m(IDS).logits, ref(IDS).logits, rtol=1e-4, atol=1e-4)
    m.profiler.reset()
    got = m.generate(IDS, max_new_tokens=8, do_sample=False)
    assert got.tolist() == want_ids.tolist()
    assert [(int(layer.split(".")[1]), routed) for layer, routed, _ in m.profiler.experts] == want_calls
    assert all(read == len(routed) for _, routed, read in m.profiler.experts)
    m.close()


@pytest.mark.slow
@pytest.mark.parametrize("qtype, compression", [("Q4_1", None), ("Q8_0", None), ("Q4_1", "int4"), ("Q8_0", "int8")])
def test_moe_gguf_computes_on_blocks(tmp_path, qtype, compression):
    """With ggml installed, a MoE GGUF computes on its blocks everywhere: attention and head as `BlockLinear`s,
    and the experts module on each routed expert's blocks (`block_experts_forward`: nothing dequantized or
    stacked), streamed per routed expert at max_ram=0 and resident at the default budget; also from our int4 /
    int8 stores of the same blocks. Against the dequantize path: the prompt's logits within ggml's 8-bit rounding
    of the activations except where that rounding tips a router's near-tie to another expert (at most one
    position of eight: it changes that position's logits as a different expert would, and the positions after
    it through their attention, so greedy tokens of this random model are not compared). The experts' math
    alone: tests/unit/test_kernels.py."""
    from layerstream.quant import kernels

    from gguf_tiny import make_moe_gguf

    if not kernels.available():
        pytest.skip("ggml-python is not installed (./install.sh builds it)")
    g = make_moe_gguf(tmp_path / "tiny-moe.gguf", qtype)
    ref = AutoModel.from_pretrained(g, max_ram=0, store_path=tmp_path / "store", progress=False, kernels=False,
                                    compression=compression)
    seq = ref.generate(IDS, max_new_tokens=8, do_sample=False)   # the prompt and 8 greedy tokens
    with torch.no_grad():
        want_logits = ref(IDS).logits[0]
    for max_ram in (0, None):
        m = AutoModel.from_pretrained(tmp_path / "store", max_ram=max_ram, progress=False)
        blocks = [n for n, mod in m.model.named_modules() if isinstance(mod, kernels.BlockLinear)]
        assert len(blocks) == 2 * 4 + 1, blocks   # q, k, v, o of both layers, and the head
        assert sum(u.kind == "expert" and u.name in m.plan.blocks for u in m.plan.units) == 2 * 8
        assert all(mod.forward.__func__ is kernels.block_experts_forward
                   for n, mod in m.model.named_modules() if n.endswith("mlp.experts"))
        assert not any(p.numel() for n, p in m.model.named_parameters() if ".experts." in n)   # nothing stacked
        m.profiler.reset()
        with torch.no_grad():
            got = m(IDS).logits[0]
        lp, lq = want_logits.log_softmax(-1), got.log_softmax(-1)
        kl = (lp.exp() * (lp - lq)).sum(-1)
        assert int((kl < 0.02).sum()) >= len(kl) - 1 and bool(torch.isfinite(got).all()), kl
        reads = [read for _, _, read in m.profiler.experts]
        assert reads and (all(reads) if max_ram == 0 else not any(reads)), m.profiler.experts
        # decoding too (one token a sweep through the routed experts' blocks)
        assert m.generate(IDS, max_new_tokens=8, do_sample=False).shape == seq.shape
        m.close()
    ref.close()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["nemotron_h", "inkling2_text"])
def test_int4_experts_of_other_shapes_compute_on_blocks(tmp_path, family):
    """Experts without a gate (Nemotron-H: up, activation, down) and with the family's own `_apply_gate`
    (Inkling 2), from an int4 store: every experts module computes on its blocks, and the logits are the
    dequantize path's within ggml's rounding of the activations (KL < 0.05 at every position; 0.001-0.014
    measured)."""
    from layerstream.quant import kernels

    from families_tiny import make_family_dir

    if not kernels.available():
        pytest.skip("ggml-python is not installed (./install.sh builds it)")
    src = make_family_dir(tmp_path / "src", family)
    ref = AutoModel.from_pretrained(src, compression="int4", store_path=tmp_path / "q4", progress=False,
                                    kernels=False)
    m = AutoModel.from_pretrained(tmp_path / "q4", max_ram=0, progress=False)
    experts = [mod for n, mod in m.model.named_modules() if n.endswith(".experts") and hasattr(mod, "has_gate")]
    assert experts and all(mod.forward.__func__ is kernels.block_experts_forward for mod in experts)
    assert (not experts[0].has_gate) if family == "nemotron_h" else "_apply_gate" in type(experts[0]).__dict__
    ids = torch.tensor([[1, 5, 9, 20, 31, 7, 99, 100]])
    with torch.no_grad():
        lp, lq = ref(ids).logits[0].log_softmax(-1), m(ids).logits[0].log_softmax(-1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    assert bool((kl < 0.05).all()), kl
    ref.close()
    m.close()


def test_an_experts_call_that_raises_hands_its_blocks_back(tmp_path):
    """An experts call that raises between its hooks (its post hook never runs) keeps the routed experts' loaded
    blocks only until the next call of that module, which hands them back to the loader first."""
    from layerstream.quant import kernels

    from gguf_tiny import make_moe_gguf

    if not kernels.available():
        pytest.skip("ggml-python is not installed (./install.sh builds it)")
    g = make_moe_gguf(tmp_path / "tiny-moe.gguf", "Q4_1")
    m = AutoModel.from_pretrained(g, max_ram=0, store_path=tmp_path / "store", progress=False)
    mod = m.model.model.layers[0].mlp.experts
    works = mod.forward

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    mod.forward = boom
    with torch.no_grad(), pytest.raises(RuntimeError, match="boom"):
        m(IDS)
    left = list(m.streamer.expert_items["model.layers.0.mlp.experts"])
    assert left and mod.ls_blocks   # still bound: no post hook ran
    handed_back, done = [], m.streamer.loader.done
    m.streamer.loader.done = lambda item: (handed_back.append(item), done(item))
    mod.forward = works
    with torch.no_grad():
        m(IDS)
    assert all(any(item is h for h in handed_back) for item in left)
    assert not any(m.streamer.expert_items.values())
    m.close()
