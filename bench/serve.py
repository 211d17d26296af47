"""`layerstream serve` under concurrent clients: shared sweeps and the prefix cache, through the openai client.

The server runs as its own process (`python -m layerstream serve --port 0`), the clients are threads of this
one using the real `openai` client (streaming, `stream_options.include_usage`). The embedded
SmolLM2-135M-Instruct with `--max-ram 0` (nothing resident: every sweep reads every layer from the store)
and `--max-concurrency 8`.

(a) Concurrency: 1, 4 and 8 clients, each one streaming chat request (max_tokens 64, temperature 0, its own
    short prompt), all sent at once after a warm-up request. Aggregate tok/s = all completion tokens (from
    include_usage) / wall time from the first send to the last finish; time to first token = send to the
    first chunk with text; per-client tok/s = a client's tokens / its own send-to-finish time. This part runs
    on a server started with `--prefix-cache 0`, so the prompts' common chat-template head is computed by
    every request, as it would be for unrelated prompts.
(b) Prefix cache: 8 chat requests sharing a ~500-token system prompt, each with its own short user message
    (max_tokens 16), sent at once to a server with the prefix cache off (the server of (a)) and to a fresh
    one with the default prefix cache. Prefill computed and prefix-cache hits are the deltas of
    layerstream_prefill_tokens_total and layerstream_prefix_cache_hit_tokens_total on /metrics.

Each server is stopped with SIGINT at the end and must exit 0. "other load" is the cores other processes
(neither this script nor the server) kept busy during a row: above ~0.2 the row is disturbed.

(c) With `--pipeline N --max-ram SIZE`: part (a) on `serve --pipeline N` (a local Ray started by the server, one
    CPU per stage, SIZE per stage), then on one process with the same SIZE, and the texts compared.

    .venv/bin/python bench/serve.py [--quick] [--json PATH] [--threads N]
    .venv/bin/python bench/serve.py --pipeline 2 --max-ram 60MB [--quick]
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# both imported here, before any client thread: openai looks httpx up in sys.modules, and a thread importing it
# meanwhile shows openai a half-initialized module (AttributeError: ... has no attribute 'Timeout')
import httpx
import openai

from harness import cpu_snapshot, fmt, fmt_b, parser, ratio, table, wait_until_quiet

REQUEST_TIMEOUT = 900.0   # seconds: a request on a slow, busy machine with everything streamed


# ---------------------------------------------------------------------------- the server process

class Server:
    """`layerstream serve --port 0 ARGS` as a child process: started, waited for until it listens (its
    "serving NAME at URL/v1" line), its output kept (`lines`), stopped with SIGINT (`stop` gives the exit
    status). Also used by soak.py."""

    def __init__(self, args: list[str], start_timeout: float = 600.0, echo: bool = False):
        self.cmd = [sys.executable, "-m", "layerstream", "serve", "--port", "0", *map(str, args)]
        self.lines: list[str] = []
        self.url = self.name = None
        self.returncode = None
        self._ready = threading.Event()
        self._echo = echo
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     bufsize=1)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._ready.wait(start_timeout) or self.url is None:
            self.kill()
            tail = "\n".join(self.lines[-15:])
            raise RuntimeError(f"the server did not start ({' '.join(self.cmd)}); its output:\n{tail}")

    def _read(self):
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.lines.append(line)
            if self._echo:
                print(f"  server: {line}", file=sys.stderr, flush=True)
            m = re.search(r"serving (\S+) at (http://\S+)/v1", line)
            if m and self.url is None:
                self.name, self.url = m.group(1), m.group(2)
                self._ready.set()
        self._ready.set()   # it exited before listening

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss(self) -> int | None:
        """The server's resident set size now (VmRSS), bytes."""
        try:
            with open(f"/proc/{self.pid}/status") as f:
                return next((int(x.split()[1]) * 1024 for x in f if x.startswith("VmRSS:")), None)
        except OSError:
            return None

    def cpu(self) -> float | None:
        """CPU seconds (user + system) the server has used so far."""
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None

    def metrics(self) -> dict[str, float]:
        """GET /metrics as {"name{labels}": value}."""
        r = httpx.get(self.url + "/metrics", timeout=60)
        r.raise_for_status()
        out = {}
        for line in r.text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                try:
                    out[key] = float(value)
                except ValueError:
                    pass
        return out

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGINT, then wait (at most `timeout` s, then kill): the exit status (None: it had to be killed)."""
        if self.alive():
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                self._reader.join(5)
                self.returncode = None
                return None
        self._reader.join(5)
        self.returncode = self.proc.returncode
        return self.returncode

    def kill(self):
        if self.alive():
            self.proc.kill()
            self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill()


def delta(before: dict, after: dict, key: str) -> float | None:
    return after[key] - before[key] if key in before and key in after else None


def others_load(snap0, snap1, server_cpu0, server_cpu1) -> float | None:
    """Cores busy with processes other than this one and the server, on average, between two snapshots."""
    wall = snap1[0] - snap0[0]
    if snap0[1] is None or snap1[1] is None or server_cpu0 is None or server_cpu1 is None or wall <= 0:
        return None
    return max(0.0, ((snap1[1] - snap0[1]) - (snap1[2] - snap0[2]) - (server_cpu1 - server_cpu0)) / wall)


# ---------------------------------------------------------------------------- clients

TOPICS = ["the sea", "a mountain", "the city at night", "a forest", "the desert", "a river", "winter", "a garden",
          "a lighthouse", "the moon", "a train station", "an old library"]
ASKS = ["Write a long story about {}.", "Describe {} in detail.", "Write a long poem about {}.",
        "Tell me everything you know about {}."]


def short_prompts(n: int, offset: int = 0) -> list[str]:
    qs = [a.format(t) for a in ASKS for t in TOPICS]
    return [qs[(offset + i) % len(qs)] for i in range(n)]


PLACES = ["Amsterdam", "Berlin", "Cairo", "Denver", "Edinburgh", "Florence", "Geneva", "Helsinki", "Istanbul",
          "Jakarta", "Kyoto", "Lisbon", "Madrid", "Nairobi", "Oslo", "Prague", "Quito", "Rome", "Seoul", "Tunis",
          "Utrecht", "Vienna", "Warsaw", "Xian", "York", "Zurich", "Lima", "Perth"]


def long_system(sentences: int = 14) -> str:
    """A system prompt of about 500 tokens (SmolLM2's tokenizer): a made-up travel desk's rules."""
    rules = [f"Rule {i + 1}: when a traveller asks about {p}, answer in two short sentences, mention the best "
             f"month to visit and one museum, and never invent prices." for i, p in enumerate(PLACES[:sentences])]
    return "You are the assistant of a small travel desk. Follow these rules exactly.\n" + "\n".join(rules)


def stream_chat(client, model: str, messages: list[dict], max_tokens: int, barrier=None) -> dict:
    """One streaming chat request: send/first-text/finish times, completion and prompt tokens (include_usage)."""
    if barrier is not None:
        barrier.wait()
    t0 = time.perf_counter()
    first = usage = None
    text = []
    s = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    for ch in s:
        if ch.choices and ch.choices[0].delta.content:
            if first is None:
                first = time.perf_counter()
            text.append(ch.choices[0].delta.content)
        if ch.usage is not None:
            usage = ch.usage
    t1 = time.perf_counter()
    if usage is None:
        raise RuntimeError("the stream had no usage chunk although include_usage was asked for")
    return {"send": t0, "first": first, "end": t1, "tokens": usage.completion_tokens,
            "prompt_tokens": usage.prompt_tokens, "text": "".join(text)}


def at_once(client, model: str, conversations: list[list[dict]], max_tokens: int) -> list[dict]:
    """All conversations sent at the same moment from their own threads."""
    barrier = threading.Barrier(len(conversations))
    with ThreadPoolExecutor(len(conversations)) as pool:
        futures = [pool.submit(stream_chat, client, model, msgs, max_tokens, barrier) for msgs in conversations]
        return [f.result() for f in futures]


def measured(server: Server, run, wait_quiet: float) -> tuple[list[dict], dict, dict, float | None]:
    """run() between two /metrics scrapes, with the other load measured: (results, before, after, others)."""
    if wait_quiet > 0:
        wait_until_quiet(wait_quiet)
    m0, s0, c0 = server.metrics(), cpu_snapshot(), server.cpu()
    res = run()
    s1, c1, m1 = cpu_snapshot(), server.cpu(), server.metrics()
    return res, m0, m1, others_load(s0, s1, c0, c1)


# ---------------------------------------------------------------------------- the two parts

def concurrency_part(server: Server, client, clients: list[int], max_tokens: int, wait_quiet: float) -> list[dict]:
    rows = []
    stream_chat(client, server.name, [{"role": "user", "content": "Say hello."}], 8)   # warm-up
    offset = 0
    for n in clients:
        convs = [[{"role": "user", "content": q}] for q in short_prompts(n, offset)]
        offset += n
        res, m0, m1, others = measured(server, lambda: at_once(client, server.name, convs, max_tokens), wait_quiet)
        wall = max(r["end"] for r in res) - min(r["send"] for r in res)
        tokens = sum(r["tokens"] for r in res)
        ttft = [r["first"] - r["send"] for r in res if r["first"] is not None]
        row = {"clients": n, "tokens": tokens, "wall_s": wall, "agg_tok_s": tokens / wall,
               "ttft_mean_s": sum(ttft) / len(ttft) if ttft else None, "ttft_max_s": max(ttft) if ttft else None,
               "per_client_tok_s": sum(r["tokens"] / (r["end"] - r["send"]) for r in res) / n,
               "sweeps": delta(m0, m1, "layerstream_sweeps_total"),
               "bytes_read": delta(m0, m1, "layerstream_bytes_read_total"),
               "prefill_tokens": delta(m0, m1, "layerstream_prefill_tokens_total"),
               "others": others, "texts": [r["text"] for r in res]}
        rows.append(row)
        print(f"  {n} clients: {tokens} tokens in {wall:.1f} s ({row['agg_tok_s']:.2f} tok/s), "
              f"other load {fmt(others)} cores", file=sys.stderr, flush=True)
    return rows


def prefix_part(server: Server, client, label: str, system: str, n: int, max_tokens: int,
                wait_quiet: float) -> dict:
    convs = [[{"role": "system", "content": system},
              {"role": "user", "content": f"I am going to {p}. What should I see first?"}]
             for p in PLACES[-n:]]    # the last places: user messages distinct from each other
    res, m0, m1, others = measured(server, lambda: at_once(client, server.name, convs, max_tokens), wait_quiet)
    ttft = [r["first"] - r["send"] for r in res if r["first"] is not None]
    row = {"server": label, "requests": n, "prompt_tokens": sum(r["prompt_tokens"] for r in res),
           "prefill_tokens": delta(m0, m1, "layerstream_prefill_tokens_total"),
           "hit_tokens": delta(m0, m1, "layerstream_prefix_cache_hit_tokens_total"),
           "sweeps": delta(m0, m1, "layerstream_sweeps_total"),
           "tokens": sum(r["tokens"] for r in res),
           "wall_s": max(r["end"] for r in res) - min(r["send"] for r in res),
           "ttft_mean_s": sum(ttft) / len(ttft) if ttft else None, "others": others,
           "texts": [r["text"] for r in res]}
    print(f"  prefix cache {label}: {row['prompt_tokens']} prompt tokens, {fmt(row['prefill_tokens'], '.0f')} "
          f"computed, {fmt(row['hit_tokens'], '.0f')} hits, {row['wall_s']:.1f} s", file=sys.stderr, flush=True)
    return row


def system_tokens(server: Server, system: str) -> int:
    """The system prompt's own length in tokens (a 1-token completion of it; usage.prompt_tokens)."""
    r = httpx.post(server.base_url + "/completions", json={"model": server.name, "prompt": system, "max_tokens": 1},
                   timeout=REQUEST_TIMEOUT)
    r.raise_for_status()
    return r.json()["usage"]["prompt_tokens"]


def stop_checked(server: Server, label: str, problems: list[str]) -> int | None:
    rc = server.stop()
    print(f"  server {label}: stopped, exit status {rc}", file=sys.stderr, flush=True)
    if rc != 0:
        problems.append(f"server {label} exited with {rc} after SIGINT (expected 0); last lines: "
                        + " | ".join(server.lines[-5:]))
    return rc


def pipeline_part(a) -> None:
    """(c): 1, 4 and 8 clients on a pipeline server, then on one process at the same budget; texts compared."""
    max_tokens = 16 if a.quick else 64
    common = ["--max-ram", a.max_ram, "--max-concurrency", "8", "--prefix-cache", "0"] + \
        (["--model", a.model] if a.model else []) + (["--threads", a.threads] if a.threads else [])
    results, codes = {}, {}
    for label, extra in ((f"pipeline={a.pipeline}, --max-ram {a.max_ram} per stage", ["--pipeline", a.pipeline]),
                         (f"one process, --max-ram {a.max_ram}", [])):
        print(f"server: {label} …", file=sys.stderr, flush=True)
        with Server(common + extra, echo=a.echo) as srv:
            client = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0, timeout=REQUEST_TIMEOUT)
            results[label] = concurrency_part(srv, client, [1, 4, 8], max_tokens, a.wait_quiet)
            codes[label] = srv.stop()
    print()
    for label, rows in results.items():
        table([f"{label}: clients (max_tokens {max_tokens}, greedy)", "tokens", "wall s", "aggregate tok/s",
               "vs 1 client", "sweeps", "other load"],
              [[r["clients"], r["tokens"], fmt(r["wall_s"], ".1f"), fmt(r["agg_tok_s"]),
                ratio(r["agg_tok_s"], rows[0]["agg_tok_s"]), fmt(r["sweeps"], ".0f"), fmt(r["others"])]
               for r in rows])
        print()
    (pl, one) = results.values()
    same = sum(x == y for a_, b_ in zip(pl, one) for x, y in zip(a_["texts"], b_["texts"]))
    total = sum(len(r["texts"]) for r in one)
    print(f"same greedy text, pipeline and one process: {same}/{total}; exit status on SIGINT: "
          f"{', '.join(map(str, codes.values()))}")
    if a.json:
        a.json.write_text(json.dumps({"results": results, "same": same, "total": total}, indent=1))


def main() -> None:
    p = parser(__doc__, wait_quiet=120)
    p.add_argument("--quick", action="store_true", help="a smoke run: max_tokens 16 / 4 instead of 64 / 16")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results here")
    p.add_argument("--model", default=None, help="the model to serve (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--threads", type=int, default=None, help="the server's --threads (default: its own choice)")
    p.add_argument("--echo", action="store_true", help="show the server's output")
    p.add_argument("--pipeline", type=int, default=None, help="(c): serve over an N-stage Ray pipeline")
    p.add_argument("--max-ram", default="0", help="the server's --max-ram (per stage with --pipeline; default 0)")
    a = p.parse_args()
    if a.pipeline:
        return pipeline_part(a)


    chat_tokens, prefix_tokens = (16, 4) if a.quick else (64, 16)
    clients = [1, 4, 8]
    common = ["--max-ram", "0", "--max-concurrency", "8"]
    if a.model:
        common += ["--model", a.model]
    if a.threads:
        common += ["--threads", a.threads]
    system = long_system()
    problems: list[str] = []

    def client_for(server):
        return openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=REQUEST_TIMEOUT)

    print("server with --prefix-cache 0 …", file=sys.stderr, flush=True)
    with Server(common + ["--prefix-cache", "0"], echo=a.echo) as srv:
        print(f"  {srv.name} at {srv.url} (pid {srv.pid})", file=sys.stderr, flush=True)
        client = client_for(srv)
        rows = concurrency_part(srv, client, clients, chat_tokens, a.wait_quiet)
        sys_tokens = system_tokens(srv, system)
        off = prefix_part(srv, client, "off (--prefix-cache 0)", system, 8, prefix_tokens, a.wait_quiet)
        rc_off = stop_checked(srv, "--prefix-cache 0", problems)
    print("server with the default prefix cache …", file=sys.stderr, flush=True)
    with Server(common, echo=a.echo) as srv:
        client = client_for(srv)
        stream_chat(client, srv.name, [{"role": "user", "content": "Say hello."}], 8)   # warm-up
        on = prefix_part(srv, client, "on (default size)", system, 8, prefix_tokens, a.wait_quiet)
        rc_on = stop_checked(srv, "default", problems)
    name = srv.name

    print()
    table([f"clients ({name}, max_ram=0, max_tokens {chat_tokens}, greedy, prefix cache off)", "tokens", "wall s",
           "aggregate tok/s", "vs 1 client", "TTFT mean s", "TTFT max s", "per-client tok/s", "sweeps",
           "read/token", "other load"],
          [[r["clients"], r["tokens"], fmt(r["wall_s"], ".1f"), fmt(r["agg_tok_s"]),
            ratio(r["agg_tok_s"], rows[0]["agg_tok_s"]), fmt(r["ttft_mean_s"]), fmt(r["ttft_max_s"]),
            fmt(r["per_client_tok_s"]), fmt(r["sweeps"], ".0f"),
            fmt_b(r["bytes_read"] / r["tokens"]) if r["bytes_read"] is not None and r["tokens"] else "-",
            fmt(r["others"])] for r in rows])
    by = {r["clients"]: r for r in rows}
    scale = by[8]["agg_tok_s"] / by[1]["agg_tok_s"] if by[1]["agg_tok_s"] else None
    met = "met" if scale and scale >= 5 else "not met"
    print(f"\naggregate tok/s, 8 clients vs 1: {fmt(scale)}x (the issue's target: >= 5x, {met})")
    print()
    table([f"prefix cache (8 requests at once, {sys_tokens}-token system prompt, max_tokens {prefix_tokens})",
           "prompt tokens", "prefill computed", "prefix hits", "sweeps", "wall s", "TTFT mean s", "other load"],
          [[r["server"], r["prompt_tokens"], fmt(r["prefill_tokens"], ".0f"), fmt(r["hit_tokens"], ".0f"),
            fmt(r["sweeps"], ".0f"), fmt(r["wall_s"], ".1f"), fmt(r["ttft_mean_s"]), fmt(r["others"])]
           for r in (off, on)])
    same = sum(x == y for x, y in zip(off["texts"], on["texts"]))
    print(f"\nsame greedy text with and without the prefix cache: {same}/{len(on['texts'])}")
    print(f"servers stopped with SIGINT: exit status {rc_off} (prefix cache off), {rc_on} (on)")

    if a.json:
        a.json.write_text(json.dumps({"model": name, "quick": a.quick, "max_tokens": chat_tokens,
                                      "concurrency": rows, "scale_8_vs_1": scale, "system_tokens": sys_tokens,
                                      "prefix": {"off": off, "on": on}, "exit_status": [rc_off, rc_on],
                                      "problems": problems}, indent=1))
    if problems:
        sys.exit("problems:\n" + "\n".join(problems))


if __name__ == "__main__":
    main()
