"""Continuous batching: one sweep per step serves every active sequence.

Streamed weights make a sweep cost about the same for 1 token or 64 (the link, not the math, sets its
time), so the engine keeps as many sequences in flight as memory allows. Each step, requests that
joined prefill and running ones decode in the same forward pass; a finished sequence leaves and a
waiting one joins at the next step. Nothing is dropped: a request waits while the KV cache it would
need does not fit the plan's KV budget.

Sequences are packed, not padded: a step's new tokens of every row (a joining row's prompt, one token of
each decoding row) are laid end to end in one row [1, T], positions are each sequence's own, and the head
computes only each row's last token. So the linear layers compute exactly the real tokens (no padding),
whatever the mix of prompts and decodes. Where the KV lives, two paths:

- slabs (engine/kv.py; families in SLAB_FAMILIES, sliding windows included): each sequence's keys and values in
  its own slab, each row's tokens attending only its own columns, so a step costs the sum of the contexts. A
  prefix-cache hit copies the source's columns; rejected drafts are cut off.
- one shared masked cache (other plain full-attention families): one transformers `DynamicCache` row whose
  columns belong to the sequences (`owner`, and each column's position in its sequence); a 4-D attention mask
  lets each token see only its own sequence's earlier columns (a step grows as batch x batch x context).
  Columns of finished sequences are masked and dropped once they are a quarter of the cache (compaction); a
  prefix-cache hit reads the source's columns through the mask.

Families whose cache is neither (recurrent states, ...) run one sequence at a time, through the same API.

Rows are isolated: a request whose own sampling, stop strings, detokenizing or drafting fails ends alone with
a `GenerationError` on its handle, and the others go on with exactly the tokens they would have had; values
that cannot be computed (NaN or infinite temperature or top_p, token ids outside the vocabulary, ...) are
refused at `submit`. Only a failure of the shared sweep fails the rows in it; the engine then starts again
from an empty cache.

API: `Engine(model, max_batch)`; `submit(prompt_ids, SamplingParams) -> Handle` (thread-safe);
`Handle.stream()` yields `Delta`s as tokens come, `Handle.result()` the `Completion`; `step()` runs one
sweep; `generate(requests)` runs a list to the end (jobs); `start()` runs steps on a thread (servers).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter, OrderedDict

import torch

from ..errors import InputError
from ..plan.planner import kv_bytes_per_token, prefix_budget
from ..utils import log
from .kv import SlabStep, pageable
from .requests import Completion, Delta, EngineState, Handle, Refusal, SamplingParams, _token_list
from .step import GenerationError, eos_ids, forward, new_cache

__all__ = ["Completion", "Delta", "Engine", "EngineState", "GenerationError", "Handle", "Refusal", "SamplingParams",
           "batchable"]

MIN_SHARE = 8       # shortest prefix worth borrowing from the prefix cache (tokens)


class _Seq:
    def __init__(self, rid, slot, prompt, params, handle, tokenizer, lslot: int = -1):
        self.id, self.slot, self.prompt, self.params, self.handle = rid, slot, prompt, params, handle
        self.tokens: list[int] = []
        self.real = 0                 # real (unmasked) tokens of this row in the cache: its next position
        self.shared = 0               # leading positions borrowed from the prefix cache (not computed here)
        self.segs: list[tuple[int, int, int]] = []   # (slot, lo, hi): positions lo..hi-1 live in slot's columns
        self.gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        self.tok = tokenizer
        self.lslot = lslot            # the LoRA adapter slot of its tokens (-1: none)
        self.sent = 0                 # characters of text already handed out
        self.t0 = time.perf_counter()
        self.cancelled = False
        self.dcache = None            # the draft model's own cache of this sequence (speculative decoding)
        self.dlen = 0                 # positions it holds (a prefix of prompt + tokens)
        self.drafted: list[int] = []  # this step's drafted tokens, verified in the sweep

    def text(self) -> str:
        return self.tok.decode(self.tokens, skip_special_tokens=True) if self.tok is not None else ""

    def cached_ids(self) -> list[int]:
        """The token ids whose keys and values the cache holds for this sequence (positions 0..real-1)."""
        return (self.prompt + self.tokens)[:self.real]


class _Entry:
    """A finished sequence whose cache columns stay for later requests with the same prefix."""

    def __init__(self, s: _Seq):
        self.slot, self.segs, self.shared, self.real, self.lslot = s.slot, s.segs, s.shared, s.real, s.lslot
        self.ids = s.cached_ids()

    def cached_ids(self) -> list[int]:
        return self.ids


class Engine:
    """A continuous-batching scheduler over a `StreamedModel` (see the module's docstring)."""

    def __init__(self, model, max_batch: int = 8, kv_budget: int | None = None, prefix_cache: int | None = None,
                 draft=None, draft_tokens: int = 4, draft_rows: int = 4, paged: bool | None = None):
        if max_batch < 1:
            raise InputError(f"max_batch must be at least 1, got {max_batch}")
        self.model, self.max_batch = model, max_batch
        self.tokenizer = getattr(model, "tokenizer", None)
        self.eos = eos_ids(model)
        self.kv_per_token = kv_bytes_per_token(model.config.get_text_config().to_dict(), model.dtype.itemsize)
        plan = getattr(model, "plan", None)   # (a Ray pipeline has no plan of its own: each stage has one)
        self.kv_budget = kv_budget if kv_budget is not None else \
            plan.kv_budget if plan is not None else getattr(model, "kv_budget", None)
        self.context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        self.vocab = getattr(model.config.get_text_config(), "vocab_size", None)
        # per-sequence KV (engine/kv.py) where the family is known to page; else one shared, masked cache
        if hasattr(model, "slab_runner"):   # a model that runs steps its own way (a Ray pipeline's stages)
            if paged is False:
                raise InputError("this model runs only on per-sequence KV (paged=False is not possible)")
            self.slab = model.slab_runner()
        else:
            self.slab = SlabStep(model) if (pageable(model) if paged is None else paged) else None
        self.batched = self.slab is not None or batchable(model)
        # the prefix cache: bytes of finished requests' KV kept for reuse (the plan's share of the KV budget)
        if prefix_cache is None:
            prefix_cache = prefix_budget(self.kv_budget, self.kv_per_token) if self.kv_budget is not None else 0
        self.prefix_budget = prefix_cache if self.batched else 0
        # speculative decoding: a resident draft model (the model's own `draft` unless given) proposes up to
        # `draft_tokens` tokens for each greedy row while at most `draft_rows` rows run; one sweep verifies them
        self.draft = (draft if draft is not None else getattr(model, "draft", None)) if self.batched else None
        self.draft_tokens, self.draft_rows = draft_tokens, draft_rows
        self.entries: OrderedDict[int, _Entry] = OrderedDict()   # least recently used first
        self.refs: Counter = Counter()   # slot -> sequences and entries that read some of its columns
        self.waiting: list[_Seq] = []
        self.active: list[_Seq] = []
        self.cache = None
        self.owner: torch.Tensor | None = None    # [cache length]: the slot of a column's sequence (-1: dead)
        self.pos: torch.Tensor | None = None      # [cache length]: that column's position in its sequence
        self.eager = model.config._attn_implementation not in (None, "sdpa")   # additive float masks
        self.lock = threading.Condition()
        self._ids = itertools.count()
        self._slots = itertools.count()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._swept: BaseException | None = None   # the error of a failed sweep, already handed to its rows
        self.stats = {"steps": 0, "tokens": 0, "prefill_tokens": 0, "max_batch_seen": 0, "seconds": 0.0,
                      "kv_peak_tokens": 0, "bytes_read": 0, "prefix_hit_tokens": 0,
                      "drafted": 0, "accepted": 0}

    # -- submitting
    def submit(self, prompt_ids, params: SamplingParams | None = None, request_id: str | None = None) -> Handle:
        """Queue a request; InputError (nothing queued) for one that cannot run: an empty prompt, token ids outside
        the vocabulary, parameters that cannot be computed, too long for the context or the KV budget."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InputError(f"params must be a SamplingParams, got {type(params).__name__}")
        params.check()   # again: a SamplingParams can be changed after it was made
        prompt = _token_list(prompt_ids)
        if not prompt:
            raise InputError("the prompt is empty")
        if self.vocab and not all(0 <= t < self.vocab for t in prompt):
            bad = next(t for t in prompt if not 0 <= t < self.vocab)
            raise InputError(f"token id {bad} is outside this model's vocabulary [0, {self.vocab})")
        why = self.refusal(len(prompt), params.max_tokens)
        if why is not None:
            raise InputError(why.message)
        lora = getattr(self.model, "lora", None)
        if params.adapter is not None and lora is None:
            raise InputError(f"no adapter named {params.adapter!r} here: this model has no LoRA adapters")
        lslot = lora.slot(params.adapter) if lora is not None else -1
        rid = request_id or f"req-{next(self._ids)}"
        h = Handle(rid)
        s = _Seq(rid, next(self._slots), prompt, params, h, self.tokenizer, lslot)
        with self.lock:
            self.waiting.append(s)
            self.lock.notify_all()
        return h

    def refusal(self, prompt_tokens: int, max_tokens: int) -> Refusal | None:
        """Why a request of this size can never run here; None if it can."""
        if self.context and prompt_tokens + max_tokens > self.context:
            return Refusal("context", (
                f"this model's context is {self.context} tokens; the prompt has {prompt_tokens} and max_tokens asks "
                f"for {max_tokens}: shorten the prompt or lower max_tokens"))
        need = (prompt_tokens + max_tokens) * self.kv_per_token
        if self.kv_budget is not None and need > self.kv_budget:
            return Refusal("kv_budget", (
                f"this request's KV cache ({need} bytes for {prompt_tokens + max_tokens} tokens) exceeds the plan's "
                f"KV budget ({self.kv_budget} bytes): lower max_tokens or raise max_ram / max_gpu_memory"))
        return None

    def cancel(self, request_id: str) -> None:
        """Stop a request at the next step (a client that went away): its slot is freed."""
        with self.lock:
            for s in self.waiting + self.active:
                if s.id == request_id:
                    s.cancelled = True

    def pending(self) -> int:
        with self.lock:
            return len(self.waiting) + len(self.active)

    @property
    def kv_layout(self) -> str:
        """How sequences keep their keys and values: "slabs" (each its own, engine/kv.py), "masked" (one shared
        cache under a mask) or "alone" (one sequence at a time)."""
        return "slabs" if self.slab is not None else "masked" if self.batched else "alone"

    def evict_prefix(self, oldest: int = 1) -> int:
        """Let go of the `oldest` least recently used prefix-cache entries (keys and values other sequences still
        read stay); the number evicted."""
        n = 0
        with self.lock:
            while n < oldest and self.entries:
                self._release(self.entries.pop(next(iter(self.entries))))
                n += 1
        return n

    def snapshot(self) -> EngineState:
        """The engine's counts, taken under its lock (servers and metrics read these, nothing else)."""
        with self.lock:
            return EngineState(waiting=len(self.waiting), running=len(self.active), kv_tokens=self.kv_tokens(),
                               prefix_entries=len(self.entries), prefix_bytes=self._cached_bytes(),
                               stats=dict(self.stats))

    # -- running
    def generate(self, prompts, params=None, progress=None) -> list[Completion]:
        """Run every prompt to its end and return the completions in order. `params`: one SamplingParams
        for all, or a list (one per prompt). `progress(completion)` is called as each finishes. A request that
        failed (GenerationError) raises its error, after the others have run."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise InputError(f"{len(prompts)} prompts but {len(plist)} SamplingParams: give one, or one per prompt")
        handles = []
        try:
            for p, sp in zip(prompts, plist):
                handles.append(self.submit(p, sp))
        except InputError as e:   # nothing of this call is left queued
            for h in handles:
                self.cancel(h.request_id)
            raise InputError(f"prompt {len(handles)}: {e}") from None
        left = set(range(len(handles)))
        while left:
            self.step()
            for i in [i for i in left if handles[i].done]:
                left.discard(i)
                if progress and handles[i].error is None:
                    progress(handles[i].result())
        return [h.result() for h in handles]

    def start(self) -> None:
        """Run steps on a background thread while there is work (for servers)."""
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="layerstream-engine", daemon=True)
            self._thread.start()

    @property
    def serving(self) -> bool:
        """Whether the engine's thread (`start()`) is running steps."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        self._stop = True
        with self.lock:
            self.lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _loop(self):
        while not self._stop:
            with self.lock:
                while not self._stop and not self.waiting and not self.active:
                    self.lock.wait()
            if self._stop:
                return
            try:
                self.step()
            except BaseException as e:
                if e is self._swept:   # a failed sweep: its rows have the error, waiting requests go on
                    log(f"engine: a sweep failed ({type(e).__name__}: {e}); its requests got the error, the engine "
                        f"goes on")
                else:   # anything else: handed to every request in flight; the engine goes on
                    self._fail_all(e)
                self._swept = None

    def _fail_all(self, err: BaseException):
        with self.lock:
            seqs, self.active, self.waiting = self.active + self.waiting, [], []
        self._reset_cache()
        for s in seqs:
            self._fail(s, err)

    def _reset_cache(self):
        self.cache = self.owner = self.pos = None
        if self.slab is not None:
            self.slab.clear()
        self.entries.clear()
        self.refs.clear()

    def step(self) -> list[Delta]:
        """One sweep over every active sequence (joining ones prefill in it). Returns the deltas it made.

        A row whose own work fails (drafting, sampling, stop strings, detokenizing) ends alone: its handle gets a
        GenerationError and the other rows go on as if it had never been there. A failure of the shared sweep
        fails the rows in it (each handle gets the error), empties the cache so that the engine can serve later
        requests, and is raised again; waiting requests stay queued."""
        t0 = time.perf_counter()
        with self.lock:
            for s in [s for s in self.waiting if s.cancelled]:
                self.waiting.remove(s)
                self._finish(s, "cancelled")
            joining = self._admit()
        deltas = [self._finish(s, "cancelled") for s in self.active if s.cancelled]
        self._drop([s for s in self.active if s.cancelled])
        if not self.active and not joining:
            return deltas
        if self.draft is not None and len(self.active) + len(joining) <= self.draft_rows:
            failed = []
            for r in self.active:
                try:
                    self._propose(r)
                except Exception as e:
                    failed.append((r, self._row_error(r, "drafting", e)))
            self._drop([], failed)
            if not self.active and not joining:
                return deltas
        rows = self.active + joining
        prof = getattr(self.model, "profiler", None)
        before = prof.bytes_read if prof is not None else 0
        try:
            logits = self._sweep(joining)
        except BaseException as e:
            self._sweep_failed(rows, e)
            raise
        if prof is not None:
            self.stats["bytes_read"] += max(prof.bytes_read - before, 0)
        self.stats["steps"] += 1
        self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], len(rows))
        done, failed, at = [], [], 0
        for s in rows:
            n = len(s.drafted) + 1 if s.drafted else 1
            mine, at = logits[at:at + n], at + n
            what = "sampling"
            try:
                if s.drafted:
                    toks = self._verify(s, mine)
                else:
                    toks = [int(s.params.next_tokens(mine, s.prompt, s.tokens, s.gen)[0])]
                what = "decoding its tokens and applying its stop strings"
                for tok in toks:
                    s.tokens.append(tok)
                    self.stats["tokens"] += 1
                    d = self._delta(s, tok)
                    deltas.append(d)
                    if d.finish_reason:
                        done.append(s)
                        break
                    s.handle._put(d)
            except Exception as e:
                failed.append((s, self._row_error(s, what, e)))
        self._drop(done, failed)
        self.stats["seconds"] += time.perf_counter() - t0
        return deltas

    def _row_error(self, s: _Seq, what: str, e: Exception) -> GenerationError:
        if isinstance(e, GenerationError):
            err = GenerationError(f"request {s.id} failed while {what}: {e}")
        else:
            err = GenerationError(f"request {s.id} failed while {what}: {type(e).__name__}: {e}")
        err.__cause__ = e
        return err

    def _sweep_failed(self, rows: list[_Seq], err: BaseException) -> None:
        """The shared sweep raised: the cache may hold some layers' keys of it and not others', so it goes, with
        every row that read it; the error goes to each of their handles."""
        self._swept = err
        self.active = []
        self._reset_cache()
        for s in rows:
            self._fail(s, err)

    def _fail(self, s: _Seq, err: BaseException) -> None:
        s.handle.error = err
        s.handle._done.set()
        s.handle._put(err)

    def _propose(self, s: _Seq) -> None:
        """Draft up to `draft_tokens` greedy tokens for a decoding row with the resident draft model."""
        s.drafted = []
        k = min(self.draft_tokens, s.params.max_tokens - len(s.tokens) - 1)
        if not s.params.greedy or s.params.penalized or k < 1 or s.cancelled:
            return
        full = s.prompt + s.tokens     # the cache holds full[:real]; full[real] is the token to feed next
        if s.dcache is None:
            s.dcache, s.dlen = new_cache(self.draft), 0
        feed = full[s.dlen:s.real + 1]
        for _ in range(k):
            logits = forward(self.draft, torch.tensor([feed]), s.dcache)
            s.dlen += len(feed)
            tok = int(logits[0].argmax())
            s.drafted.append(tok)
            if tok in self.eos:
                break
            feed = [tok]
        self.stats["drafted"] += len(s.drafted)

    def _verify(self, s: _Seq, logits: torch.Tensor) -> list[int]:
        """The tokens a verifying sweep gives a row: the drafted ones the model agrees with, then its own next
        token. Columns of rejected drafts are masked; the draft's cache is cut back to what stays."""
        best = logits.argmax(-1).tolist()     # the model's greedy token after the fed token and each draft
        j = 0
        while j < len(s.drafted) and s.drafted[j] == best[j]:
            j += 1
        self.stats["accepted"] += j
        rejected = len(s.drafted) - j
        if rejected and self.slab is not None:
            s.real -= rejected
            self.slab.truncate(s.slot, s.real)
        elif rejected:
            self.owner[(self.owner == s.slot) & (self.pos >= s.real - rejected)] = -1
            s.real -= rejected
        keep = s.real     # the draft holds full[:real_before + 1] and the drafts but the last: cut what was rejected
        if s.dlen > keep:
            s.dcache.crop(keep - s.dlen)   # a negative count: the tokens to remove
            s.dlen = keep
        toks = s.drafted[:j] + [best[j]]
        s.drafted = []
        return toks

    # -- internals
    def _admit(self) -> list[_Seq]:
        """Waiting requests that join this step: while a slot is free and their KV cache fits (FIFO: a request
        that does not fit waits, and so do the ones behind it, so no request starves). A request that shares a
        prefix with the prefix cache or a running sequence borrows those columns; one that shares more with a
        request joining in this very step waits one step, to borrow from it instead of computing it again."""
        joining = []
        if not self.batched and (self.active or not self.waiting):
            return joining
        while self.waiting and len(self.active) + len(joining) < (self.max_batch if self.batched else 1):
            s = self.waiting[0]
            src, m = self._best_prefix(s, list(self.entries.values()) + self.active)
            if joining and self.prefix_budget and self._best_prefix(s, joining, done=False)[1] >= m + MIN_SHARE:
                break
            if self.slab is not None:
                self.slab.limit(s.slot, len(s.prompt) + s.params.max_tokens)
            self._borrow(s, src, m)
            if self.kv_budget is not None and self._kv_after(joining + [s]) > self.kv_budget and self.entries:
                while self._kv_after(joining + [s]) > self.kv_budget and self._evict():
                    self._compact(force=True)
            if self.kv_budget is not None and self._kv_after(joining + [s]) > self.kv_budget and \
                    (self.active or joining):
                self._unborrow(s)
                break
            joining.append(self.waiting.pop(0))
            self.stats["prefix_hit_tokens"] += s.shared
        return joining

    def _best_prefix(self, s: _Seq, sources, done: bool = True):
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

    def _borrow(self, s: _Seq, src, m: int) -> None:
        """Let `s` read positions 0..m-1 from `src`'s columns (and those it borrowed itself)."""
        if src is None:
            return
        if isinstance(src, _Entry):
            self.entries.move_to_end(src.slot)
        if self.slab is not None:   # per-sequence slabs: the prefix is copied (linear in m; its compute is saved)
            self.slab.copy_prefix(s.slot, src.slot, m)
            s.shared, s.real = m, m
            return
        segs = [(slot, lo, min(hi, m)) for slot, lo, hi in src.segs if lo < m]
        if m > src.shared:
            segs.append((src.slot, src.shared, m))
        s.segs, s.shared, s.real = segs, m, m
        for slot, _, _ in segs:
            self.refs[slot] += 1

    def _unborrow(self, s: _Seq) -> None:
        if self.slab is not None:   # (and its limit)
            self.slab.free(s.slot)
        for slot, _, _ in s.segs:
            self.refs[slot] -= 1
        s.segs, s.shared, s.real = [], 0, 0

    def _evict(self) -> bool:
        """Drop the least recently used entry that no running sequence reads; False when there is none."""
        for slot in self.entries:
            if not self.refs[slot]:
                self._release(self.entries.pop(slot))
                return True
        return False

    def _release(self, holder) -> None:
        """A finished sequence or an evicted entry lets go of its columns and of those it borrowed; columns
        nobody holds any more are masked (and dropped at the next compaction). With slabs: its slab goes, unless it
        is a prefix-cache entry now."""
        if self.slab is not None:
            if holder.slot not in self.entries:
                self.slab.free(holder.slot)
            return
        running = {s.slot for s in self.active}

        def held(slot):
            return self.refs[slot] > 0 or slot in self.entries or slot in running

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

    def _kv_after(self, joining) -> int:
        """Bytes the cache would reach if `joining` joined now and every row ran to its token limit (the prefix
        cache's columns and those of finished sequences not yet dropped included)."""
        rows = self.active + joining
        if self.slab is not None:   # a shared prefix is a copy: it counts in full
            return (self._entry_tokens() + sum(len(s.prompt) + s.params.max_tokens for s in rows)) * self.kv_per_token
        dead = int((self.owner < 0).sum()) if self.owner is not None else 0
        return (dead + self._held_beside(rows) + sum(len(s.prompt) - s.shared + s.params.max_tokens for s in rows)) \
            * self.kv_per_token

    def _sweep(self, joining: list[_Seq]) -> torch.Tensor:
        """One forward over the packed new tokens of every row; the logits of each row's last token [rows, vocab]."""
        rows = self.active + joining
        news = [[s.tokens[-1]] + s.drafted for s in self.active] + [s.prompt[s.shared:] for s in joining]
        ids = torch.tensor([t for n in news for t in n]).unsqueeze(0)
        qowner = torch.cat([torch.full((len(n),), s.slot) for s, n in zip(rows, news)])
        qpos = torch.cat([torch.arange(s.real, s.real + len(n)) for s, n in zip(rows, news)])
        for s, n in zip(rows, news):
            s.real += len(n)
        ends = torch.tensor([len(n) for n in news]).cumsum(0)
        # the head computes each row's last token, and every drafted position of a verifying row
        last = torch.cat([torch.arange(e - len(s.drafted) - 1, e) if s.drafted else e[None] - 1
                          for s, e in zip(rows, ends)])
        self.stats["prefill_tokens"] += sum(len(s.prompt) - s.shared for s in joining)
        lora = getattr(self.model, "lora", None)
        routing = lambda: lora.routing(torch.cat([torch.full((len(n),), s.lslot) for s, n in zip(rows, news)]))  # noqa
        if self.slab is not None:   # each row's tokens attend its own slab
            self.active = rows
            logits = self.slab.forward([(s.slot, n) for s, n in zip(rows, news)], last,
                                       routing() if lora is not None else None)
            self.stats["kv_peak_tokens"] = max(self.stats["kv_peak_tokens"], self.slab.capacity())
            return logits
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
        self.active = rows
        self.stats["kv_peak_tokens"] = max(self.stats["kv_peak_tokens"], int(self.owner.numel()))
        if lora is None:
            logits = forward(self.model, ids, self.cache, attention_mask=mask[None, None], position_ids=qpos[None],
                             keep=last)
        else:   # each row's tokens get its own adapter
            with routing():
                logits = forward(self.model, ids, self.cache, attention_mask=mask[None, None],
                                 position_ids=qpos[None], keep=last)
        return logits[0]

    def _drop(self, done: list[_Seq], failed: list[tuple[_Seq, BaseException]] = ()) -> None:
        """Remove finished rows: their columns become a prefix-cache entry (within its budget) or are masked;
        masked columns are dropped from the cache once they are a quarter of it. `failed`: rows that end with
        an error (their handles get it; their columns are masked, never reused)."""
        if not done and not failed:
            return
        gone = set(map(id, done)) | {id(s) for s, _ in failed}
        self.active = [s for s in self.active if id(s) not in gone]
        for s, err in failed:
            self._release(s)
            self._fail(s, err)
        for s in done:
            if self.prefix_budget and s.real > s.shared:
                if self.slab is not None:
                    self.slab.shrink(s.slot)
                self.entries[s.slot] = _Entry(s)
                self.entries.move_to_end(s.slot)
                for slot, _, _ in s.segs:   # the entry holds what the sequence held
                    self.refs[slot] += 1
            self._release(s)
        while self.entries and self._cached_bytes() > self.prefix_budget and self._evict():
            pass
        if not self.active and not self.entries and not any(n > 0 for n in self.refs.values()):
            self._reset_cache()   # (a row about to join may still read columns it borrowed: then not)
            return
        self._compact()

    def _compact(self, force: bool = False) -> None:
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

    def _held_beside(self, rows) -> int:
        """Live columns that none of `rows` owns: the prefix cache's entries and the columns they lend."""
        if self.owner is None:
            return 0
        mine = torch.tensor([s.slot for s in rows], dtype=torch.long)
        return int(((self.owner >= 0) & ~torch.isin(self.owner, mine)).sum())

    def _cached_bytes(self) -> int:
        """Bytes of live columns that no running sequence owns (the prefix cache's)."""
        if self.slab is not None:
            return self._entry_tokens() * self.kv_per_token
        return self._held_beside(self.active) * self.kv_per_token

    def _entry_tokens(self) -> int:
        return sum(e.real for e in self.entries.values())

    def kv_tokens(self) -> int:
        """Tokens whose keys and values the engine holds now (running sequences and the prefix cache)."""
        if self.slab is not None:
            return self.slab.tokens()
        return int(self.owner.numel()) if self.owner is not None else 0

    def _delta(self, s: _Seq, tok: int) -> Delta:
        """The text a new token completes, with stop strings applied; a finish reason when the request ends."""
        reason = None
        if tok in self.eos:
            reason = "stop"
        elif len(s.tokens) >= s.params.max_tokens:
            reason = "length"
        text = s.text()
        if s.params.stop:
            hits = [i for i in (text.find(x, max(0, s.sent - len(x))) for x in s.params.stop) if i >= 0]
            if hits:
                text, reason = text[:min(hits)], "stop"
        if reason is None:
            # hold back what could be the start of a stop string, and an incomplete character
            hold = max((len(x) - 1 for x in s.params.stop), default=0)
            end = len(text) - hold
            while end > s.sent and text[end - 1] == "\ufffd":
                end -= 1
            piece, s.sent = text[s.sent:max(end, s.sent)], max(end, s.sent)
            return Delta(s.id, [tok], piece)
        return self._finish(s, reason, text, tok)

    def _finish(self, s: _Seq, reason: str, text: str | None = None, tok: int | None = None) -> Delta:
        text = s.text() if text is None else text
        d = Delta(s.id, [tok] if tok is not None else [], text[s.sent:], reason)
        s.handle.completion = Completion(s.id, len(s.prompt), list(s.tokens), text, reason,
                                         time.perf_counter() - s.t0)
        s.handle._done.set()
        s.handle._put(d)
        return d


def batchable(model) -> bool:
    """Whether rows of different lengths can share one cache here: every layer is plain full attention."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    try:
        cache = DynamicCache(config=model.config)
    except Exception:   # families whose cache needs more than the config (recurrent states ...)
        return False
    return bool(cache.layers) and all(type(layer) is DynamicLayer for layer in cache.layers)
