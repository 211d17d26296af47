"""layerstream on Ray: (a) a batch job on one process against 1 and 2 Ray replicas; (b) a 2-stage layer pipeline
against one process at the same budget.

(a) 32 chat requests (greedy, 32 tokens each) on the embedded SmolLM2-135M-Instruct, fully resident:
`layerstream batch` in one process (torch's default threads, then one thread), then `layerstream batch --ray
--replicas R` (a local Ray started by the command, one CPU and one compute thread per replica) for R = 1 and 2.
Each run is a fresh `layerstream` process; the job's own seconds and tokens/s are the summary line's (from the
first request handed out to the output written: replicas already loaded), the wall seconds include starting
Ray and loading the model in every replica. The outputs are compared byte for byte.

(b) The 4.3 GB random-weight Llama-shaped bf16 checkpoint of bench/big_model.py with 6 layers (made once with
`--make`), each system with a budget of 60 % of the model: one process at `max_ram` = that budget (streaming
what does not fit) against `pipeline=2` with that budget per stage (a local Ray, one CPU per stage: both
stages together keep everything resident). Greedy, the same prompt; s/token over the new tokens (the prompt's
sweep included) and bytes read from the store per token, each system in a fresh process; then the pipeline with
the prompt four times at once (four sequences in flight).

    .venv/bin/python bench/ray.py [--requests 32] [--max-tokens 32]        # (a)
    .venv/bin/python bench/ray.py --pipeline [--make] [--dir /tmp/big43]   # (b)
"""

from __future__ import annotations

import sys
from pathlib import Path

# this file is named ray.py: its folder must not shadow the `ray` package in its own children
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import json
import re
import subprocess
import tempfile
import time

ASKS = ["Write a short poem about {}.", "Describe {} in one sentence.", "Give three facts about {}.",
        "Tell a tiny story set in {}."]
TOPICS = ["the sea", "a mountain", "the city at night", "a forest", "the desert", "a river", "winter", "a garden"]


def write_requests(path: Path, n: int, max_tokens: int) -> None:
    qs = [a.format(t) for t in TOPICS for a in ASKS]
    with open(path, "w") as f:
        for i in range(n):
            body = {"messages": [{"role": "user", "content": qs[i % len(qs)]}], "max_tokens": max_tokens,
                    "temperature": 0}
            f.write(json.dumps({"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
                                "body": body}) + "\n")


def run(src: Path, out: Path, *extra: str) -> dict:
    cmd = [str(Path(sys.executable).parent / "layerstream"), "batch", str(src), str(out), *extra]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    m = re.search(r"(\d+) tokens in ([\d.]+) s, ([\d.]+) tok/s", r.stderr)
    return {"tokens": int(m[1]), "seconds": float(m[2]), "tok_s": float(m[3]), "wall": wall}


def pipeline_child(mode: str, path: str, budget: int, tokens: int) -> None:
    import torch
    from transformers import AutoTokenizer

    from layerstream import AutoModel

    extra = {"pipeline": 2, "pipeline_cpus": 1} if mode == "pipeline" else {}
    t0 = time.perf_counter()
    m = AutoModel.from_pretrained(path, max_ram=budget, progress=False, **extra)
    load = time.perf_counter() - t0
    ids = torch.tensor([AutoTokenizer.from_pretrained(path)("The sea is", add_special_tokens=False)["input_ids"]])
    m.generate(ids, max_new_tokens=2, do_sample=False)   # warm-up
    out = m.generate(ids, max_new_tokens=tokens, do_sample=False)
    s = m.last_stats
    four = None
    if mode == "pipeline":   # four prompts in flight at once: while one stage computes a row, the other the next
        m.generate(ids.repeat(4, 1), max_new_tokens=tokens, do_sample=False)
        four = m.last_stats["seconds"] / m.last_stats["new_tokens"]
        resident = [i["resident"] for i in m.info]
        m.close()
    else:
        resident = [sum(u.bytes for u in m.plan.units if u.tier != "disk")]
    print("RESULT " + json.dumps({"s_per_token": s["seconds"] / s["new_tokens"], "new": s["new_tokens"],
                                  "bytes_per_token": s["bytes_per_token"], "resident": resident, "load_s": load,
                                  "tokens": out[0].tolist(), "four": four}), flush=True)


def bench_pipeline(a) -> None:
    if a.make:
        r = subprocess.run([sys.executable, str(Path(__file__).parent / "big_model.py"), "--dir", str(a.dir),
                            "--layers", "6", "--no-gguf"])
        if r.returncode:
            sys.exit("making the model failed")
    model = sum(f.stat().st_size for f in a.dir.glob("*.safetensors"))
    budget = int(model * 0.6)
    rows = []
    for mode in ("one", "pipeline"):
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, __file__, "--child", mode, "--dir", str(a.dir), "--budget", str(budget),
                            "--tokens", str(a.tokens)], capture_output=True, text=True)
        line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{mode} failed:\n{r.stderr[-3000:]}")
        rows.append((mode, json.loads(line[7:]), time.perf_counter() - t0))
    gb = 1e9
    print(f"\n{model / gb:.2f} GB bf16 model, budget {budget / gb:.2f} GB (60 %) per process / per stage, "
          f"{rows[0][1]['new']} greedy tokens\n")
    print("| system | s/token | read per token | resident | load s | wall s |")
    print("|---|---|---|---|---|---|")
    names = {"one": "one process, max_ram = budget", "pipeline": "pipeline=2, budget per stage"}
    for mode, r, wall in rows:
        print(f"| {names[mode]} | {r['s_per_token']:.2f} | {r['bytes_per_token'] / gb:.2f} GB | "
              f"{' + '.join(f'{x / gb:.2f}' for x in r['resident'])} GB | {r['load_s']:.1f} | {wall:.1f} |")
    print(f"\nsame tokens: {rows[0][1]['tokens'] == rows[1][1]['tokens']}; the pipeline with 4 prompts in flight: "
          f"{rows[1][1]['four']:.2f} s per token (all rows' tokens counted)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--pipeline", action="store_true", help="(b): the pipeline against one process")
    p.add_argument("--make", action="store_true", help="(b): make the 4.3 GB model first")
    p.add_argument("--dir", type=Path, default=Path("/tmp/big43"))
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--child", default=None)
    p.add_argument("--budget", type=int, default=None)
    a = p.parse_args()
    if a.child:
        return pipeline_child(a.child, str(a.dir), a.budget, a.tokens)
    if a.pipeline:
        return bench_pipeline(a)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "in.jsonl"
        write_requests(src, a.requests, a.max_tokens)
        rows = [("one process, torch's default threads", run(src, tmp / "one.jsonl")),
                ("one process, 1 thread", run(src, tmp / "one1.jsonl", "--threads", "1"))]
        for r in (1, 2):
            rows.append((f"Ray, {r} replica{'s' * (r > 1)}", run(src, tmp / f"ray{r}.jsonl", "--ray", "--replicas",
                                                                str(r), "--replica-cpus", "1", "--threads", "1")))
        same = [(tmp / f"ray{r}.jsonl").read_bytes() == (tmp / "one.jsonl").read_bytes() for r in (1, 2)]
    base = next(r["tok_s"] for name, r in rows if name == "Ray, 1 replica")
    print(f"\n{a.requests} chat requests x {a.max_tokens} tokens, greedy, embedded SmolLM2-135M-Instruct\n")
    print("| system | job s | tok/s | vs 1 replica | wall s (with start-up) |")
    print("|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['seconds']:.1f} | {r['tok_s']:.2f} | {r['tok_s'] / base:.2f}x | {r['wall']:.1f} |")
    print(f"\noutputs byte for byte equal to one process: 1 replica {same[0]}, 2 replicas {same[1]}")


if __name__ == "__main__":
    main()
