"""The scheduler: who runs in the next sweep and with which tokens, decided without touching a tensor (vLLM's
`schedule()`; `Engine.step` then runs the sweep and samples, and `Scheduler.drop` takes finished rows back).

Each step, waiting requests join while a slot is free and their KV cache fits the budget (FIFO: a request that
does not fit waits, and so do the ones behind it, so no request starves); a request that begins like a finished
request kept in the prefix cache, or like a running one, starts from those keys and values (the KV manager says
how: copied, or read through a mask); one that shares more with a request joining in this very step waits one
step, to start from it instead of computing it again. Finished requests stay in the prefix cache, least recently
used first, within its budget. The KV manager (engine/cache.py) holds the keys and values and charges the budget;
the scheduler is tested with it over a runner that holds nothing (tests/unit/test_scheduler.py).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

MIN_SHARE = 8       # shortest prefix worth borrowing from the prefix cache (tokens)


class Seq:
    """A request in the engine: its prompt, parameters, tokens so far and where its KV stands."""

    def __init__(self, rid, slot, prompt, params, handle=None, tokenizer=None, lslot: int = -1, index: int = 0):
        self.id, self.slot, self.prompt, self.params, self.handle = rid, slot, prompt, params, handle
        self.index = index            # its choice in its request (SamplingParams.n)
        self.tokens: list[int] = []
        self.real = 0                 # positions whose keys and values the cache holds: its next position
        self.shared = 0               # leading positions taken from the prefix cache (not computed here)
        self.segs: list[tuple[int, int, int]] = []   # masked cache: (slot, lo, hi), positions lo..hi-1 in slot's
        self.gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        self.tok = tokenizer
        self.lslot = lslot            # the LoRA adapter slot of its tokens (-1: none)
        self.sent = 0                 # characters of text already handed out
        self.t0 = time.perf_counter()
        self.cancelled = False
        self.dcache = None            # the draft model's own cache of this sequence (speculative decoding)
        self.dlen = 0                 # positions it holds (a prefix of prompt + tokens)
        self.drafted: list[int] = []  # this step's drafted tokens, verified in the sweep
        self.logprobs: list = []      # each token's TokenLogprob (with params.logprobs)
        self.matcher = None           # its grammar's state (with params.grammar: engine/constrain.py)

    def text(self) -> str:
        return self.tok.decode(self.tokens, skip_special_tokens=True) if self.tok is not None else ""

    def cached_ids(self) -> list[int]:
        """The token ids whose keys and values the cache holds for this sequence (positions 0..real-1)."""
        return (self.prompt + self.tokens)[:self.real]

    def feed(self) -> list[int]:
        """The tokens this sequence adds in the next sweep: the rest of its prompt (joining), or its last token
        and the drafted ones (decoding)."""
        return [self.tokens[-1]] + self.drafted if self.tokens else self.prompt[self.shared:]


class Entry:
    """A finished sequence whose keys and values stay for later requests with the same prefix."""

    def __init__(self, s: Seq):
        self.slot, self.segs, self.shared, self.real, self.lslot = s.slot, s.segs, s.shared, s.real, s.lslot
        self.ids = s.cached_ids()

    def cached_ids(self) -> list[int]:
        return self.ids


@dataclass
class StepRecord:
    """One sweep: the rows (decoding ones first, then joining ones) and each row's new tokens."""

    rows: list[Seq]
    joining: list[Seq]
    news: list[list[int]] = field(default_factory=list)

    def last(self) -> torch.Tensor:
        """The packed positions whose logits the head computes: each row's last token, and every drafted
        position of a verifying row."""
        ends = torch.tensor([len(n) for n in self.news]).cumsum(0)
        return torch.cat([torch.arange(e - len(s.drafted) - 1, e) if s.drafted else e[None] - 1
                          for s, e in zip(self.rows, ends)])


class Scheduler:
    """Admission, the prefix cache and the KV budget over a KV manager `cache` (engine/cache.py). `batched`: rows
    may share a sweep (else one sequence at a time); budgets in bytes (`kv_per_token` each)."""

    def __init__(self, cache, max_batch: int, batched: bool, kv_budget: int | None, kv_per_token: int,
                 prefix_budget: int):
        self.cache, self.max_batch, self.batched = cache, max_batch, batched
        self.kv_budget, self.kv_per_token, self.prefix_budget = kv_budget, kv_per_token, prefix_budget
        self.waiting: list[Seq] = []
        self.active: list[Seq] = []
        self.entries: OrderedDict[int, Entry] = OrderedDict()   # least recently used first
        self.prefix_hit_tokens = 0

    def admit(self) -> list[Seq]:
        """The waiting requests that join the next sweep (their KV made ready: a shared prefix lent)."""
        joining = []
        if not self.batched and (self.active or not self.waiting):
            return joining
        while self.waiting and len(self.active) + len(joining) < (self.max_batch if self.batched else 1):
            s = self.waiting[0]
            src, m = self.best_prefix(s, list(self.entries.values()) + self.active)
            if joining and self.prefix_budget and self.best_prefix(s, joining, done=False)[1] >= m + MIN_SHARE:
                break
            self.cache.admit(s)
            if src is not None:
                if isinstance(src, Entry):
                    self.entries.move_to_end(src.slot)
                self.cache.lend(s, src, m)
            if self._over(joining + [s]) and self.entries:
                while self._over(joining + [s]) and self.evict():
                    self.cache.compact(force=True)
            if self._over(joining + [s]) and (self.active or joining):
                self.cache.unlend(s)
                break
            joining.append(self.waiting.pop(0))
            self.prefix_hit_tokens += s.shared
        return joining

    def record(self, joining: list[Seq]) -> StepRecord:
        """The next sweep's record, once `joining` were admitted and the running rows drafted: every row's new
        tokens (`news`), and its positions counted (`real`) for the sweep."""
        rows = self.active + joining
        news = [s.feed() for s in rows]
        for s, n in zip(rows, news):
            s.real += len(n)
        self.active = rows
        return StepRecord(rows, joining, news)

    def _over(self, joining) -> bool:
        """Whether the KV cache could outgrow the budget if `joining` joined now and every row ran to its limit."""
        return self.kv_budget is not None and \
            self.cache.need(self.active + joining, self.entries) * self.kv_per_token > self.kv_budget

    def best_prefix(self, s: Seq, sources, done: bool = True):
        """The source (entry or sequence) whose cached ids share the longest prefix with `s`'s prompt, and that
        length (at most len(prompt) - 1: the last prompt token is computed, for its logits); (None, 0) below
        MIN_SHARE or with the prefix cache off. `done=False`: the sources' prompts (not yet in the cache). Only
        sources of the same LoRA adapter count: another adapter's keys and values are not this one's."""
        best, m, prompt = None, 0, s.prompt
        if not self.prefix_budget:
            return best, m
        for src in sources:
            if src.lslot != s.lslot:
                continue
            ids = src.cached_ids() if done else src.prompt
            n = min(len(ids), len(prompt) - 1)
            k = 0
            while k < n and ids[k] == prompt[k]:
                k += 1
            if k > m:
                best, m = src, k
        return (best, m) if m >= MIN_SHARE else (None, 0)

    def evict(self) -> bool:
        """Drop the least recently used entry whose KV no running sequence reads; False when there is none."""
        for slot in self.entries:
            if self.cache.evictable(slot):
                self.cache.release(self.entries.pop(slot), self.entries, self.active)
                return True
        return False

    def evict_oldest(self) -> None:
        """Drop the least recently used entry (what it lent to others stays with them)."""
        self.cache.release(self.entries.pop(next(iter(self.entries))), self.entries, self.active)

    def drop(self, done: list[Seq], failed: list[Seq] = ()) -> None:
        """Rows leave: finished ones stay as prefix-cache entries (within its budget), failed ones' KV goes (never
        reused)."""
        if not done and not failed:
            return
        gone = set(map(id, done)) | set(map(id, failed))
        self.active = [s for s in self.active if id(s) not in gone]
        for s in failed:
            self.cache.release(s, self.entries, self.active)
        for s in done:
            if self.prefix_budget and s.real > s.shared:
                self.cache.keep(s)
                self.entries[s.slot] = Entry(s)
                self.entries.move_to_end(s.slot)
            self.cache.release(s, self.entries, self.active)
        while self.entries and self.cached_bytes() > self.prefix_budget and self.evict():
            pass
        self.cache.tidy(self.entries, self.active)

    def cached_bytes(self) -> int:
        """Bytes of the prefix cache's keys and values."""
        return self.cache.entry_tokens(self.entries, self.active) * self.kv_per_token

    def reset(self) -> None:
        """Every KV goes (a failed sweep may have left some layers' keys and not others'); waiting rows stay."""
        self.active = []
        self.entries.clear()
        self.cache.reset()
