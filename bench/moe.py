"""Mixture of experts: bytes read per token with per-expert streaming vs a dense sweep of the same model.

A random-weight Qwen3-MoE-shaped checkpoint (bf16, written by transformers' own save_pretrained, so one
tensor per expert as on the hub; default 16 layers, 64 experts of which 8 per token, hidden 1024, expert
width 512: ~3.3 GB) is served in place (the store points into its shards). Then, each in its own subprocess, greedy
decoding of 16 tokens after an 8-token prompt (one warm-up generation first):

- layerstream, max_ram=0, in place and from a split store (`in_place=False`): nothing resident; per token the dense part of every layer (attention, norms,
  router) is read, plus only the experts the router chose. Bytes read per token are counted by
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
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from cpuload import child_result  # noqa: E402

WORK = pathlib.Path("/tmp/layerstream-bench/moe")
PROMPT = [1, 17, 333, 5, 900, 64, 12, 4000]
NEW = 16


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
        m.generate(ids, max_new_tokens=2, do_sample=False)
        out = m.generate(ids, max_new_tokens=NEW, do_sample=False)
        st, prof = m.last_stats, m.profiler
        units = {u.name: u.bytes for u in m.store.manifest.units}
        decode = prof.experts[len(prof.experts) // prof.sweeps:]   # the calls after the prefill's
        return {"seconds": st["seconds"], "new": st["new_tokens"],
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
                "out": out[0, len(PROMPT):].tolist()}
    from transformers import AutoModelForCausalLM

    kw = {}
    tmp = None
    if what == "accelerate":
        tmp = tempfile.mkdtemp(prefix="offload-", dir=WORK)
        kw = dict(device_map="auto", max_memory={"cpu": "64MB"}, offload_folder=tmp)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16, **kw).eval()
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=2, do_sample=False)
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=NEW, do_sample=False)
        dt = time.perf_counter() - t0
    note = ""
    if what == "accelerate":
        places = {}
        for v in model.hf_device_map.values():
            places[str(v)] = places.get(str(v), 0) + 1
        note = f"hf_device_map {places}"
        shutil.rmtree(tmp, ignore_errors=True)
    return {"seconds": dt, "new": out.shape[1] - len(PROMPT), "out": out[0, len(PROMPT):].tolist(), "note": note}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--expert-width", type=int, default=512)
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        what, ckpt, budget = a.child
        print("RESULT " + json.dumps(child(what, ckpt, None if budget == "none" else int(budget))), flush=True)
        return 0
    WORK.mkdir(parents=True, exist_ok=True)
    ckpt = make(a)
    size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    print(f"checkpoint {ckpt}: {size / 1e9:.2f} GB, {a.layers} layers x {a.experts} experts, {a.topk} per token")
    runs = {}
    (WORK / "store" / "expert-counts.json").unlink(missing_ok=True)
    for key, what, budget in (("ls_stream", "layerstream", 0), ("ls_stream_split", "layerstream-split", 0),
                              ("ls_half_nocounts", "layerstream", size // 2),
                              ("ls_half", "layerstream", size // 2), ("ls_full", "layerstream", 2 * size),
                              ("accelerate", "accelerate", None), ("transformers", "transformers", None)):
        if key == "ls_half_nocounts":   # the planner's first choice, before any router counts exist
            (WORK / "store" / "expert-counts.json").unlink(missing_ok=True)
        r, tail = child_result([sys.executable, __file__, "--child", what, str(ckpt),
                                "none" if budget is None else str(budget)])
        runs[key] = r
        if r is None:
            print(f"{key}: did not run ({tail})")
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
    for key, label in (("ls_stream", "layerstream max_ram=0 (in place)"),
                       ("ls_stream_split", "layerstream max_ram=0, split store"),
                       ("ls_half_nocounts", "layerstream max_ram=half, no router counts"),
                       ("ls_half", "layerstream max_ram=half, router counts of the runs above (same prompt)"),
                       ("ls_full", "layerstream all resident"),
                       ("accelerate", "accelerate disk offload"), ("transformers", "transformers in RAM")):
        r = runs.get(key)
        if not r:
            continue
        extra = ""
        if "bytes_per_token" in r:
            extra = (f", {r['bytes_per_token'] / 1e6:.1f} MB read/token, {r['resident_experts']} experts resident, "
                     f"store {'in place' if r['in_place'] else 'split'} {r['store_disk'] / 1e6:.1f} MB of disk")
        same = "" if ref is None else (", same tokens as transformers" if r["out"] == ref else ", TOKENS DIFFER")
        print(f"{label:40s} {r['seconds'] / r['new']:.3f} s/token{extra}{same} {r.get('note', '')}")
    out = HERE / "out"
    out.mkdir(exist_ok=True)
    (out / "moe.json").write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
