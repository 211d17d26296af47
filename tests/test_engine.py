"""The step API, the continuous-batching engine and speculative decoding, against transformers' `generate`."""

import threading

import pytest
import torch

from layerstream import AutoModel
from layerstream.engine.scheduler import Engine, SamplingParams
from layerstream.engine.step import eos_ids, generate_step
from layerstream.errors import InputError

from conftest import make_model_dir

PROMPTS = [[1, 5, 9, 13], [1, 7, 3, 99, 45, 12, 8, 64, 33, 2], [1, 20], [1, 77, 78, 79, 80, 81],
           [1, 30, 31, 32, 33, 34, 35, 36, 37], [1, 100, 101]]
LIMITS = [3, 12, 7, 12, 2, 9]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama, every layer streamed (max_ram=0), and its greedy tokens from transformers' generate."""
    d = tmp_path_factory.mktemp("tiny")
    src = make_model_dir(d / "src", "llama", layers=4)
    m = AutoModel.from_pretrained(src, max_ram=0, store_path=d / "store", progress=False)
    want = [m.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False)[0, len(p):].tolist()
            for p, n in zip(PROMPTS, LIMITS)]
    return src, m, want


@pytest.fixture(params=[True, False], ids=["slabs", "masked"])
def paged(request):
    """Both KV paths: per-sequence slabs (engine/kv.py, the default of paged families) and the shared masked
    cache (families that cannot page)."""
    return request.param


def test_generate_step_gives_generate_tokens(tiny):
    src, m, want = tiny
    for p, n, w in zip(PROMPTS, LIMITS, want):
        m.profiler.reset()
        assert list(generate_step(m, p, n, eos_token_ids=eos_ids(m))) == w
        assert m.profiler.sweeps == len(w)   # the prompt's sweep makes the first token, one sweep per token after


def test_requests_join_and_leave_sharing_sweeps(tiny, paged):
    """Six requests, three slots: a finished request leaves and a waiting one joins at the next step; every
    request gets exactly generate's greedy tokens, and each step is one sweep for all the rows in it."""
    src, m, want = tiny
    eng = Engine(m, paged=paged, max_batch=3, prefix_cache=0)
    m.profiler.reset()
    out = eng.generate(PROMPTS, [SamplingParams(max_tokens=n) for n in LIMITS])
    assert [c.token_ids for c in out] == want
    assert [c.finish_reason for c in out] == ["length" if len(w) == n else "stop" for w, n in zip(want, LIMITS)]
    assert [c.prompt_tokens for c in out] == [len(p) for p in PROMPTS]
    assert eng.stats["max_batch_seen"] == 3
    assert m.profiler.sweeps == eng.stats["steps"]
    # static batches of 3 would take 12 + 12 sweeps; joining as slots free up takes fewer
    assert eng.stats["steps"] < sum(max(len(w) for w in want[i:i + 3]) for i in (0, 3))
    # packed, not padded: the first sweep computes the three prompts' tokens, a decode sweep one token per row
    assert m.profiler.sweep_tokens[0] == sum(len(p) for p in PROMPTS[:3])
    assert m.profiler.sweep_tokens[1] == 3
    now = eng.snapshot()
    assert now.kv_tokens == 0 and now.running == 0 and now.waiting == 0


def test_requests_wait_while_the_kv_budget_is_full(tiny, paged):
    """A KV budget that holds the largest request alone: the others wait (never dropped), the cache never
    outgrows the budget, and all finish, correct."""
    src, m, want = tiny
    per = Engine(m).kv_per_token
    one = max(len(p) + n for p, n in zip(PROMPTS, LIMITS)) * per
    eng = Engine(m, paged=paged, max_batch=4, kv_budget=one)
    out = eng.generate(PROMPTS, [SamplingParams(max_tokens=n) for n in LIMITS])
    assert [c.token_ids for c in out] == want
    assert eng.stats["kv_peak_tokens"] * per <= one
    assert eng.stats["max_batch_seen"] < 4
    roomy = Engine(m, paged=paged, max_batch=4)
    roomy.generate(PROMPTS, [SamplingParams(max_tokens=n) for n in LIMITS])
    assert roomy.stats["max_batch_seen"] == 4 and roomy.stats["kv_peak_tokens"] * per > one
    with pytest.raises(InputError, match="KV budget"):
        eng.submit(list(range(1, 100)), SamplingParams(max_tokens=100))


SYSTEM = [1] + list(range(40, 70))    # a 31-token "system prompt" shared by the prompts below


def greedy(m, prompt, n):
    return m.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)[0, len(prompt):].tolist()


def test_prefix_cache_reuses_a_shared_prompt_prefix(tiny, paged):
    """Requests that share a system prompt with a finished one borrow its cache columns: they compute only
    their own tokens, and every request still gets generate's greedy tokens."""
    src, m, want = tiny
    prompts = [SYSTEM + [5, 6, 7], SYSTEM + [8, 9], SYSTEM + [10, 11, 12, 13], SYSTEM + [5, 6, 7]]
    expect = [greedy(m, p, 6) for p in prompts]
    eng = Engine(m, paged=paged, max_batch=4)
    assert eng.prefix_budget > 0
    first = eng.generate(prompts[:1], SamplingParams(max_tokens=6))
    assert first[0].token_ids == expect[0] and eng.stats["prefill_tokens"] == len(prompts[0])
    assert eng.snapshot().prefix_entries == 1   # the finished request stays in the prefix cache
    rest = eng.generate(prompts[1:], SamplingParams(max_tokens=6))
    assert [c.token_ids for c in rest] == expect[1:]
    # the three later prompts computed only what follows the shared part (the repeated one: its last token)
    assert eng.stats["prefix_hit_tokens"] == len(SYSTEM) * 2 + len(prompts[3]) - 1
    assert eng.stats["prefill_tokens"] == len(prompts[0]) + 2 + 4 + 1
    off = Engine(m, paged=paged, max_batch=4, prefix_cache=0)
    assert [c.token_ids for c in off.generate(prompts, SamplingParams(max_tokens=6))] == expect
    assert off.stats["prefill_tokens"] == sum(map(len, prompts)) and off.stats["prefix_hit_tokens"] == 0


def test_simultaneous_requests_with_one_prefix_compute_it_once(tiny, paged):
    """Eight requests that arrive together with the same system prompt: the first computes it, the others wait
    one step and borrow it."""
    src, m, want = tiny
    prompts = [SYSTEM + [10 + i, 20 + i] for i in range(8)]
    expect = [greedy(m, p, 4) for p in prompts]
    eng = Engine(m, paged=paged, max_batch=8)
    out = eng.generate(prompts, SamplingParams(max_tokens=4))
    assert [c.token_ids for c in out] == expect
    assert eng.stats["prefill_tokens"] == len(prompts[0]) + 7 * 2
    assert eng.stats["max_batch_seen"] == 8


def test_a_later_chat_turn_borrows_the_earlier_turn_and_its_reply(tiny, paged):
    """A follow-up whose prompt is the earlier prompt, the reply and more borrows both (a chain of borrowings),
    and stays correct after the first entry is evicted."""
    src, m, want = tiny
    eng = Engine(m, paged=paged, max_batch=2)
    p1 = SYSTEM + [5, 6, 7]
    r1 = eng.generate([p1], SamplingParams(max_tokens=5))[0].token_ids
    p2 = p1 + r1 + [90, 91, 92]
    r2 = eng.generate([p2], SamplingParams(max_tokens=5))[0]
    assert r2.token_ids == greedy(m, p2, 5)
    assert eng.stats["prefill_tokens"] == len(p1) + 3 + 1   # the first reply's last token was never fed back
    p3 = p2 + r2.token_ids + [93, 94]
    assert eng.evict_prefix(1) == 1   # evict the first turn: the second still holds the columns it lent
    r3 = eng.generate([p3], SamplingParams(max_tokens=5))[0]
    assert r3.token_ids == greedy(m, p3, 5)


def test_the_prefix_cache_stays_within_its_budget(tiny, paged):
    """Finished requests are kept least recently used first while they fit the prefix budget; older ones are
    evicted, results stay exact."""
    src, m, want = tiny
    per = Engine(m).kv_per_token
    eng = Engine(m, paged=paged, max_batch=2, prefix_cache=60 * per)
    prompts = [[1] + list(range(20 + 20 * i, 40 + 20 * i)) for i in range(5)]
    for p in prompts:
        assert eng.generate([p], SamplingParams(max_tokens=4))[0].token_ids == greedy(m, p, 4)
        assert eng.snapshot().prefix_bytes <= 60 * per
    assert 1 <= eng.snapshot().prefix_entries <= 2
    again = eng.generate([prompts[-1][:-1] + [7]], SamplingParams(max_tokens=4))[0]
    assert again.token_ids == greedy(m, prompts[-1][:-1] + [7], 4)
    assert eng.stats["prefix_hit_tokens"] == len(prompts[-1]) - 1


def test_seeded_sampling_does_not_depend_on_the_batch(tiny, paged):
    src, m, want = tiny
    sp = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.95, seed=7)
    alone = Engine(m, paged=paged, max_batch=1).generate([PROMPTS[1]], [sp])[0].token_ids
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[1]]
    batch = Engine(m, paged=paged, max_batch=4).generate(
        prompts, [SamplingParams(max_tokens=5, temperature=1.0, seed=1), sp, SamplingParams(max_tokens=3), sp])
    assert batch[1].token_ids == alone and batch[3].token_ids == alone
    other = Engine(m, paged=paged, max_batch=1).generate(
        [PROMPTS[1]], [SamplingParams(max_tokens=8, temperature=0.9, seed=8)])
    assert other[0].token_ids != alone


def test_penalized_greedy_requests_give_generates_tokens_beside_plain_ones(tiny, paged):
    """A greedy request with a repetition penalty gets transformers' `generate(repetition_penalty=...)` tokens,
    whatever shares its sweeps; sampled ones with top_k / min_p are seeded reproducibly; OpenAI's penalties
    change the tokens of a request that repeats."""
    src, m, want = tiny
    p, n = PROMPTS[1], 12
    ref = m.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False, repetition_penalty=1.5)[0, len(p):].tolist()
    assert ref != want[1]   # the penalty changes this prompt's greedy tokens
    out = Engine(m, paged=paged, max_batch=3).generate([PROMPTS[0], p, PROMPTS[2]],
                                          [SamplingParams(max_tokens=LIMITS[0]),
                                           SamplingParams(max_tokens=n, repetition_penalty=1.5),
                                           SamplingParams(max_tokens=LIMITS[2])])
    assert out[1].token_ids == ref
    assert out[0].token_ids == want[0] and out[2].token_ids == want[2]
    sp = SamplingParams(max_tokens=8, temperature=0.9, top_k=5, min_p=0.1, seed=3)
    a, b = (Engine(m, paged=paged, max_batch=2).generate([p, PROMPTS[0]], [sp, SamplingParams(max_tokens=4)])[0]
            .token_ids for _ in range(2))
    assert a == b
    freq = Engine(m, paged=paged, max_batch=1).generate([p], [SamplingParams(max_tokens=n, frequency_penalty=2.0,
                                                                presence_penalty=2.0)])[0].token_ids
    assert len(set(freq)) > len(set(want[1]))   # fewer repeats than plain greedy


def test_logprobs_are_the_models_log_softmax(tiny, paged):
    """SamplingParams(logprobs=k): each generated token's log-probability and the k most likely tokens at its
    position are log_softmax of the model's own logits there (1e-4), whatever shares the sweep; the deltas carry
    them as they come."""
    src, m, want = tiny
    eng = Engine(m, paged=paged, max_batch=3)
    out = eng.generate(PROMPTS[:3], [SamplingParams(max_tokens=6, logprobs=3), SamplingParams(max_tokens=4),
                                     SamplingParams(max_tokens=5, temperature=0.8, seed=2, logprobs=0)])
    assert out[1].logprobs is None
    for p, c, k in ((PROMPTS[0], out[0], 3), (PROMPTS[2], out[2], 0)):
        ids = torch.tensor([p + c.token_ids])
        ref = torch.log_softmax(m(ids).logits[0].float(), -1)[len(p) - 1:-1]   # the positions that chose them
        assert len(c.logprobs) == len(c.token_ids) == len(ref)
        for e, tok, row in zip(c.logprobs, c.token_ids, ref):
            assert e.token_id == tok and abs(e.logprob - float(row[tok])) < 1e-4
            assert [i for i, _, _ in e.top] == row.topk(k).indices.tolist() if k else e.top == []
            assert all(abs(v - float(row[i])) < 1e-4 for i, _, v in e.top)
    eng.start()
    try:
        h = eng.submit(PROMPTS[0], SamplingParams(max_tokens=6, logprobs=3))
        streamed = [e for d in h.stream(timeout=120) for e in d.logprobs]
    finally:
        eng.stop()
    assert [(e.token_id, round(e.logprob, 4)) for e in streamed] == \
        [(e.token_id, round(e.logprob, 4)) for e in out[0].logprobs]
    with pytest.raises(InputError, match="logprobs"):
        SamplingParams(logprobs=21)


def test_n_choices_share_the_prompt_and_are_seeded_one_by_one(tiny, paged):
    """SamplingParams(n=4): four choices of one request; greedy ones are generate's tokens, the prompt's KV is
    computed once (the other choices start from it); sampled choice i is a request seeded seed + i alone; a
    cancel stops every choice."""
    src, m, want = tiny
    prompt = PROMPTS[1]   # 10 tokens: enough to share
    eng = Engine(m, paged=paged, max_batch=4)
    h = eng.submit(prompt, SamplingParams(max_tokens=6, n=4))
    while not h.done:
        eng.step()
    cs = h.results()
    assert [c.token_ids for c in cs] == [greedy(m, prompt, 6)] * 4 and h.result() is cs[0]
    assert eng.stats["prefill_tokens"] == len(prompt) + 3   # three choices compute only the prompt's last token
    sp = SamplingParams(max_tokens=6, temperature=0.9, seed=11, n=3)
    got = [c.token_ids for c in eng.generate([prompt], [sp])]
    h = eng.submit(prompt, sp)
    while not h.done:
        eng.step()
    many = [c.token_ids for c in h.results()]
    alone = [Engine(m, paged=paged).generate([prompt], [SamplingParams(max_tokens=6, temperature=0.9,
                                                                       seed=11 + i)])[0].token_ids for i in range(3)]
    assert many == alone and got[0] == alone[0] and len(set(map(tuple, many))) > 1
    h = eng.submit(prompt, SamplingParams(max_tokens=50, n=3))
    eng.step()
    eng.cancel(h.request_id)
    eng.step()
    assert h.done and [c.finish_reason for c in h.results()] == ["cancelled"] * 3
    with pytest.raises(InputError, match="n must be"):
        SamplingParams(n=0)


def test_bad_requests_are_refused(tiny):
    src, m, want = tiny
    eng = Engine(m)
    for bad in (dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(stop=[""])):
        with pytest.raises(InputError):
            SamplingParams(**bad)
    with pytest.raises(InputError, match="empty"):
        eng.submit([])
    with pytest.raises(InputError, match="context is 256 tokens; the prompt has 250 and max_tokens asks for 10"):
        eng.submit([1] * 250, SamplingParams(max_tokens=10))


def test_engine_thread_streams_and_cancels(tiny, paged):
    """On its own thread (as a server runs it): concurrent submitters, deltas as they come, a cancelled request
    frees its slot and ends with finish_reason 'cancelled'."""
    src, m, want = tiny
    eng = Engine(m, paged=paged, max_batch=4)
    eng.start()
    try:
        results = {}

        def client(i):
            h = eng.submit(PROMPTS[i], SamplingParams(max_tokens=LIMITS[i]))
            toks = [t for d in h.stream(timeout=60) for t in d.token_ids]
            results[i] = (toks, h.result(timeout=60))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        long = eng.submit([1, 2, 3], SamplingParams(max_tokens=200))
        next(long.stream(timeout=60))
        eng.cancel(long.request_id)
        assert long.result(timeout=60).finish_reason == "cancelled"
        for t in threads:
            t.join(60)
        for i in range(4):
            toks, c = results[i]
            assert toks == c.token_ids == want[i]
    finally:
        eng.stop()


def test_sliding_window_families_batch_on_slabs_and_run_alone_without(tmp_path):
    """Gemma 2's sliding-window layers (a window of 8 here, shorter than prompt and reply) and softcapped
    attention cannot share one masked cache, but each sequence's own slab batches them: generate's tokens, several
    rows a sweep. Without slabs the engine serves them one request at a time, with the same tokens."""
    src = make_model_dir(tmp_path / "src", "gemma2", layers=2)
    m = AutoModel.from_pretrained(src, max_ram=0, store_path=tmp_path / "store", progress=False)
    want = [m.generate(torch.tensor([p]), max_new_tokens=5, do_sample=False)[0, len(p):].tolist() for p in PROMPTS[:3]]
    eng = Engine(m, max_batch=4)
    assert eng.kv_layout == "slabs"
    out = eng.generate(PROMPTS[:3], SamplingParams(max_tokens=5))
    assert [c.token_ids for c in out] == want and eng.stats["max_batch_seen"] == 3
    # the model's own attention is untouched outside the engine's sweeps
    assert m.config._attn_implementation == "eager" and greedy(m, PROMPTS[1], 5) == want[1]
    alone = Engine(m, max_batch=4, paged=False)
    assert alone.kv_layout == "alone"
    out = alone.generate(PROMPTS[:3], SamplingParams(max_tokens=5))
    assert [c.token_ids for c in out] == want and alone.stats["max_batch_seen"] == 1


@pytest.mark.slow
def test_stop_strings_and_streamed_text(embedded_store):
    """A stop string ends the request where it first appears (not included); the streamed text pieces add up
    to the completion's text."""
    m = AutoModel.from_pretrained(embedded_store, progress=False)
    tok = m.tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": "Write a short poem about the sea."}],
                                  add_generation_prompt=True, return_tensors="pt")["input_ids"][0]
    eng = Engine(m)
    full = eng.generate([ids], SamplingParams(max_tokens=24))[0]
    assert full.text == tok.decode(full.token_ids, skip_special_tokens=True) and len(full.text) > 20
    stop = full.text[10:14]
    cut = full.text[:full.text.find(stop)]
    eng.start()
    try:
        h = eng.submit(ids, SamplingParams(max_tokens=24, stop=[stop, "zzzz"]))
        pieces = [d.text for d in h.stream(timeout=120)]
        c = h.result()
    finally:
        eng.stop()
    assert c.text == cut and "".join(pieces) == cut and c.finish_reason == "stop"


def test_int4_draft_gives_plain_greedy_tokens_in_fewer_sweeps(tmp_path):
    """draft="int4": a resident int4 copy drafts, one streamed sweep verifies several tokens; greedy output is
    plain decoding's, and last_stats counts sweeps, drafted and accepted tokens."""
    src = make_model_dir(tmp_path / "src", "llama", layers=4, tie=True)
    plain = AutoModel.from_pretrained(src, max_ram=0, store_path=tmp_path / "store", progress=False)
    m = AutoModel.from_pretrained(src, max_ram=0, store_path=tmp_path / "store", progress=False, draft="int4")
    assert m.draft is not None and not m.draft.plan.streamed and m.draft.store.manifest.quantization == "int4"
    ids = torch.tensor([PROMPTS[1]])
    want = plain.generate(ids, max_new_tokens=24, do_sample=False)
    assert plain.last_stats["sweeps"] == want.shape[1] - ids.shape[1]
    got = m.generate(ids, max_new_tokens=24, do_sample=False)
    s = m.last_stats
    assert got.tolist() == want.tolist()
    assert s["drafted"] > 0 and s["sweeps"] < s["new_tokens"] and s["tokens_per_sweep"] > 1
    assert s["accepted"] == s["new_tokens"] - s["sweeps"] and s["accepted"] <= s["drafted"]
    assert max(m.profiler.sweep_tokens[1:]) > 1   # a sweep verified several drafted tokens at once
    # opened from its store, the int4 draft is still made from the checkpoint the store came from
    from_store = AutoModel.from_pretrained(tmp_path / "store", max_ram=0, progress=False, draft="int4")
    assert from_store.draft.store.manifest.quantization == "int4"


def test_the_engine_verifies_int4_drafts_in_its_sweeps(tmp_path, paged):
    """A model opened with draft="int4" behind the engine: greedy rows get drafted tokens verified in the shared
    sweep (several tokens per sweep), sampled rows decode as before, and every greedy row gets plain decoding's
    tokens, alone or two at a time, with stop conditions inside an accepted run honoured."""
    src = make_model_dir(tmp_path / "src", "llama", layers=4, tie=True)
    plain = AutoModel.from_pretrained(src, max_ram=0, store_path=tmp_path / "store", progress=False)
    prompts = [PROMPTS[1], PROMPTS[3], PROMPTS[0]]
    want = [greedy(plain, p, 20) for p in prompts]
    m = AutoModel.from_pretrained(src, max_ram=0, store_path=tmp_path / "store", progress=False, draft="int4")
    alone = Engine(m, paged=paged, max_batch=1)
    assert alone.draft is m.draft
    out = alone.generate(prompts, SamplingParams(max_tokens=20))
    assert [c.token_ids for c in out] == want
    s = alone.stats
    assert s["accepted"] > 0 and s["accepted"] <= s["drafted"] and s["steps"] < s["tokens"]
    two = Engine(m, paged=paged, max_batch=2)
    out = two.generate(prompts + [PROMPTS[2]], [SamplingParams(max_tokens=20)] * 3 +
                       [SamplingParams(max_tokens=20, temperature=1.0, seed=3)])
    assert [c.token_ids for c in out[:3]] == want and len(out[3].token_ids) == 20
    assert two.stats["accepted"] > 0 and two.stats["max_batch_seen"] == 2
    short = Engine(m, paged=paged, max_batch=1).generate([prompts[0]], SamplingParams(max_tokens=7))[0]
    assert short.token_ids == want[0][:7] and short.finish_reason == "length"
    off = Engine(m, paged=paged, max_batch=1, draft_rows=0)
    assert [c.token_ids for c in off.generate(prompts, SamplingParams(max_tokens=20))] == want
    assert off.stats["drafted"] == 0


def test_prompt_lookup_verifies_copied_tokens_in_one_sweep(tiny):
    src, m, want = tiny
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 5, 9, 13, 17, 21, 5, 9, 13]])
    plain = m.generate(ids, max_new_tokens=16, do_sample=False)
    got = m.generate(ids, max_new_tokens=16, do_sample=False, prompt_lookup_num_tokens=5)
    assert got.tolist() == plain.tolist()
    assert m.last_stats["drafted"] > 0 and m.last_stats["sweeps"] <= m.last_stats["new_tokens"]


def test_prefill_and_decode_step_keep_the_cache_in_place(tiny):
    """The step API's cache is `growing_cache`'s (a decode step writes its keys and values in place): the same
    logits, step by step, as transformers' DynamicCache, which concatenates the whole cache each step."""
    from transformers import DynamicCache

    from layerstream.engine.step import GROW, decode_step, growing_layer_class, prefill

    src, m, want = tiny
    ids = torch.tensor([PROMPTS[0]])
    got, cache = prefill(m, ids)
    ref, ref_cache = prefill(m, ids, DynamicCache(config=m.config))
    assert all(type(layer) is growing_layer_class() for layer in cache.layers)
    assert torch.equal(got, ref)
    kbuf = cache.layers[0]._kbuf
    for _ in range(3):
        tok = got.argmax(-1)
        got, ref = decode_step(m, tok, cache), decode_step(m, tok, ref_cache)
        assert torch.equal(got, ref)
    assert cache.layers[0]._kbuf is kbuf and kbuf.shape[-2] >= GROW   # written in place, not grown
    assert cache.get_seq_length() == ref_cache.get_seq_length() == ids.shape[1] + 3
