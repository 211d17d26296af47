"""A tiny random-weight Qwen3-MoE model written as a GGUF file, as llama.cpp's converter lays one out
(per layer `ffn_gate_exps` / `ffn_up_exps` / `ffn_down_exps` holding every expert, [experts, rows, cols]),
with the embedded SmolLM2 GGUF's tokenizer. Linear weights in Q4_1 or Q8_0 (quantized by the `gguf`
package's own code) or F32; norms in F32."""

from __future__ import annotations

from pathlib import Path

import numpy as np

EXPERTS, TOP_K, MOE_FF = 8, 2, 64


def make_moe_gguf(path: Path, qtype: str = "Q4_1", layers: int = 2, seed: int = 0) -> Path:
    import gguf
    import transformers as tf

    from layerstream.sources import embedded_model

    from factory import tiny_model

    tok = gguf.GGUFReader(embedded_model())
    vocab = VOCAB
    cfg = tf.Qwen3MoeConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, moe_intermediate_size=MOE_FF,
                            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            num_experts=EXPERTS, num_experts_per_tok=TOP_K, norm_topk_prob=True,
                            max_position_embeddings=256, tie_word_embeddings=False, rope_theta=10000.0)
    sd = {name: p.detach().numpy() for name, p in tiny_model(cfg, seed=seed).named_parameters()}

    w = gguf.GGUFWriter(str(path), "qwen3moe")
    arch = "qwen3moe"
    w.add_uint32(f"{arch}.context_length", 256)
    w.add_uint32(f"{arch}.embedding_length", 64)
    w.add_uint32(f"{arch}.block_count", layers)
    w.add_uint32(f"{arch}.feed_forward_length", 96)
    w.add_uint32(f"{arch}.expert_feed_forward_length", MOE_FF)
    w.add_uint32(f"{arch}.attention.head_count", 4)
    w.add_uint32(f"{arch}.attention.head_count_kv", 2)
    w.add_uint32(f"{arch}.attention.key_length", 16)
    w.add_uint32(f"{arch}.attention.value_length", 16)
    w.add_float32(f"{arch}.rope.freq_base", 10000.0)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    w.add_uint32(f"{arch}.expert_count", EXPERTS)
    w.add_uint32(f"{arch}.expert_used_count", TOP_K)
    _copy_tokenizer(w, tok)

    qt = getattr(gguf.GGMLQuantizationType, qtype)

    def put(name: str, a: np.ndarray, quantize: bool):
        a = np.ascontiguousarray(a, dtype=np.float32)
        if quantize and qtype != "F32":
            w.add_tensor(name, gguf.quants.quantize(a, qt), raw_dtype=qt)
        else:
            w.add_tensor(name, a)

    put("token_embd.weight", sd["model.embed_tokens.weight"], False)
    put("output_norm.weight", sd["model.norm.weight"], False)
    put("output.weight", sd["lm_head.weight"], True)
    for i in range(layers):
        p = f"model.layers.{i}."
        for g, h in [("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"), ("attn_v", "self_attn.v_proj"),
                     ("attn_output", "self_attn.o_proj")]:
            put(f"blk.{i}.{g}.weight", sd[p + h + ".weight"], True)
        for g, h in [("attn_q_norm", "self_attn.q_norm"), ("attn_k_norm", "self_attn.k_norm"),
                     ("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm")]:
            put(f"blk.{i}.{g}.weight", sd[p + h + ".weight"], False)
        put(f"blk.{i}.ffn_gate_inp.weight", sd[p + "mlp.gate.weight"], False)
        gate_up = sd[p + "mlp.experts.gate_up_proj"]              # [experts, 2 * ff, hidden]: gate rows, then up
        put(f"blk.{i}.ffn_gate_exps.weight", gate_up[:, :MOE_FF], True)
        put(f"blk.{i}.ffn_up_exps.weight", gate_up[:, MOE_FF:], True)
        put(f"blk.{i}.ffn_down_exps.weight", sd[p + "mlp.experts.down_proj"], True)   # [experts, hidden, ff]
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# sizes of the scale fields of each block type (byte offset of each fp16, and a magnitude that keeps the
# weights near normal(0, 0.1)), for random blocks
_FP16_FIELDS = {"Q8_0": ((0, 1e-3),), "Q4_1": ((0, 0.01), (2, 0.1)), "Q4_0": ((0, 0.02),), "Q5_0": ((0, 0.01),),
                "Q5_1": ((0, 0.01), (2, 0.1)), "Q4_K": ((0, 4e-4), (2, 4e-4)), "Q5_K": ((0, 2e-4), (2, 2e-4)),
                "Q6_K": ((208, 4e-5),)}

# a Q4_K_M-like mix (llama.cpp's Q4_K_M also holds Q8_0 and Q5_0 tensors where K-quants do not fit),
# and every other kept type once
LLAMA_TYPES = {"token_embd": "Q4_K", "output": "Q6_K", "attn_q": "Q4_K", "attn_k": "Q5_K", "attn_v": "Q6_K",
               "attn_output": "Q4_0", "ffn_gate": "Q5_0", "ffn_up": "Q5_1", "ffn_down": "Q8_0"}


def random_blocks(rows: int, cols: int, qtype: str, rng) -> np.ndarray:
    """Random blocks of a GGUF type (uint8 [rows, bytes per row]): random codes, scales of a sane size."""
    import gguf

    per, size = gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, qtype)]
    raw = rng.integers(0, 256, size=(rows, cols // per, size), dtype=np.uint8)
    for off, mag in _FP16_FIELDS[qtype]:
        raw[..., off:off + 2] = rng.uniform(-mag, mag, size=(rows, cols // per)).astype(np.float16) \
            .view(np.uint8).reshape(rows, cols // per, 2)
    return raw.reshape(rows, -1)


def make_llama_gguf(path: Path, types: dict = LLAMA_TYPES, layers: int = 2, seed: int = 0,
                    dims: dict | None = None) -> Path:
    """A tiny random Llama GGUF (hidden 256, the K-quants' block; or `dims`) whose weights are random blocks of
    the given GGUF types (or F16/BF16/F32 floats); norms F32; the embedded SmolLM2 GGUF's tokenizer."""
    hd = (dims or {}).get("head_dim", 64)
    return _dense_gguf(path, "llama", types, layers, seed, norms=("attn_norm", "ffn_norm"),
                       keys={"rope.dimension_count": hd}, eps=1e-5, dims=dims)


# a Q4_K_M-like Gemma: the tied embedding in Q6_K, as llama.cpp keeps a tied output matrix
GEMMA_TYPES = {"token_embd": "Q6_K", "attn_q": "Q4_K", "attn_k": "Q4_K", "attn_v": "Q6_K", "attn_output": "Q4_K",
               "ffn_gate": "Q4_K", "ffn_up": "Q4_K", "ffn_down": "Q6_K"}


def make_gemma_gguf(path: Path, types: dict = GEMMA_TYPES, layers: int = 2, seed: int = 0) -> Path:
    """A tiny random Gemma-2 GGUF (hidden 256), laid out as llama.cpp's converter writes one: a tied embedding
    (no `output.weight`), four norms a layer, every norm stored as 1 + w (transformers subtracts the 1 when it
    reads the file); weights random blocks of the given types; the embedded SmolLM2 GGUF's tokenizer."""
    return _dense_gguf(path, "gemma2", types, layers, seed,
                       norms=("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"),
                       keys={"attention.key_length": 64, "attention.value_length": 64, "attention.sliding_window": 8},
                       eps=1e-6)


def _dense_gguf(path: Path, arch: str, types: dict, layers: int, seed: int, norms: tuple, keys: dict,
                eps: float, dims: dict | None = None) -> Path:
    """A tiny dense GGUF of `arch` (hidden 256, 4 heads of 64, 2 KV heads, ff 512, or `dims`): each weight of
    the type `types` gives its role (random blocks, or random F16/BF16/F32 floats; a callable (role, layer) ->
    type for per-layer mixes), norms F32; `output.weight` only where `types` has an "output"; the embedded
    SmolLM2 GGUF's tokenizer (its first `vocab` tokens)."""
    import gguf

    from layerstream.sources import embedded_model

    rng = np.random.default_rng(seed)
    tok = gguf.GGUFReader(embedded_model())
    d = {"hidden": 256, "ff": 512, "heads": 4, "kv": 2, "head_dim": 64, "vocab": VOCAB, "ctx": 256, **(dims or {})}
    hidden, ff, heads, kv, hd, vocab = d["hidden"], d["ff"], d["heads"], d["kv"], d["head_dim"], d["vocab"]
    w = gguf.GGUFWriter(str(path), arch)
    for key, val in {"context_length": d["ctx"], "embedding_length": hidden, "block_count": layers,
                     "feed_forward_length": ff, "attention.head_count": heads, "attention.head_count_kv": kv,
                     **keys}.items():
        w.add_uint32(f"{arch}.{key}", val)
    w.add_float32(f"{arch}.rope.freq_base", 10000.0)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", eps)
    _copy_tokenizer(w, tok, vocab)
    layer = [0]

    def put(name: str, rows: int, cols: int, role: str):
        qtype = "F32" if role == "norm" else types(role, layer[0]) if callable(types) else types.get(role, "F32")
        if qtype in ("F16", "BF16"):
            a = rng.normal(0, 0.1, size=(rows, cols)).astype(np.float32)
            if qtype == "F16":
                w.add_tensor(name, a.astype(np.float16))
            else:
                bf16 = gguf.GGMLQuantizationType.BF16
                w.add_tensor(name, gguf.quants.quantize(a, bf16), raw_dtype=bf16)
        elif qtype == "F32":
            w.add_tensor(name, rng.uniform(0.5, 1.5, size=(cols,)).astype(np.float32) if rows == 0
                         else rng.normal(0, 0.1, size=(rows, cols)).astype(np.float32))
        else:
            w.add_tensor(name, random_blocks(rows, cols, qtype, rng),
                         raw_dtype=getattr(gguf.GGMLQuantizationType, qtype))

    put("token_embd.weight", vocab, hidden, "token_embd")
    put("output_norm.weight", 0, hidden, "norm")
    if callable(types) or "output" in types:
        put("output.weight", vocab, hidden, "output")
    for i in range(layers):
        layer[0] = i
        put(f"blk.{i}.attn_q.weight", heads * hd, hidden, "attn_q")
        put(f"blk.{i}.attn_k.weight", kv * hd, hidden, "attn_k")
        put(f"blk.{i}.attn_v.weight", kv * hd, hidden, "attn_v")
        put(f"blk.{i}.attn_output.weight", hidden, heads * hd, "attn_output")
        put(f"blk.{i}.ffn_gate.weight", ff, hidden, "ffn_gate")
        put(f"blk.{i}.ffn_up.weight", ff, hidden, "ffn_up")
        put(f"blk.{i}.ffn_down.weight", hidden, ff, "ffn_down")
        for norm in norms:
            put(f"blk.{i}.{norm}.weight", 0, hidden, "norm")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# tokens of the embedded tokenizer a test GGUF keeps: its first ones, and the merges among them (parsing a
# GGUF's vocabulary costs seconds per reader, and several readers parse each file: transformers' config,
# tensor map and tokenizer; 4096 tokens instead of 49152 make that ten times cheaper)
VOCAB = 4096


def _copy_tokenizer(w, tok, vocab: int = VOCAB) -> None:
    import gguf

    tokens = tok.fields["tokenizer.ggml.tokens"].contents()[:vocab]
    kept = set(tokens)
    for key, field in tok.fields.items():   # the tokenizer, copied field by field
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            value = field.contents()
            if key == "tokenizer.ggml.merges":
                value = [m for m in value if all(p in kept for p in (*m.split(" "), m.replace(" ", "")))]
            elif len(value) == len(tok.fields["tokenizer.ggml.tokens"].data):
                value = value[:vocab]
            w.add_key_value(key, value, vtype, sub_type=field.types[-1])
        else:
            w.add_key_value(key, field.contents(), vtype)
