"""The server under hostile and careless clients (issue 23): every bad request gets an OpenAI-shaped JSON error
while innocent `openai` clients beside it all succeed; /health stays responsive through a 50 MB body; slow
clients are cut off; SIGTERM and SIGINT end every request in flight with an answer, an error event + [DONE] or
a 503, and exit 0. A real uvicorn server on 127.0.0.1 (in this process, and started by the command line)."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from layerstream import AutoModel  # noqa: E402
from layerstream.engine.scheduler import Engine  # noqa: E402
from layerstream.server.app import build_app, make_server  # noqa: E402

from conftest import start  # noqa: E402

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
JSON = {**AUTH, "Content-Type": "application/json"}
READ_TIMEOUT = 1.5
CHAT = [{"role": "user", "content": "Name a color."}]


@pytest.fixture(scope="module")
def hardened(embedded_store):
    """The embedded model behind `make_server` (key required, 4 sequences per sweep, a 64 MiB body cap, a 1.5 s
    read timeout), in a thread: (url, port, model, app)."""
    m = AutoModel.from_pretrained(embedded_store, progress=False)
    app = build_app(Engine(m, max_batch=4), "smol", api_key=KEY, max_body_bytes=64 << 20, read_timeout=READ_TIMEOUT)
    server, thread, port = start(make_server(app, port=0, read_timeout=READ_TIMEOUT, shutdown_timeout=5))
    yield f"http://127.0.0.1:{port}", port, m, app
    server.should_exit = True
    thread.join(30)
    m.close()


def error(r, status, code=None, param=None):
    """`r` is a JSON error in OpenAI's shape with this status (and code, param)."""
    assert r.status_code == status, r.text[:300]
    assert r.headers["content-type"] == "application/json", r.headers
    e = r.json()["error"]
    assert set(e) == {"message", "type", "param", "code"} and e["message"]
    if code:
        assert e["code"] == code, e
    if param:
        assert e["param"] == param, e
    return e


def raw(port, head: bytes, trickle: bytes = b"", every: float = 0.2, limit: float = 15.0):
    """Send `head` on a new connection, then `trickle` every `every` s, until the server closes it: (seconds
    until closed, what came back)."""
    t0 = time.perf_counter()
    got = b""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(head)
        s.settimeout(every)
        while time.perf_counter() - t0 < limit:
            try:
                b = s.recv(65536)
            except socket.timeout:
                try:
                    if trickle:
                        s.sendall(trickle)
                except OSError:
                    break
                continue
            except ConnectionResetError:
                break
            if not b:
                break
            got += b
    return time.perf_counter() - t0, got


def raw_json(got: bytes):
    """(status, JSON body) of a raw HTTP/1.1 response."""
    head, _, body = got.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), head
    return int(head.split()[1]), json.loads(body)


def test_health_answers_throughout_a_50_mb_request(hardened):
    """A 50 MB prompt (under this server's 64 MiB cap) is read, parsed and refused off the event loop: /health,
    polled meanwhile, answers each time within 1.5 s; the prompt is refused as longer than the context could
    hold, before it is tokenized."""
    url, port, m, app = hardened
    body = json.dumps({"model": "smol", "prompt": "word " * 10_000_000}).encode()
    assert len(body) > 50_000_000
    got = {}

    def big():
        got["r"] = httpx.post(f"{url}/v1/completions", content=body, headers=JSON, timeout=120)

    t = threading.Thread(target=big)
    t.start()
    waits = []
    with httpx.Client(timeout=30) as http:
        while t.is_alive() or not waits:
            t0 = time.perf_counter()
            assert http.get(f"{url}/health").status_code == 200
            waits.append(time.perf_counter() - t0)
            time.sleep(0.05)
    t.join()
    e = error(got["r"], 400, "context_length_exceeded", "prompt")
    assert "50000000 characters" in e["message"]
    assert max(waits) < 1.5, waits


def test_slow_clients_are_cut_off(hardened):
    """A connection that sends nothing, one that trickles its request head a byte at a time, and one that
    trickles its body are each closed within the 1.5 s read timeout (the last after a 408 in JSON)."""
    url, port, m, app = hardened
    seconds, got = raw(port, b"")
    assert got == b"" and seconds < 5
    seconds, got = raw(port, b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n", trickle=b"X")
    assert got == b"" and 1 < seconds < 5
    seconds, got = raw(port, b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                             b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 1000\r\n\r\n{",
                       trickle=b" ")
    assert 1 < seconds < 5
    status, body = raw_json(got)
    assert status == 408 and body["error"]["code"] == "request_timeout"
    assert httpx.get(f"{url}/health").status_code == 200


def test_idle_keep_alive_connections_last_the_read_timeout(hardened):
    """An idle keep-alive connection is closed `--read-timeout` after its last response, not at uvicorn's 5 s:
    those equal httpx's pool expiry (the openai client's), and a client reusing a connection as the server closes
    it gets a reset. A server with a 5.6 s timeout: a connection idle 5.2 s still answers; idle 5.6 s more, closed."""
    url, port, m, _ = hardened
    app = build_app(Engine(m, max_batch=2), "smol", api_key=KEY, read_timeout=5.6)   # its own: a stop drains it
    server, thread, port = start(make_server(app, port=0, read_timeout=5.6, shutdown_timeout=1))
    get = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            for wait in (0, 5.2):
                time.sleep(wait)
                s.sendall(get)
                got = b""
                while b"\r\n\r\n" not in got or len(got.split(b"\r\n\r\n", 1)[1]) < int(
                        got.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0]):
                    chunk = s.recv(65536)
                    assert chunk, (wait, got)   # not closed before the whole answer
                    got += chunk
                assert got.startswith(b"HTTP/1.1 200"), (wait, got)
            t0 = time.perf_counter()
            assert s.recv(65536) == b""   # closed by the server
            assert 5.2 < time.perf_counter() - t0 < 8.5
    finally:
        server.should_exit = True
        thread.join(30)


def test_hostile_requests_beside_innocent_clients(hardened):
    """Each class of hostile request gets its JSON error (the field named where there is one) while three
    innocent openai clients (chat, streamed chat, completions) run beside them: every innocent request succeeds
    (its text non-empty). Harmless defaults of the refused fields are accepted; a tiny temperature is greedy."""
    url, port, m, app = hardened
    c = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)
    stop, failures, counts = threading.Event(), [], [0, 0, 0]

    def chat():
        return c.chat.completions.create(model="smol", messages=CHAT, max_tokens=3, temperature=0) \
            .choices[0].message.content

    def streamed():
        return "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
            model="smol", messages=CHAT, max_tokens=3, temperature=0, stream=True))

    def text():
        return c.completions.create(model="smol", prompt="The sky is", max_tokens=3, temperature=0).choices[0].text

    def innocent(k, fn):
        while not stop.is_set():
            try:
                assert fn()   # not compared with a reference: sweeps of other sizes may round near-ties otherwise
                counts[k] += 1
            except Exception as e:   # noqa: BLE001 - recorded, asserted below
                failures.append(f"{fn.__name__}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=innocent, args=(k, fn)) for k, fn in enumerate((chat, streamed, text))]
    for t in threads:
        t.start()
    good = {"model": "smol", "prompt": "Hello", "max_tokens": 2}
    hi = {"model": "smol", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}

    def post(body=None, raw_body=None, path="/v1/completions", headers=JSON):
        content = raw_body if raw_body is not None else json.dumps(body).encode()
        return http.post(f"{url}{path}", content=content, headers=headers, timeout=120)

    http = httpx.Client(timeout=120)
    try:
        # cross-site: a body that is not declared JSON, another site's Host, no key
        error(post(good, headers={**AUTH, "Content-Type": "text/plain"}), 415, "unsupported_media_type")
        error(post(good, headers={**AUTH, "Content-Type": "application/x-www-form-urlencoded"}), 415)
        error(post(good, headers=AUTH), 415, "unsupported_media_type")
        error(post(good, headers={**JSON, "Host": f"rebound.example:{port}"}), 400, "invalid_host")
        error(http.get(f"{url}/v1/models", headers={**AUTH, "Host": "rebound.example"}), 400, "invalid_host")
        error(post(good, headers={"Content-Type": "application/json"}), 401, "invalid_api_key")
        error(http.get(f"{url}/metrics"), 401, "invalid_api_key")
        error(http.get(f"{url}/openapi.json"), 404, "not_found")
        assert http.get(f"{url}/metrics", headers=AUTH).status_code == 200
        # size: declared too large (nothing read), and streamed past the cap
        status, body = raw_json(raw(port, b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                                          b"application/json\r\nAuthorization: Bearer " + KEY.encode()
                                          + b"\r\nContent-Length: 100000000\r\n\r\n{")[1])
        assert status == 413 and body["error"]["code"] == "request_too_large"
        error(post(raw_body=iter([b" " * (1 << 20)] * 65)), 413, "request_too_large")
        # bodies that crashed the parser
        error(post(raw_body=b"[" * 100_000 + b"]" * 100_000), 400, "invalid_json")
        error(post(raw_body=b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"), 400, "invalid_json")
        error(post(raw_body=b'{"prompt": "\xff\xfe"}'), 400, "invalid_json")
        error(post(raw_body=b'{"model": "smol", "prompt": "a\\ud800b"}'), 400, "invalid_value", "prompt")
        error(post(raw_body=b'{"messages": [{"role": "user", "content": "\\udc00"}]}', path="/v1/chat/completions"),
              400, "invalid_value", "messages[0].content")
        error(post(raw_body=b'{"prompt": "a", "stop": ["\\ud800"]}'), 400, "invalid_value", "stop[0]")
        error(post(raw_body=b'{"model": "\\ud800", "prompt": "a"}'), 404, "model_not_found", "model")
        error(post({**good, "prompt": "a" * 300_000}), 400, "context_length_exceeded", "prompt")
        error(post({**hi, "messages": [{"role": "user", "content": "a" * 300_000}]}, path="/v1/chat/completions"),
              400, "context_length_exceeded", "messages")
        for value in (b"Infinity", b"-Infinity", b"NaN", b"1e400", b"-1"):
            error(post(raw_body=b'{"prompt": "a", "max_tokens": 2, "temperature": ' + value + b"}"), 400,
                  "invalid_value", "temperature")
        # OpenAI fields not honoured (tools: on completions; chat takes them, tests/test_tools.py): refused by name
        for field, value in (("tool_choice", "auto"),
                             ("tools", [{"type": "function", "function": {"name": "f"}}]),
                             ("functions", [{"name": "f"}]),
                             ("logit_bias", {"50256": -100}),
                             ("best_of", 2), ("echo", True), ("suffix", "!")):
            e = error(post({**good, field: value}), 400, "unsupported_parameter", field)
            assert "not supported" in e["message"] and field in e["message"]
        # sampling fields we honour, out of range
        for field, value in (("frequency_penalty", 3), ("presence_penalty", -2.5), ("top_k", -2), ("top_k", 1.5),
                             ("min_p", 1), ("repetition_penalty", 0), ("top_p", 0), ("logprobs", True),
                             ("logprobs", 21), ("top_logprobs", 3), ("response_format", {"type": "yaml"}),
                             ("response_format", {"type": "json_schema", "json_schema": {"schema": {"type": "x"}}})):
            error(post({**good, field: value}), 400, "invalid_value", field)
        error(post({**good, "n": 99}), 400, "invalid_value", "n")
        error(post({**good, "stop": [f"s{k}" for k in range(10_000)]}), 400, "invalid_value", "stop")
        # HTTP that is not HTTP, routes that do not exist
        status, body = raw_json(raw(port, b"NOT HTTP AT ALL\r\n\r\n")[1])
        assert status == 400 and body["error"]["code"] == "invalid_request"
        error(http.get(f"{url}/v2/nothing"), 404, "not_found")
        # harmless defaults of those fields are accepted, and a tiny temperature is greedy
        r = post({**good, "n": 1, "logprobs": False, "tools": [], "tool_choice": "none", "frequency_penalty": 0,
                  "presence_penalty": 0.0, "logit_bias": {}, "response_format": {"type": "text"}, "best_of": 1})
        assert r.status_code == 200, r.text
    finally:
        stop.set()
        http.close()
        for t in threads:
            t.join(120)
    assert not failures, failures
    assert all(n >= 1 for n in counts), counts
    # alone (a sweep of one row, as the reference), a tiny temperature is greedy
    greedy = c.completions.create(model="smol", prompt="The sky is", max_tokens=3, temperature=1e-300)
    assert greedy.choices[0].text == text()


def test_an_unexpected_error_is_a_json_500(hardened):
    """Any exception a route did not expect (here from a route added to the real app for the test) is a 500 in
    OpenAI's shape, not starlette's plain text, and the server goes on."""
    url, port, m, app = hardened

    def broken():
        raise KeyError("a bug")

    app.add_api_route("/broken", broken)
    e = error(httpx.get(f"{url}/broken"), 500, "internal_error")
    assert "KeyError" in e["message"] and "a bug" in e["message"] and e["type"] == "server_error"
    assert httpx.get(f"{url}/health").status_code == 200


def test_host_check():
    """Which Host headers reach the server: IP addresses, localhost and the bound name (any port); other names only
    when listed in --allowed-hosts, or all with '*'; this machine's names when bound to every address."""
    from layerstream.server.app import host_check

    ok = host_check("127.0.0.1")
    assert all(map(ok, ("127.0.0.1:8000", "[::1]:8000", "localhost:8000", "LOCALHOST", "localhost.", "10.0.0.7",
                        None)))
    assert not any(map(ok, ("rebound.example:8000", "localhost.rebound.example", "127.0.0.1.rebound.example", "")))
    assert host_check("127.0.0.1", ["rebound.example"])("rebound.example:8000")
    assert host_check("127.0.0.1", ["*"])("anything.example")
    assert host_check("box.lan")("box.lan:8000") and not host_check("box.lan")("other.lan")
    assert host_check("0.0.0.0")(socket.gethostname())


def test_batch_lines_that_crashed_become_error_records(hardened, tmp_path):
    """The same parser in batch jobs: a lone surrogate in a prompt, 100,000-deep JSON, an unsupported field and
    an infinite temperature each become an error record; a tiny temperature runs greedy; a custom_id with a lone
    surrogate runs and is written back as its escape; the job finishes."""
    from layerstream.engine.batch import run_batch

    url, port, m, app = hardened

    def line(cid, raw_body):
        return (f'{{"custom_id": "{cid}", "method": "POST", "url": "/v1/completions", "body": ').encode() \
            + raw_body + b"}"

    lines = [line("ok", b'{"prompt": "The sky is", "max_tokens": 4, "temperature": 0}'),
             line("surrogate", b'{"prompt": "a\\ud800", "max_tokens": 4}'),
             b"[" * 100_000 + b"]" * 100_000,
             line("tools", b'{"prompt": "a", "tools": [{"type": "function"}]}'),
             line("inf", b'{"prompt": "a", "temperature": Infinity}'),
             line("tiny", b'{"prompt": "The sky is", "max_tokens": 4, "temperature": 1e-300}'),
             line("\\ud800", b'{"prompt": "a"}')]
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"".join(x + b"\n" for x in lines))
    s = run_batch(m, src, tmp_path / "out.jsonl", progress=False)
    assert s["requests"] == 7 and s["succeeded"] == 3 and s["failed"] == 4
    recs = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["error"] and r["error"]["code"] for r in recs] == [None, "invalid_value", "invalid_json",
                                                                 "unsupported_parameter", "invalid_value", None,
                                                                 None]
    assert recs[6]["custom_id"] == "\ud800"   # kept, written as its escape
    text = [r["response"]["body"]["choices"][0]["text"] for r in (recs[0], recs[5])]
    assert text[0] == text[1]


def test_the_command_refuses_an_empty_key_and_bad_limits():
    """Before loading anything: an empty --api-key, a read timeout of 0, a negative shutdown timeout, a body
    cap of 0."""
    from conftest import run_cli

    for args, flag in ((("--api-key", ""), "--api-key is empty"), (("--api-key", "  "), "--api-key is empty"),
                       (("--read-timeout", "0"), "--read-timeout"), (("--max-body-bytes", "0"), "--max-body-bytes"),
                       (("--shutdown-timeout", "-1"), "--shutdown-timeout")):
        r = run_cli("serve", *args, timeout=120)
        assert r.returncode == 1 and flag in r.stderr and "Traceback" not in r.stderr, r.stderr


def start_server(store, *args):
    """`layerstream serve --port 0` on the embedded model: (process, url, stderr lines so far)."""
    p = subprocess.Popen([sys.executable, "-m", "layerstream", "serve", "--model", str(store), "--port", "0",
                          "--threads", "1", *args], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                         stdin=subprocess.DEVNULL, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = []
    deadline = time.time() + 300
    while time.time() < deadline:
        line = p.stderr.readline()
        if not line:
            break
        lines.append(line)
        if "serving" in line:
            return p, line.split(" at ", 1)[1].split("/v1", 1)[0], lines
    p.kill()
    raise AssertionError("".join(lines))


def stream_lines(url, body, out, key):
    """POST a streaming request; `out[key]`: its status and data lines (or the exception that ended it)."""
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions" if "messages" in body else f"{url}/v1/completions",
                          json=body, timeout=120) as r:
            out[key] = [r.status_code] + [x for x in r.iter_lines() if x]
    except Exception as e:   # noqa: BLE001 - asserted by the caller
        out[key] = e


def post_json(url, body, out, key):
    try:
        r = httpx.post(f"{url}/v1/chat/completions" if "messages" in body else f"{url}/v1/completions", json=body,
                       timeout=120)
        out[key] = (r.status_code, r.headers.get("content-type"), r.json())
    except Exception as e:   # noqa: BLE001 - asserted by the caller
        out[key] = e


COUNTING = {"prompt": "1, 2, 3, 4, 5,", "max_tokens": 4000, "temperature": 0}   # greedy: counts on, no end


@pytest.mark.slow
def test_sigterm_with_8_requests_in_flight(embedded_store):
    """8 requests in flight (6 running, 2 waiting for a slot; streaming and not) and SIGTERM: the server stops
    accepting connections at once; the 2 short ones get their whole answer; the 6 long ones are cut when the
    grace period ends: each stream with an error event then [DONE], each non-streaming request with a 503 JSON.
    The process logs the counts and exits 0. (Before that, the default body cap, from the context, answers 413.)"""
    p, url, lines = start_server(embedded_store, "--max-concurrency", "6", "--shutdown-timeout", "8")
    out = {}
    try:
        cap = 8192 * 32 + (1 << 20)
        e = error(httpx.post(f"{url}/v1/completions", content=b" " * (cap + 1),
                             headers={"Content-Type": "application/json"}), 413, "request_too_large")
        assert str(cap) in e["message"]
        long = [("s", {**COUNTING, "stream": True}), ("j", COUNTING)]
        kinds = long * 2 + [("s", {"messages": CHAT, "max_tokens": 3, "stream": True}),
                            ("j", {"prompt": "Hello", "max_tokens": 3})] + long   # the last two wait for a slot
        threads = []
        for k, (how, body) in enumerate(kinds):
            threads.append(threading.Thread(target=stream_lines if how == "s" else post_json, args=(url, body, out, k)))
            threads[-1].start()
            time.sleep(0.1)   # in this order
        for _ in range(600):   # all 8 in (the short ones may be done already)
            h = httpx.get(f"{url}/health").json()
            if h["running"] + h["waiting"] + (4 in out) + (5 in out) == 8:
                break
            time.sleep(0.05)
        p.send_signal(signal.SIGTERM)
        refused = False
        for _ in range(100):   # the listening socket closes at once
            try:
                httpx.get(f"{url}/health", timeout=2)
            except httpx.ConnectError:
                refused = True
                break
            time.sleep(0.05)
        assert refused
        for t in threads:
            t.join(60)
        rest = p.communicate(timeout=60)[1]
    finally:
        if p.poll() is None:
            p.kill()
    log = "".join(lines) + rest
    assert p.returncode == 0, log
    for k, (how, body) in enumerate(kinds):
        got = out[k]
        assert not isinstance(got, Exception), (k, got)
        cut = body["max_tokens"] == 4000
        if how == "s":
            assert got[0] == 200 and got[-1] == "data: [DONE]", (k, got[-3:])
            last = json.loads(got[-2][len("data: "):])
            if cut:
                assert last.get("error", {}).get("code") == "server_shutting_down", (k, last)
            else:
                assert last["choices"][0]["finish_reason"] in ("stop", "length"), (k, last)
        else:
            status, ctype, answer = got
            assert ctype == "application/json", (k, got)
            if cut:
                assert status == 503 and answer["error"]["code"] == "server_shutting_down", (k, got)
            else:
                assert status == 200 and answer["choices"][0]["finish_reason"] in ("stop", "length"), (k, got)
    assert " finished in the grace period, 6 cut (" in log, log
    # one line per request in the log: the 2 that finished with their tokens and time, the 6 cut with a 503/499
    import re

    done = re.findall(r"(chat|completions) \S+ 200: \d+ prompt \+ \d+ completion tokens in [\d.]+ s \((stop|length)\)",
                      log)
    assert len(done) == 2, log


@pytest.mark.slow
def test_sigint_ends_a_stream_with_an_error_event(embedded_store):
    """Ctrl-C (SIGINT) with --shutdown-timeout 0: a stream in flight ends at once with an error event and [DONE];
    exit status 0."""
    p, url, lines = start_server(embedded_store, "--shutdown-timeout", "0")
    out = {}
    try:
        t = threading.Thread(target=stream_lines, args=(url, {**COUNTING, "stream": True}, out, 0))
        t.start()
        for _ in range(600):
            if httpx.get(f"{url}/health").json()["running"] == 1:
                break
            time.sleep(0.05)
        p.send_signal(signal.SIGINT)
        t.join(60)
        rest = p.communicate(timeout=60)[1]
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, "".join(lines) + rest
    got = out[0]
    assert got[0] == 200 and got[-1] == "data: [DONE]" and "server_shutting_down" in got[-2], got[-3:]
    assert "1 cut" in rest
