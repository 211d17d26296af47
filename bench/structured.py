"""Constrained decoding's cost in a batch job (issue 22): N extraction requests with one JSON schema
(`response_format` json_schema, strict) against the same N requests unconstrained, each job a fresh
`layerstream batch` process on the embedded SmolLM2, greedy, 8 sequences per sweep. Reported: each job's own
seconds and tokens (its summary line), wall s/token, and how many constrained lines parse as the schema.

    .venv/bin/python bench/structured.py [--requests 200]
Target: the constrained job's time per token <= 1.15x the unconstrained one's; every constrained line valid."""

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "country", "population"],
          "properties": {"name": {"type": "string", "maxLength": 24}, "country": {"type": "string", "maxLength": 24},
                         "population": {"type": "integer", "minimum": 0, "maximum": 100_000_000}}}
PLACES = ["Paris", "Tokyo", "Lima", "Cairo", "Oslo", "Quito", "Hanoi", "Dakar", "Perth", "Seoul", "Rome", "Delhi",
          "Accra", "Sofia", "Havana", "Kyiv", "Doha", "Minsk", "Lagos", "Bern"]


def lines(n: int, constrained: bool) -> str:
    out = []
    for i in range(n):
        body = {"messages": [{"role": "user", "content": f"Tell me about {PLACES[i % len(PLACES)]} (#{i})."}],
                "max_tokens": 48, "temperature": 0}
        if constrained:
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA,
                                                                              "strict": True}}
        out.append(json.dumps({"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
                               "body": body}))
    return "".join(x + "\n" for x in out)


def run(path: Path, out: Path) -> dict:
    cmd = [str(Path(sys.executable).parent / "layerstream"), "batch", str(path), str(out), "--batch-size", "8"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    m = re.search(r"(\d+) tokens in ([\d.]+) s, ([\d.]+) tok/s", r.stderr)
    return {"tokens": int(m[1]), "seconds": float(m[2]), "tok_s": float(m[3])}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=200)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        res = {}
        for name, constrained in (("unconstrained", False), ("json_schema", True)):
            src = d / f"{name}.jsonl"
            src.write_text(lines(a.requests, constrained))
            res[name] = run(src, d / f"{name}.out.jsonl")
            print(f"{name}: {res[name]['tokens']} tokens in {res[name]['seconds']:.1f} s, "
                  f"{res[name]['tok_s']:.2f} tok/s", flush=True)
        valid = 0
        for line in (d / "json_schema.out.jsonl").read_text().splitlines():
            try:
                obj = json.loads(json.loads(line)["response"]["body"]["choices"][0]["message"]["content"])
                valid += set(obj) == {"name", "country", "population"} and isinstance(obj["population"], int)
            except (ValueError, KeyError, TypeError):
                pass
    u, c = res["unconstrained"], res["json_schema"]
    ratio = (c["seconds"] / c["tokens"]) / (u["seconds"] / u["tokens"])
    print(f"constrained lines valid: {valid}/{a.requests}")
    print(f"time per token, constrained / unconstrained: {ratio:.2f}x (target <= 1.15x); whole jobs: "
          f"{c['seconds']:.1f} s vs {u['seconds']:.1f} s ({c['tokens']} vs {u['tokens']} tokens)")


if __name__ == "__main__":
    main()
