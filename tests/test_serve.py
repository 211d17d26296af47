"""`layerstream serve` against the real `openai` client: a uvicorn server on a free port of 127.0.0.1 in this process
(and one started by the command line), greedy replies equal to the library's own `generate`, every error status,
a client that goes away mid-stream, the prefix cache, /metrics."""

import asyncio
import json
import threading
import time

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from layerstream import AutoModel  # noqa: E402
from layerstream.engine.scheduler import Engine  # noqa: E402
from layerstream.server import build_app  # noqa: E402

from conftest import serving, start  # noqa: E402

KEY = "test-key"
CHATS = [[{"role": "user", "content": "What is the capital of France?"}],
         [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a color."}],
         [{"role": "user", "content": "Count to five."}],
         [{"role": "user", "content": "Write a haiku about rain."}]]
TEXT = "The three primary colors are"


@pytest.fixture(scope="module")
def served(embedded_store):
    """The embedded model behind a server (key required, 2 sequences per sweep, 3 waiting at most), and the
    library's own greedy replies, computed before the server starts."""
    m = AutoModel.from_pretrained(embedded_store, progress=False)
    tok = m.tokenizer
    want = {}
    for i, chat in enumerate(CHATS):
        ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt")["input_ids"]
        out = m.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:]
        want[i] = (ids.shape[1], tok.decode(out, skip_special_tokens=True), len(out))
    ids = torch.tensor([tok(TEXT)["input_ids"]])
    out = m.generate(ids, max_new_tokens=10, do_sample=False)[0, ids.shape[1]:]
    want["text"] = (ids.shape[1], tok.decode(out, skip_special_tokens=True), len(out))
    engine = Engine(m, max_batch=2)
    app = build_app(engine, "smol", api_key=KEY, max_queue=3)
    server, thread, port = start(uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")))
    url = f"http://127.0.0.1:{port}"
    yield url, engine, want
    server.should_exit = True
    thread.join(30)
    m.close()


def client(url, key=KEY):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def post(url, path, body, key=KEY, raw=None):
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    return httpx.post(f"{url}{path}", content=raw if raw is not None else json.dumps(body), headers=headers,
                      timeout=120)


def metric(url, name) -> float:
    for line in httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_models_and_health(served):
    url, engine, want = served
    assert [m.id for m in client(url).models.list().data] == ["smol"]
    assert client(url).models.retrieve("smol").id == "smol"
    h = httpx.get(f"{url}/health").json()
    assert h["status"] == "ok" and h["model"] == "smol"


def test_greedy_chat_and_completion_equal_the_library(served):
    url, engine, want = served
    c = client(url)
    for i in (0, 1):
        r = c.chat.completions.create(model="smol", messages=CHATS[i], max_tokens=12, temperature=0)
        prompt_tokens, text, n = want[i]
        assert r.choices[0].message.content == text and r.choices[0].message.role == "assistant"
        assert r.usage.prompt_tokens == prompt_tokens and r.usage.completion_tokens == n
        assert r.usage.total_tokens == prompt_tokens + n
        assert r.choices[0].finish_reason == ("length" if n == 12 else "stop")
        assert r.object == "chat.completion" and r.model == "smol"
    r = c.completions.create(model="smol", prompt=TEXT, max_tokens=10, temperature=0)
    assert r.choices[0].text == want["text"][1] and r.usage.prompt_tokens == want["text"][0]
    assert r.object == "text_completion"


def test_streaming_gives_the_same_text_and_usage(served):
    url, engine, want = served
    chunks = list(client(url).chat.completions.create(model="smol", messages=CHATS[0], max_tokens=12, temperature=0,
                                                      stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == want[0][1]
    assert sum(1 for ch in chunks if ch.choices and ch.choices[0].delta.content) >= 3   # token by token
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == ["length" if want[0][2] == 12 else "stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == want[0][2]
    assert all(ch.usage is None for ch in chunks[:-1])
    pieces = list(client(url).completions.create(model="smol", prompt=TEXT, max_tokens=10, temperature=0,
                                                 stream=True))
    assert "".join(p.choices[0].text for p in pieces) == want["text"][1]
    # the raw stream ends with [DONE]
    with httpx.stream("POST", f"{url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"prompt": TEXT, "max_tokens": 3, "stream": True}) as r:
        lines = [x for x in r.iter_lines() if x]
    assert lines[-1] == "data: [DONE]" and all(x.startswith("data: ") for x in lines)


def test_concurrent_async_clients_share_sweeps(served):
    """Three clients at once with two slots: every reply is the library's, and sweeps carried two sequences.
    (Three, not four: the fixture's --max-queue is 3, and four requests that all arrive before the engine
    admits one would rightly get a 429.)"""
    url, engine, want = served
    seen = engine.stats["max_batch_seen"]
    engine.stats["max_batch_seen"] = 0

    async def main():
        c = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)
        rs = await asyncio.gather(*[c.chat.completions.create(model="smol", messages=chat, max_tokens=12,
                                                              temperature=0) for chat in CHATS[:3]])
        await c.close()
        return rs

    rs = asyncio.run(main())
    assert [r.choices[0].message.content for r in rs] == [want[i][1] for i in range(3)]
    assert engine.stats["max_batch_seen"] == 2
    engine.stats["max_batch_seen"] = max(seen, 2)


def test_a_shared_prefix_is_not_computed_again(served):
    url, engine, want = served
    system = {"role": "system", "content": "You are a helpful assistant who answers in one short sentence. " * 6}
    c = client(url)
    c.chat.completions.create(model="smol", messages=[system, {"role": "user", "content": "Hi"}], max_tokens=2)
    hits, prefill = metric(url, "layerstream_prefix_cache_hit_tokens_total"), \
        metric(url, "layerstream_prefill_tokens_total")
    r = c.chat.completions.create(model="smol", messages=[system, {"role": "user", "content": "Bye"}], max_tokens=2)
    got_hits = metric(url, "layerstream_prefix_cache_hit_tokens_total") - hits
    computed = metric(url, "layerstream_prefill_tokens_total") - prefill
    assert got_hits >= 60 and computed + got_hits == r.usage.prompt_tokens


def test_logprobs_through_the_openai_client(served):
    """Chat's logprobs / top_logprobs and completions' logprobs: one entry per generated token; a greedy token is
    the most likely one (its logprob the first of the top ones); streamed chunks carry the same values; the
    completions tokens add up to the text. Values out of range are 400s."""
    url, engine, want = served
    c = client(url)
    r = c.chat.completions.create(model="smol", messages=CHATS[0], max_tokens=12, temperature=0, logprobs=True,
                                  top_logprobs=2)
    lp = r.choices[0].logprobs.content
    assert r.choices[0].message.content == want[0][1] and len(lp) == r.usage.completion_tokens == want[0][2]
    for e in lp:
        assert len(e.top_logprobs) == 2 and e.logprob == e.top_logprobs[0].logprob and e.logprob <= 0
        assert e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob and e.bytes == list(e.token.encode())
    chunks = c.chat.completions.create(model="smol", messages=CHATS[0], max_tokens=12, temperature=0,
                                       logprobs=True, top_logprobs=2, stream=True)
    streamed = [e for ch in chunks if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 5)) for e in streamed] == [(e.token, round(e.logprob, 5)) for e in lp]
    t = c.completions.create(model="smol", prompt=TEXT, max_tokens=10, temperature=0, logprobs=3)
    tl = t.choices[0].logprobs
    assert t.choices[0].text == want["text"][1] and "".join(tl.tokens).startswith(t.choices[0].text)
    assert len(tl.tokens) == len(tl.token_logprobs) == len(tl.top_logprobs) == want["text"][2]
    assert all(1 <= len(x) <= 3 for x in tl.top_logprobs) and tl.text_offset[0] == 0
    assert all(b - a == len(tok) for a, b, tok in zip(tl.text_offset, tl.text_offset[1:], tl.tokens))
    for body, param in (({"logprobs": "yes"}, "logprobs"), ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
                        ({"top_logprobs": 2}, "top_logprobs")):
        r = post(url, "/v1/chat/completions", {"model": "smol", "messages": CHATS[0], "max_tokens": 2, **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_n_choices_through_the_openai_client(served):
    """n=3 greedy: three identical choices, the library's text, usage counting the prompt once; sampled with a
    seed: reproducible; streamed: each choice's chunks (by index) add up to the non-streamed text."""
    url, engine, want = served
    c = client(url)
    r = c.chat.completions.create(model="smol", messages=CHATS[0], max_tokens=12, temperature=0, n=3)
    assert [x.index for x in r.choices] == [0, 1, 2] and {x.message.content for x in r.choices} == {want[0][1]}
    assert r.usage.prompt_tokens == want[0][0] and r.usage.completion_tokens == 3 * want[0][2]
    kw = dict(model="smol", prompt=TEXT, max_tokens=8, temperature=1.0, seed=5, n=2)
    a, b = (c.completions.create(**kw) for _ in range(2))
    assert [x.text for x in a.choices] == [x.text for x in b.choices]
    texts = ["", ""]
    for ch in c.completions.create(**kw, stream=True):
        for x in ch.choices:
            texts[x.index] += x.text
    assert texts == [x.text for x in a.choices]
    r = post(url, "/v1/completions", {"model": "smol", "prompt": TEXT, "max_tokens": 2, "n": 17})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"


def test_structured_outputs_parse_as_their_schema(served):
    """response_format: the openai client's parse() with a Pydantic model returns a valid object for 20 of 20
    prompts (the tokens held to the schema, engine/constrain.py); json_object gives JSON; a schema that does not
    compile is a 400 naming response_format."""
    from concurrent.futures import ThreadPoolExecutor

    from pydantic import BaseModel, Field

    class City(BaseModel):
        name: str = Field(max_length=24)
        country: str = Field(max_length=24)
        population: int = Field(ge=0, le=100_000_000)   # (unbounded, a 135M model may write digits forever)

    url, engine, want = served
    c = client(url)
    places = ["Paris", "Tokyo", "Lima", "Cairo", "Oslo", "Quito", "Hanoi", "Dakar", "Perth", "Seoul",
              "Rome", "Delhi", "Accra", "Sofia", "Havana", "Kyiv", "Doha", "Minsk", "Lagos", "Bern"]

    def ask(place):
        r = c.beta.chat.completions.parse(model="smol", response_format=City, max_tokens=80, temperature=0,
                                          messages=[{"role": "user", "content": f"Tell me about {place}."}])
        return r.choices[0].message.parsed, r.choices[0].finish_reason

    with ThreadPoolExecutor(3) as pool:   # three, not four: the fixture's --max-queue is 3 (a fourth may get a 429)
        got = list(pool.map(ask, places))
    assert all(isinstance(obj, City) and reason == "stop" for obj, reason in got), got
    r = c.chat.completions.create(model="smol", messages=CHATS[0], max_tokens=120, temperature=0,
                                  response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
    r = post(url, "/v1/chat/completions", {"model": "smol", "messages": CHATS[0], "response_format": bad})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format", r.text
    r = post(url, "/v1/chat/completions", {"model": "smol", "messages": CHATS[0], "response_format": {"type": "yaml"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format", r.text


def test_errors_have_openai_shape_and_status(served):
    url, engine, want = served
    good = {"model": "smol", "messages": CHATS[0], "max_tokens": 2}

    def error(r, status, code=None, param=None):
        assert r.status_code == status, r.text
        e = r.json()["error"]
        assert set(e) == {"message", "type", "param", "code"} and e["message"]
        if code:
            assert e["code"] == code
        if param:
            assert e["param"] == param
        return e

    error(post(url, "/v1/chat/completions", None, raw=b"{not json"), 400, "invalid_json")
    error(post(url, "/v1/chat/completions", [1, 2]), 400)
    error(post(url, "/v1/chat/completions", {**good, "max_tokens": "many"}), 400, param="max_tokens")
    error(post(url, "/v1/chat/completions", {**good, "temperature": "hot"}), 400, param="temperature")
    error(post(url, "/v1/chat/completions", {**good, "messages": "hello"}), 400, param="messages")
    error(post(url, "/v1/chat/completions", {**good, "stream": "yes"}), 400, param="stream")
    error(post(url, "/v1/chat/completions", {**good, "n": 0}), 400, param="n")
    error(post(url, "/v1/completions", {"model": "smol"}), 400, param="prompt")
    error(post(url, "/v1/chat/completions", {**good, "model": 123}), 400, param="model")
    error(post(url, "/v1/chat/completions", {**good, "stop": ""}), 400, param="stop")
    error(post(url, "/v1/chat/completions", {**good, "stream_options": ""}), 400, param="stream_options")
    error(httpx.get(f"{url}/v1/chat/completions"), 405, "method_not_allowed")
    error(httpx.get(f"{url}/v2/nothing"), 404, "not_found")
    assert post(url, "/v1/chat/completions", {**good, "stream": None, "stream_options": None}).status_code == 200
    e = error(post(url, "/v1/completions", {"model": "smol", "prompt": [1] * 8190, "max_tokens": 100}), 400,
              "context_length_exceeded")
    assert "8192" in e["message"] and "8190" in e["message"] and "100" in e["message"]
    error(post(url, "/v1/chat/completions", {**good, "model": "gpt-4"}), 404, "model_not_found", "model")
    error(post(url, "/v1/chat/completions", good, key=None), 401, "invalid_api_key")
    error(post(url, "/v1/chat/completions", good, key="wrong"), 401, "invalid_api_key")
    assert httpx.get(f"{url}/v1/models").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        client(url, key="wrong").chat.completions.create(model="smol", messages=CHATS[0], max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client(url).chat.completions.create(model="nope", messages=CHATS[0], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="context"):
        client(url).completions.create(model="smol", prompt=[1] * 8190, max_tokens=100)
    # still serving after all of that
    assert client(url).chat.completions.create(**good).choices[0].message.content


def test_a_full_queue_answers_429_and_disconnects_free_their_slots(served):
    """Two running and three waiting fill the server: the next request gets 429. Clients that go away mid-stream
    are cancelled at the next step; the server then serves a request as before."""
    url, engine, want = served
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "smol", "prompt": "Once upon a time", "max_tokens": 2000, "stream": True}
    hang_up = threading.Event()
    got = {}

    def hold(i):   # a streaming client that reads until told to hang up
        with httpx.stream("POST", f"{url}/v1/completions", headers=headers, json=body, timeout=120) as r:
            got[i] = [r.status_code]
            for line in r.iter_lines():
                got[i].append(line)
                if hang_up.is_set():
                    return

    def wait(cond):
        for _ in range(1200):
            if cond():
                return True
            time.sleep(0.05)
        return False

    threads = []
    try:
        for i in range(5):
            threads.append(threading.Thread(target=hold, args=(i,), daemon=True))
            threads[-1].start()
            counts = (min(i + 1, 2), max(i - 1, 0))   # (running, waiting)
            assert wait(lambda: (engine.snapshot().running, engine.snapshot().waiting) == counts)
        r = post(url, "/v1/completions", {"model": "smol", "prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
        with pytest.raises(openai.RateLimitError):
            client(url).completions.create(model="smol", prompt="Hi", max_tokens=2)
        assert wait(lambda: len(got.get(0, [])) > 2)   # a running stream sends tokens as they come
    finally:
        hang_up.set()   # every client hangs up mid-stream (the waiting ones once they get their first token)
        for t in threads:
            t.join(120)
    assert all(got[i][0] == 200 for i in range(5))
    for _ in range(600):
        if engine.pending() == 0:
            break
        time.sleep(0.05)
    assert engine.pending() == 0
    assert metric(url, 'layerstream_requests_total{route="completions",status="499"}') >= 5
    r = client(url).chat.completions.create(model="smol", messages=CHATS[0], max_tokens=12, temperature=0)
    assert r.choices[0].message.content == want[0][1]


def test_metrics_in_prometheus_text_format(served):
    url, engine, want = served
    client(url).completions.create(model="smol", prompt=TEXT, max_tokens=2)
    assert httpx.get(f"{url}/metrics").status_code == 401   # behind the key, like /v1
    r = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert metric(url, 'layerstream_requests_total{route="completions",status="200"}') >= 1
    assert metric(url, "layerstream_completion_tokens_total") >= 2
    assert metric(url, "layerstream_sweeps_total") >= 2
    assert metric(url, "layerstream_queue_waiting") == 0
    assert metric(url, "layerstream_tokens_per_second") > 0
    assert "layerstream_time_to_first_token_seconds_bucket" in r.text


@pytest.mark.slow
def test_the_command_starts_serves_and_stops_on_ctrl_c(embedded_store):
    """`layerstream serve --port 0 --draft int4`: says what it loads, then the URL; answers, with drafted tokens
    verified in its sweeps; Ctrl-C stops it with status 0."""
    with serving("--model", embedded_store, "--max-ram", "0", "--threads", "1", "--draft", "int4") as (url, out):
        lines = out["lines"]
        assert url.startswith("http://127.0.0.1:"), "".join(lines)
        assert any("ready:" in x for x in lines) and any("KV budget" in x for x in lines)
        r = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0).completions.create(
            model=client_model(url), prompt="Hello", max_tokens=12, temperature=0)
        assert r.usage.completion_tokens == 12
        assert metric(url, "layerstream_draft_tokens_total") > 0
        assert metric(url, "layerstream_draft_accepted_tokens_total") > 0
        assert "<title>" in httpx.get(f"{url}/").text
    assert out["code"] == 0, "".join(out["lines"]) + out["rest"]
    assert "stopped" in out["rest"]


def client_model(url) -> str:
    return httpx.get(f"{url}/v1/models").json()["data"][0]["id"]


def test_the_command_refuses_bad_options():
    from conftest import run_cli

    r = run_cli("serve", "--max-concurrency", "0")
    assert r.returncode == 1 and "--max-concurrency" in r.stderr
    r = run_cli("serve", "--port", "70000")
    assert r.returncode == 1 and "--port" in r.stderr
    r = run_cli("serve", "--ray", "127.0.0.1:6379")   # the cluster of a pipeline: needs --pipeline N
    assert r.returncode == 1 and "--ray needs --pipeline N" in r.stderr
    r = run_cli("batch", __file__, "out.jsonl", "--pipeline", "2", "--ray", "--replicas", "2")
    assert r.returncode == 1 and "--replicas is for replicas" in r.stderr
