"""Quantized stores on the embedded model: speed and agreement with the float model, in one run.

SmolLM2-135M-Instruct: the fp32 store and the int4 store made from the same GGUF (its Q4_1 blocks kept
exactly). For each setting: greedy tokens/s (32 new tokens after a 2-token warm-up, chat prompt) and,
over a fixed text (teacher forcing), top-1 next-token agreement and mean KL(float || setting) against the
fp32 float model. Each setting in its own subprocess. Then the time `quantize` takes on one random
4096x4096 float32 weight (the shape of a 7B model's attention projections; normal(0, 0.02)), int8 and
int4, and the time `dequantize` takes to turn it back into bfloat16 (what the loader does per unit when
a quantized store streams), with one torch thread and with all of them, best of 3. Last, the time a
quantizing `split` takes on a random Llama-3-8B-shaped bf16 checkpoint of `--split-layers` decoder layers
(hidden 4096, intermediate 14336, 8 KV heads, vocab 32000, untied; one shard per layer, N(0, 0.02)), int8
and int4, with workers=1 and all torch threads (the split before it had workers), workers=1 and one torch
thread (one core), and one worker per core, each in its own process, the checkpoint in the page cache: GB/s
of bf16 read, in all and per core.

Run:  .venv/bin/python bench/quant.py [--split-layers 2] [--split-kinds int8,int4] [--only-split]
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import harness

WORK = harness.WORK
SETTINGS = {
    "fp32, fully resident": dict(quant=None, max_ram=None, dtype=None),
    "int4, dequantized once at load (fits as floats)": dict(quant="int4", max_ram=None, dtype=None),
    "int4, packed int4 kernel, bf16 compute (max_ram=300MB)": dict(quant="int4", max_ram="300MB", dtype="bfloat16"),
    "int4, streamed and dequantized per sweep (max_ram=0)": dict(quant="int4", max_ram=0, dtype=None),
}


def child(name: str) -> dict:
    import torch

    from layerstream import AutoModel
    from layerstream.quant import Int4PackedLinear
    from layerstream.sources import embedded_model
    from layerstream.store import resolve

    from peers import TEXT, prompt_ids

    s = SETTINGS[name]
    ref_store = resolve(embedded_model(), store_path=WORK / "store", progress=False)
    store = resolve(embedded_model(), store_path=WORK / f"store-{s['quant']}", quantize=s["quant"],
                    progress=False) if s["quant"] else ref_store
    m = AutoModel.from_pretrained(store, max_ram=s["max_ram"], dtype=s["dtype"], progress=False)
    tokens, seconds = harness.timed_generate(m, prompt_ids(m.tokenizer), 32)
    text = m.tokenizer(TEXT, return_tensors="pt")["input_ids"]
    logits = m(text).logits.float()
    m.close()
    ref = AutoModel.from_pretrained(ref_store, progress=False)
    with torch.no_grad():
        want = ref(text).logits.float()
    agree = (logits.argmax(-1) == want.argmax(-1)).float().mean().item()
    kl = torch.nn.functional.kl_div(logits.log_softmax(-1), want.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1).mean().item()
    return {"tok_s": len(tokens) / seconds, "agree": agree, "kl": kl, "tokens": text.shape[1],
            "store_bytes": sum(u.bytes for u in m.store.manifest.units),
            "packed": sum(isinstance(mod, Int4PackedLinear) for mod in m.model.modules())}


def quantize_speed(threads: int) -> dict:
    import time

    import torch

    from layerstream.quant import dequantize, quantize

    torch.set_num_threads(threads)
    w = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0)) * 0.02
    out = {}
    for kind in ("int8", "int4"):
        best = best_d = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            parts = quantize(w, kind)
            best = min(best, time.perf_counter() - t0)
        dest = torch.empty(w.shape, dtype=torch.bfloat16)
        for _ in range(3):
            t0 = time.perf_counter()
            dequantize("uint8" if kind == "int8" else kind, parts, torch.bfloat16, out=dest)
            best_d = min(best_d, time.perf_counter() - t0)
        out[kind] = best
        out[kind + " dequantize"] = best_d
    return out


def make_checkpoint(layers: int) -> pathlib.Path:
    """The Llama-3-8B-shaped bf16 checkpoint of `layers` layers (see the docstring), written once."""
    import json

    from safetensors.torch import save_file

    from big_model import make_tensor

    d = WORK / f"llama3-8b-shaped-{layers}"
    if (d / "config.json").is_file():
        return d
    d.mkdir(parents=True, exist_ok=True)
    h, i, v, kv = 4096, 14336, 32000, 1024
    shards = [{"model.embed_tokens.weight": (v, h)}]
    for n in range(layers):
        p = f"model.layers.{n}."
        shards.append({p + "input_layernorm.weight": (h,), p + "self_attn.q_proj.weight": (h, h),
                       p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.v_proj.weight": (kv, h),
                       p + "self_attn.o_proj.weight": (h, h), p + "post_attention_layernorm.weight": (h,),
                       p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                       p + "mlp.down_proj.weight": (h, i)})
    shards.append({"model.norm.weight": (h,), "lm_head.weight": (v, h)})
    weight_map = {}
    for k, shard in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: make_tensor(n, shape) for n, shape in shard.items()}, d / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
              "intermediate_size": i, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
              "num_hidden_layers": layers, "vocab_size": v, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
              "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
              "dtype": "bfloat16"}
    (d / "config.json").write_text(json.dumps(config))   # last: the checkpoint is complete
    return d


def split_speed(layers: int, kind: str, workers: int, threads: int) -> dict:
    """Seconds a quantizing split of the checkpoint takes (its files read once before, into the page cache)."""
    import shutil
    import time

    import torch

    from layerstream.store import split

    torch.set_num_threads(threads)
    src = make_checkpoint(layers)
    read = 0
    for f in src.glob("*.safetensors"):
        read += len(f.read_bytes())
    out = WORK / f"quant-split-{kind}-{workers}-{threads}"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    split(src, out, quantize=kind, progress=False, workers=workers)
    seconds = time.perf_counter() - t0
    store = sum(f.stat().st_size for f in (out / "units").iterdir())
    shutil.rmtree(out)
    return {"seconds": seconds, "source_bytes": read, "store_bytes": store}


def split_table(layers: int, kinds: list[str], wait_quiet: float, timeout: float) -> None:
    from layerstream.utils import cores

    n = cores()
    harness.run_child(harness.self_cmd(__file__, "--make", layers))   # written once, not timed
    rows, size = [], None
    for kind in kinds:
        before = None
        for workers, threads in dict.fromkeys([(1, n), (1, 1), (n, 1)]):
            c = harness.run_child(harness.self_cmd(__file__, "--split", layers, kind, workers, threads),
                                  wait_quiet=wait_quiet, timeout=timeout)
            r = c.result
            setting = f"{workers} worker{'s' if workers > 1 else ''}" + \
                (f", {threads} torch thread{'s' if threads > 1 else ''}" if workers == 1 else "")
            if r is None:
                rows.append([kind, setting, "failed: " + c.note, "-", "-", "-", "-"])
                continue
            size, gbs = r["source_bytes"], r["source_bytes"] / r["seconds"] / 1e9
            before = before or r["seconds"]
            used = threads if workers == 1 else min(n, workers)
            rows.append([kind, setting, f"{r['seconds']:.1f}", f"{gbs:.3f}", f"{gbs / used:.3f}",
                         f"{before / r['seconds']:.2f}x", harness.fmt(c.others)])
            print(f"  split {kind}, {setting}: {r['seconds']:.1f} s", flush=True)
    print(f"\nquantizing split of a Llama-3-8B-shaped bf16 checkpoint, {layers} layer{'s' if layers > 1 else ''} "
          f"({harness.fmt_b(size)}), {n} cores:")
    harness.table(["quantization", "setting", "seconds", "GB/s bf16 in", "GB/s per core used",
                   "vs the split before workers", "cores busy with others"], rows)


def main() -> int:
    p = harness.parser(__doc__, wait_quiet=60.0)
    p.add_argument("--child", choices=list(SETTINGS), help=argparse.SUPPRESS)
    p.add_argument("--speed", type=int, help=argparse.SUPPRESS)
    p.add_argument("--make", type=int, help=argparse.SUPPRESS)
    p.add_argument("--split", nargs=4, help=argparse.SUPPRESS)
    p.add_argument("--split-layers", type=int, default=2, help="decoder layers of the split's checkpoint (default 2)")
    p.add_argument("--split-kinds", default="int8,int4", help="quantizations of the split (default int8,int4)")
    p.add_argument("--split-timeout", type=float, default=3600, help="seconds one split may take (default 3600)")
    p.add_argument("--only-split", action="store_true", help="only the quantizing split's table")
    a = p.parse_args()
    if a.make:
        make_checkpoint(a.make)
        harness.emit({})
        return 0
    if a.split:
        harness.emit(split_speed(int(a.split[0]), a.split[1], int(a.split[2]), int(a.split[3])))
        return 0
    if a.child or a.speed:
        harness.emit(child(a.child) if a.child else quantize_speed(a.speed))
        return 0
    kinds = a.split_kinds.split(",")
    if a.only_split:
        split_table(a.split_layers, kinds, a.wait_quiet, a.split_timeout)
        return 0
    rows, tokens = [], None
    for name in SETTINGS:
        c = harness.run_child(harness.self_cmd(__file__, "--child", name), wait_quiet=a.wait_quiet)
        r = c.result
        print(f"  {name}: " + (f"{r['tok_s']:.2f} tok/s" if r else f"failed: {c.note}"), flush=True)
        if r is None:
            rows.append([name, "failed", "-", "-", "-", "-"])
            continue
        tokens = r["tokens"]
        rows.append([name, f"{r['tok_s']:.2f}", f"{r['store_bytes'] / 1e6:.1f} MB", f"{r['agree']:.1%}",
                     f"{r['kl']:.5f}", r["packed"] or "-"])
    print()
    harness.table(["setting", "tok/s", "store", "top-1", "KL", "linear layers on the int4 kernel"], rows)
    print(f"(top-1 and KL over {tokens} tokens of a fixed text, against the fp32 model)")
    from layerstream.utils import cores

    for threads in sorted({1, cores()}):
        c = harness.run_child(harness.self_cmd(__file__, "--speed", threads), wait_quiet=a.wait_quiet)
        r = c.result
        if r is None:
            print(f"quantize speed, {threads} threads: failed: {c.note}")
            continue
        print(f"one 4096x4096 weight, {threads} thread{'s' if threads > 1 else ''}: quantize "
              + ", ".join(f"{k} {r[k]:.2f} s ({4096 * 4096 / r[k] / 1e6:.0f} M weights/s)" for k in ("int8", "int4"))
              + "; dequantize to bf16 " + ", ".join(f"{k} {r[k + ' dequantize'] * 1e3:.1f} ms "
                                                    f"({4096 * 4096 * 2 / r[k + ' dequantize'] / 1e9:.2f} GB/s out)"
                                                    for k in ("int8", "int4")))
    split_table(a.split_layers, kinds, a.wait_quiet, a.split_timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
