"""Speculative decoding for a streamed model: a small resident draft proposes, one streamed sweep verifies.

Every accepted token saves a whole sweep of the big model. The verification is transformers' own
assisted generation (`assistant_model=`, `prompt_lookup_num_tokens=`): greedy output is identical to
plain decoding and sampling keeps the target's distribution (speculative sampling). layerstream adds the
draft: `draft="int4"` opens a block-wise int4 copy of the same model, kept resident and computed in
bfloat16 on the packed blocks (torch's int4 kernel on the CPU), so the draft costs a fraction of the
target's memory and time; `draft=PATH` opens another model (same tokenizer) resident.
"""

from __future__ import annotations

from ..errors import InputError
from ..utils import log

DRAFT_TOKENS = 6   # tokens drafted per verification to start with; transformers' heuristic adapts it


def open_draft(source, draft: str, options):
    """The draft model for `source`, fully resident: its int4 store (made once) or another model."""
    from .model import open_streamed

    kind = str(draft).lower()
    if kind in ("int4", "4bit"):
        source = _int4_source(source)
        opts = options.replace(compression="int4", dtype="bfloat16" if options.device == "cpu" else options.dtype,
                               store_path=None, in_place=None, max_ram=None, max_gpu_memory=None, draft=None,
                               lora=None)   # the default adapter only: it drafts for every row
        log(f"opening the int4 draft of {source or 'the embedded model'}")
        m = open_streamed(source, opts)
    else:
        opts = options.replace(store_path=None, in_place=None, compression=None, max_ram=None, max_gpu_memory=None,
                               draft=None, adapter=None, lora=None)   # another model: the target's adapters are not its
        log(f"opening the draft model {draft}")
        m = open_streamed(draft, opts)
    if m.plan.streamed:
        raise InputError(f"the draft model does not fit in free memory ({len(m.plan.streamed)} units would stream); "
                         f"a draft must be resident to be faster than the model it drafts for")
    m.model.generation_config.num_assistant_tokens = DRAFT_TOKENS
    m.model.generation_config.num_assistant_tokens_schedule = "heuristic"
    return m


def _int4_source(source):
    """What an int4 draft is made from: the source itself, or, for a store, the checkpoint it was made from
    (a store is what it is: asking it for int4 would open its own weights)."""
    from pathlib import Path

    from ..store import Store

    if source is None or not Store.is_store(source):
        return source
    m = Store(source).manifest
    if m.quantization == "int4":
        return source
    origin = (m.source or {}).get("path")
    if origin and Path(origin).exists():
        return origin
    raise InputError(f"{source} is a store of {m.dtype} weights whose source ({origin or 'unknown'}) is not here: an "
                     f"int4 draft is made from the source; pass the source, or draft=PATH to an int4 store")


def draft_bytes(draft) -> int:
    """Resident bytes of a draft (its store's units; int4 blocks stay packed)."""
    return sum(u.bytes for u in draft.plan.units if u.tier != "disk")


def speculative_stats(profiler, new_tokens: int, prompt_tokens: int) -> dict:
    """Sweeps of the target, tokens drafted and accepted, tokens per sweep, from the sweeps it ran: a sweep
    that verifies k drafted tokens computes 1 + k new positions (the first: the prompt and k) and yields the
    accepted ones plus one."""
    sweeps = profiler.sweeps
    first, *rest = profiler.sweep_tokens or [prompt_tokens]
    drafted = max(0, first - prompt_tokens) + sum(max(0, t - 1) for t in rest)
    accepted = max(0, new_tokens - sweeps)
    return {"drafted": drafted, "accepted": accepted, "tokens_per_sweep": new_tokens / sweeps if sweeps else 0.0,
            "acceptance": accepted / drafted if drafted else 0.0}
