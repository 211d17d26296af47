"""The step API: prefill and decode one token at a time over transformers' modules and KV caches.

`generate` stays transformers' own; these are the pieces a scheduler, a draft/verify loop or a server
drives (gpt-fast's `prefill` / `decode_one_token`, mlx-lm's `generate_step`). Each call is one sweep
over the weights, whatever the batch: the streamed units are read once and serve every row.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..errors import InputError, LayerstreamError
from ..sampling import MIN_TEMPERATURE as GREEDY_BELOW  # below: greedy (as vLLM does); logits / T would overflow


class GenerationError(LayerstreamError):
    """One request could not go on (its sampling, stop handling, detokenizing or drafting failed); the other
    requests of its sweeps are not affected."""


def new_cache(model):
    """An empty KV cache for `model` (transformers' DynamicCache, as `generate` makes)."""
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


# tokens a GrowingLayer's buffers grow by when full
GROW = 256


def growing_cache(model):
    """transformers' DynamicCache for `model`, its full-attention layers `GrowingLayer`s: what `generate` and a chat
    session use, so that a decode step writes its token's keys and values in place instead of copying the whole
    cache (a 1.5B model at 512 tokens of context: ~4 ms of a ~80 ms step went to those copies). Sliding-window and
    other layers stay transformers' own."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=model.config)
    grow = growing_layer_class()
    cache.layers = [grow() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


_GROWING: list = []


def growing_layer_class():
    """`GrowingLayer`, made on first use (importing transformers' cache code takes a while)."""
    if _GROWING:
        return _GROWING[0]
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """A DynamicLayer whose keys and values are views of buffers with room for GROW more tokens: `update`
        copies the new tokens into the room (the buffers grow, copied once, when it runs out) instead of
        concatenating the whole cache each step. Everything else is transformers' DynamicLayer: a crop narrows
        the views (the next update writes over what was cropped), and where transformers replaces the tensors
        (a beam reorder, a batch selection) the next update moves them into new buffers."""

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            k, v = self.keys, self.values
            have = k.shape[-2] if k.numel() else 0
            end = have + key_states.shape[-2]
            kb, vb = getattr(self, "_kbuf", None), getattr(self, "_vbuf", None)
            if not (_prefix_of(k, kb, key_states) and _prefix_of(v, vb, value_states) and end <= kb.shape[-2]):
                room = -(-end // GROW) * GROW + GROW
                kb = key_states.new_empty((*key_states.shape[:-2], room, key_states.shape[-1]))
                vb = value_states.new_empty((*value_states.shape[:-2], room, value_states.shape[-1]))
                if have:
                    kb[..., :have, :].copy_(k)
                    vb[..., :have, :].copy_(v)
                self._kbuf, self._vbuf = kb, vb
            kb[..., have:end, :].copy_(key_states)
            vb[..., have:end, :].copy_(value_states)
            self.keys, self.values = kb[..., :end, :], vb[..., :end, :]
            return self.keys, self.values

        def reset(self) -> None:
            self._kbuf = self._vbuf = None
            super().reset()

    _GROWING.append(GrowingLayer)
    return GrowingLayer


def _prefix_of(t: torch.Tensor, buf: torch.Tensor | None, new: torch.Tensor) -> bool:
    """Whether `t` is the first tokens of `buf` (a view of it, as `update` made; not a tensor transformers put
    in its place), with `new`'s batch, heads, head size and dtype."""
    if buf is None or t.numel() == 0:
        return False
    return (t.data_ptr() == buf.data_ptr() and t.stride() == buf.stride() and t.dtype == new.dtype == buf.dtype
            and t.shape[:-2] == new.shape[:-2] == buf.shape[:-2] and t.shape[-1] == new.shape[-1])


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
    """The prompt's sweep: (logits of its last position [batch, vocab], the filled cache: `growing_cache`'s
    unless one is given)."""
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.shape[-1] == 0:
        raise InputError("the prompt is empty")
    cache = cache if cache is not None else growing_cache(model)
    return forward(model, input_ids, cache), cache


def decode_step(model, tokens: torch.Tensor, cache) -> torch.Tensor:
    """One new token per sequence [batch] (or [batch, 1]) after the cache: logits of the next [batch, vocab]."""
    return forward(model, tokens.reshape(-1, 1), cache)


def penalize(logits: torch.Tensor, seen, repetition: float = 1.0, generated=(), frequency: float = 0.0,
             presence: float = 0.0) -> torch.Tensor:
    """Logits [vocab] (or [n, vocab], each row the same sequence) with penalties for tokens already there:
    `repetition` divides the positive logits of every token `seen` (prompt and output) and multiplies the negative
    ones (transformers' and llama.cpp's rule, 1 = off); OpenAI's `frequency` and `presence` penalties subtract
    count x frequency + presence from the logits of the `generated` tokens."""
    rep, pen = repetition != 1.0 and len(seen), bool(frequency or presence) and len(generated)
    if not (rep or pen):
        return logits
    logits = logits.clone()
    if rep:
        ids = torch.as_tensor(list(set(seen)), dtype=torch.long, device=logits.device)
        picked = logits[..., ids]
        logits[..., ids] = torch.where(picked > 0, picked / repetition, picked * repetition)
    if pen:
        ids, counts = torch.as_tensor(list(generated), dtype=torch.long, device=logits.device).unique(
            return_counts=True)
        logits[..., ids] -= counts.to(logits.dtype) * frequency + presence
    return logits


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
           generator: torch.Generator | None = None, top_k: int = 0, min_p: float = 0.0) -> torch.Tensor:
    """Next tokens [batch] from logits [batch, vocab]: greedy at temperature 0 (and below GREEDY_BELOW), else
    softmax(logits / T) restricted to the `top_k` most likely tokens (0: all), then to the smallest set whose
    probability reaches `top_p`, then to those at least `min_p` x the most likely one's probability (as
    transformers' warpers do, in that order). Probabilities that are not finite (NaN or infinite logits) raise
    GenerationError rather than sample from nonsense."""
    if not temperature or temperature < GREEDY_BELOW:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum <= (1 - top_p)
        drop[..., -1:] = False   # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    if min_p:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, float("-inf"))
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
