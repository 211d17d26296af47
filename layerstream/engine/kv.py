"""Per-sequence KV for the engine: each sequence's keys and values in its own slab, each sequence's tokens attending
only its own columns, so a step costs the sum of the sequences' contexts (not batch x batch x context).

A step packs every row's new tokens in one row [1, T] (the linear layers compute exactly the real tokens), as
transformers' continuous batching does, and passes `cu_seq_lens_q` / `cu_seq_lens_k` (each row's slice of the
packed queries and of its context) to the model. Every attention layer calls `cache.update`, which writes the row's
new keys and values into its slab and hands the attention function a *view* of each row's columns (no gather, no
concatenation of the whole cache). The attention function registered here scores each row against its own view
with torch's SDPA (bottom-right causal, within the family's sliding window; the family's own eager attention per
row where softcapping or attention sinks need it). No attention kernel is written here.

Measured before choosing (docs/paged-spike.md): transformers' `PagedAttentionCache` with the same per-sequence SDPA
gathers every row's whole context out of its blocks at every layer and step (0.29 s of a 0.57 s step at 16 x 1,000
tokens); its own SDPA path scores a block-diagonal mask over all columns (9x the 16 x 64 step); slabs cost 1.9x.
Slabs grow by `chunk` tokens (one copy of the row's columns then, amortized).

Families are paged when their model type is in SLAB_FAMILIES: those whose tiny random models gave transformers'
own greedy tokens when batched on slabs (bench/paged_families.py, docs/paged-spike-families.txt). Other families
keep the engine's masked path (one shared cache) or run one sequence at a time.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F

PAGED = "layerstream_slabs"   # the attention implementation over a family's SDPA (over eager: PAGED + "_eager");
# no "sdpa" in the name: transformers would check that the family supports SDPA before setting it

# model types batched on slabs with transformers' greedy tokens (docs/paged-spike-families.txt, "slab: ok"),
# except llama4_text: its chunked attention is not what slab_attention computes (the survey's prompts were
# shorter than a chunk). tests/test_paged_kv.py keeps this list equal to the survey's.
NOT_SLABS = frozenset({"llama4_text"})
SLAB_FAMILIES = frozenset("""
afmoe apertus apertus1p5_text arcee aria_text beam bitnet codegen cohere cohere2 cohere2_moe cohere_compass_text cwm
dbrx dots1 ernie4_5 ernie4_5_moe exaone exaone4 exaone_moe flex_olmo flint gemma gemma2 gemma3_text glm glm4
glm4_moe gpt-sw3 gpt2 gpt_bigcode gpt_oss gptj granite granite_swa granitemoe granitemoe_swa granitemoeshared helium
hunyuan_v1_dense hunyuan_v1_moe hy_v3 hyperclovax internlm3 iquestcoder jais2 kolibri1 laguna llama mellum
minimax_m2 minimax_m3_vl_text ministral ministral3 mistral mixtral modernbert-decoder nanochat olmo olmo2 olmo3
olmoe persimmon phi phi3 qwen2 qwen2_moe qwen3 qwen3_moe sarvam_moe seed_oss smollm3 solar_open starcoder2
vaultgemma
""".split())


def slab_families_from(path) -> set[str]:
    """The model types a family survey (docs/paged-spike-families.txt) found batched correctly on slabs."""
    out = set()
    for line in open(path, encoding="utf-8"):
        if ":" in line and not line.startswith("#") and line.rstrip().endswith("slab: ok"):
            out.add(line.split(":", 1)[0].strip())
    return out


def pageable(model) -> bool:
    """Whether the engine batches `model` on slabs: its family is one of SLAB_FAMILIES and its head sizes are
    found in its config."""
    cfg = model.config.get_text_config()
    if getattr(cfg, "model_type", None) not in SLAB_FAMILIES:
        return False
    try:
        _heads(cfg)
    except Exception:
        return False
    return True


def _heads(cfg) -> tuple[int, int, int]:
    from transformers.generation.continuous_batching.utils import find_head_dim, find_num_key_value_heads

    return cfg.num_hidden_layers, find_num_key_value_heads(cfg), find_head_dim(cfg)


def slab_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                   sliding_window=None, slab_kv=None, cu_seq_lens_q=None, cu_seq_lens_k=None, _fallback=None,
                   **kwargs):
    """transformers' attention interface, per sequence: query [1, heads, new tokens, dim] packed row after row
    (`cu_seq_lens_q`), and each row's keys / values either a view [1, kv heads, its columns, dim] of its slab
    (`slab_kv`, set by SlabKV.update) or its slice of packed key / value (`cu_seq_lens_k`, as transformers'
    PagedAttentionCache returns them); each row's queries attend its own columns. Any other forward (a
    DynamicCache one) runs the family's own implementation, `_fallback`."""
    if slab_kv is None and (cu_seq_lens_q is None or cu_seq_lens_k is None or isinstance(cu_seq_lens_k, dict)):
        return _fallback(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                         sliding_window=sliding_window, **kwargs)
    eager = None
    if kwargs.get("softcap") is not None or getattr(module, "sinks", None) is not None:
        # SDPA has no logit softcapping and no attention sinks: the family's own eager attention, per row
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if eager is None:
            raise NotImplementedError(f"{type(module).__name__} needs softcapping or sinks and its module has no "
                                      "eager_attention_forward")
    cq = cu_seq_lens_q.tolist() if torch.is_tensor(cu_seq_lens_q) else cu_seq_lens_q
    if slab_kv is None:
        ck = cu_seq_lens_k.tolist()
        slab_kv = ([key[:, :, a:b] for a, b in zip(ck, ck[1:])], [value[:, :, a:b] for a, b in zip(ck, ck[1:])])
    ks, vs = slab_kv
    gqa = query.shape[1] != ks[0].shape[1]
    out = query.new_empty(query.shape[2], query.shape[1], query.shape[3])   # [new tokens, heads, dim]
    for i in range(len(cq) - 1):
        q0, q1 = cq[i], cq[i + 1]
        lq, lk = q1 - q0, ks[i].shape[2]
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
        if eager is not None:
            if causal:
                mask = torch.ones(lq, lk, dtype=torch.bool, device=query.device).tril()
            add = None if mask is None else torch.zeros(mask.shape, dtype=query.dtype, device=query.device) \
                .masked_fill(~mask, torch.finfo(query.dtype).min)[None, None]
            o, _ = eager(module, query[:, :, q0:q1], ks[i], vs[i], add, dropout=dropout, scaling=scaling,
                         sliding_window=sliding_window, **{n: x for n, x in kwargs.items() if n == "softcap"})
            out[q0:q1] = o[0]
            continue
        o = F.scaled_dot_product_attention(query[:, :, q0:q1], ks[i], vs[i], attn_mask=mask, is_causal=causal,
                                           scale=scaling, enable_gqa=gqa)
        out[q0:q1] = o[0].transpose(0, 1)
    return out.unsqueeze(0), None


def register(original: str = "sdpa") -> str:
    """The slab attention implementation for a family whose own is `original` (its fallback and its masks)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask, sdpa_mask

    if original.startswith(PAGED):   # a model already set to one of ours (engine/paged.py's runner does)
        return original
    name = PAGED if original == "sdpa" else f"{PAGED}_{original}"
    if name in AttentionInterface._global_mapping:
        return name
    if original == "sdpa":
        fallback = sdpa_attention_forward
    elif original == "eager":
        def fallback(module, *args, **kw):
            return sys.modules[type(module).__module__].eager_attention_forward(module, *args, **kw)
    else:
        raise NotImplementedError(f"no slab attention over the {original!r} implementation")

    def attend(*args, **kw):
        return slab_attention(*args, _fallback=fallback, **kw)

    AttentionInterface.register(name, attend)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask if original == "sdpa" else eager_mask)
    return name


def _cache_class():
    """SlabKV, made a transformers `PagedAttentionCache` for its masking code only (which builds no mask for one:
    rows are kept apart by `cu_seq_lens_q` and their own views, not by a mask). Its bookkeeping is not used."""
    global _CLASS
    if _CLASS is None:
        from transformers.generation.continuous_batching.cache import PagedAttentionCache

        _CLASS = type("SlabKV", (SlabKV, PagedAttentionCache), {"__init__": SlabKV.__init__,
                                                                "update": SlabKV.update})
    return _CLASS


_CLASS = None


class SlabKV:
    """The keys and values of several sequences (keyed by an int), each in its own slab per layer ([kv heads,
    capacity, dim], grown by `chunk` tokens). `rows` is the step in progress: (key, cached tokens, new tokens).
    `first`: the model's index of the first layer held (a pipeline stage holds layers first..first+layers-1)."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype, device, chunk: int = 256, first: int = 0):
        self.shape, self.dtype, self.device = (kv_heads, head_dim), dtype, device
        self.chunk, self.layers, self.first = chunk, layers, first
        self.k: dict[int, list[torch.Tensor]] = {}
        self.v: dict[int, list[torch.Tensor]] = {}
        self.lens: dict[int, int] = {}
        self.limits: dict[int, int] = {}   # the most tokens a sequence can reach (its slab never grows past it)
        self.rows: list[tuple[int, int, int]] = []

    @classmethod
    def for_model(cls, model, chunk: int = 256, layers: tuple[int, int] | None = None) -> SlabKV:
        """Slabs for `model`'s layers (`layers`: only a..b-1 of them)."""
        n, heads, dim = _heads(model.config.get_text_config())
        a, b = layers if layers is not None else (0, n)
        return _cache_class()(b - a, heads, dim, model.dtype, model.device, chunk, a)

    def length(self, key: int) -> int:
        return self.lens.get(key, 0)

    def tokens(self) -> int:
        """Tokens held, all sequences together."""
        return sum(self.lens.values())

    def capacity(self) -> int:
        """Tokens the slabs have room for, all sequences together."""
        return sum(k[0].shape[1] for k in self.k.values())

    def reserve(self, key: int, tokens: int) -> None:
        """Room for `tokens` tokens of `key` (its columns kept when its slab grows): whole chunks, but never past
        its limit, so that the slabs of admitted sequences fit the KV budget they were admitted against."""
        cap = max(tokens, min(-(-tokens // self.chunk) * self.chunk, self.limits.get(key, 1 << 62)))
        old = self.k.get(key)
        if old is not None and old[0].shape[1] >= cap:
            return
        h, d = self.shape
        n = self.lens.get(key, 0)
        for store in (self.k, self.v):
            new = [torch.empty(h, cap, d, dtype=self.dtype, device=self.device) for _ in range(self.layers)]
            if key in store:
                for a, b in zip(new, store[key]):
                    a[:, :n] = b[:, :n]
            store[key] = new
        self.lens.setdefault(key, 0)

    def copy_prefix(self, key: int, src: int, m: int) -> None:
        """`key` starts with the first `m` columns of `src` (a shared prefix: copied, not computed again)."""
        self.reserve(key, m)
        for store in (self.k, self.v):
            for a, b in zip(store[key], store[src]):
                a[:, :m] = b[:, :m]
        self.lens[key] = m

    def truncate(self, key: int, n: int) -> None:
        """Keep `key`'s first `n` columns (the others, e.g. rejected drafts, are written over)."""
        self.lens[key] = min(n, self.lens.get(key, 0))

    def shrink(self, key: int) -> None:
        """`key`'s slabs cut to its length (a finished sequence kept for its prefix)."""
        n = self.lens.get(key, 0)
        for store in (self.k, self.v):
            if key in store:
                store[key] = [t[:, :n].clone() for t in store[key]]

    def free(self, key: int) -> None:
        for store in (self.k, self.v, self.lens, self.limits):
            store.pop(key, None)

    def clear(self) -> None:
        self.k.clear()
        self.v.clear()
        self.lens.clear()
        self.limits.clear()
        self.rows = []

    def update(self, key_states, value_states, layer_idx, kwargs):
        """transformers' cache interface, called by every attention layer: the step's new keys and values go into
        their rows' slabs; the attention function gets each row's columns as views (`slab_kv`)."""
        ks, vs, q0 = [], [], 0
        for key, past, n in self.rows:
            K, V = self.k[key][layer_idx - self.first], self.v[key][layer_idx - self.first]
            K[:, past:past + n] = key_states[0, :, q0:q0 + n]
            V[:, past:past + n] = value_states[0, :, q0:q0 + n]
            ks.append(K[None, :, :past + n])
            vs.append(V[None, :, :past + n])
            q0 += n
        kwargs["slab_kv"] = (ks, vs)
        return key_states, value_states


class SlabStep:
    """Runs engine steps of `model` on a SlabKV: `forward(rows, keep)` with rows (key, new tokens). The engine's
    runner interface (a Ray pipeline has another, ray/pipeline.py's PipelineSlabs): `forward`, `limit`,
    `copy_prefix`, `truncate`, `shrink`, `free`, `clear`, `tokens`, `capacity`."""

    def __init__(self, model, chunk: int = 256, layers: tuple[int, int] | None = None):
        self.model = model
        net = model.model
        self.kv = SlabKV.for_model(model, chunk, layers)
        # the attention implementation is switched for the step only (`attention()`): the model's other forwards
        # are untouched
        self.configs = list({id(c): c for c in [net.config, *(getattr(mod, "config", None) for mod in net.modules())]
                             if c is not None and isinstance(getattr(c, "_attn_implementation", None), str)}
                            .values())
        self.names = [register(c._attn_implementation) for c in self.configs]

    @contextmanager
    def attention(self):
        old = [c._attn_implementation_internal for c in self.configs]
        for c, name in zip(self.configs, self.names):
            c._attn_implementation_internal = name
        try:
            yield
        finally:
            for c, o in zip(self.configs, old):
                c._attn_implementation_internal = o

    def free(self, key) -> None:
        self.kv.free(key)

    def limit(self, key, tokens: int) -> None:
        """`key` never holds more than `tokens` tokens (prompt + max_tokens): its slab never grows past it."""
        self.kv.limits[key] = tokens

    def copy_prefix(self, key, src, m: int) -> None:
        self.kv.copy_prefix(key, src, m)

    def truncate(self, key, n: int) -> None:
        self.kv.truncate(key, n)

    def shrink(self, key) -> None:
        self.kv.shrink(key)

    def clear(self) -> None:
        self.kv.clear()

    def tokens(self) -> int:
        return self.kv.tokens()

    def capacity(self) -> int:
        return self.kv.capacity()

    def step(self, rows) -> torch.Tensor:
        """`forward` keeping each row's last token: logits [rows, vocab]."""
        return self.forward(rows)

    @torch.no_grad()
    def forward(self, rows: list[tuple[int, list[int]]], keep: torch.Tensor | None = None,
                routing=None) -> torch.Tensor:
        """One sweep: each row (key, new tokens) appends its tokens after its cached ones. Returns float32 logits of
        the packed positions `keep` [len(keep), vocab] (default: each row's last token). `routing`: a context
        manager entered around the forward (LoRA's per-token adapters)."""
        ids = torch.tensor([t for _, toks in rows for t in toks], dtype=torch.int64, device=self.model.device)
        kwargs = self.begin([(key, len(toks)) for key, toks in rows])
        if keep is None:
            keep = torch.tensor(kwargs["cu_seq_lens_q"][1:]) - 1
        try:
            with self.attention(), self.model.running(), (routing if routing is not None else nullcontext()):
                out = self.model.model(input_ids=ids[None], logits_to_keep=keep.to(self.model.device), **kwargs)
        finally:
            self.kv.rows = []
        self.end()
        return out.logits[0].float()

    def begin(self, rows: list[tuple[int, int]]) -> dict:
        """A step of rows (key, new tokens' count) begins: their slabs have room, and the model's keywords for it
        (positions, the cache, `cu_seq_lens_q`). `end()` once the forward has run."""
        kv = self.kv
        kv.rows, pos, cq = [], [], [0]
        for key, n in rows:
            past = kv.length(key)
            kv.reserve(key, past + n)
            kv.rows.append((key, past, n))
            pos += range(past, past + n)
            cq.append(cq[-1] + n)
        self._done = list(kv.rows)
        return dict(position_ids=torch.tensor(pos, dtype=torch.int64, device=self.model.device)[None], cache=kv,
                    use_cache=False, cu_seq_lens_q=cq)

    def end(self) -> None:
        for key, past, n in self._done:
            self.kv.lens[key] = past + n
        self.kv.rows = self._done = []

