"""Soak test of `layerstream serve`: mixed, misbehaving and bursting clients for a while; no failure, no growth.

Starts `python -m layerstream serve --port 0 --max-queue 16` (the embedded SmolLM2-135M-Instruct, otherwise
the default options), warms it up, then `--clients` threads (default 6) loop for `--seconds` (default 600):

- well-formed requests through the real `openai` client: chat and completion, streaming (with and without
  `stream_options.include_usage`) and not, random max_tokens 1-32, greedy or sampled; each answer is checked
  (text, finish_reason, usage within max_tokens);
- disconnects: a streaming request closed after 1-3 chunks;
- malformed requests (raw HTTP): invalid JSON, wrong field types, out-of-range values, an unknown model;
  each must get its 4xx (400, or 404 for the model) with OpenAI's error object
  {"error": {"message", "type", "param", "code"}};
- issue 23's hostile classes mixed in with the malformed ones: a temperature of 1e-300 (must be served,
  greedily), NaN, a lone surrogate, 100,000-deep JSON, a body past the cap (the server runs with
  --max-body-bytes 1MiB), a text/plain body, another site's Host, 10,000 stop strings, an OpenAI field not
  honoured; and slow clients sending a byte a second (the server runs with --read-timeout 3: each must get
  its JSON 408);
- now and then a burst: `--burst` (default 24) requests at once, beyond what the queue holds; their 429s
  (and the 429s other requests get while a burst is on) are expected and counted apart.

A failure is a well-formed request that raised or got a non-200 other than a 429 during a burst, an answer
that does not check out, or a malformed request answered with the wrong status or error shape. At the end:
the server must have no running or waiting request left (cancelled streams freed), must still answer a
normal request, and its RSS (VmRSS after the warm-up, sampled peak, at the end) is shown. Exits 1 on any
failure.

    .venv/bin/python bench/soak.py [--seconds 600] [--clients 6] [--seed 0]
"""

from __future__ import annotations

import json
import random
import sys
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor

import httpx  # before any client thread (see bench/serve.py)
import openai

from harness import fmt, fmt_b, parser, table

# bench/serve.py's Server (isort files `serve` as third-party: it is not in known-local-folder)
from serve import Server

TIMEOUT = 300.0   # seconds for one request: longer is a hang
PROMPTS = ["Tell me a joke.", "What is the capital of France?", "Write a haiku about rain.", "Count to ten.",
           "Explain gravity to a child.", "Name three fruits.", "What is 12 times 7?", "Describe a cat.",
           "Give me a tip for cooking pasta.", "Why is the sky blue?", "Say something kind.", "List four colors."]
TEXTS = ["Once upon a time", "The quick brown fox", "In the beginning", "def fibonacci(n):", "Dear diary,",
         "The three laws of robotics are", "My favourite recipe is", "1, 2, 3, 4,"]
KINDS = {"chat": 20, "chat stream": 20, "completion": 12, "completion stream": 12, "disconnect": 12,
         "malformed": 20, "slow client": 2, "burst": 4}
BURST_KINDS = ["chat", "chat stream", "completion", "completion stream"]


def malformed_cases(model: str) -> list[tuple[str, str, bytes | dict, int]]:
    """(name, route, body (bytes: sent as is), expected status)."""
    msgs = [{"role": "user", "content": "hi"}]
    return [
        ("invalid JSON", "chat", b'{"messages": [{"role": "user", "content": "hi"}', 400),
        ("not UTF-8", "completions", b'{"prompt": "\xff\xfe"}', 400),
        ("body not an object", "chat", b'[1, 2, 3]', 400),
        ("messages missing", "chat", {"model": model}, 400),
        ("messages a string", "chat", {"messages": "hi"}, 400),
        ("message without role", "chat", {"messages": [{"content": "hi"}]}, 400),
        ("content a number", "chat", {"messages": [{"role": "user", "content": 5}]}, 400),
        ("max_tokens a string", "chat", {"messages": msgs, "max_tokens": "ten"}, 400),
        ("max_tokens 0", "completions", {"prompt": "hi", "max_tokens": 0}, 400),
        ("max_tokens beyond context", "chat", {"messages": msgs, "max_tokens": 10_000_000}, 400),
        ("temperature a string", "chat", {"messages": msgs, "temperature": "hot"}, 400),
        ("top_p 2", "completions", {"prompt": "hi", "top_p": 2}, 400),
        ("stream a string", "chat", {"messages": msgs, "stream": "yes"}, 400),
        ("stream_options a list", "chat", {"messages": msgs, "stream": True, "stream_options": [1]}, 400),
        ("n 99", "chat", {"messages": msgs, "n": 99}, 400),
        ("seed a string", "completions", {"prompt": "hi", "seed": "x"}, 400),
        ("stop a number", "completions", {"prompt": "hi", "stop": 3}, 400),
        ("prompt a float", "completions", {"prompt": 3.5}, 400),
        ("prompt missing", "completions", {"max_tokens": 4}, 400),
        ("token id out of range", "completions", {"prompt": [1, 2, 10_000_000]}, 400),
        ("messages empty", "chat", {"messages": []}, 400),
        ("max_tokens a float", "chat", {"messages": msgs, "max_tokens": 1.5}, 400),
        ("temperature negative", "completions", {"prompt": "hi", "temperature": -1}, 400),
        ("empty body", "completions", b"", 400),
        ("unknown model (chat)", "chat", {"model": "no-such-model", "messages": msgs}, 404),
        ("unknown model (completions)", "completions", {"model": "no-such-model", "prompt": "hi"}, 404),
    ] + hostile_cases(model)


MAX_BODY = 1 << 20       # the soak's server: --max-body-bytes 1MiB
READ_TIMEOUT = 3.0       # and --read-timeout 3


def hostile_cases(model: str) -> list[tuple]:
    """Issue 23's hostile classes: (name, route, body, expected status, extra headers). The tiny temperature
    must be served (greedy), the rest refused with their 4xx."""
    msgs = [{"role": "user", "content": "hi"}]
    return [
        ("hostile: temperature 1e-300", "completions", b'{"prompt": "The sky is", "max_tokens": 4, '
                                                       b'"temperature": 1e-300}', 200, None),
        ("hostile: temperature NaN", "completions", b'{"prompt": "hi", "temperature": NaN}', 400, None),
        ("hostile: lone surrogate", "completions", b'{"prompt": "a\\ud800b"}', 400, None),
        ("hostile: 100000-deep JSON", "completions", b"[" * 100_000 + b"]" * 100_000, 400, None),
        ("hostile: body past the cap", "completions", b'{"prompt": "' + b"a" * (MAX_BODY + 10) + b'"}', 413, None),
        ("hostile: text/plain body", "chat", json.dumps({"messages": msgs}).encode(), 415,
         {"content-type": "text/plain"}),
        ("hostile: another site's Host", "chat", json.dumps({"messages": msgs}).encode(), 400,
         {"host": "rebound.example"}),
        ("hostile: 10000 stop strings", "completions", {"prompt": "hi", "stop": [f"s{k}" for k in range(10_000)]},
         400, None),
        ("hostile: logprobs out of range", "chat", {"model": model, "messages": msgs, "logprobs": True,
                                                    "top_logprobs": 99}, 400, None),
    ]


class Stats:
    """Everything the clients saw, under one lock."""
    def __init__(self):
        self.lock = threading.Lock()
        self.sent = Counter()
        self.ok = Counter()
        self.expected = Counter()        # expected 4xx answers to malformed requests
        self.rate_limited = Counter()    # 429 while a burst was on
        self.failed = Counter()
        self.seconds = defaultdict(list)
        self.failures: list[str] = []
        self.malformed = defaultdict(Counter)     # case -> Counter of "status code param"
        self.bursts = 0                           # bursts started
        self.burst_on = 0                         # bursts running now
        self.malformed_sent = 0

    def add(self, kind: str, outcome: str, seconds: float | None = None, why: str | None = None):
        with self.lock:
            self.sent[kind] += 1
            {"ok": self.ok, "expected": self.expected, "429": self.rate_limited, "failed": self.failed}[outcome][
                kind] += 1
            if seconds is not None and outcome == "ok":
                self.seconds[kind].append(seconds)
            if why is not None and outcome == "failed":
                self.failures.append(f"{kind}: {why}")

    def burst_window(self) -> tuple[int, int]:
        with self.lock:
            return self.bursts, self.burst_on


def status_of(e: BaseException) -> int | None:
    return getattr(e, "status_code", None)


def describe(e: BaseException) -> str:
    body = getattr(e, "body", None)
    return f"{type(e).__name__}" + (f" {status_of(e)}" if status_of(e) else "") + f": {body if body else e}"[:400]


# ---------------------------------------------------------------------------- well-formed requests

def params(rng: random.Random) -> dict:
    p = {"max_tokens": rng.randint(1, 32), "temperature": rng.choice([0, 0, 0.7, 1.0])}
    if p["temperature"] and rng.random() < 0.5:
        p["seed"] = rng.randint(0, 2**31)
    if rng.random() < 0.15:
        p["stop"] = [rng.choice(["\n\n", ".", "!"])]
    return p


def check_usage(u, max_tokens: int) -> str | None:
    if u is None:
        return "no usage"
    if not 0 <= u.completion_tokens <= max_tokens:
        return f"completion_tokens {u.completion_tokens} outside 0..{max_tokens}"
    if u.prompt_tokens < 1 or u.total_tokens != u.prompt_tokens + u.completion_tokens:
        return f"usage does not add up: {u}"
    return None


def well_formed(client, model: str, kind: str, rng: random.Random) -> str | None:
    """One request of `kind`; None if its answer checks out, else what is wrong (exceptions propagate)."""
    p = params(rng)
    chat = kind.startswith("chat")
    stream = kind.endswith("stream")
    if chat:
        call = client.chat.completions.create
        args = {"messages": [{"role": "user", "content": rng.choice(PROMPTS)}]}
    else:
        call = client.completions.create
        args = {"prompt": rng.choice(TEXTS)}
    if not stream:
        r = call(model=model, **args, **p)
        c = r.choices[0]
        text = c.message.content if chat else c.text
        if not isinstance(text, str):
            return f"no text: {r}"
        if c.finish_reason not in ("stop", "length"):
            return f"finish_reason {c.finish_reason!r}"
        if c.finish_reason == "length" and r.usage.completion_tokens != p["max_tokens"]:
            return f"finish_reason length after {r.usage.completion_tokens} of {p['max_tokens']} tokens"
        return check_usage(r.usage, p["max_tokens"])
    include = rng.random() < 0.7
    extra = {"stream_options": {"include_usage": True}} if include else {}
    finishes, usage, chunks = [], None, 0
    for ch in call(model=model, **args, **p, stream=True, **extra):
        chunks += 1
        if ch.choices and ch.choices[0].finish_reason is not None:
            finishes.append(ch.choices[0].finish_reason)
        if getattr(ch, "usage", None) is not None:
            usage = ch.usage
    if finishes not in (["stop"], ["length"]):
        return f"finish_reasons {finishes} in {chunks} chunks (expected one stop or length)"
    if include:
        return check_usage(usage, p["max_tokens"])
    if usage is not None:
        return "usage sent without include_usage"
    return None


def disconnect(client, model: str, rng: random.Random) -> None:
    """A streaming request closed after 1-3 chunks (the server should cancel it)."""
    chat = rng.random() < 0.5
    p = {"max_tokens": rng.randint(16, 32), "temperature": 0}
    s = (client.chat.completions.create(model=model, messages=[{"role": "user", "content": rng.choice(PROMPTS)}],
                                        stream=True, **p) if chat else
         client.completions.create(model=model, prompt=rng.choice(TEXTS), stream=True, **p))
    want = rng.randint(1, 3)
    for k, _ in enumerate(s, 1):
        if k >= want:
            break
    s.close()


def malformed(http, url: str, case, stats: Stats) -> None:
    name, route, body, want, headers = (*case, None)[:5]
    t0 = time.perf_counter()
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else \
        {"json": body}
    if headers:
        kw["headers"] = {**kw.get("headers", {}), **headers}
    try:
        r = http.post(f"{url}/v1/{'chat/completions' if route == 'chat' else 'completions'}", timeout=TIMEOUT, **kw)
    except Exception as e:
        stats.add("malformed", "failed", why=f"{name}: {describe(e)}")
        return
    dt = time.perf_counter() - t0
    try:
        err = r.json().get("error")
    except (ValueError, AttributeError):
        err = None
    shape = (isinstance(err, dict) and isinstance(err.get("message"), str) and isinstance(err.get("type"), str)
             and "param" in err and "code" in err)
    with stats.lock:
        stats.malformed[name][f"{r.status_code} {err.get('code') if isinstance(err, dict) else '-'} "
                              f"{err.get('param') if isinstance(err, dict) else '-'}"] += 1
    if r.status_code != want:
        stats.add("malformed", "failed", why=f"{name}: status {r.status_code}, expected {want}: {r.text[:300]}")
    elif want == 200:   # a hostile request that must be served
        ok = r.headers.get("content-type", "").startswith("application/json") and r.json().get("choices")
        stats.add("malformed", "expected" if ok else "failed", dt, why=None if ok else f"{name}: {r.text[:300]}")
    elif not shape:
        stats.add("malformed", "failed", why=f"{name}: error body not OpenAI's shape: {r.text[:300]}")
    else:
        stats.add("malformed", "expected", dt)


def slow_client(url: str) -> str | None:
    """A client that sends its request a byte a second (issue 23's slow clients): the server must answer 408 in
    JSON once --read-timeout has passed, and close the connection; None if it did."""
    import socket

    host, port = url.split("//", 1)[1].rsplit(":", 1)
    t0 = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=READ_TIMEOUT + 30) as s:
        req = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n" \
              b"Content-Length: 1000\r\n\r\n{"
        s.sendall(req)
        s.settimeout(1.0)
        got = b""
        while time.monotonic() - t0 < READ_TIMEOUT + 30:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                try:
                    s.sendall(b" ")
                except OSError:
                    break
                continue
            except ConnectionResetError:
                # our byte crossed the server's 408 and close: the kernel's reset drops the unread answer
                if not got and time.monotonic() - t0 >= READ_TIMEOUT:
                    return None   # cut off once the timeout had passed, as it should be
                raise
            if not chunk:
                break
            got += chunk
    head = got.split(b"\r\n", 1)[0]
    if b" 408 " not in head or b'"request_timeout"' not in got:
        return f"expected a 408 request_timeout after {READ_TIMEOUT} s, got {got[:200]!r}"
    return None


# ---------------------------------------------------------------------------- the loops

def attempt(stats: Stats, kind: str, fn) -> None:
    """Run fn() (None or what is wrong with the answer) and file its outcome under `kind`."""
    bursts0, _ = stats.burst_window()
    t0 = time.perf_counter()
    try:
        wrong = fn()
    except Exception as e:
        bursts1, on = stats.burst_window()
        if status_of(e) == 429 and (on or bursts1 != bursts0):
            stats.add(kind, "429")
        else:
            stats.add(kind, "failed", why=describe(e))
        return
    if wrong:
        stats.add(kind, "failed", why=wrong)
    else:
        stats.add(kind, "ok", time.perf_counter() - t0)


def burst(client, model: str, rng: random.Random, n: int, stats: Stats) -> None:
    with stats.lock:
        if stats.burst_on:      # one burst at a time
            return
        stats.burst_on += 1
        stats.bursts += 1
    try:
        seeds = [rng.randrange(2**32) for _ in range(n)]
        with ThreadPoolExecutor(n) as pool:
            list(pool.map(lambda s: attempt(stats, "burst", lambda: well_formed(
                client, model, random.Random(s).choice(BURST_KINDS), random.Random(s + 1))), seeds))
    finally:
        with stats.lock:
            stats.burst_on -= 1


def loop(i: int, srv: Server, deadline: float, seed: int, burst_size: int, stats: Stats) -> None:
    rng = random.Random(seed * 1000 + i)
    # the server closes idle connections after --read-timeout (3 s here): the clients drop theirs sooner (httpx's
    # default, 5 s, would reuse connections the server is closing), as a client of a server with that setting must
    limits = httpx.Limits(keepalive_expiry=1.0)
    client = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0, timeout=TIMEOUT,
                           http_client=httpx.Client(limits=limits, timeout=TIMEOUT))
    cases = malformed_cases(srv.name)
    kinds, weights = list(KINDS), list(KINDS.values())
    with httpx.Client(limits=limits) as http:
        while time.monotonic() < deadline:
            kind = rng.choices(kinds, weights)[0]
            if kind == "malformed":
                with stats.lock:     # the cases in turn: a short run still sends each one
                    case = cases[stats.malformed_sent % len(cases)]
                    stats.malformed_sent += 1
                malformed(http, srv.url, case, stats)
            elif kind == "burst":
                burst(client, srv.name, rng, burst_size, stats)
            elif kind == "slow client":
                attempt(stats, kind, lambda: slow_client(srv.url))
            elif kind == "disconnect":
                attempt(stats, kind, lambda: disconnect(client, srv.name, rng))
            else:
                attempt(stats, kind, lambda: well_formed(client, srv.name, kind, rng))


def sample_rss(srv: Server, stop: threading.Event, samples: list) -> None:
    while not stop.wait(2.0):
        rss = srv.rss()
        if rss is not None:
            samples.append((time.monotonic(), rss))


def settle(srv: Server, seconds: float = 60.0) -> dict:
    """/health once nothing is running or waiting (or after `seconds`)."""
    end = time.monotonic() + seconds
    while True:
        h = httpx.get(srv.url + "/health", timeout=30).json()
        if (h.get("running") == 0 and h.get("waiting") == 0) or time.monotonic() > end:
            return h
        time.sleep(0.5)


def growth(a: int | None, b: int | None) -> str:
    if a is None or b is None:
        return "-"
    return ("+" if b >= a else "-") + fmt_b(abs(b - a))


def pct(xs: list[float], q: float) -> float | None:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--seconds", type=float, default=600, help="how long the clients loop (default %(default)s)")
    p.add_argument("--clients", type=int, default=6, help="client threads (default %(default)s)")
    p.add_argument("--burst", type=int, default=24, help="requests in one burst (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="the model to serve (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the summary here")
    p.add_argument("--echo", action="store_true", help="show the server's output")
    p.add_argument("--prefix-cache", default=None, metavar="SIZE",
                   help="the server's --prefix-cache (default: its own; 0 tells a leak from the cache filling up)")
    a = p.parse_args()


    args = ["--max-queue", "16", "--max-body-bytes", str(MAX_BODY), "--read-timeout", str(READ_TIMEOUT)] + \
        (["--model", a.model] if a.model else []) + \
        (["--prefix-cache", a.prefix_cache] if a.prefix_cache is not None else [])
    problems: list[str] = []
    stats = Stats()
    with Server(args, echo=a.echo) as srv:
        print(f"{srv.name} at {srv.url} (pid {srv.pid})", file=sys.stderr, flush=True)
        client = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0, timeout=TIMEOUT)
        rng = random.Random(a.seed)
        for kind in ("chat", "chat stream", "completion", "completion stream"):     # warm-up
            if wrong := well_formed(client, srv.name, kind, rng):
                sys.exit(f"warm-up {kind}: {wrong}")
        rss0 = srv.rss()
        samples: list = [(time.monotonic(), rss0)]
        stop = threading.Event()
        sampler = threading.Thread(target=sample_rss, args=(srv, stop, samples), daemon=True)
        sampler.start()
        t0 = time.monotonic()
        print(f"soaking for {a.seconds:.0f} s with {a.clients} clients …", file=sys.stderr, flush=True)
        threads = [threading.Thread(target=loop, args=(i, srv, t0 + a.seconds, a.seed, a.burst, stats))
                   for i in range(a.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        loops_s = time.monotonic() - t0
        health = settle(srv)
        if health.get("running") or health.get("waiting"):
            problems.append(f"after all clients finished the server still has {health.get('running')} running "
                            f"and {health.get('waiting')} waiting requests")
        try:
            final = well_formed(client, srv.name, "chat", random.Random(1))
        except Exception as e:
            final = describe(e)
        if final:
            problems.append(f"the final normal request failed: {final}")
        stop.set()
        sampler.join()
        rss1 = srv.rss()
        metrics = srv.metrics()
        alive = srv.alive()
        rc = srv.stop()
    if not alive:
        problems.append("the server process had exited before the end")

    rows = []
    for kind in KINDS:      # "burst": the requests sent in bursts
        s = stats.seconds[kind]
        rows.append([kind, stats.sent[kind], stats.ok[kind] + stats.expected[kind], stats.rate_limited[kind],
                     stats.failed[kind], fmt(pct(s, 0.5)), fmt(pct(s, 0.95)), fmt(max(s) if s else None)])
    total = [stats.sent, stats.ok + stats.expected, stats.rate_limited, stats.failed]
    rows.append(["all", *(sum(c.values()) for c in total), "", "", ""])
    print()
    cache = "" if a.prefix_cache is None else f", --prefix-cache {a.prefix_cache}"
    print(f"{srv.name}, --max-queue 16{cache}, {a.clients} clients for {loops_s:.0f} s, "
          f"{stats.bursts} bursts of {a.burst}")
    print()
    table(["requests", "sent", "ok (4xx for malformed)", "429 in a burst", "failed", "p50 s", "p95 s", "max s"], rows)
    print()
    table(["malformed case", "sent", "answers (status code param)"],
          [[name, sum(c.values()), ", ".join(f"{k} x{v}" for k, v in c.most_common())]
           for name, c in sorted(stats.malformed.items())])
    peak = max(r for _, r in samples)
    print()
    table(["server RSS", "bytes"], [["after warm-up", fmt_b(rss0)], ["peak (sampled every 2 s)", fmt_b(peak)],
                                    ["at the end", fmt_b(rss1)],
                                    ["end - start", growth(rss0, rss1)]])
    served = {k: v for k, v in metrics.items() if k.startswith("layerstream_requests_total")}
    print()
    table(["server's /metrics", "value"],
          [[k.replace("layerstream_requests_total", "requests"), fmt(v, ".0f")] for k, v in sorted(served.items())]
          + [[k, fmt(metrics.get(k), ".0f")] for k in ("layerstream_sweeps_total", "layerstream_generated_tokens_total",
                                                       "layerstream_prefill_tokens_total",
                                                       "layerstream_prefix_cache_hit_tokens_total")])
    print(f"\nfinal /health: {health}; final normal request: {'ok' if not final else final}")
    print(f"server stopped with SIGINT: exit status {rc}" + ("" if rc == 0 else " (expected 0)"))
    fails = sum(stats.failed.values())
    if stats.failures:
        print(f"\nfailures ({fails}; the first 20 distinct):")
        for f in list(dict.fromkeys(stats.failures))[:20]:
            print(f"- {f}")
    for pr in problems:
        print(f"problem: {pr}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"seconds": loops_s, "clients": a.clients, "sent": stats.sent, "ok": stats.ok,
                       "expected": stats.expected, "rate_limited": stats.rate_limited, "failed": stats.failed,
                       "failures": stats.failures, "malformed": stats.malformed, "bursts": stats.bursts,
                       "rss": {"start": rss0, "peak": peak, "end": rss1, "samples": [r for _, r in samples]},
                       "health": health, "exit_status": rc, "problems": problems}, f, indent=1)
    if fails or problems:
        sys.exit(1)


if __name__ == "__main__":
    main()
