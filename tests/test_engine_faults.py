"""Faults in the continuous-batching engine: a request whose own sampling or stop handling fails ends alone (the
others get exactly their tokens), values that cannot be computed are refused at submit, and a failed shared
sweep fails only its rows, the engine serving on after it. A tiny random-weight Llama, every layer streamed."""

import math
import os
import threading

import pytest
import torch

from layerstream import AutoModel
from layerstream.engine.scheduler import Engine, GenerationError, SamplingParams
from layerstream.engine.step import sample
from layerstream.errors import InputError, StoreError

from conftest import make_model_dir

PROMPTS = [[1, 5, 9, 13], [1, 7, 3, 99, 45, 12, 8, 64, 33, 2], [1, 20], [1, 77, 78, 79, 80, 81],
           [1, 30, 31, 32, 33, 34, 35, 36, 37], [1, 100, 101]]
LIMITS = [9, 12, 7, 12, 10, 9]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama, every layer streamed (max_ram=0), and each prompt's greedy tokens from generate alone."""
    d = tmp_path_factory.mktemp("tiny")
    m = AutoModel.from_pretrained(make_model_dir(d / "src", "llama", layers=4), max_ram=0, store_path=d / "store",
                                  progress=False)
    want = [m.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False)[0, len(p):].tolist()
            for p, n in zip(PROMPTS, LIMITS)]
    assert all(len(w) >= 4 for w in want)   # long enough to fail in the middle of a request
    return m, want


def run(eng, handles):
    while not all(h.done for h in handles):
        eng.step()


@pytest.mark.parametrize("prefix_cache", [0, None])
def test_a_row_whose_sampling_or_stop_handling_fails_ends_alone(tiny, prefix_cache):
    """Four greedy requests share their sweeps with two that fail after two tokens (one's temperature turned
    NaN after submit's checks, so its sampling raises; one's stop list given a None, so its stop handling
    raises): those two end with a GenerationError on their handles, after the deltas they made, and the four
    get exactly the tokens of generate alone; the engine serves the next requests. With and without the
    prefix cache (a failed row's columns must never be lent)."""
    m, want = tiny
    eng = Engine(m, max_batch=6, prefix_cache=prefix_cache)
    good = [eng.submit(p, SamplingParams(max_tokens=n)) for p, n in zip(PROMPTS[:4], LIMITS[:4])]
    hot = SamplingParams(max_tokens=LIMITS[4], temperature=0.8, seed=3)
    plain = SamplingParams(max_tokens=LIMITS[5], stop=["\x01never"])
    bad = [eng.submit(PROMPTS[4], hot), eng.submit(PROMPTS[5], plain)]
    eng.step()
    eng.step()
    assert eng.stats["max_batch_seen"] == 6 and not any(h.done for h in good + bad)
    hot.temperature = math.nan
    plain.stop.append(None)
    run(eng, good + bad)
    assert [h.result().token_ids for h in good] == want[:4]
    with pytest.raises(GenerationError, match=r"request req-4 failed while sampling: the sampling probabilities "
                                              r"are not finite \(temperature nan"):
        bad[0].result()
    with pytest.raises(GenerationError, match="req-5 failed while decoding its tokens and applying its stop "
                                              "strings: TypeError"):
        bad[1].result()
    streamed = list(bad[1].drain())
    assert [d.token_ids for d in streamed[:2]] == [want[5][:1], want[5][1:2]] and streamed[-1] is bad[1].error
    assert eng.snapshot().running == 0 and eng.snapshot().waiting == 0
    out = eng.generate(PROMPTS[3:], [SamplingParams(max_tokens=n) for n in LIMITS[3:]])
    assert [c.token_ids for c in out] == want[3:]


def test_a_failing_request_leaves_the_engine_thread_serving(tiny):
    """On the engine's thread (as the server runs it): a request that fails in its sampling gets its error from
    `stream()`, while concurrent clients get their tokens; the thread keeps running."""
    m, want = tiny
    eng = Engine(m, max_batch=4)
    eng.start()
    try:
        results = {}

        def client(i):
            h = eng.submit(PROMPTS[i], SamplingParams(max_tokens=LIMITS[i]))
            results[i] = [t for d in h.stream(timeout=60) for t in d.token_ids]

        threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        p = SamplingParams(max_tokens=50, temperature=1.0, seed=0)
        h = eng.submit(PROMPTS[4], p)
        p.temperature = math.nan
        with pytest.raises(GenerationError, match="not finite"):
            for _ in h.stream(timeout=60):
                pass
        for t in threads:
            t.join(60)
        assert [results[i] for i in range(3)] == want[:3]
        assert eng.serving
        after = eng.submit(PROMPTS[5], SamplingParams(max_tokens=LIMITS[5]))
        assert after.result(timeout=60).token_ids == want[5]
    finally:
        eng.stop()


@pytest.mark.parametrize("bad, message", [
    (dict(temperature=math.nan), "temperature must be a finite number >= 0"),
    (dict(temperature=math.inf), "temperature must be a finite number >= 0"),
    (dict(temperature=-1e-300), "temperature must be a finite number >= 0"),
    (dict(temperature=10**400), "temperature must be a finite number >= 0"),
    (dict(temperature=True), "temperature must be a finite number >= 0"),
    (dict(top_p=math.nan), r"top_p must be a number in \(0, 1\]"),
    (dict(top_p=0.0), r"top_p must be a number in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be a number in \(0, 1\]"),
    (dict(top_p=-math.inf), r"top_p must be a number in \(0, 1\]"),
    (dict(seed=2**64), r"seed must be an integer in \[-2\*\*63, 2\*\*64\)"),
    (dict(seed=1.5), "seed must be an integer"),
    (dict(stop=[None]), "stop must be a string or a list of non-empty strings"),
])
def test_values_that_cannot_be_computed_are_refused_at_submit(tiny, bad, message):
    """Refused when the parameters are made, and again at submit when they were changed after (nothing queued)."""
    m, _ = tiny
    with pytest.raises(InputError, match=message):
        SamplingParams(**bad)
    p = SamplingParams(temperature=0.5)
    for k, v in bad.items():
        setattr(p, k, v)
    eng = Engine(m)
    with pytest.raises(InputError, match=message):
        eng.submit(PROMPTS[0], p)
    assert eng.snapshot().waiting == 0


def test_prompts_outside_the_vocabulary_are_refused_at_submit(tiny):
    """A token id outside [0, vocab) would fail the shared sweep (the embedding lookup) for every row: refused."""
    m, _ = tiny
    eng = Engine(m)
    for prompt, message in (([1, 128], r"token id 128 is outside this model's vocabulary \[0, 128\)"),
                            ([-1, 5], "token id -1 is outside"), ([1, "x"], "must be a sequence of token ids"),
                            (None, "must be a sequence of token ids"), ([1, 2.5], "must be a sequence of token ids"),
                            ("hello", "not text: encode it with the tokenizer"),
                            (torch.tensor([[1, 2], [3, 4]]), "one prompt, got a batch of 2 rows: submit each row")):
        with pytest.raises(InputError, match=message):
            eng.submit(prompt, SamplingParams())
    assert eng.snapshot().waiting == 0


def test_generate_refuses_a_bad_prompt_and_leaves_nothing_queued(tiny):
    """generate with a bad third prompt raises naming it, and the two submitted before it do not stay queued (the
    next step drops them); a params list of another length than the prompts is refused, not cut short."""
    m, want = tiny
    eng = Engine(m)
    with pytest.raises(InputError, match=r"prompt 2: token id 500 is outside"):
        eng.generate([PROMPTS[0], PROMPTS[1], [1, 500]], SamplingParams(max_tokens=2))
    eng.step()
    assert eng.pending() == 0
    with pytest.raises(InputError, match="3 prompts but 2 SamplingParams"):
        eng.generate(PROMPTS[:3], [SamplingParams(), SamplingParams()])
    assert eng.pending() == 0
    assert [c.token_ids for c in eng.generate(PROMPTS[:2], [SamplingParams(max_tokens=n) for n in LIMITS[:2]])] \
        == want[:2]


def test_a_one_row_batch_is_that_prompt(tiny):
    """tokenizer(..., return_tensors="pt").input_ids is (1, n): submitted as it is, it gives the 1-D prompt's tokens."""
    m, _ = tiny
    eng = Engine(m)
    a, b = eng.generate([torch.tensor([PROMPTS[0]]), PROMPTS[0]], SamplingParams(max_tokens=4))
    assert a.token_ids == b.token_ids and len(a.token_ids) == 4


def test_tiny_temperatures_sample_greedily_and_nonfinite_probabilities_fail(tiny):
    """A temperature below 1e-5 is greedy (1e-300 made logits / T overflow to NaN before): the tokens of generate.
    Probabilities that are not finite raise GenerationError instead of sampling from them."""
    m, want = tiny
    eng = Engine(m, max_batch=3)
    out = eng.generate(PROMPTS[:3], [SamplingParams(max_tokens=n, temperature=t, seed=1)
                                     for n, t in zip(LIMITS, (1e-300, 5e-324, 9.9e-6))])
    assert [c.token_ids for c in out] == want[:3]
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.9]])
    assert sample(logits, 1e-300).tolist() == [1]
    with pytest.raises(GenerationError, match="not finite"):
        sample(logits, math.nan)
    with pytest.raises(GenerationError, match="not finite"):
        sample(torch.tensor([[0.0, math.inf, 1.0]]), 1.0, generator=torch.Generator().manual_seed(0))
    with pytest.raises(GenerationError, match="not finite"):
        sample(torch.tensor([[0.0, math.nan, 1.0]]), 0.7, top_p=0.9)


def test_a_failed_sweep_fails_its_rows_and_the_engine_serves_on(tiny):
    """A unit file of the store grows while requests run (a real fault of the shared sweep: the reader refuses
    a file whose size changed): the rows in that sweep get the StoreError, the request still waiting stays
    queued, and once the file is whole again it runs, with generate's tokens, as do new requests."""
    m, want = tiny
    unit = m.plan.streamed[1].load[0]
    path = m.store.file(unit)
    st = path.stat()
    eng = Engine(m, max_batch=2, prefix_cache=0)
    hs = [eng.submit(p, SamplingParams(max_tokens=n)) for p, n in zip(PROMPTS[:3], LIMITS[:3])]
    eng.step()
    try:
        with open(path, "ab") as f:
            f.write(b"\0")
        with pytest.raises(StoreError, match="truncated or replaced"):
            eng.step()
    finally:
        with open(path, "r+b") as f:
            f.truncate(st.st_size)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))   # as it was (the store is the model's own file)
    for h in hs[:2]:
        assert h.done and isinstance(h.error, StoreError)
    now = eng.snapshot()
    assert not hs[2].done and now.kv_tokens == 0 and now.running == 0 and now.waiting == 1
    run(eng, hs[2:])
    assert hs[2].result().token_ids == want[2]
    assert [c.token_ids for c in eng.generate(PROMPTS[:2], [SamplingParams(max_tokens=n) for n in LIMITS[:2]])] \
        == want[:2]


def test_a_row_whose_drafting_fails_ends_alone(tiny):
    """With a draft model (the same tiny model, resident: every draft is accepted), a row whose max_tokens was
    turned into a float after submit's checks cannot be drafted for: it ends with a GenerationError, and the
    rows drafted beside it get exactly generate's tokens."""
    m, want = tiny
    draft = AutoModel.from_pretrained(m.store.path, progress=False)
    eng = Engine(m, max_batch=4, draft=draft)
    good = [eng.submit(p, SamplingParams(max_tokens=n)) for p, n in zip(PROMPTS[:3], LIMITS[:3])]
    p = SamplingParams(max_tokens=LIMITS[3])
    bad = eng.submit(PROMPTS[3], p)
    eng.step()
    p.max_tokens = 9.5   # its next draft but one: min(4, 9.5 - 6 - 1) tokens, not a count
    run(eng, good + [bad])
    assert [h.result().token_ids for h in good] == want[:3]
    assert eng.stats["drafted"] > 0 and eng.stats["accepted"] > 0
    with pytest.raises(GenerationError, match="req-3 failed while drafting: TypeError"):
        bad.result()
