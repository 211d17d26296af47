"""The engine's KV managers: where each sequence's keys and values live, what a shared prefix costs, what the KV
budget is charged. The scheduler (engine/scheduler.py) decides with them and never touches a tensor; they run a
step's forward (`run`), since how the rows' tokens attend depends on where their keys and values are.

- `SlabCache` (families that page, engine/kv.py): each sequence's own slab, each row attending only its own
  columns, in this process (`SlabStep`) or on a Ray pipeline's stages (`PipelineSlabs`); a shared prefix is
  copied (its compute saved, its memory not), rejected drafts are cut off.
- `MaskedCache` (other plain-attention families): one transformers `DynamicCache` row whose columns belong to the
  sequences (`owner`, and each column's position in its sequence); a 4-D mask lets each token see only its own
  sequence's earlier columns, so a step costs batch x batch x context. A shared prefix is read through the mask
  from the sequence or entry that holds it (`segs`, refcounted by `refs`); dead columns are masked and dropped
  once they are a quarter of the cache (compaction).

Both take sequences with `slot`, `prompt`, `params.max_tokens`, `real` (positions held), `shared` (positions
lent by another) and `segs`, and prefix-cache entries with `slot`, `real`, `segs`.
"""

from __future__ import annotations

from collections import Counter
from contextlib import nullcontext

import torch

from .step import forward, new_cache


class SlabCache:
    """Per-sequence slabs, over a runner (`SlabStep` here, `PipelineSlabs` on Ray)."""

    layout = "slabs"

    def __init__(self, runner):
        self.runner = runner

    def admit(self, s) -> None:
        """`s` joins: its slab never needs more than prompt + max_tokens."""
        self.runner.limit(s.slot, len(s.prompt) + s.params.max_tokens)

    def lend(self, s, src, m: int) -> None:
        self.runner.copy_prefix(s.slot, src.slot, m)   # linear in m; the compute is saved
        s.shared, s.real = m, m

    def unlend(self, s) -> None:
        self.runner.free(s.slot)
        s.shared, s.real = 0, 0

    def keep(self, s) -> None:
        """`s` finished and stays as a prefix-cache entry: its slab cut to what it holds."""
        self.runner.shrink(s.slot)

    def release(self, holder, entries, running) -> None:
        """A finished sequence or an evicted entry lets go of its slab (unless it is an entry now)."""
        if holder.slot not in entries:
            self.runner.free(holder.slot)

    def evictable(self, slot) -> bool:
        return True

    def need(self, rows, entries) -> int:
        """Tokens held if `rows` ran to their limits beside the prefix cache (a copied prefix counts in full)."""
        return self.entry_tokens(entries, rows) + sum(len(s.prompt) + s.params.max_tokens for s in rows)

    def entry_tokens(self, entries, running) -> int:
        return sum(e.real for e in entries.values())

    def reject(self, s, n: int) -> None:
        s.real -= n
        self.runner.truncate(s.slot, s.real)

    def compact(self, force: bool = False) -> None:
        pass

    def run(self, rows, news, last, routing=None) -> torch.Tensor:
        """One forward: each row's new tokens after its own columns; logits of the packed positions `last`."""
        return self.runner.forward([(s.slot, n) for s, n in zip(rows, news)], last, routing)

    def tidy(self, entries, running) -> None:
        if not running and not entries:
            self.runner.clear()

    def reset(self) -> None:
        self.runner.clear()

    def tokens(self) -> int:
        return self.runner.tokens()

    def peak(self) -> int:
        return self.runner.capacity()


class MaskedCache:
    """One shared, masked cache for the families that cannot page (see the module's docstring)."""

    layout = "masked"

    def __init__(self, model):
        self.model = model
        self.eager = model.config._attn_implementation not in (None, "sdpa")   # additive float masks
        self.refs: Counter = Counter()   # slot -> sequences and entries that read some of its columns
        self.cache = None
        self.owner: torch.Tensor | None = None    # [cache length]: the slot of a column's sequence (-1: dead)
        self.pos: torch.Tensor | None = None      # [cache length]: that column's position in its sequence

    def admit(self, s) -> None:
        pass

    def lend(self, s, src, m: int) -> None:
        """Let `s` read positions 0..m-1 from `src`'s columns (and those it borrowed itself)."""
        segs = [(slot, lo, min(hi, m)) for slot, lo, hi in src.segs if lo < m]
        if m > src.shared:
            segs.append((src.slot, src.shared, m))
        s.segs, s.shared, s.real = segs, m, m
        for slot, _, _ in segs:
            self.refs[slot] += 1

    def unlend(self, s) -> None:
        for slot, _, _ in s.segs:
            self.refs[slot] -= 1
        s.segs, s.shared, s.real = [], 0, 0

    def keep(self, s) -> None:
        for slot, _, _ in s.segs:   # the entry holds what the sequence held
            self.refs[slot] += 1

    def release(self, holder, entries, running) -> None:
        """A finished sequence or an evicted entry lets go of its columns and of those it borrowed; columns
        nobody holds any more are masked (and dropped at the next compaction)."""
        live = {s.slot for s in running}

        def held(slot):
            return self.refs[slot] > 0 or slot in entries or slot in live

        gone = []
        for slot, _, _ in holder.segs:
            self.refs[slot] -= 1
            if not held(slot):
                gone.append(slot)
        if not held(holder.slot):
            gone.append(holder.slot)
        for slot in gone:
            self.refs.pop(slot, None)
        if gone and self.owner is not None:
            self.owner = torch.where(torch.isin(self.owner, torch.tensor(gone)), -1, self.owner)

    def evictable(self, slot) -> bool:
        return not self.refs[slot]

    def need(self, rows, entries) -> int:
        """Columns the cache would reach if `rows` ran to their limits: dead ones not yet dropped, the prefix
        cache's, and each row's own (a borrowed prefix is read, not held)."""
        dead = int((self.owner < 0).sum()) if self.owner is not None else 0
        return dead + self._beside(rows) + sum(len(s.prompt) - s.shared + s.params.max_tokens for s in rows)

    def entry_tokens(self, entries, running) -> int:
        return self._beside(running)

    def _beside(self, rows) -> int:
        """Live columns that none of `rows` owns: the prefix cache's entries and the columns they lend."""
        if self.owner is None:
            return 0
        mine = torch.tensor([s.slot for s in rows], dtype=torch.long)
        return int(((self.owner >= 0) & ~torch.isin(self.owner, mine)).sum())

    def reject(self, s, n: int) -> None:
        self.owner[(self.owner == s.slot) & (self.pos >= s.real - n)] = -1
        s.real -= n

    def run(self, rows, news, last, routing=None) -> torch.Tensor:
        """One forward over the packed new tokens; each token sees its own sequence's columns (and its borrowed
        prefix) through a [new tokens, columns] mask."""
        qowner = torch.cat([torch.full((len(n),), s.slot) for s, n in zip(rows, news)])
        qpos = torch.cat([torch.arange(s.real - len(n), s.real) for s, n in zip(rows, news)])
        if self.cache is None:
            self.cache = new_cache(self.model)
            self.owner = self.pos = torch.zeros(0, dtype=torch.long)
        self.owner, self.pos = torch.cat([self.owner, qowner]), torch.cat([self.pos, qpos])
        see = (self.owner[None, :] == qowner[:, None]) & (self.pos[None, :] <= qpos[:, None])   # [new, columns]
        start = 0
        for s, n in zip(rows, news):   # borrowed prefixes: positions lo..hi-1 of another slot's columns
            if s.segs:
                extra = torch.zeros_like(self.owner, dtype=torch.bool)
                for slot, lo, hi in s.segs:
                    extra |= (self.owner == slot) & (self.pos >= lo) & (self.pos < hi)
                see[start:start + len(n)] |= extra
            start += len(n)
        if self.eager:
            mask = torch.zeros(see.shape, dtype=self.model.dtype).masked_fill(~see, torch.finfo(self.model.dtype).min)
        else:
            mask = see
        ids = torch.tensor([t for n in news for t in n]).unsqueeze(0)
        with routing if routing is not None else nullcontext():   # (LoRA: each row's tokens get its adapter)
            return forward(self.model, ids, self.cache, attention_mask=mask[None, None], position_ids=qpos[None],
                           keep=last)[0]

    def tidy(self, entries, running) -> None:
        """After rows left: an empty cache goes; else masked columns are dropped once they are a quarter of it."""
        if not running and not entries and not any(n > 0 for n in self.refs.values()):
            self.reset()   # (a row about to join may still read columns it borrowed: then not)
            return
        self.compact()

    def compact(self, force: bool = False) -> None:
        """Drop masked columns from the cache: when they are a quarter of it, or any with `force`."""
        if self.owner is None:
            return
        live = self.owner >= 0
        if int(live.sum()) < (live.numel() if force else 0.75 * live.numel()):
            cols = live.nonzero().squeeze(1)
            self.owner, self.pos = self.owner[cols], self.pos[cols]
            dcols = cols.to(self.model.device)
            for layer in self.cache.layers:
                if getattr(layer, "keys", None) is not None and layer.is_initialized and layer.keys.numel():
                    layer.keys = layer.keys.index_select(-2, dcols)
                    layer.values = layer.values.index_select(-2, dcols)

    def reset(self) -> None:
        self.cache = self.owner = self.pos = None
        self.refs.clear()

    def tokens(self) -> int:
        return int(self.owner.numel()) if self.owner is not None else 0

    peak = tokens
