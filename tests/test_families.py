"""Every supported family, streamed with nothing resident and fully resident, against transformers itself."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from layerstream import AutoModel
from layerstream.arch import TESTED_DENSE, TESTED_MOE, TESTED_MOE_WHOLE_LAYER

from conftest import assert_like_transformers, make_model_dir, reference

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3"]   # the full matrix below


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("max_ram", [0, None])
@pytest.mark.parametrize("in_place", [True, False])
def test_greedy_and_logits_match_transformers(tmp_path, family, max_ram, in_place):
    src = make_model_dir(tmp_path / "src", family)
    ref = reference(src)
    ids = torch.tensor([[1, 17, 33, 5, 90, 64, 12]])
    m = AutoModel.from_pretrained(src, max_ram=max_ram, store_path=tmp_path / "store", progress=False,
                                  in_place=in_place)
    assert m.store.manifest.in_place == in_place
    if max_ram == 0:
        assert all(u.tier == "disk" for u in m.plan.units)
    else:
        assert all(u.tier == "ram" for u in m.plan.units)
    assert_like_transformers(m, ref, ids, 12)
    if max_ram == 0:
        assert m.last_stats["bytes_per_token"] > 0.9 * sum(u.bytes for u in m.store.manifest.units if u.kind != "embed")
    m.close()


@pytest.mark.parametrize("tie", [True, False])
def test_tied_and_untied_embeddings(tmp_path, tie):
    src = make_model_dir(tmp_path / "src", "llama", tie=tie)
    ref = reference(src)
    m = AutoModel.from_pretrained(src, max_ram=0, store_path=tmp_path / "store", progress=False)
    assert bool(m.store.manifest.tied) == tie
    names = {t for u in m.store.manifest.units for t in u.tensors}
    assert ("lm_head.weight" in names) == (not tie)  # a tied head is stored once, in the embedding unit
    ids = torch.tensor([[3, 4, 5, 6]])
    assert m.generate(ids, max_new_tokens=8, do_sample=False).tolist() == \
        ref.generate(ids, max_new_tokens=8, do_sample=False).tolist()


def test_sharded_checkpoint_and_partial_budget(tmp_path):
    src = make_model_dir(tmp_path / "src", "qwen2", tie=False, layers=6, shard="100KB")
    assert (src / "model.safetensors.index.json").is_file()
    ref = reference(src)
    store = tmp_path / "store"
    units = AutoModel.from_pretrained(src, max_ram=0, store_path=store, progress=False).store.units
    # the budget holds the resident units, the in-flight buffers (lookahead 1: two layer buffers) and a
    # runtime reserve (10% of it, at most 512 MB)
    budget = int((5 * units["layer.0"].bytes + units["head"].bytes) / 0.9) + 1
    m = AutoModel.from_pretrained(store, max_ram=budget, lookahead=1, progress=False)
    tiers = [u.tier for u in m.plan.units if u.kind == "layer"]
    assert tiers == ["disk", "ram"] * 3  # a fixed set, spread so reads interleave with resident compute
    assert m.plan.tier("head") == "ram" and m.plan.tier("embed") == "disk"
    assert m.plan.resident("ram") + m.plan.inflight_bytes <= 0.9 * budget
    ids = torch.tensor([[1, 2, 3, 50, 60], [0, 0, 7, 8, 9]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    want = ref.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    got = m.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert got.tolist() == want.tolist()


def test_sampling_matches_transformers_with_same_seed(tmp_path):
    src = make_model_dir(tmp_path / "src", "llama")
    ref = reference(src)
    m = AutoModel.from_pretrained(src, max_ram=0, store_path=tmp_path / "store", progress=False)
    ids = torch.tensor([[1, 9, 8, 7]])
    kw = dict(max_new_tokens=10, do_sample=True, temperature=0.8, top_p=0.9)
    torch.manual_seed(123)
    want = ref.generate(ids, **kw)
    torch.manual_seed(123)
    got = m.generate(ids, **kw)
    assert got.tolist() == want.tolist()


def test_bfloat16_store(tmp_path):
    src = make_model_dir(tmp_path / "src", "llama", dtype=torch.bfloat16)
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval()
    m = AutoModel.from_pretrained(src, max_ram=0, store_path=tmp_path / "store", progress=False)
    assert m.store.manifest.dtype == "bfloat16"
    ids = torch.tensor([[1, 5, 9, 13]])
    assert m.generate(ids, max_new_tokens=8, do_sample=False).tolist() == \
        ref.generate(ids, max_new_tokens=8, do_sample=False).tolist()


@pytest.mark.parametrize("in_place", [True, False])
@pytest.mark.parametrize("io", ["direct", "fadvise"])
def test_direct_io_with_parallel_readers(tmp_path, in_place, io):
    """O_DIRECT reads into aligned buffers (or buffered reads dropped from the page cache after), several
    chunks in flight: same tokens as transformers."""
    src = make_model_dir(tmp_path / "src", "llama", layers=4)
    ref = reference(src)
    m = AutoModel.from_pretrained(src, max_ram=0, store_path=tmp_path / "store", progress=False,
                                  in_place=in_place, io=io, readers=3)
    assert m.direct == (io == "direct") and m.streamer.reader.fadvise == (io == "fadvise")
    assert m.streamer.reader.pool is not None
    ids = torch.tensor([[1, 17, 33, 5]])
    torch.testing.assert_close(m(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)
    assert m.generate(ids, max_new_tokens=8, do_sample=False).tolist() == \
        ref.generate(ids, max_new_tokens=8, do_sample=False).tolist()


def test_page_cache_tier_only_beside_direct_reads(tmp_path):
    """A fixed set of streamed layers may be read through the page cache while the rest use O_DIRECT; when
    everything streamed fits in the page cache anyway, plain buffered reads are used and the tier is empty."""
    from layerstream.plan import choose_io, make_plan

    src = make_model_dir(tmp_path / "src", "llama", layers=6)
    m = AutoModel.from_pretrained(src, max_ram=0, store_path=tmp_path / "store", progress=False)
    plan = make_plan(m.store, "cpu", 0)
    layers = [u.name for u in plan.streamed if u.kind == "layer"]
    assert plan.cached == layers          # plenty of free RAM beside a budget of 0
    assert choose_io("auto", plan) == (False, [])
    assert choose_io("direct", plan) == (True, [])


def test_bf16_store_computed_in_fp32_converts_on_the_loader(tmp_path):
    """Streamed weights of another dtype are converted by the loader thread, off the compute's path."""
    src = make_model_dir(tmp_path / "src", "llama", dtype=torch.bfloat16)
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()   # upcast once
    AutoModel.from_pretrained(src, max_ram=0, store_path=tmp_path / "store", progress=False).close()   # bf16
    m = AutoModel.from_pretrained(tmp_path / "store", max_ram=0, dtype="float32", progress=False)
    assert m.store.manifest.dtype == "bfloat16" and m.dtype == torch.float32
    ids = torch.tensor([[1, 5, 9, 13]])
    torch.testing.assert_close(m(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
    assert m.generate(ids, max_new_tokens=8, do_sample=False).tolist() == \
        ref.generate(ids, max_new_tokens=8, do_sample=False).tolist()
    assert sum(m.profiler.dequant.values()) > 0   # the conversions ran on the loader


def test_stopping_criteria_and_streamer_as_in_transformers(tmp_path):
    from transformers import StoppingCriteria, StoppingCriteriaList

    class After(StoppingCriteria):
        def __init__(self, n):
            self.n = n

        def __call__(self, input_ids, scores, **kw):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.n, dtype=torch.bool)

    class Collect:
        def __init__(self):
            self.got = []

        def put(self, value):
            self.got.append(value.reshape(-1).tolist())

        def end(self):
            self.got.append("end")

    src = make_model_dir(tmp_path / "src", "llama")
    ref = reference(src)
    m = AutoModel.from_pretrained(src, max_ram=0, store_path=tmp_path / "store", progress=False)
    ids = torch.tensor([[1, 2, 3, 4]])
    a, b = Collect(), Collect()
    want = ref.generate(ids, max_new_tokens=20, do_sample=False, stopping_criteria=StoppingCriteriaList([After(9)]),
                        streamer=a)
    got = m.generate(ids, max_new_tokens=20, do_sample=False, stopping_criteria=StoppingCriteriaList([After(9)]),
                     streamer=b)
    assert got.shape[1] == 9 and got.tolist() == want.tolist()
    assert b.got == a.got and b.got[-1] == "end"


def test_no_buffer_allocation_per_token_once_warm(tmp_path):
    """Streamed units land in reused buffers: a second generation allocates none."""
    src = make_model_dir(tmp_path / "src", "llama", layers=5)
    m = AutoModel.from_pretrained(src, max_ram=0, store_path=tmp_path / "store", progress=False)
    ids = torch.tensor([[1, 2, 3]])
    m.generate(ids, max_new_tokens=4, do_sample=False)
    m.generate(ids, max_new_tokens=12, do_sample=False)
    assert m.profiler.sweeps == 12 and m.profiler.allocations == 0
    assert m.last_stats["bytes_read"] > 0


CORE = set(FAMILIES) | {"mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3"}   # tested above / test_moe


@pytest.mark.slow   # about 2 s a family, 130 families: the fast subset keeps the core matrix above
@pytest.mark.parametrize("family", [f for f in TESTED_DENSE + TESTED_MOE + TESTED_MOE_WHOLE_LAYER if f not in CORE])
def test_every_tested_family_streams_like_transformers(tmp_path, family):
    """Every family the README lists: nothing resident (every unit streamed, experts per expert where the
    family routes them), then fully resident from the same store; logits and greedy tokens as transformers'."""
    from families_tiny import make_family_dir

    src = make_family_dir(tmp_path / "src", family)
    ref = reference(src)
    ids = torch.tensor([[1, 17, 33, 5, 90, 64, 12]])
    m = AutoModel.from_pretrained(src, max_ram=0, store_path=tmp_path / "store", progress=False)
    want_logits = assert_like_transformers(m, ref, ids, 8)
    experts = [u for u in m.store.manifest.units if u.kind == "expert"]
    assert bool(experts) == (family in TESTED_MOE)
    if experts:   # only the routed experts were read: 2 of 8 per call while decoding
        assert m.profiler.experts and all(read == len(r) <= 2 for _, r, read in m.profiler.experts[-2:])
    m.close()
    full = AutoModel.from_pretrained(tmp_path / "store", max_ram=None, progress=False)
    assert all(u.tier == "ram" for u in full.plan.units)
    torch.testing.assert_close(full(ids).logits, want_logits, rtol=1e-4, atol=1e-4)
    full.close()
