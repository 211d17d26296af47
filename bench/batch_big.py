"""Batch scaling larger than memory: aggregate tokens/s at batch 1, 8, 32, layerstream against Accelerate, in one run.

The model is bench/big.py's (~31 GB random Llama-shaped bf16 checkpoint, one decoder layer per shard, made once
by ``--make`` into ``--dir``; only the checkpoint is needed here, no GGUF). For each batch size B and each system,
a fresh subprocess (page cache dropped first) gets B distinct prompts of 8 fixed token ids (seeded, the same for
both systems) and generates ``-n`` tokens each, greedy. The first token comes from the prefill sweep; the
figures are the decode steps after it:
  ls       layerstream, max_ram = --budget (CPU) or max_gpu_memory = --budget with the rest in RAM (CUDA), served
           in place from the checkpoint (the index is made beforehand, untimed, shared with bench/big.py); an
           `Engine(model, max_batch=B)` with all B submitted, each `engine.step()` timed (one sweep each)
  offload  transformers + Accelerate, device_map="auto", max_memory={"cpu": budget} and an offload folder (CPU),
           or {0: budget, "cpu": most of the RAM} (CUDA); one padded batch of B through `generate`, each step
           timestamped by a LogitsProcessor
With LS_KV=masked in the environment, layerstream's engine keeps the shared masked cache instead of
per-sequence slabs (`Engine(paged=False)`: the engine before issue 21, for a comparison on the same day).
s/step is the median of the decode steps; tok/s = B / s/step (aggregate over the batch).

Read against compute (layerstream): per step, "read s" is the time its loader thread spent in reads
(profiler.read_seconds), "wait s" the time the compute thread waited for the loader (profiler.wait), and
"compute s" = step - wait (everything the compute thread did: layers, head, masks, sampling). If reads and compute
overlap, a step costs max(read, compute); run one after the other, read + compute. "hidden" is the share of the
smaller of the two that the overlap hid: (read + compute - step) / min(read, compute) per step (median), 100% = max,
0% = their sum. Compute bounds from the first batch whose compute s >= read s. "cores" is the process's CPU
seconds per second during the decode steps (2 = both cores busy), in brackets those of layerstream's loader and
reader threads (/proc/self/task): read s and compute s are wall times of two threads, so on a machine busy with
other processes ("others" > 0.2) they can overlap in time while sharing one core; cores says how much CPU they
really had. On CUDA "read s" covers disk reads only; copies of RAM-tier units to the GPU are asynchronous and
count in compute.

Targets: layerstream >= 1.3x Accelerate's tok/s at every batch; layerstream's tok/s at the largest batch >= 10x
its batch-1 tok/s. "same tokens": rows whose greedy tokens equal Accelerate's (batched bf16 math may differ).

Run (as root, to drop the page cache):
    python bench/batch_big.py --json bench/out/batch_big.json               # CPU, batches 1 8 32
    python bench/batch_big.py --device cuda --budget 16GB --batches 1 8 32 64
Small-scale check of the machinery:
    python bench/batch_big.py --make --layers 2 --dir /tmp/bbsmall --budget 1GB --batches 1 4 -n 3
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter

import big_model
import harness
from big_model import checkpoint_complete
from harness import drop_caches, fmt, fmt_b, ratio

SYSTEMS = {"ls": "layerstream", "offload": "accelerate offload"}
PROMPT_LEN = 8


def prompts(batch: int) -> list[list[int]]:
    """`batch` distinct prompts of PROMPT_LEN token ids, the same in every process."""
    import torch

    g = torch.Generator().manual_seed(20240)
    return torch.randint(1000, 40000, (batch, PROMPT_LEN), generator=g).tolist()


def cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def loader_cpu_s() -> float:
    """CPU seconds of this process's layerstream loader and reader threads (/proc/self/task/TID/stat)."""
    total = 0
    for t in threading.enumerate():
        if t.name.startswith(("layerstream-loader", "layerstream-read")) and t.native_id:
            try:
                with open(f"/proc/self/task/{t.native_id}/stat") as f:
                    total += sum(int(x) for x in f.read().rsplit(")", 1)[1].split()[11:13])   # utime, stime
            except OSError:
                pass
    return total / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------- children: one (system, batch) each

def child(key: str, a) -> dict:
    import torch

    __import__("layerstream" if key == "ls" else "accelerate")   # imports before the baseline
    if key == "offload":
        from transformers import AutoModelForCausalLM  # noqa: F401
    d, B, cuda = a.dir, a.batch, a.device == "cuda"
    ids = prompts(B)
    r = {"key": key, "batch": B, "base_rss": harness.rss_now(), "threads": torch.get_num_threads()}
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    steps = []       # one dict per sweep; the first is the prefill
    t0 = time.perf_counter()
    if key == "ls":
        from layerstream import AutoModel
        from layerstream.engine.scheduler import Engine, SamplingParams

        mem = {"device": "cuda", "max_gpu_memory": a.budget} if cuda else {"max_ram": a.budget}
        m = AutoModel.from_pretrained(str(d), store_path=str(d / "ls-store"), progress=False, **mem)
        r["setup_s"] = time.perf_counter() - t0
        eng = Engine(m, max_batch=B, paged=False if os.environ.get("LS_KV") == "masked" else None)
        handles = [eng.submit(p, SamplingParams(max_tokens=a.new_tokens)) for p in ids]
        prof = m.profiler

        def snap():
            return (time.perf_counter(), prof.read_seconds, sum(prof.wait.values()), prof.bytes_read, cpu_s(),
                    harness.read_bytes(), loader_cpu_s())

        s1 = snap()
        while eng.pending():   # consecutive snapshots: what the loader does between steps counts too
            s0 = s1
            rows = sum(1 for x in eng.step() if x.token_ids)
            sync()
            s1 = snap()
            st = {"s": s1[0] - s0[0], "read_s": s1[1] - s0[1], "wait_s": s1[2] - s0[2], "bytes": s1[3] - s0[3],
                  "cpu_s": s1[4] - s0[4], "disk": None if s0[5] is None else s1[5] - s0[5],
                  "loader_cpu_s": s1[6] - s0[6], "rows": rows}
            st["compute_s"] = st["s"] - st["wait_s"]
            steps.append(st)
        r["tokens"] = [h.result().token_ids for h in handles]
        r.update(threads=m.threads, direct=m.direct, bytes_per_sweep=m.plan.bytes_per_sweep, plan=m.plan.describe(),
                 engine={k: v for k, v in eng.stats.items() if isinstance(v, (int, float))})
        r["note"] = (f"{fmt_b(m.plan.bytes_per_sweep)} streamed per sweep; O_DIRECT={m.direct}; compute threads "
                     f"{m.threads}; max batch seen {eng.stats['max_batch_seen']}")
    else:
        from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

        tmp = d / "offload-tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        mm = {0: a.budget, "cpu": int(ram * 0.8)} if cuda else {"cpu": a.budget}
        try:
            model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16, device_map="auto",
                                                         max_memory=mm, offload_folder=str(tmp)).eval()
            r["setup_s"] = time.perf_counter() - t0
            stamps = []

            class Stamp(LogitsProcessor):
                def __call__(self, input_ids, scores):
                    sync()
                    stamps.append((time.perf_counter(), cpu_s(), harness.read_bytes()))
                    return scores

            x = torch.tensor(ids, device="cuda:0" if cuda else "cpu")   # model.device is "meta" when offloaded
            with torch.inference_mode():
                stamps.append((time.perf_counter(), cpu_s(), harness.read_bytes()))
                out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=a.new_tokens,
                                     do_sample=False, pad_token_id=2, logits_processor=LogitsProcessorList([Stamp()]))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        for p, q in zip(stamps, stamps[1:]):
            steps.append({"s": q[0] - p[0], "cpu_s": q[1] - p[1], "disk": None if p[2] is None else q[2] - p[2],
                          "rows": B})
        r["tokens"] = out[:, PROMPT_LEN:].tolist()
        placement = dict(Counter(map(str, model.hf_device_map.values())))
        r["note"] = f"max_memory {mm}; hf_device_map {placement}; torch threads {torch.get_num_threads()}"
    r["steps"] = steps
    return r


def summary(r: dict) -> dict:
    """Medians over the decode steps (all steps but the first)."""
    dec = r["steps"][1:]
    if not dec:
        return {}

    def med(k):
        vals = [s[k] for s in dec if s.get(k) is not None]
        return statistics.median(vals) if vals else None

    wall = sum(s["s"] for s in dec)
    out = {"s_step": med("s"), "prefill_s": r["steps"][0]["s"], "cores": sum(s["cpu_s"] for s in dec) / wall,
           "disk_step": med("disk"), "rows_min": min(s["rows"] for s in dec)}
    out["tok_s"] = r["batch"] / out["s_step"]
    if r["key"] == "ls":
        out.update(read_s=med("read_s"), wait_s=med("wait_s"), compute_s=med("compute_s"), bytes_step=med("bytes"),
                   loader_cores=sum(s["loader_cpu_s"] for s in dec) / wall)
        hid = [(s["read_s"] + s["compute_s"] - s["s"]) / min(s["read_s"], s["compute_s"]) for s in dec
               if min(s["read_s"], s["compute_s"]) > 0]
        out["hidden"] = statistics.median(hid) if hid else None
    return out


def prep(a) -> dict:
    """layerstream's in-place index of the checkpoint (a checksum of the whole model, once), untimed."""
    from layerstream.store import resolve

    t0 = time.perf_counter()
    path = resolve(str(a.dir), store_path=str(a.dir / "ls-store"), progress=True)
    return {"what": "layerstream index", "path": str(path), "seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------------------- parent

def main(argv=None) -> int:
    p = harness.parser(__doc__, wait_quiet=60.0)
    p.add_argument("--dir", type=pathlib.Path, default=pathlib.Path("/work/bigmodel"))
    p.add_argument("--layers", type=int, default=54)
    p.add_argument("--make", action="store_true", help="write the checkpoint (no GGUF) if not complete, then run")
    p.add_argument("--budget", type=harness.size_arg, default="16GB", help="CPU: max_ram and Accelerate's "
                   "max_memory; CUDA: max_gpu_memory and Accelerate's GPU max_memory (default 16GB = 16e9 bytes)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("-n", "--new-tokens", type=int, default=4, help="tokens per prompt: 1 from the prefill, the rest "
                   "are the measured decode steps (default 4)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--skip", action="append", default=[], choices=list(SYSTEMS))
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed to each child (default 3600)")
    p.add_argument("--json", type=pathlib.Path)
    p.add_argument("--child", choices=list(SYSTEMS), help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--prep", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.new_tokens < 2:
        p.error("-n must be at least 2 (the decode steps come after the prefill's token)")
    if a.child or a.prep:
        harness.emit(child(a.child, a) if a.child else prep(a))
        return 0
    if a.make:
        rc = subprocess.run(harness.self_cmd(big_model.__file__, "--dir", a.dir, "--layers", a.layers,
                                             "--no-gguf")).returncode
        if rc:
            return rc
    info = checkpoint_complete(a.dir, a.layers)
    if info is None:
        sys.exit(f"batch_big.py: error: no complete {a.layers}-layer checkpoint in {a.dir}; run with --make first")
    if os.geteuid() != 0:
        print("warning: not root: the page cache cannot be dropped; figures will include cached reads", flush=True)
    systems = [k for k in SYSTEMS if k not in a.skip]
    batches = sorted(set(a.batches))
    logdir = a.dir / "bench-logs"
    logdir.mkdir(exist_ok=True)
    print(f"model: {a.dir}, {a.layers} layers, {fmt_b(info['bytes'])} bf16; {a.device}; budget {fmt_b(a.budget)}; "
          f"batches {batches}; {PROMPT_LEN}-token prompts, {a.new_tokens} new tokens each, greedy", flush=True)
    pre = None
    if "ls" in systems:
        c = harness.run_child(harness.self_cmd(__file__, "--dir", a.dir, "--prep"), show_stderr=True)
        pre = c.result or {"failed": c.returncode}
        print(f"prep: {c.wall:.0f} s {pre}", flush=True)

    results = []
    for b in batches:
        for key in systems:
            load = harness.wait_until_quiet(a.wait_quiet) if a.wait_quiet > 0 else None
            print(f"running {key} batch {b} ...", flush=True)
            dropped = drop_caches()
            log = logdir / f"batch-{key}-{b}.log"
            cmd = harness.self_cmd(__file__, "--dir", a.dir, "--budget", a.budget, "-n", a.new_tokens, "--device",
                                   a.device, "--child", key, "--batch", b)
            c = harness.run_child(cmd, timeout=a.timeout, log=log)
            r = c.result or {"key": key, "batch": b, "tokens": None, "steps": [],
                             "note": f"failed (exit {c.returncode}): {c.note}; log {log}"}
            r.update(wall_s=c.wall, others=c.others, cache_dropped=dropped, load_before=load, peak_rss=c.peak_rss)
            r["sum"] = summary(r)
            results.append(r)
            s = r["sum"]
            print(f"  {SYSTEMS[key]} batch {b}: " + (f"setup {r['setup_s']:.1f} s, prefill {s['prefill_s']:.1f} s, "
                  f"{s['s_step']:.2f} s/step, {s['tok_s']:.2f} tok/s (others {fmt(c.others)} cores)"
                  if s else r["note"]), flush=True)
    report(a, batches, results, pre)
    return 0


def report(a, batches, results, pre) -> None:
    by = {(r["key"], r["batch"]): r for r in results}

    def got(key, b):
        return by.get((key, b), {}).get("sum") or {}

    print(f"\n{a.layers}-layer Llama-shaped bf16 model ({fmt_b(checkpoint_complete(a.dir)['bytes'])}), {a.device}, "
          f"budget {fmt_b(a.budget)}, {PROMPT_LEN}-token prompts, greedy, {a.new_tokens - 1} decode steps "
          f"measured (median)\n")
    rows, same = [], {}
    for b in batches:
        ls, ac = got("ls", b), got("offload", b)
        lt, at = by.get(("ls", b), {}).get("tokens"), by.get(("offload", b), {}).get("tokens")
        if lt is not None and at is not None:
            k = sum(x == y for x, y in zip(lt, at))
            same[b] = k == b
            cell = "yes" if k == b else f"{k}/{b} rows"
        else:
            cell = "-"
        rows.append([b, fmt(ls.get("s_step")), fmt(ls.get("tok_s")), fmt(ac.get("s_step")), fmt(ac.get("tok_s")),
                     ratio(ls.get("tok_s"), ac.get("tok_s")), fmt(ls.get("read_s")), fmt(ls.get("compute_s")),
                     fmt(ls.get("wait_s")), fmt(100 * ls["hidden"], ".0f") + "%" if ls.get("hidden") is not None
                     else "-", fmt(ls.get("cores")) + (f" ({ls['loader_cores']:.2f})" if ls else ""),
                     fmt(ac.get("cores")), cell])
    harness.table(["batch", "ls s/step", "ls tok/s", "acc s/step", "acc tok/s", "ls/acc", "ls read s",
                   "ls compute s", "ls wait s", "hidden", "ls cores", "acc cores", "same tokens"], rows)
    print("(ls = layerstream, acc = Accelerate offload; tok/s = batch / s per decode step; read s: loader time in "
          "reads per step; compute s = step - wait s, the compute thread's busy time; hidden: share of "
          "min(read, compute) hidden by overlap, 100% = step costs max(read, compute), 0% = their sum; cores: "
          "process CPU s per s during decode, in brackets the loader's and readers' threads)")

    lo, hi = batches[0], batches[-1]
    scale = {}
    for key in ("ls", "offload"):
        x, y = got(key, lo).get("tok_s"), got(key, hi).get("tok_s")
        scale[key] = y / x if x and y else None
        print(f"{SYSTEMS[key]}: batch {hi} tok/s / batch {lo} tok/s = {fmt(scale[key])}" + ("x" if scale[key] else ""))
    bound = next((b for b in batches if got("ls", b).get("compute_s") is not None
                  and got("ls", b)["compute_s"] >= got("ls", b)["read_s"]), None)
    if any(got("ls", b) for b in batches):
        print("layerstream: compute bounds (compute s >= read s) " +
              (f"from batch {bound}" if bound else "at none of the batches measured (reads bound throughout)"))
    early = [f"{SYSTEMS[r['key']]} batch {r['batch']}" for r in results
             if r["sum"] and r["sum"]["rows_min"] < r["batch"]]
    if early:
        print("note: some rows ended early (end of sequence) in: " + ", ".join(early))

    targets = []
    for b in batches:
        v = got("ls", b).get("tok_s") / got("offload", b)["tok_s"] if got("ls", b) and got("offload", b) else None
        targets.append((f"batch {b}: layerstream >= 1.3x Accelerate", v, v is not None and v >= 1.3))
    if lo == 1 and hi > 1:
        targets.append((f"layerstream batch {hi} tok/s >= 10x batch 1", scale["ls"],
                        scale["ls"] is not None and scale["ls"] >= 10))
    print()
    for text, v, ok in targets:
        print(f"target {text}: " + (f"{v:.2f}x, {'PASS' if ok else 'MISS'}" if v is not None else "not measured"))
    print()
    for r in results:
        s = r["sum"]
        print(f"- {SYSTEMS[r['key']]} batch {r['batch']}: {r.get('note')}; setup {fmt(r.get('setup_s'), '.1f')} s, "
              f"prefill {fmt(s.get('prefill_s'), '.1f')} s, per-step s {[round(x['s'], 2) for x in r['steps'][1:]]}, "
              f"disk read/step {fmt_b(s.get('disk_step'))}"
              + (f", layerstream read/step {fmt_b(s['bytes_step'])}" if s.get("bytes_step") is not None else "")
              + f", peak RSS {fmt_b(r.get('peak_rss'))}, others {fmt(r.get('others'))} cores")
        if r.get("tokens") and r["key"] == "ls" and same.get(r["batch"]) is False:
            ac = by[("offload", r["batch"])]["tokens"]
            diff = next(i for i, (x, y) in enumerate(zip(r["tokens"], ac)) if x != y)
            print(f"    first differing row {diff}: layerstream {r['tokens'][diff]} vs Accelerate {ac[diff]}")
    if not all(r.get("cache_dropped", True) for r in results):
        print("WARNING: the page cache could not be dropped (not root?): figures include cached reads")
    if any((r.get("others") or 0) > harness.QUIET_CORES for r in results):
        print(f"WARNING: other processes used > {harness.QUIET_CORES} cores during some runs: figures disturbed")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"results": results, "scaling": scale, "compute_bound_from": bound,
                                      "prep": pre, "targets": [{"target": t, "value": v, "met": ok}
                                                               for t, v, ok in targets],
                                      "args": {k: str(v) for k, v in vars(a).items()}}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
