"""Several sequences per forward, each attending only its own keys and values: over the engine's slabs
(layerstream.engine.kv) and over transformers' PagedAttentionCache (the spike's runner, engine/paged.py), each
sequence gets the greedy tokens it gets alone (layerstream.engine.step.generate_step)."""

import pytest
import torch

from layerstream import AutoModel
from layerstream.engine import paged
from layerstream.engine.kv import SlabKV, SlabStep, slab_attention
from layerstream.engine.step import generate_step

TEXTS = ["Hello",
         "The capital of France is",
         "Write a short poem about the sea and the wind in the night, please.",
         "List three prime numbers greater than one hundred and explain why each of them is prime, step by step."]
NEW = 16


@pytest.fixture(scope="module")
def smol(embedded_store):
    m = AutoModel.from_pretrained(None, store_path=embedded_store.root, progress=False)
    prompts = [m.tokenizer(t)["input_ids"] for t in TEXTS]
    assert len({len(p) for p in prompts}) == len(prompts)   # different lengths
    alone = [list(generate_step(m, p, NEW)) for p in prompts]
    yield m, prompts, alone
    m.model.set_attn_implementation("sdpa")


def test_batched_greedy_equals_alone(smol):
    m, prompts, alone = smol
    runner = paged.PagedRunner(m, num_blocks=32, page_size=16)   # blocks smaller than the prompts: several each
    assert paged.generate(runner, prompts, NEW) == alone
    # every block went back to the pool: a second round on the same cache gives the same tokens
    assert not any(a.block_table for a in runner.cache.cache_allocators.values())
    assert paged.generate(runner, prompts, NEW) == alone


def test_slab_greedy_equals_alone(smol):
    m, prompts, alone = smol
    m.model.set_attn_implementation("sdpa")
    runner = SlabStep(m, chunk=8)   # slabs grown (copied) several times per sequence
    assert paged.generate(runner, prompts, NEW) == alone
    assert not runner.kv.k and m.config._attn_implementation == "sdpa"   # switched for the steps only


@pytest.mark.parametrize("family", ["mistral", "gemma2", "gpt_oss"])   # a sliding window; softcapping; sinks
def test_tiny_families(family):
    """Sliding-window layers (every one, or hybrid with full ones), and attention that SDPA cannot compute (the
    family's eager attention, per sequence): tiny random models in transformers directly."""
    from contextlib import nullcontext

    from factory import tiny_model
    from families_tiny import tiny_family_config

    net = tiny_model(tiny_family_config(family)).eval()   # sliding windows of 8 tokens
    shim = type("Shim", (), {"model": net, "config": net.config, "device": net.device, "dtype": net.dtype,
                             "running": lambda self: nullcontext()})()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 120, (n,), generator=g).tolist() for n in (5, 11)]
    impl = net.config._attn_implementation
    with torch.no_grad():
        want = [net.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    assert paged.generate(paged.PagedRunner(shim, num_blocks=16, page_size=4), prompts, 8) == want
    net.set_attn_implementation(impl)
    assert paged.generate(SlabStep(shim, chunk=4), prompts, 8) == want


def test_joining_mid_decode(smol):
    """Continuous batching: a sequence prefills in the same forward in which the others decode."""
    m, prompts, alone = smol
    runner = paged.PagedRunner(m, num_blocks=32, page_size=16)
    got = {i: [] for i in range(len(prompts))}
    nxt: dict[int, int] = {}
    for step in range(NEW + len(prompts)):
        rows = [(i, [nxt[i]]) for i in nxt if len(got[i]) < NEW]
        if step < len(prompts):
            rows.append((step, prompts[step]))   # prompt i joins at step i
        if not rows:
            break
        logits = runner.step([(f"s{i}", toks) for i, toks in rows])
        for (i, _), t in zip(rows, logits.argmax(-1).tolist()):
            got[i].append(t)
            nxt[i] = t
    assert [got[i] for i in range(len(prompts))] == alone


def test_out_of_blocks_is_memory_error(smol):
    m, prompts, _ = smol
    runner = paged.PagedRunner(m, num_blocks=2, page_size=16)
    with pytest.raises(MemoryError):
        runner.step([("a", prompts[3] * 3)])


def test_paged_attention_matches_sdpa_per_sequence():
    """The attention function alone: packed sequences (prefill chunks after a past, decode rows, a window) equal
    SDPA on each sequence by itself."""
    from types import SimpleNamespace

    torch.manual_seed(0)
    heads, kv, d = 4, 2, 8
    lens = [(3, 7), (1, 9), (5, 5), (1, 1)]   # (new tokens, columns) per sequence
    qs = [torch.randn(1, heads, q, d) for q, _ in lens]
    ks = [torch.randn(1, kv, k, d) for _, k in lens]
    vs = [torch.randn(1, kv, k, d) for _, k in lens]
    cq = torch.tensor([0] + [q for q, _ in lens]).cumsum(0).int()
    ck = torch.tensor([0] + [k for _, k in lens]).cumsum(0).int()
    for window in (None, 3):
        out, _ = slab_attention(SimpleNamespace(), torch.cat(qs, 2), torch.cat(ks, 2), torch.cat(vs, 2), None,
                                scaling=d ** -0.5, cu_seq_lens_q=cq, cu_seq_lens_k=ck, sliding_window=window)
        for i, (q, k) in enumerate(lens):
            diff = torch.arange(k - q, k)[:, None] - torch.arange(k)[None, :]
            mask = (diff >= 0) & (diff < (window or 10 ** 9))
            want = torch.nn.functional.scaled_dot_product_attention(qs[i], ks[i], vs[i], attn_mask=mask,
                                                                    enable_gqa=True)
            torch.testing.assert_close(out[0, cq[i]:cq[i + 1]], want[0].transpose(0, 1))


def test_slabs_grow_within_their_limit_copy_truncate_and_shrink():
    """SlabKV alone: a slab grows by chunks (its columns kept) but never past its sequence's limit; a prefix copy,
    a truncation (rejected drafts) and a shrink (a finished sequence kept for its prefix) keep the right columns."""
    kv = SlabKV(layers=2, kv_heads=2, head_dim=4, dtype=torch.float32, device="cpu", chunk=8)
    kv.limits[1] = 10
    kv.reserve(1, 3)
    assert kv.k[1][0].shape == (2, 8, 4)
    kv.k[1][1][:, :3] = torch.arange(24.).reshape(2, 3, 4)
    kv.lens[1] = 3
    kv.reserve(1, 9)   # grows to its limit (10), not to the next chunk (16)
    assert kv.k[1][0].shape[1] == 10 and torch.equal(kv.k[1][1][:, :3], torch.arange(24.).reshape(2, 3, 4))
    kv.reserve(2, 9)   # no limit: whole chunks
    assert kv.k[2][0].shape[1] == 16
    kv.copy_prefix(3, 1, 2)
    assert kv.length(3) == 2 and torch.equal(kv.k[3][1][:, :2], kv.k[1][1][:, :2])
    kv.truncate(1, 2)
    assert kv.length(1) == 2 and kv.tokens() == 4 and kv.capacity() == 10 + 16 + 8
    kv.shrink(1)
    assert kv.k[1][1].shape == (2, 2, 4) and torch.equal(kv.k[1][1], kv.k[3][1][:, :2])
    kv.free(1)
    assert 1 not in kv.k and 1 not in kv.limits
    kv.clear()
    assert kv.tokens() == 0 and kv.capacity() == 0


def test_the_families_on_slabs_are_those_the_survey_found_correct():
    """SLAB_FAMILIES is the family survey's "slab: ok" list (bench/paged_families.py's output in docs/), less the
    families whose attention slab_attention does not compute (NOT_SLABS): never a family nobody checked."""
    from pathlib import Path

    from layerstream.engine.kv import NOT_SLABS, SLAB_FAMILIES, slab_families_from

    survey = slab_families_from(Path(__file__).resolve().parents[1] / "docs" / "paged-spike-families.txt")
    assert len(survey) > 50 and SLAB_FAMILIES == survey - NOT_SLABS
