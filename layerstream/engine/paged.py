"""Paged KV with per-sequence attention (spike for issue 21; see docs/paged-spike.md).

transformers' continuous batching keeps KV in fixed-size blocks (`PagedAttentionCache`: a block table per request,
prefix sharing by block hashes) and runs one forward over the packed new tokens of every request, passing the cache
and the varlen keywords (`cu_seq_lens_q/k`, `max_length_q/k`, `read_index`, `write_index`) to the model. Each
attention layer's `cache.update` writes the new keys and values into their blocks and reads back, per request, that
request's own columns, packed one request after the other. What scores them is the attention implementation:

- "sdpa" (transformers' CPU choice): one SDPA over [all new tokens, all read columns] with a block-diagonal mask
  that transformers builds (`continuous_batching.utils.build_attention_mask`): still B x (B x C) work at decode.
- "flash_attention_*": varlen / block-table kernels, per sequence, but CUDA only.
- PAGED (engine/kv.py's slab_attention): SDPA once per sequence over its own slice of the packed columns
  (`cu_seq_lens_q/k` give the slices), so a step costs the sum of the sequences' contexts. Not a kernel.

The engine runs on engine/kv.py's slabs instead (no per-step gather of every context out of the blocks); this
runner stays as the measured alternative (bench/paged_spike.py) and the base for a CUDA paged kernel.

`PagedRunner` drives the cache from outside, step by step: the caller (our scheduler) says which sequences run and
which tokens they add; transformers' generation loop, its scheduler, request states and thread are not used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kv import PAGED  # noqa: F401  (per-sequence SDPA: engine/kv.py's slab_attention over packed keys and values)
from .kv import register as _register_kv


def register() -> None:
    """Make PAGED a transformers attention implementation (transformers' SDPA for non-paged forwards)."""
    _register_kv("sdpa")


@dataclass
class _State:
    """What `PagedAttentionCache` reads of a request: its id and how many of its tokens are in the cache."""
    request_id: str
    position_offset: int = 0

    def current_len(self) -> int:
        return self.position_offset


class PagedRunner:
    """One forward per step over several sequences, each with its own KV blocks in transformers' PagedAttentionCache.

    `attn`: PAGED (per-sequence SDPA, registered here) or "sdpa" (transformers' own: one SDPA with a block-diagonal
    mask). `num_blocks` blocks of `page_size` tokens (for every layer) are allocated up front."""

    def __init__(self, model, num_blocks: int = 1024, page_size: int = 64, max_batch_tokens: int = 4096,
                 attn: str = PAGED, prefix_sharing: bool = False):
        from transformers import ContinuousBatchingConfig
        from transformers.generation.continuous_batching.cache import PagedAttentionCache
        from transformers.generation.continuous_batching.distributed import DistributedHelper

        self.model, self.attn = model, attn
        net = model.model
        if attn == PAGED:
            register()
        if net.config._attn_implementation != attn:
            net.set_attn_implementation(attn)
        cfg = ContinuousBatchingConfig(num_blocks=num_blocks, page_size=page_size, max_batch_tokens=max_batch_tokens,
                                       max_blocks_per_request=0, max_memory_percent=0.9, max_requests_per_batch=256,
                                       allow_block_sharing=prefix_sharing)
        self.cache = PagedAttentionCache(net.config.get_text_config(), cfg, model.device,
                                         DistributedHelper(None, None), dtype=model.dtype,
                                         model_supports_logits_to_keep=True)
        self.layer_types = list(self.cache.cache_allocators)
        self.states: dict[str, _State] = {}

    def length(self, sid: str) -> int:
        return self.states[sid].position_offset

    def free(self, sid: str) -> None:
        """The sequence's blocks go back to the pool (kept for prefix reuse when sharing is on)."""
        self.cache.free_blocks(sid)
        self.states.pop(sid, None)

    def share_prefix(self, sid: str, prompt: list[int]) -> int:
        """With prefix sharing on: adopt the cached blocks of the longest block-aligned prefix of `prompt` (from
        finished or running sequences whose blocks were marked complete); the number of tokens to skip."""
        n = self.cache.search_prefix_match(sid, prompt)
        self.states.setdefault(sid, _State(sid)).position_offset = n
        return n

    @torch.no_grad()
    def step(self, rows: list[tuple[str, list[int]]]) -> torch.Tensor:
        """One forward: each row (sequence id, its new tokens) appends its tokens after its cached ones. Returns
        float32 logits of each row's last new token [rows, vocab]. MemoryError when the blocks run out."""
        dev = self.model.device
        ids, pos, cq, lasts = [], [], [0], []
        ck = {t: [0] for t in self.layer_types}
        maxk = dict.fromkeys(self.layer_types, 0)
        n_groups = len(self.layer_types)
        write, read = [[] for _ in range(n_groups)], [[] for _ in range(n_groups)]
        any_past = any(self.states.get(sid, _State(sid)).position_offset for sid, _ in rows)
        for sid, toks in rows:
            st = self.states.setdefault(sid, _State(sid))
            past, n = st.position_offset, len(toks)
            if not self.cache.can_store_request_tokens(st, n):
                raise MemoryError(f"the paged KV cache has no free block for sequence {sid}")
            self.cache.extend_read_and_write_indices(sid, past, n, read if any_past else None, write)
            ids += toks
            pos += range(past, past + n)
            cq.append(cq[-1] + n)
            lasts.append(cq[-1] - 1)
            for t, alloc in self.cache.cache_allocators.items():
                k = alloc.get_seqlen_k(past, n)
                ck[t].append(ck[t][-1] + k)
                maxk[t] = max(maxk[t], k)
            st.position_offset += n
        i32 = lambda x: torch.tensor(x, dtype=torch.int32, device=dev)   # noqa: E731
        i64 = lambda x: torch.tensor(x, dtype=torch.int64, device=dev)   # noqa: E731
        kwargs = dict(input_ids=i64(ids)[None], position_ids=i64(pos)[None], cache=self.cache, use_cache=False,
                      cu_seq_lens_q=i32(cq), max_length_q=max(b - a for a, b in zip(cq, cq[1:])),
                      cu_seq_lens_k={t: i32(v) for t, v in ck.items()}, max_length_k=maxk,
                      write_index=[i64(w) for w in write],
                      read_index=[i64(r) if any_past else i64([]) for r in read],
                      logits_to_keep=i64(lasts))
        if self.attn == "sdpa":   # transformers' own path: a [new tokens, read columns] block-diagonal mask
            from transformers.generation.continuous_batching.utils import build_attention_mask

            masks = {}
            for t in self.layer_types:
                m = torch.empty(1, 1, len(ids), ck[t][-1], dtype=self.model.dtype, device=dev)
                m.fill_(torch.finfo(self.model.dtype).min)
                window = getattr(self.model.config, "sliding_window", None) if t == "sliding_attention" else 1
                build_attention_mask(m, cq, ck[t], sliding_window=window)
                masks[t] = m
            kwargs["attention_mask"] = masks.popitem()[1] if len(masks) == 1 else masks
            kwargs["is_causal"] = False
        with self.model.running():
            out = self.model.model(**kwargs)
        return out.logits[0].float()


def generate(runner: PagedRunner, prompts: list[list[int]], max_new_tokens: int, eos=(),
             prefill_together: bool = True) -> list[list[int]]:
    """Greedy tokens of every prompt: one prefill step (all prompts in one forward, or one each), then one decode
    step per token with every unfinished sequence in it."""
    sids = [f"s{i}" for i in range(len(prompts))]
    out = [[] for _ in prompts]
    if prefill_together:
        logits = runner.step(list(zip(sids, prompts)))
    else:
        logits = torch.cat([runner.step([(s, p)]) for s, p in zip(sids, prompts)])
    live = list(range(len(prompts)))
    toks = logits.argmax(-1).tolist()
    for _ in range(max_new_tokens):
        for i, t in zip(live, toks):
            out[i].append(t)
        live_toks = [(i, t) for i, t in zip(live, toks) if t not in eos and len(out[i]) < max_new_tokens]
        for i in set(live) - {i for i, _ in live_toks}:
            runner.free(sids[i])
        if not live_toks:
            break
        live = [i for i, _ in live_toks]
        toks = runner.step([(sids[i], [t]) for i, t in live_toks]).argmax(-1).tolist()
    return out
