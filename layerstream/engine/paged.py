"""Paged KV with per-sequence attention (spike for issue 21; see docs/paged-spike.md).

transformers' continuous batching keeps KV in fixed-size blocks (`PagedAttentionCache`: a block table per request,
prefix sharing by block hashes) and runs one forward over the packed new tokens of every request, passing the cache
and the varlen keywords (`cu_seq_lens_q/k`, `max_length_q/k`, `read_index`, `write_index`) to the model. Each
attention layer's `cache.update` writes the new keys and values into their blocks and reads back, per request, that
request's own columns, packed one request after the other. What scores them is the attention implementation:

- "sdpa" (transformers' CPU choice): one SDPA over [all new tokens, all read columns] with a block-diagonal mask
  that transformers builds (`continuous_batching.utils.build_attention_mask`): still B x (B x C) work at decode.
- "flash_attention_*": varlen / block-table kernels, per sequence, but CUDA only.
- PAGED (registered here): SDPA once per sequence over its own slice of the packed columns (`cu_seq_lens_q/k`
  give the slices), so a step costs the sum of the sequences' contexts. Not a kernel: torch's SDPA, sliced.

`PagedRunner` drives the cache from outside, step by step: the caller (our scheduler) says which sequences run and
which tokens they add; transformers' generation loop, its scheduler, request states and thread are not used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

PAGED = "layerstream_paged"


def paged_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                    cu_seq_lens_q=None, cu_seq_lens_k=None, sliding_window=None, **kwargs):
    """transformers' attention interface: query [1, heads, new tokens, dim], key / value [1, kv heads, read columns,
    dim] (each sequence's columns after the previous one's, as `PagedAttentionCache.update` returns them). Each
    sequence's new tokens attend its own columns (bottom-right causal, and within `sliding_window`). Without
    `cu_seq_lens_q` (a plain DynamicCache forward) it is transformers' SDPA."""
    if cu_seq_lens_q is None or cu_seq_lens_k is None or isinstance(cu_seq_lens_k, dict):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, **kwargs)
    eager = None
    if kwargs.get("softcap") is not None or getattr(module, "sinks", None) is not None:
        # SDPA has no logit softcapping and no attention sinks: the family's own eager attention, per sequence
        import sys

        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if eager is None:
            raise NotImplementedError(f"{type(module).__name__} needs softcapping or sinks and its module has no "
                                      "eager_attention_forward")
    slabs = kwargs.get("slab_kv")   # SlabCache: each sequence's own columns, views of its contiguous slab
    cq, ck = cu_seq_lens_q.tolist(), cu_seq_lens_k.tolist()
    gqa = query.shape[1] != (key.shape[1] if slabs is None else slabs[0][0].shape[1])
    out = query.new_empty(query.shape[2], query.shape[1], query.shape[3])   # [new tokens, heads, dim]
    for i in range(len(cq) - 1):
        q0, q1, k0, k1 = cq[i], cq[i + 1], ck[i], ck[i + 1]
        lq, lk = q1 - q0, k1 - k0
        if lq == 0:
            continue
        mask, causal = None, False
        if sliding_window is not None and lk > sliding_window or lq > 1:
            if lq == lk and (sliding_window is None or lk <= sliding_window):
                causal = True
            else:   # query t sits at column lk - lq + t; it sees the columns up to it, within the window
                diff = torch.arange(lk - lq, lk, device=query.device)[:, None] - \
                    torch.arange(lk, device=query.device)[None, :]
                mask = diff >= 0
                if sliding_window is not None:
                    mask &= diff < sliding_window
        k, v = (key[:, :, k0:k1], value[:, :, k0:k1]) if slabs is None else (slabs[0][i], slabs[1][i])
        if eager is not None:
            if causal:
                mask = torch.ones(lq, lk, dtype=torch.bool, device=query.device).tril()
            add = None if mask is None else torch.zeros(mask.shape, dtype=query.dtype, device=query.device) \
                .masked_fill(~mask, torch.finfo(query.dtype).min)[None, None]
            o, _ = eager(module, query[:, :, q0:q1], k, v, add, dropout=dropout, scaling=scaling,
                         sliding_window=sliding_window, **{n: x for n, x in kwargs.items() if n == "softcap"})
            out[q0:q1] = o[0]
            continue
        o = F.scaled_dot_product_attention(query[:, :, q0:q1], k, v,
                                           attn_mask=mask, is_causal=causal, scale=scaling, enable_gqa=gqa)
        out[q0:q1] = o[0].transpose(0, 1)
    return out.unsqueeze(0), None


def register() -> None:
    """Make PAGED a transformers attention implementation (and its masks SDPA's, for non-paged forwards)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(PAGED, paged_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PAGED, sdpa_mask)


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


class SlabCache:
    """The no-gather alternative measured beside PagedRunner: each sequence's keys and values in one contiguous slab
    per layer ([kv heads, capacity, dim], grown by `chunk` tokens, or reserved up front), so that per-sequence SDPA
    reads a view of it instead of a copy gathered from blocks. (A PagedAttentionCache only for transformers' masking,
    which skips building a mask for one; its bookkeeping is not used.)"""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype, device, chunk: int = 256):
        self.shape, self.dtype, self.device = (kv_heads, head_dim), dtype, device
        self.chunk, self.layers = chunk, layers
        self.k: dict[str, list[torch.Tensor]] = {}
        self.v: dict[str, list[torch.Tensor]] = {}
        self.lens: dict[str, int] = {}
        self.rows: list[tuple[str, int, int]] = []   # this step: (sequence, cached tokens, new tokens)

    def reserve(self, sid: str, tokens: int) -> None:
        cap = -(-tokens // self.chunk) * self.chunk
        old = self.k.get(sid)
        if old is not None and old[0].shape[1] >= cap:
            return
        h, d = self.shape
        n = self.lens.get(sid, 0)
        for store in (self.k, self.v):
            new = [torch.empty(h, cap, d, dtype=self.dtype, device=self.device) for _ in range(self.layers)]
            if sid in store:
                for a, b in zip(new, store[sid]):
                    a[:, :n] = b[:, :n]
            store[sid] = new

    def free(self, sid: str) -> None:
        for store in (self.k, self.v, self.lens):
            store.pop(sid, None)

    def update(self, key_states, value_states, layer_idx, kwargs):
        ks, vs, q0 = [], [], 0
        for sid, past, n in self.rows:
            K, V = self.k[sid][layer_idx], self.v[sid][layer_idx]
            K[:, past:past + n] = key_states[0, :, q0:q0 + n]
            V[:, past:past + n] = value_states[0, :, q0:q0 + n]
            ks.append(K[None, :, :past + n])
            vs.append(V[None, :, :past + n])
            q0 += n
        kwargs["slab_kv"] = (ks, vs)
        return key_states, value_states


def _slab_cache_class():
    from transformers.generation.continuous_batching.cache import PagedAttentionCache

    return type("SlabPagedCache", (SlabCache, PagedAttentionCache), {"__init__": SlabCache.__init__,
                                                                     "update": SlabCache.update})


class SlabRunner:
    """PagedRunner's interface over a SlabCache: the same model keywords (cu_seq_lens_q/k), per-sequence SDPA."""

    def __init__(self, model, chunk: int = 256):
        register()
        net = model.model
        if net.config._attn_implementation != PAGED:
            net.set_attn_implementation(PAGED)
        from transformers.generation.continuous_batching.utils import find_head_dim, find_num_key_value_heads

        cfg = net.config.get_text_config()
        self.model = model
        self.cache = _slab_cache_class()(cfg.num_hidden_layers, find_num_key_value_heads(cfg), find_head_dim(cfg),
                                         model.dtype, model.device, chunk)

    def free(self, sid: str) -> None:
        self.cache.free(sid)

    @torch.no_grad()
    def step(self, rows: list[tuple[str, list[int]]]) -> torch.Tensor:
        dev, c = self.model.device, self.cache
        c.rows, ids, pos, cq, ck = [], [], [], [0], [0]
        for sid, toks in rows:
            past, n = c.lens.get(sid, 0), len(toks)
            c.reserve(sid, past + n)
            c.rows.append((sid, past, n))
            ids += toks
            pos += range(past, past + n)
            cq.append(cq[-1] + n)
            ck.append(ck[-1] + past + n)
        i64 = lambda x: torch.tensor(x, dtype=torch.int64, device=dev)   # noqa: E731
        with self.model.running():
            out = self.model.model(input_ids=i64(ids)[None], position_ids=i64(pos)[None], cache=c, use_cache=False,
                                   cu_seq_lens_q=i64(cq), cu_seq_lens_k=i64(ck), logits_to_keep=i64(cq[1:]) - 1)
        for sid, past, n in c.rows:
            c.lens[sid] = past + n
        return out.logits[0].float()
