"""Continuous batching vs static batches: `layerstream batch` against padded batches through `generate`.

64 chat requests whose `max_tokens` alternate 4 and 64, greedy, at most 8 sequences per sweep, on the
embedded SmolLM2-135M-Instruct streamed from its store (`max_ram=0`: every layer read every sweep).
Static: the requests in input order in padded batches of 8, one `generate` call each (the batch runs
until its longest request is done, nobody joins). Continuous: `run_batch` (what `layerstream batch` runs)
on the same requests as an OpenAI batch file: a finished request leaves and a waiting one joins at the next
sweep. Tokens/s counts each request's own tokens (up to its limit or end of sequence). Each system in its
own process.

    .venv/bin/python bench/batch.py [--requests 64] [--batch-size 8]
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from harness import emit, fmt, parser, ratio, run_child, self_cmd, table

TOPICS = ["the sea", "a mountain", "the city at night", "a forest", "the desert", "a river", "winter", "a garden"]
ASKS = ["Write a short poem about {}.", "Describe {} in one sentence.", "Give three facts about {}.",
        "Tell a tiny story set in {}.", "What colors do you associate with {}?", "Write a haiku about {}.",
        "Why do people love {}?", "Name a song about {}."]


def requests(n: int) -> list[tuple[str, int]]:
    qs = [a.format(t) for t in TOPICS for a in ASKS]
    return [(qs[i % len(qs)], 4 if i % 2 == 0 else 64) for i in range(n)]


def child(mode: str, n: int, batch: int) -> None:
    import torch

    from layerstream import AutoModel

    m = AutoModel.from_pretrained(None, max_ram=0, progress=False)
    tok = m.tokenizer
    reqs = requests(n)
    texts, tokens = [], 0
    if mode == "static":
        tok.padding_side = "left"
        eos = m.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        t0 = time.perf_counter()
        for i in range(0, n, batch):
            chunk = reqs[i:i + batch]
            enc = tok.apply_chat_template([[{"role": "user", "content": q}] for q, _ in chunk],
                                          add_generation_prompt=True, padding=True, return_tensors="pt",
                                          return_dict=True)
            out = m.generate(enc["input_ids"], attention_mask=enc["attention_mask"], do_sample=False,
                             max_new_tokens=max(k for _, k in chunk))
            for row, (_, k) in zip(out[:, enc["input_ids"].shape[1]:].tolist(), chunk):
                own = []
                for t in row[:k]:
                    own.append(t)
                    if t in eos:
                        break
                tokens += len(own)
                texts.append(tok.decode(own, skip_special_tokens=True))
        dt = time.perf_counter() - t0
        sweeps = None
    else:
        from layerstream.engine.batch import run_batch

        with tempfile.TemporaryDirectory() as d:
            src, dst = Path(d) / "in.jsonl", Path(d) / "out.jsonl"
            src.write_text("".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                                               "body": {"messages": [{"role": "user", "content": q}],
                                                        "max_tokens": k, "temperature": 0}}) + "\n"
                                   for i, (q, k) in enumerate(reqs)))
            m.profiler.reset()
            t0 = time.perf_counter()
            summary = run_batch(m, src, dst, batch_size=batch, progress=False)
            dt = time.perf_counter() - t0
            sweeps = m.profiler.sweeps
            for line in dst.read_text().splitlines():
                body = json.loads(line)["response"]["body"]
                texts.append(body["choices"][0]["message"]["content"])
                tokens += body["usage"]["completion_tokens"]
        assert summary["failed"] == 0, summary
    emit({"texts": texts, "tokens": tokens, "seconds": dt, "sweeps": sweeps, "threads": torch.get_num_threads()})


def main() -> None:
    p = parser(__doc__, wait_quiet=120)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--child", default=None)
    a = p.parse_args()
    if a.child:
        return child(a.child, a.requests, a.batch_size)
    res = {}
    for mode in ("static", "continuous"):
        c = run_child(self_cmd(__file__, "--child", mode, "--requests", a.requests, "--batch-size", a.batch_size),
                      wait_quiet=a.wait_quiet)
        if c.result is None:
            sys.exit(f"{mode} failed: {c.note}")
        res[mode] = c.result | {"others": c.others, "rss": c.peak_rss}
        print(f"{mode}: {c.wall:.0f} s (other load {fmt(c.others)} cores)", file=sys.stderr)
    s, c = res["static"], res["continuous"]
    same = sum(x == y for x, y in zip(s["texts"], c["texts"]))
    table([f"system ({a.requests} requests, max_tokens 4/64, {a.batch_size} per sweep, max_ram=0)", "tokens",
           "seconds", "sweeps", "tok/s", "vs static"],
          [[f"padded static batches of {a.batch_size} through generate", s["tokens"], fmt(s["seconds"], ".1f"), "-",
            fmt(s["tokens"] / s["seconds"]), "1.00x"],
           ["layerstream batch (continuous)", c["tokens"], fmt(c["seconds"], ".1f"), c["sweeps"],
            fmt(c["tokens"] / c["seconds"]), ratio(c["tokens"] / c["seconds"], s["tokens"] / s["seconds"])]])
    print(f"\nsame greedy text per request: {same}/{len(s['texts'])}")


if __name__ == "__main__":
    main()
