"""The step API: prefill and decode one token at a time over transformers' modules and KV caches.

`generate` stays transformers' own; these are the pieces a scheduler, a draft/verify loop or a server
drives (gpt-fast's `prefill` / `decode_one_token`, mlx-lm's `generate_step`). Each call is one sweep
over the weights, whatever the batch: the streamed units are read once and serve every row.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..errors import InputError, LayerstreamError

GREEDY_BELOW = 1e-5   # a temperature below this samples greedily (as vLLM does): logits / T would overflow float32


class GenerationError(LayerstreamError):
    """One request could not go on (its sampling, stop handling, detokenizing or drafting failed); the other
    requests of its sweeps are not affected."""


def new_cache(model):
    """An empty KV cache for `model` (transformers' DynamicCache, as `generate` makes)."""
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def forward(model, input_ids: torch.Tensor, cache, attention_mask: torch.Tensor | None = None,
            position_ids: torch.Tensor | None = None, last_only: bool = True,
            keep: torch.Tensor | None = None) -> torch.Tensor:
    """One sweep: run `input_ids` [batch, new tokens] after what `cache` holds, append their keys and values
    to it, and return float32 logits, of the last position only [batch, vocab] (the head computes one row per
    sequence), of every new position [batch, new tokens, vocab] with `last_only=False`, or of the positions
    `keep` (indices) [batch, len(keep), vocab]."""
    past = cache.get_seq_length()
    n = input_ids.shape[-1]
    kwargs = {"cache": cache, "use_cache": True,
              "cache_position": torch.arange(past, past + n, device=model.device)}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask.to(model.device)
    if position_ids is not None:
        kwargs["position_ids"] = position_ids.to(model.device)
    if keep is not None:
        kwargs["logits_to_keep"] = keep.to(model.device)
    elif last_only:
        kwargs["logits_to_keep"] = 1
    with model.running():
        out = model.model(input_ids=input_ids.to(model.device), **kwargs)
    logits = out.logits.float()
    return logits[:, -1] if last_only and keep is None else logits


def prefill(model, input_ids: torch.Tensor, cache=None) -> tuple[torch.Tensor, object]:
    """The prompt's sweep: (logits of its last position [batch, vocab], the filled cache)."""
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.shape[-1] == 0:
        raise InputError("the prompt is empty")
    cache = cache if cache is not None else new_cache(model)
    return forward(model, input_ids, cache), cache


def decode_step(model, tokens: torch.Tensor, cache) -> torch.Tensor:
    """One new token per sequence [batch] (or [batch, 1]) after the cache: logits of the next [batch, vocab]."""
    return forward(model, tokens.reshape(-1, 1), cache)


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens [batch] from logits [batch, vocab]: greedy at temperature 0 (and below GREEDY_BELOW), else
    softmax(logits / T) restricted to the smallest set of tokens whose probability reaches top_p (as
    transformers' warpers do). Probabilities that are not finite (NaN or infinite logits) raise
    GenerationError rather than sample from nonsense."""
    if not temperature or temperature < GREEDY_BELOW:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum <= (1 - top_p)
        drop[..., -1:] = False   # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    if not bool(torch.isfinite(probs).all()):
        raise GenerationError(f"the sampling probabilities are not finite (temperature {temperature!r}, top_p "
                              f"{top_p!r}): the model's logits hold NaN or infinite values")
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


def generate_step(model, prompt_ids, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                  seed: int | None = None, eos_token_ids=(), cache=None) -> Iterator[int]:
    """Token ids of one sequence as they are made (one sweep each), stopping at an end-of-sequence id
    (yielded) or after `max_new_tokens`. Greedy gives transformers' `generate` tokens exactly."""
    ids = torch.as_tensor(prompt_ids).reshape(1, -1)
    if max_new_tokens <= 0:
        raise InputError(f"max_new_tokens must be positive, got {max_new_tokens}")
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    logits, cache = prefill(model, ids, cache)
    eos = set(eos_token_ids or ())
    for i in range(max_new_tokens):
        tok = sample(logits, temperature, top_p, gen)
        t = int(tok[0])
        yield t
        if t in eos or i == max_new_tokens - 1:
            return
        logits = decode_step(model, tok, cache)


def eos_ids(model) -> set[int]:
    """The ids that end a sequence: the generation config's eos_token_id (one or several) and the tokenizer's."""
    out = set()
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    out.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    tok = getattr(model, "tokenizer", None)
    if tok is not None and tok.eos_token_id is not None:
        out.add(tok.eos_token_id)
    return out
