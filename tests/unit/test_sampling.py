"""layerstream.engine.step.sample: greedy, temperature, top-p (nucleus), seeded generators."""

import pytest
import torch

from layerstream.engine.step import sample


def logits_of(probs, rows=1):
    return torch.tensor(probs).log().repeat(rows, 1)


@pytest.mark.parametrize("temperature", [0, 0.0, None, -1.0])
def test_greedy_is_argmax_per_row(temperature):
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    got = sample(logits, temperature=temperature)
    assert got.shape == (5,)
    assert torch.equal(got, logits.argmax(-1))


def test_greedy_ignores_top_p_and_generator():
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sample(logits, 0, top_p=0.01, generator=torch.Generator().manual_seed(5)), logits.argmax(-1))


def test_tiny_top_p_keeps_only_the_top_token():
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(2))
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert torch.equal(sample(logits, temperature=1.5, top_p=1e-6, generator=gen), logits.argmax(-1))


def test_top_p_keeps_the_smallest_set_reaching_p():
    # probabilities 0.4, 0.3, 0.2, 0.1: top_p 0.5 needs the first two (0.4 alone does not reach 0.5)
    logits = logits_of([0.1, 0.4, 0.2, 0.3], rows=4000)
    got = sample(logits, temperature=1.0, top_p=0.5, generator=torch.Generator().manual_seed(3))
    assert set(got.tolist()) == {1, 3}
    assert abs((got == 1).float().mean().item() - 0.4 / 0.7) < 0.04   # renormalized over the kept two
    got = sample(logits, temperature=1.0, top_p=0.75, generator=torch.Generator().manual_seed(3))
    assert set(got.tolist()) == {1, 2, 3}


def test_full_top_p_samples_the_softmax():
    logits = logits_of([0.1, 0.4, 0.2, 0.3], rows=8000)
    got = sample(logits, temperature=1.0, top_p=1.0, generator=torch.Generator().manual_seed(4))
    freq = torch.bincount(got, minlength=4).float() / got.numel()
    assert torch.allclose(freq, torch.tensor([0.1, 0.4, 0.2, 0.3]), atol=0.02)


def test_temperature_sharpens_and_flattens():
    logits = logits_of([0.1, 0.4, 0.2, 0.3], rows=8000)
    cold = sample(logits, temperature=0.1, generator=torch.Generator().manual_seed(5))
    hot = sample(logits, temperature=10.0, generator=torch.Generator().manual_seed(5))
    assert (cold == 1).float().mean() > 0.9
    assert (hot == 1).float().mean() < 0.35 and (hot == 0).float().mean() > 0.15


def test_a_seeded_generator_is_reproducible():
    logits = torch.zeros(8, 1000)   # uniform: every draw is up to the generator
    a = [sample(logits, 1.0, 0.9, torch.Generator().manual_seed(42)) for _ in range(3)]
    assert all(torch.equal(a[0], x) for x in a)
    ga, gb = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    seq_a = torch.stack([sample(logits, 0.8, 1.0, ga) for _ in range(10)])
    seq_b = torch.stack([sample(logits, 0.8, 1.0, gb) for _ in range(10)])
    assert torch.equal(seq_a, seq_b)
    other = torch.stack([sample(logits, 0.8, 1.0, torch.Generator().manual_seed(8)) for _ in range(10)])
    assert not torch.equal(seq_a, other)
    assert len(set(seq_a.flatten().tolist())) > 50   # really sampled, not one token


def test_sampled_tokens_stay_on_the_logits_device_and_dtype():
    logits = torch.randn(2, 30, dtype=torch.bfloat16)
    got = sample(logits, temperature=0.7, top_p=0.9, generator=torch.Generator().manual_seed(0))
    assert got.shape == (2,) and got.dtype == torch.int64 and got.device == logits.device
    assert ((got >= 0) & (got < 30)).all()


def test_penalties_and_top_k_min_p_match_transformers_processors():
    """The repeat penalty, top-k and min-p keep exactly the tokens (and scores) transformers' processors keep."""
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
    )

    from layerstream.engine.step import penalize

    g = torch.Generator().manual_seed(4)
    logits = torch.randn(1, 300, generator=g) * 3
    seen = [5, 7, 7, 250, 3]
    ids = torch.tensor([seen])
    want = RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    got = penalize(logits, seen, 1.3)
    torch.testing.assert_close(got, want)
    assert not torch.equal(got, logits)   # the caller's logits are not changed in place: a copy was penalized
    # OpenAI's frequency and presence penalties: over the generated tokens, count x frequency + presence
    out = penalize(logits, [], 1.0, [7, 7, 9], frequency=0.5, presence=0.25)
    assert torch.isclose(out[0, 7], logits[0, 7] - 1.25) and torch.isclose(out[0, 9], logits[0, 9] - 0.75)
    assert torch.equal(out[0, :7], logits[0, :7])
    # top-k then min-p at temperature 0.7: the support of our distribution is transformers'
    ref = MinPLogitsWarper(0.1)(ids, TopKLogitsWarper(20)(ids, TemperatureLogitsWarper(0.7)(ids, logits.clone())))
    keep = torch.isfinite(ref[0])
    drawn = {int(sample(logits, 0.7, 1.0, g, top_k=20, min_p=0.1)) for _ in range(400)}
    assert drawn <= set(keep.nonzero().flatten().tolist())
    assert len(drawn) >= 2 and 2 <= int(keep.sum()) <= 20


def test_greedy_takes_the_penalized_argmax():
    from layerstream.engine.step import penalize

    logits = torch.tensor([[1.0, 3.0, 2.9]])
    assert int(sample(penalize(logits, [1], 1.1), 0)[0]) == 2
