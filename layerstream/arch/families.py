"""The families layerstream is tested on, and the switch that allows others."""

# Families whose outputs are checked against transformers in the test suite.
# Families (transformers model_type) whose streamed outputs are checked against transformers' own in the
# test suite (tests/test_families.py, tests/test_moe.py): tiny random-weight models, logits within 1e-4 and
# greedy tokens identical. docs/families.md lists these; nothing else is called supported.
TESTED_DENSE = (
    "apertus", "apertus1p5_text", "arcee", "bamba", "biogpt", "bitnet", "bloom", "codegen", "cohere", "cohere2",
    "cohere_compass_text", "cpmant", "ctrl", "cwm", "diffllama", "doge", "dory", "ernie4_5", "exaone", "exaone4",
    "falcon", "falcon_h1", "falcon_mamba", "gemma", "gemma2", "gemma3_text", "gemma3n_text", "gemma4_text",
    "gemma4_unified_text", "glm", "glm4", "gpt-sw3", "gpt2", "gpt_bigcode", "gpt_neo", "gpt_neox",
    "gpt_neox_japanese", "gptj", "granite", "granite_swa", "helium", "hunyuan_v1_dense", "hyperclovax", "internlm3",
    "iquestcoder", "jais2", "lfm2", "lfm3", "llama", "mamba", "mamba2", "minicpm3", "ministral", "ministral3",
    "mistral", "modernbert-decoder", "mpt", "nanochat", "nemotron", "olmo", "olmo2", "olmo3", "olmo_hybrid",
    "openai-gpt", "opt", "persimmon", "phi", "phi3", "qwen2", "qwen3", "qwen3_5_text", "recurrent_gemma", "rwkv",
    "seed_oss", "smollm3", "stablelm", "starcoder2", "vaultgemma", "xglm", "xlstm", "youtu", "zamba", "zamba2",
)
# Mixture of experts with per-expert streaming (each expert its own unit, only the routed ones read).
TESTED_MOE = (
    "afmoe", "aria_text", "axk1", "axk2", "bailing_hybrid", "cohere2_moe", "deepseek_v2", "deepseek_v3",
    "deepseek_v32", "deepseek_v4", "dots1", "dots3_note_text", "ernie4_5_moe", "exaone_moe", "flex_olmo", "flint",
    "glm4_moe", "glm4_moe_lite", "glm_moe_dsa", "gpt_oss", "granitemoe", "granitemoe_swa", "granitemoehybrid",
    "granitemoeshared", "hunyuan_v1_moe", "hy_v3", "hy_v4", "inkling2_loop_text", "inkling2_text", "inkling_text",
    "jamba", "kimi_linear", "kolibri1", "laguna", "lara_mini", "lfm2_moe", "mellum", "mimo_v2_flash", "minimax",
    "minimax_m2", "minimax_m3_vl_text", "mixtral", "nemotron_h", "olmoe", "phimoe", "qwen2_moe", "qwen3_5_moe_text",
    "qwen3_moe", "qwen3_next", "qwen4_exp_text", "sarvam_mla", "sarvam_moe", "solar_open", "zaya",
)
# Mixture of experts whose experts module is not one layerstream can stream per expert (streamed, correct, a
# whole layer at a time): a ModuleList or one not called with the routing (beam, jetmoe, llama4_text), fused
# weights held by a child module, flattened (dbrx), zero-compute experts counted apart, no num_experts
# (longcat_flash).
TESTED_MOE_WHOLE_LAYER = ("beam", "dbrx", "jetmoe", "llama4_text", "longcat_flash")
TESTED_MODEL_TYPES = TESTED_DENSE + TESTED_MOE + TESTED_MOE_WHOLE_LAYER
ALLOW_UNTESTED_ENV = "LAYERSTREAM_ALLOW_UNTESTED"
