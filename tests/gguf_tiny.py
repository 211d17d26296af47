"""A tiny random-weight Qwen3-MoE model written as a GGUF file, as llama.cpp's converter lays one out
(per layer `ffn_gate_exps` / `ffn_up_exps` / `ffn_down_exps` holding every expert, [experts, rows, cols]),
with the embedded SmolLM2 GGUF's tokenizer. Linear weights in Q4_1 or Q8_0 (quantized by the `gguf`
package's own code) or F32; norms in F32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

EXPERTS, TOP_K, MOE_FF = 8, 2, 64


def make_moe_gguf(path: Path, qtype: str = "Q4_1", layers: int = 2, seed: int = 0) -> Path:
    import gguf
    import transformers as tf
    from transformers import AutoModelForCausalLM

    from layerstream.split import embedded_model

    tok = gguf.GGUFReader(embedded_model())
    vocab = len(tok.fields["tokenizer.ggml.tokens"].data)
    cfg = tf.Qwen3MoeConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, moe_intermediate_size=MOE_FF,
                            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            num_experts=EXPERTS, num_experts_per_tok=TOP_K, norm_topk_prob=True,
                            max_position_embeddings=256, tie_word_embeddings=False, rope_theta=10000.0)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    sd = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            (p.normal_(0, 0.3) if p.dim() >= 2 else p.uniform_(0.5, 1.5))
            sd[name] = p.detach().numpy()

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
    for key, field in tok.fields.items():   # the tokenizer, copied field by field
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, field.contents(), vtype, sub_type=field.types[-1])
        else:
            w.add_key_value(key, field.contents(), vtype)

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
