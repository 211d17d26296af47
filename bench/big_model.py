"""The larger-than-RAM model of bench/big.py: a random-weight Llama-shaped checkpoint and its GGUF, written once.

Random weights (N(0, 0.02), bf16, deterministic per tensor name), hidden 5120, intermediate 13824, 40 heads,
8 KV heads, vocab 49152 (the embedded SmolLM2's tokenizer), untied embeddings, 54 layers by default: about
31 GB. Written into a directory as a transformers checkpoint with ONE DECODER LAYER PER SHARD (embeddings,
final norm and head in shards of their own), so that AirLLM 4.0 links its split instead of copying it and
layerstream serves the shards in place, plus ``model.gguf`` with the same weights for llama.cpp
(bench/big_gguf.py). Both are written tensor by tensor and reused once complete (marker files written
last); an interrupted run resumes at the first unfinished shard. Torch is imported only to write.

Run:  .venv/bin/python bench/big_model.py --dir /work/bigmodel [--layers 54] [--no-gguf]   (or bench/big.py --make)
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
import struct
import sys
import time
import zlib

import harness
from harness import fmt_b

PROMPT = "The sea is"
CKPT_MARKER = ".checkpoint-complete.json"
GGUF_MARKER = ".gguf-complete.json"
PARAMS_FILE = ".make-params.json"
GGUF_NAME = "model.gguf"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
STD = 0.02
SEED = 1234


# ---------------------------------------------------------------------------- the model

def model_config(layers: int) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 5120,
            "intermediate_size": 13824, "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128,
            "num_hidden_layers": layers, "vocab_size": 49152, "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5, "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
            "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
            "tie_word_embeddings": False, "initializer_range": STD, "bos_token_id": 1, "eos_token_id": 2,
            "pad_token_id": 2, "use_cache": True, "dtype": "bfloat16", "pretraining_tp": 1}


def shard_plan(layers: int) -> list[tuple[str, list[tuple[str, tuple[int, ...]]]]]:
    """[(shard file name, [(tensor name, shape), ...])]: embeddings, one shard per decoder layer, the final
    norm, the head. Tensors in forward order within a shard."""
    c = model_config(layers)
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv, q = c["num_key_value_heads"] * c["head_dim"], c["num_attention_heads"] * c["head_dim"]
    groups = [[("model.embed_tokens.weight", (v, h))]]
    for n in range(layers):
        p = f"model.layers.{n}."
        groups.append([(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (q, h)),
                       (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.v_proj.weight", (kv, h)),
                       (p + "self_attn.o_proj.weight", (h, q)), (p + "post_attention_layernorm.weight", (h,)),
                       (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                       (p + "mlp.down_proj.weight", (h, i))])
    groups += [[("model.norm.weight", (h,))], [("lm_head.weight", (v, h))]]
    return [(f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors", g) for k, g in enumerate(groups)]


def safetensors_header(tensors) -> tuple[bytes, int]:
    """The header of a safetensors file holding `tensors` (bf16) back to back, as safetensors writes it
    (JSON padded with spaces to 8 bytes), and the size of the data that follows."""
    meta, off = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        n = math.prod(shape) * 2
        meta[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    h = json.dumps(meta, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h, off


def shard_bytes(tensors) -> int:
    header, data = safetensors_header(tensors)
    return len(header) + data


def make_tensor(name: str, shape, seed: int = SEED):
    """Deterministic per (seed, name): N(0, 0.02) in bf16; norms are ones."""
    import torch

    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    return torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, STD, generator=g)


def gguf_bytes_estimate(layers: int) -> int:
    return sum(shard_bytes(t) for _, t in shard_plan(layers)) + 12_000_000   # + tokenizer metadata, padding


def checkpoint_complete(d: pathlib.Path, layers: int | None = None) -> dict | None:
    """The checkpoint marker's contents when the checkpoint in `d` is complete (and of `layers`)."""
    try:
        info = json.loads((d / CKPT_MARKER).read_text())
        if layers is not None and info.get("layers") != layers:
            return None
        return info if all((d / name).stat().st_size == size for name, size in info["files"].items()) else None
    except (OSError, ValueError):
        return None


def gguf_complete(d: pathlib.Path) -> dict | None:
    try:
        info = json.loads((d / GGUF_MARKER).read_text())
        return info if (d / GGUF_NAME).stat().st_size == info["bytes"] else None
    except (OSError, ValueError, KeyError):
        return None


def make(d: pathlib.Path, layers: int, gguf: bool, gguf_type: str) -> None:
    """Write the checkpoint (shard by shard, tensor by tensor; resumable) and the GGUF, once."""
    import torch
    from tqdm import tqdm

    from layerstream.store import atomic_write_bytes

    def marker(name: str, info: dict) -> None:
        atomic_write_bytes(d / name, json.dumps(info, indent=1).encode())

    d.mkdir(parents=True, exist_ok=True)
    params = {"layers": layers, "seed": SEED, "std": STD, "config": model_config(layers)}
    pf = d / PARAMS_FILE
    if pf.is_file() and (old := json.loads(pf.read_text())) != params:
        sys.exit(f"big.py: error: {d} holds (part of) a model made with other parameters "
                 f"(layers={old.get('layers')}); pass another --dir or delete it")
    plan = shard_plan(layers)
    done_ckpt = checkpoint_complete(d, layers) is not None
    done_gguf = (not gguf) or gguf_complete(d) is not None
    if done_ckpt and done_gguf:
        print(f"model already complete in {d} (checkpoint{' + GGUF' if gguf else ''})", flush=True)
        return

    # disk: what is still to write must fit, with 2 GB to spare
    sizes = {f: shard_bytes(t) for f, t in plan}
    todo = {f for f, s in sizes.items() if not ((d / f).is_file() and (d / f).stat().st_size == s)}
    need_ckpt = 0 if done_ckpt else sum(sizes[f] for f in todo)
    need_gguf = 0 if done_gguf else gguf_bytes_estimate(layers)
    free = shutil.disk_usage(d).free
    need = need_ckpt + need_gguf + 2_000_000_000
    print(f"model: {layers} layers, checkpoint {fmt_b(sum(sizes.values()))} in {len(plan)} shards"
          + (f" + GGUF ({gguf_type}) ~{fmt_b(gguf_bytes_estimate(layers))}" if gguf else "")
          + f"; still to write {fmt_b(need_ckpt + need_gguf)}; {fmt_b(free)} free on {d}", flush=True)
    if need > free:
        sys.exit(f"big.py: error: not enough disk in {d}: {fmt_b(need_ckpt)} checkpoint + {fmt_b(need_gguf)} GGUF "
                 f"+ 2 GB margin = {fmt_b(need)} needed, {fmt_b(free)} free. Free space, pass fewer --layers, "
                 f"or --no-gguf (llama.cpp is then skipped)")
    pf.write_text(json.dumps(params, indent=1))

    if not done_ckpt:
        t0 = time.perf_counter()
        torch.set_num_threads(1)
        bar = tqdm(total=sum(sizes.values()), initial=sum(sizes.values()) - need_ckpt, unit="B", unit_scale=True,
                   desc="checkpoint", file=sys.stderr, mininterval=1.0)
        for fname, tensors in plan:
            if fname not in todo:
                continue
            path = d / fname
            tmp = path.with_name(path.name + ".tmp")
            with open(tmp, "wb") as f:
                header = safetensors_header(tensors)[0]
                f.write(header)
                bar.update(len(header))
                for name, shape in tensors:
                    t = make_tensor(name, shape)
                    f.write(t.view(torch.uint8).numpy().data)
                    bar.update(t.numel() * 2)
                    del t
                f.flush()
                os.fsync(f.fileno())
            harness.drop_file_cache(tmp)
            os.replace(tmp, path)
        bar.close()
        index = {"metadata": {"total_size": sum(math.prod(s) * 2 for _, ts in plan for _, s in ts)},
                 "weight_map": {n: f for f, ts in plan for n, _ in ts}}
        (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (d / "config.json").write_text(json.dumps({**model_config(layers), "transformers_version": "5.24.0"},
                                                  indent=2))
        (d / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "do_sample": False}, indent=2))
        _copy_tokenizer(d)
        info = {"layers": layers, "files": sizes, "bytes": sum(sizes.values()), "seconds": time.perf_counter() - t0}
        marker(CKPT_MARKER, info)
        print(f"checkpoint written: {fmt_b(info['bytes'])} in {info['seconds']:.0f} s", flush=True)

    if not done_gguf:
        import big_gguf

        t0 = time.perf_counter()
        size = big_gguf.write_gguf(d, d / GGUF_NAME, dtype=gguf_type)
        marker(GGUF_MARKER, {"bytes": size, "dtype": gguf_type, "seconds": time.perf_counter() - t0})
        print(f"GGUF written: {fmt_b(size)} ({gguf_type}) in {time.perf_counter() - t0:.0f} s", flush=True)


def _copy_tokenizer(d: pathlib.Path) -> None:
    """The tokenizer of the embedded SmolLM2 (vocab 49152), from its layerstream store."""
    from layerstream.store import resolve

    store = pathlib.Path(resolve(None, progress=False))
    for name in TOKENIZER_FILES:
        if (store / name).is_file():
            shutil.copyfile(store / name, d / name)
    if not (store / "tokenizer.json").is_file():
        sys.exit(f"big.py: error: no tokenizer.json in {store}")


def prompt_ids(d):
    """The benchmark prompt, "The sea is", as a [1, n] LongTensor for the model in `d` (no special tokens)."""
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(d))
    return torch.tensor([tok(PROMPT, add_special_tokens=False)["input_ids"]], dtype=torch.long)


def main(argv=None) -> int:
    p = harness.parser(__doc__)
    p.add_argument("--dir", type=pathlib.Path, default=pathlib.Path("/work/bigmodel"))
    p.add_argument("--layers", type=int, default=54)
    p.add_argument("--no-gguf", action="store_true", help="no GGUF (bench/big.py then skips llama.cpp)")
    p.add_argument("--gguf-type", default="bf16", choices=["bf16", "f16"])
    a = p.parse_args(argv)
    make(a.dir, a.layers, gguf=not a.no_gguf, gguf_type=a.gguf_type)
    return 0


if __name__ == "__main__":
    sys.exit(main())
