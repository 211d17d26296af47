"""Mixture of experts: bytes read per token with per-expert streaming vs a dense sweep of the same model.

A random-weight Qwen3-MoE-shaped checkpoint (bf16, written by transformers' own save_pretrained, so one
tensor per expert as on the hub; default 16 layers, 64 experts of which 8 per token, hidden 1024, expert
width 512: ~3.3 GB) is served in place (the store points into its shards). Then, each in its own
subprocess, greedy decoding of 16 tokens after an 8-token prompt (one warm-up generation first):

- layerstream, max_ram=0, in place and from a split store (`in_place=False`): nothing resident; per
  token the dense part of every layer (attention, norms, router) is read, plus only the experts the
  router chose. Bytes read per token are counted by
  layerstream's reader; they are compared with a dense sweep (every unit of the store but the embedding,
  what a whole-layer streamer such as AirLLM reads per token) and with the expectation
  dense + (top_k / experts) x all experts;
- layerstream with a RAM budget of half the model: the planner keeps the dense parts and some experts
  resident, first without router counts (experts spread evenly), then with the counts the runs before
  recorded in the store (the same prompt: an upper bound on what counts give); and with a budget that
  holds everything;
- transformers + Accelerate disk offload (device_map="auto", max_memory={"cpu": 64MB}), the peer that
  streams this model without per-expert reads; and transformers fully in RAM for the tokens.

The checkpoint is smaller than RAM, so reads come from the page cache after the first sweep: the
seconds per token here measure the cost of the bytes moved and of the machinery, not of a disk.

Run:  .venv/bin/python bench/moe.py   [--layers 16 --experts 64 --topk 8 --hidden 1024 --expert-width 512]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import tempfile
from collections import Counter

import harness

HERE = pathlib.Path(__file__).resolve().parent
WORK = harness.WORK / "moe"
PROMPT = [1, 17, 333, 5, 900, 64, 12, 4000]
NEW = 16
RUNS = [  # (key, what runs, its budget: a number, or a share of the checkpoint's size, label)
    ("ls_stream", "layerstream", 0, "layerstream max_ram=0 (in place)"),
    ("ls_stream_split", "layerstream-split", 0, "layerstream max_ram=0, split store"),
    ("ls_half_nocounts", "layerstream", 0.5, "layerstream max_ram=half, no router counts"),
    ("ls_half", "layerstream", 0.5, "layerstream max_ram=half, router counts of the runs above (same prompt)"),
    ("ls_full", "layerstream", 2.0, "layerstream all resident"),
    ("accelerate", "accelerate", None, "accelerate disk offload"),
    ("transformers", "transformers", None, "transformers in RAM"),
]


def config(a):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(hidden_size=a.hidden, intermediate_size=4 * a.hidden, moe_intermediate_size=a.expert_width,
                          num_hidden_layers=a.layers, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
                          num_experts=a.experts, num_experts_per_tok=a.topk, vocab_size=32000,
                          max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def make(a) -> pathlib.Path:
    import torch
    from transformers import AutoModelForCausalLM

    d = WORK / f"ckpt-{a.layers}x{a.experts}x{a.topk}-{a.hidden}-{a.expert_width}"
    if (d / ".complete").is_file():
        return d
    shutil.rmtree(d, ignore_errors=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config(a), dtype=torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.05)
            else:
                p.fill_(1.0)
    model.save_pretrained(d, max_shard_size="1GB")
    (d / ".complete").write_text("ok")
    return d


def child(what: str, ckpt: str, budget: int | None) -> dict:
    import torch

    ids = torch.tensor([PROMPT])
    if what.startswith("layerstream"):
        from layerstream import AutoModel

        split = what == "layerstream-split"   # a store of its own instead of the checkpoint's shards in place
        store = WORK / ("store-split" if split else "store")
        m = AutoModel.from_pretrained(ckpt, max_ram=budget, store_path=store, progress=False,
                                      in_place=False if split else None)
        out, seconds = harness.timed_generate(m, ids, NEW)
        st, prof = m.last_stats, m.profiler
        units = {u.name: u.bytes for u in m.store.manifest.units}
        decode = prof.experts[len(prof.experts) // prof.sweeps:]   # the calls after the prefill's
        return {"seconds": seconds, "new": len(out),
                "bytes_per_token": st["bytes_per_token"], "sweeps": prof.sweeps,
                "dense_sweep": sum(b for n, b in units.items() if n != "embed"),
                "dense_part": sum(b for n, b in units.items() if ".expert." not in n and n != "embed"),
                "experts_total": sum(b for n, b in units.items() if ".expert." in n),
                "share": m.plan.expert_share,
                "routed_per_call": sum(len(r) for _, r, _ in decode) / max(len(decode), 1),
                "read_per_call": sum(k for _, _, k in decode) / max(len(decode), 1),
                "resident_experts": sum(u.tier == "ram" for u in m.plan.units if u.kind == "expert"),
                "in_place": m.store.manifest.in_place,
                "store_disk": sum(f.stat().st_size for f in store.rglob("*") if f.is_file()),
                "out": out}
    from transformers import AutoModelForCausalLM

    kw, tmp = {}, None
    if what == "accelerate":
        tmp = tempfile.mkdtemp(prefix="offload-", dir=WORK)
        kw = dict(device_map="auto", max_memory={"cpu": "64MB"}, offload_folder=tmp)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16, **kw).eval()
    with torch.inference_mode():
        out, seconds = harness.timed_generate(model, ids, NEW)
    note = ""
    if what == "accelerate":
        note = f"hf_device_map {dict(Counter(map(str, getattr(model, 'hf_device_map', {}).values())))}"
        shutil.rmtree(tmp, ignore_errors=True)
    return {"seconds": seconds, "new": len(out), "out": out, "note": note}


def main(argv=None) -> int:
    ap = harness.parser(__doc__, wait_quiet=60.0)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--expert-width", type=int, default=512)
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        what, ckpt, budget = a.child
        harness.emit(child(what, ckpt, None if budget == "none" else int(budget)))
        return 0
    WORK.mkdir(parents=True, exist_ok=True)
    ckpt = make(a)
    size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    print(f"checkpoint {ckpt}: {size / 1e9:.2f} GB, {a.layers} layers x {a.experts} experts, {a.topk} per token")
    runs = {}
    for key, what, share, _ in RUNS:
        if key in ("ls_stream", "ls_half_nocounts"):   # the planner's first choice, before any router counts exist
            (WORK / "store" / "expert-counts.json").unlink(missing_ok=True)
        budget = "none" if share is None else int(share * size)
        c = harness.run_child(harness.self_cmd(__file__, "--child", what, ckpt, budget), wait_quiet=a.wait_quiet)
        runs[key] = c.result
        if c.result is None:
            print(f"{key}: did not run ({c.note})")
    ref = runs["transformers"]["out"] if runs.get("transformers") else None
    s = runs.get("ls_stream")
    if s:
        expect = s["dense_part"] + s["share"] * s["experts_total"]
        print(f"bytes read per token, max_ram=0: {s['bytes_per_token'] / 1e6:.1f} MB; dense sweep "
              f"{s['dense_sweep'] / 1e6:.1f} MB -> {s['bytes_per_token'] / s['dense_sweep']:.3f}x of it "
              f"(active/total experts {s['share']:.3f}); expected dense part + share of experts "
              f"{expect / 1e6:.1f} MB -> measured/expected {s['bytes_per_token'] / expect:.3f}")
        print(f"  experts routed per call while decoding {s['routed_per_call']:.2f}, read from disk "
              f"{s['read_per_call']:.2f}")
    rows = []
    for key, _, _, label in RUNS:
        r = runs.get(key)
        if not r:
            continue
        ls = "bytes_per_token" in r
        rows.append([label, f"{r['seconds'] / r['new']:.3f}", f"{r['bytes_per_token'] / 1e6:.1f}" if ls else "-",
                     r["resident_experts"] if ls else "-",
                     f"{'in place' if r['in_place'] else 'split'} {r['store_disk'] / 1e6:.1f} MB" if ls else "-",
                     "-" if ref is None else ("same" if r["out"] == ref else "DIFFER"), r.get("note", "")])
    print()
    harness.table(["system", "s/token", "MB read/token", "experts resident", "store on disk", "tokens vs transformers",
                   "note"], rows)
    out = HERE / "out"
    out.mkdir(exist_ok=True)
    (out / "moe.json").write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
