"""Tiny random-weight configs for the decoder-only text families of the installed transformers.

`tiny_family_config(model_type)` builds a config of about conftest.tiny_config's size (hidden 64, vocab 128,
3 layers, 4 heads / 2 KV heads of 16) for any model type below: the common sizes are set on whichever
fields the config class has (its own names or its `attribute_map` aliases), and a family's own knobs
(MLA ranks, state-space sizes, linear-attention heads ...) come from EXTRA.

DENSE_FAMILIES: the dense decoder-only families whose streamed outputs (nothing resident and fully
resident) match transformers' own, logits and greedy tokens.
"""

from __future__ import annotations

import dataclasses

from layerstream.arch import TESTED_DENSE, TESTED_MOE, TESTED_MOE_WHOLE_LAYER

# Passed the survey at 0df10b4 (transformers 5.24): a tiny random checkpoint (2-D weights normal(0, 0.3),
# 1-D uniform(0.5, 1.5), as factory.spread_weights) streamed with max_ram=0 and max_ram=None, logits within
# 1e-4 and 12 greedy tokens equal to transformers' own.
DENSE_FAMILIES = TESTED_DENSE

# Fixed after the survey: a tokenizer class needing a package that is not installed (biogpt, cpmant) no
# longer stops a store from opening; weights tied across decoder layers (zamba's shared block) live in the
# head unit; dense weights that transformers converts on load (olmo_hybrid's q/k/v) are converted by split.

# Mixture of experts, each expert streamed as its own unit (checked the same way, with MOE below).
MOE_FAMILIES = TESTED_MOE
# Mixture of experts whose experts module cannot be streamed per expert (a ModuleList, routed inputs only,
# weights on a child module as dbrx's, identity experts counted apart as longcat_flash's): correct, but each
# layer is streamed whole.
MOE_WHOLE_LAYER = TESTED_MOE_WHOLE_LAYER

# Dense families that the survey does not make run (see the report).
UNSUPPORTED: dict[str, str] = {
    "hrm_text": "decoder layers in two stacks (H_module / L_module) called in cycles; num_hidden_layers counts "
                "calls, not layers",
}

# With the conftest spread these produce one repeated greedy token (the logits still match): their biases
# at uniform(0.5, 1.5) dominate, or a tied, scaled embedding makes each position predict its own token.
# Biases at normal(0, 0.3) give real sequences for bloom, ctrl, gpt-sw3, gpt2, gpt_bigcode, gpt_neo, gpt_neox,
# gptj, stablelm, zaya; tie=False for gemma3_text, gemma3n_text, gemma4_unified_text, openai-gpt, xglm; both for
# biogpt; tie=False and seed 1 for gemma4_text (seed 0 untied ends on eos at once).
SINGLE_TOKEN_WITH_CONFTEST_SPREAD = ("biogpt", "gemma3_text", "bloom", "ctrl", "gemma3n_text", "gemma4_text",
                                     "gemma4_unified_text", "gpt-sw3", "gpt2", "gpt_bigcode", "gpt_neo", "gpt_neox",
                                     "gptj", "openai-gpt", "stablelm", "xglm", "zaya")

# Common sizes, by transformers' standard attribute names.
COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)

# Other spellings of the common sizes in older configs (used when neither the name nor an attribute_map
# alias of it is a field of the config class).
ALIASES = {
    "hidden_size": ("n_embd", "d_model", "emb_dim", "hidden_dim"),
    "num_hidden_layers": ("n_layer", "n_layers", "num_layers"),
    "num_attention_heads": ("n_head", "n_heads", "num_heads", "attention_heads"),
    "intermediate_size": ("n_inner", "ffn_dim", "dff", "ffn_hidden_size", "dim_ff"),
    "max_position_embeddings": ("n_positions", "max_seq_len", "context_length"),
}

MLA = dict(q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
MAMBA = dict(state_size=8, expand=2, conv_kernel=4)
DSA = dict(index_topk=4, index_head_dim=16, index_n_heads=2)
LINEAR_ATTN = dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                   linear_value_head_dim=16, linear_conv_kernel_dim=4)

def _one_full(n: int) -> list[str]:
    return ["full_attention" if i == 1 else "linear_attention" for i in range(n)]


# A family's own knobs, on top of COMMON (field names as the config class spells them); a function of the
# number of layers where they depend on it.
EXTRA: dict = {
    # sliding windows shorter than the 19 tokens the checks see, so the windowed masks/caches are used
    "gemma2": dict(sliding_window=8, query_pre_attn_scalar=16),
    "gemma3_text": dict(sliding_window=8, query_pre_attn_scalar=16),
    "vaultgemma": dict(sliding_window=8, query_pre_attn_scalar=16),
    "cohere2": dict(sliding_window=8),
    "exaone4": dict(sliding_window=8),
    "olmo3": dict(sliding_window=8),
    "cwm": dict(sliding_window=8),
    "mistral": dict(sliding_window=None),
    "ministral": dict(sliding_window=8),
    "phi3": dict(num_key_value_heads=4),
    "phi": dict(num_key_value_heads=4),
    # older configs without GQA
    "falcon": dict(new_decoder_architecture=True, num_kv_heads=2, ffn_hidden_size=96),
    "gpt_neo": dict(attention_types=[[["global", "local"], 1], [["global"], 1]], window_size=8),
    "codegen": dict(rotary_dim=8, n_ctx=256),
    "gptj": dict(rotary_dim=8),
    "mpt": dict(expansion_ratio=2, max_seq_len=256),
    "cpmant": dict(dim_head=16, dim_ff=96, prompt_length=0, position_bias_num_buckets=32,
                   position_bias_max_distance=64),
    "gpt_neox_japanese": dict(intermediate_multiple_size=2),
    "opt": dict(ffn_dim=96, word_embed_proj_dim=64),
    "persimmon": dict(),
    "stablelm": dict(),
    "starcoder2": dict(sliding_window=8),
    # multi-head latent attention (dense)
    "minicpm3": dict(MLA, num_key_value_heads=4),
    # no padding row: transformers' Youtu zeroes the padding_idx row of the embedding when it loads a
    # checkpoint (its _init_weights), so its outputs would not be the checkpoint's own
    "youtu": dict(MLA, num_key_value_heads=4, pad_token_id=None),
    # state-space / recurrent / hybrid
    "mamba": dict(MAMBA, time_step_rank=8),
    "falcon_mamba": dict(MAMBA, time_step_rank=8),
    "mamba2": dict(MAMBA, num_heads=8, head_dim=16, n_groups=1, chunk_size=8, time_step_rank=8),
    "rwkv": dict(attention_hidden_size=64, intermediate_size=96, context_length=256),
    "bamba": dict(mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=8, mamba_d_conv=4,
                  mamba_expand=2, mamba_chunk_size=8, attn_layer_indices=[1]),
    "falcon_h1": dict(mamba_d_ssm=128, mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=8,
                      mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=8),
    # hybrid layers (a shared attention block + mamba) alternate with mamba layers; two of them, so the
    # shared block's tying has something to tie
    "zamba": lambda n: dict(attention_hidden_size=128, attention_head_dim=32, n_mamba_heads=2, mamba_d_state=8,
                            mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=8, use_mamba_kernels=False,
                            layers_block_type=["hybrid" if i % 2 == 0 else "mamba" for i in range(n)]),
    "zamba2": lambda n: dict(mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_ngroups=1, n_mamba_heads=8,
                             chunk_size=8, use_mamba_kernels=False, num_mem_blocks=1, adapter_rank=8,
                             layers_block_type=["hybrid" if i % 2 == 0 else "linear_attention" for i in range(n)]),
    "recurrent_gemma": dict(lru_width=64, attention_window_size=8, conv1d_width=4),
    "xlstm": dict(embedding_dim=64, qk_dim_factor=1.0, num_blocks=3, num_heads=4, mode="inference", chunk_size=8,
                  chunkwise_kernel="chunkwise--native_autograd", sequence_kernel="native_sequence__native",
                  step_kernel="native"),
    "lfm2": dict(block_auto_adjust_ff_dim=False, full_attn_idxs=[1], conv_L_cache=3),
    "lfm3": dict(conv_L_cache=3, sliding_window=8),
    # linear-attention layers with one full-attention layer (an all-linear stack has no sequence length)
    "qwen3_5_text": lambda n: dict(LINEAR_ATTN, layer_types=["full_attention" if i == 1 else "linear_attention"
                                                            for i in range(n)]),
    "olmo_hybrid": dict(LINEAR_ATTN),
    "dory": dict(n_input_layers=1, n_recurrent_layers=1, n_output_layers=1, n_recurrent_loops=2, sliding_window=8),
    "hrm_text": dict(H_cycles=1, L_cycles=1, L_bp_cycles=[1]),
    "doge": dict(is_moe=False, keep_window_size=8, sliding_window=None),
    "smollm3": dict(no_rope_layer_interval=2),
    "llama4_text": dict(),
    "gpt_bigcode": dict(multi_query=False),
    "modernbert-decoder": dict(local_attention=8),
    "granite_swa": dict(sliding_window=8),
    "cohere_compass_text": dict(rope_parameters={t: {"rope_type": "default", "rope_theta": 10000.0}
                                                 for t in ("full_attention", "sliding_attention")}),
    "gemma4_text": dict(vocab_size_per_layer_input=128, hidden_size_per_layer_input=16),
    "gemma4_unified_text": dict(vocab_size_per_layer_input=128, hidden_size_per_layer_input=16),
    # mixture of experts with multi-head latent attention (every head its own KV), and DeepSeek sparse
    # attention's indexer keeping fewer positions than the checks see
    "deepseek_v32": dict(MLA, num_key_value_heads=4, first_k_dense_replace=1, **DSA),
    "glm_moe_dsa": dict(MLA, num_key_value_heads=4, first_k_dense_replace=1, **DSA),
    "glm4_moe_lite": dict(MLA, num_key_value_heads=4),
    "sarvam_mla": dict(MLA, num_key_value_heads=4),
    "axk1": dict(MLA, num_key_value_heads=4),
    "axk2": dict(MLA, num_key_value_heads=4, **DSA),
    # two attention sublayers per decoder layer (num_hidden_layers counts them), the rotary dim as head_dim,
    # and two zero-compute (identity) experts beside the routed ones
    "longcat_flash": dict(MLA, num_key_value_heads=4, head_dim=8, expert_ffn_hidden_size=32, zero_expert_num=2),
    # linear-attention / state-space / short-conv layers with one full-attention layer, experts in every layer
    "qwen3_next": lambda n: dict(LINEAR_ATTN, layer_types=_one_full(n)),
    "qwen3_5_moe_text": lambda n: dict(LINEAR_ATTN, layer_types=_one_full(n)),
    "lara_mini": lambda n: dict(LINEAR_ATTN,
                                layer_types=["linear_attention", "full_attention", "sliding_attention"][:n]),
    "bailing_hybrid": lambda n: dict(MLA, num_key_value_heads=4, first_k_dense_replace=1, layer_types=_one_full(n)),
    "kimi_linear": lambda n: dict(MLA, num_key_value_heads=4, linear_head_dim=16, linear_num_heads=4,
                                  layer_types=_one_full(n)),
    "granitemoehybrid": lambda n: dict(mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=8,
                                       mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=8,
                                       shared_intermediate_size=48, position_embedding_type="rope",
                                       layer_types=_one_full(n)),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=1, expert_layer_offset=0,
                  use_mamba_kernels=False, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=8),
    "lfm2_moe": lambda n: dict(num_dense_layers=1, conv_L_cache=3,
                               layer_types=["full_attention" if i == 1 else "conv" for i in range(n)]),
    "dbrx": dict(attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
                 ffn_config=dict(ffn_hidden_size=32, moe_num_experts=8, moe_top_k=2)),
    # a hash-routed MoE layer (a fixed token -> experts table, filled by make_family_dir) and top-k ones
    "deepseek_v4": lambda n: dict(mlp_layer_types=["hash_moe"] + ["moe"] * (n - 1)),
    "inkling2_text": lambda n: dict(unpadded_vocab_size=128, swa_num_attention_heads=4, swa_num_key_value_heads=2,
                                    swa_head_dim=16, sliding_window_size=8, d_rel=8, rel_extent=16,
                                    n_layers_per_attn_res_block=2,
                                    layer_types=["hybrid" if i == 1 else "hybrid_sliding" for i in range(n)]),
    "inkling2_loop_text": lambda n: dict(EXTRA["inkling2_text"](n), n_layers_per_attn_res_block=1,
                                         loop_layer_index_start=1, loop_layer_index_end=2,
                                         loop_num_passes=2, loop_gate_rank=8),
    "qwen4_exp_text": lambda n: dict(LINEAR_ATTN, hc_count=2, hc_lowrank=8, indexer_n_heads=2, indexer_kv_heads=1,
                                     indexer_head_dim=16, indexer_budget=4, indexer_compress_ratio=2,
                                     layer_types=["indexed_attention" if i == 1 else "linear_attention"
                                                  for i in range(n)]),
    "dots3_note_text": dict(MLA, num_key_value_heads=4, first_k_dense_replace=1, **DSA),
    "zaya": dict(num_experts_per_tok=1),   # the only routing transformers' ZAYA supports
    # per-layer inputs, AltUp and the last layer reusing an earlier layer's KV cache, all small
    "gemma3n_text": lambda n: dict(vocab_size_per_layer_input=128, hidden_size_per_layer_input=16, laurel_rank=8,
                                   query_pre_attn_scalar=16, num_kv_shared_layers=1,
                                   layer_types=["full_attention" if i % 2 else "sliding_attention" for i in range(n)],
                                   activation_sparsity_pattern=[0.95] + [0.0] * (n - 1)),
}


# Mixture-of-experts sizes, set on whichever of these fields a config has: 8 experts, 2 per token, every
# layer sparse (DeepSeek-style configs keep their first layer dense).
MOE = dict(num_local_experts=8, num_experts=8, n_routed_experts=8, moe_num_experts=8, num_experts_per_tok=2,
           moe_topk=2, num_experts_per_token=2, moe_k=2, moe_intermediate_size=32, expert_intermediate_size=32,
           shared_expert_intermediate_size=48, n_group=1, topk_group=1, first_k_dense_replace=1,
           decoder_sparse_step=1, n_shared_experts=1, num_shared_experts=1, moe_num_shared_experts=1)


def _moe(cfg, keep=()):
    for c in {id(cfg): cfg, id(cfg.get_text_config()): cfg.get_text_config()}.values():
        for k, v in MOE.items():
            if hasattr(c, k) and not callable(getattr(c, k)) and k not in keep:   # a family's own value kept
                setattr(c, k, v)
        if hasattr(c, "mlp_only_layers"):
            c.mlp_only_layers = []
    return cfg


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()


def tiny_family_config(model_type: str, tie: bool | None = None, layers: int = 3):
    """A small random-weight config of transformers family `model_type` (a key of
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    fields = _fields(cls)
    amap = dict(getattr(cls, "attribute_map", {}) or {})
    kw = {}
    for key, value in {**COMMON, "num_hidden_layers": layers}.items():
        for name in (amap.get(key, key), key, *ALIASES.get(key, ())):
            if name in fields:
                kw.setdefault(name, value)
                break
    if "sliding_window" in fields:
        kw["sliding_window"] = 8
    extra = EXTRA.get(model_type, {})
    extra = extra(layers) if callable(extra) else extra
    kw.update(extra)
    kw = {k: v for k, v in kw.items() if k in fields or k not in COMMON}
    cfg = cls(**kw)
    if tie is not None:
        cfg.tie_word_embeddings = tie
    return _moe(cfg, keep=extra) if model_type in MOE_FAMILIES + MOE_WHOLE_LAYER else cfg


def make_family_dir(path, model_type: str, layers: int = 3):
    """A random-weight checkpoint of any family above, its weights spread by the tests' one factory
    (factory.make_tiny_dir: 2-D normal(0, 0.3), 1-D uniform(0.5, 1.5)), with the changes that make the
    greedy tokens of the few families in SINGLE_TOKEN_WITH_CONFTEST_SPREAD a real sequence (biases
    normal(0, 0.3), or untied)."""
    from factory import make_tiny_dir

    untie = model_type in ("biogpt", "gemma3_text", "gemma3n_text", "gemma4_text", "gemma4_unified_text",
                           "openai-gpt", "xglm")
    cfg = tiny_family_config(model_type, tie=False if untie else None, layers=layers)
    return make_tiny_dir(path, cfg, seed=1 if model_type == "gemma4_text" else 0,
                         normal_biases=model_type in SINGLE_TOKEN_WITH_CONFTEST_SPREAD)
