"""The one tiny-model factory of the tests: a random-weight transformers model built from a config, its
weights spread so that greedy decoding makes a real sequence, optionally saved as a checkpoint directory.

Every tiny checkpoint of the suite (conftest.make_model_dir / make_moe_dir, families_tiny.make_family_dir,
gguf_tiny.make_moe_gguf) is made here, so "the conftest spread" means one thing:

  * 2-D and larger parameters ~ normal(0, 0.3); 1-D ones (norms, biases) ~ uniform(0.5, 1.5);
    `normal_biases`: biases ~ normal(0, 0.3) too (families whose large biases make one repeated token);
  * `router_bias`: a router bias kept in the checkpoint as a buffer (DeepSeek-V3's
    `e_score_correction_bias`) ~ uniform(-0.5, 0.5), so loading it (not zeros) matters;
  * DeepSeek-V4's hash routing table (`tid2eid`): distinct experts per token, not all expert 0.

The random draws happen in that order after `torch.manual_seed(seed)`, so a (config, seed) pair always
gives the same weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

SPREAD_STD = 0.3
SPREAD_1D = (0.5, 1.5)


def spread_weights(model, normal_biases: bool = False, router_bias: bool = False):
    """Refill `model`'s weights in place as described above (uses torch's global RNG); returns it."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 or (normal_biases and name.endswith("bias")):
                p.normal_(0, SPREAD_STD)
            else:
                p.uniform_(*SPREAD_1D)
        for name, b in model.named_buffers():
            if router_bias and name.endswith("e_score_correction_bias"):
                b.uniform_(-0.5, 0.5)
            elif name.endswith("tid2eid"):
                n = model.get_submodule(name.rsplit(".", 1)[0]).num_experts
                b.copy_(torch.stack([torch.randperm(n)[:b.shape[1]] for _ in range(b.shape[0])]))
    return model


def tiny_model(config, seed: int = 0, dtype=torch.float32, normal_biases: bool = False, router_bias: bool = False):
    """A random-weight causal LM of `config` (transformers' AutoModelForCausalLM), spread."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return spread_weights(model, normal_biases=normal_biases, router_bias=router_bias)


def make_tiny_dir(path: Path, config, seed: int = 0, dtype=torch.float32, shard: str | None = None,
                  normal_biases: bool = False, router_bias: bool = False, fused: bool = False) -> Path:
    """`tiny_model(config, ...)` saved with save_pretrained at `path` (sharded at `shard`, e.g. "100KB").

    fused: the checkpoint rewritten as the model holds its weights (a MoE's [num_experts, ...] tensors,
    not transformers' per-expert hub layout)."""
    path = Path(path)
    model = tiny_model(config, seed=seed, dtype=dtype, normal_biases=normal_biases, router_bias=router_bias)
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    if fused:
        from safetensors.torch import save_file

        sd = {k: v.contiguous() for k, v in model.state_dict().items()
              if k != "lm_head.weight" or not model.config.tie_word_embeddings}
        save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    return path
