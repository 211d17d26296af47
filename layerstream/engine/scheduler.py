"""Continuous batching: one sweep per step serves every active sequence.

(Over 400 lines: the engine's public surface and the per-row work of a step, drafting, sampling, verifying and
detokenizing, each isolated per row; admission and the KV live in schedule.py and cache.py.)

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

The pieces: `Scheduler` (engine/schedule.py) decides who runs and with which tokens and keeps the prefix cache,
without tensors; the KV manager (engine/cache.py) holds the keys and values and runs the sweep; the engine here
drafts, samples, verifies, detokenizes and hands results to the requests' handles.

API: `Engine(model, max_batch)`; `submit(prompt_ids, SamplingParams) -> Handle` (thread-safe);
`Handle.stream()` yields `Delta`s as tokens come, `Handle.result()` the `Completion`; `step()` runs one
sweep; `generate(requests)` runs a list to the end (jobs); `start()` runs steps on a thread (servers).
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time

import torch

from ..errors import InputError
from ..plan.planner import kv_bytes_per_token, prefix_budget
from ..utils import log
from .cache import MaskedCache, SlabCache
from .kv import SlabStep, pageable
from .requests import (
    Completion,
    Delta,
    EngineState,
    Handle,
    Refusal,
    SamplingParams,
    _token_list,
    token_logprob,
)
from .schedule import Scheduler, Seq
from .step import GenerationError, eos_ids, forward, new_cache

__all__ = ["Completion", "Delta", "Engine", "EngineState", "GenerationError", "Handle", "Refusal", "SamplingParams",
           "batchable"]


class Engine:
    """Continuous batching over a model (a `StreamedModel`, or a Ray `PipelineModel`): see the module's docstring."""

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
            self.cache = SlabCache(model.slab_runner())
        elif pageable(model) if paged is None else paged:
            self.cache = SlabCache(SlabStep(model))
        else:
            self.cache = MaskedCache(model)
        self.batched = self.cache.layout == "slabs" or batchable(model)
        # the prefix cache: bytes of finished requests' KV kept for reuse (the plan's share of the KV budget)
        if prefix_cache is None:
            prefix_cache = prefix_budget(self.kv_budget, self.kv_per_token) if self.kv_budget is not None else 0
        self.prefix_budget = prefix_cache if self.batched else 0
        self.sched = Scheduler(self.cache, max_batch, self.batched, self.kv_budget, self.kv_per_token,
                               self.prefix_budget)
        # speculative decoding: a resident draft model (the model's own `draft` unless given) proposes up to
        # `draft_tokens` tokens for each greedy row while at most `draft_rows` rows run; one sweep verifies them
        self.draft = (draft if draft is not None else getattr(model, "draft", None)) if self.batched else None
        self.draft_tokens, self.draft_rows = draft_tokens, draft_rows
        self.lock = threading.Condition()
        self._ids = itertools.count()
        self._slots = itertools.count()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._swept: BaseException | None = None   # the error of a failed sweep, already handed to its rows
        self._constraints = None   # grammar support (engine/constrain.py), made at the first constrained request
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
        h = Handle(rid, params.n)
        # n choices: n sequences of one id (cancelled together), seeded seed, seed + 1, ...; the first computes the
        # prompt's KV and the others, a step later, start from it (the prefix cache)
        seqs = [Seq(rid, next(self._slots), prompt, params if i == 0 or params.seed is None else
                    dataclasses.replace(params, seed=(params.seed + i) % 2**63), h, self.tokenizer, lslot, i)
                for i in range(params.n)]
        if params.grammar is not None:   # each choice its own matcher; a grammar that does not compile: InputError
            for s in seqs:
                s.matcher = self.check_grammar(params.grammar)
        with self.lock:
            self.sched.waiting.extend(seqs)
            self.lock.notify_all()
        return h

    def check_grammar(self, grammar: str):
        """A matcher of `grammar` for this model's tokenizer (engine/constrain.py); InputError, saying what is
        wrong, for one that does not compile."""
        if self._constraints is None:
            from .constrain import Constraints

            self._constraints = Constraints(self.tokenizer)
        return self._constraints.matcher(grammar)

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
            for s in self.sched.waiting + self.sched.active:
                if s.id == request_id:
                    s.cancelled = True

    def pending(self) -> int:
        with self.lock:
            return len(self.sched.waiting) + len(self.sched.active)

    @property
    def kv_layout(self) -> str:
        """How sequences keep their keys and values: "slabs" (each its own, engine/kv.py), "masked" (one shared
        cache under a mask) or "alone" (one sequence at a time)."""
        return self.cache.layout if self.batched else "alone"

    def evict_prefix(self, oldest: int = 1) -> int:
        """Let go of the `oldest` least recently used prefix-cache entries (keys and values other sequences still
        read stay); the number evicted."""
        n = 0
        with self.lock:
            while n < oldest and self.sched.entries:
                self.sched.evict_oldest()
                n += 1
        return n

    def kv_tokens(self) -> int:
        """Tokens whose keys and values the engine holds now (running sequences and the prefix cache)."""
        return self.cache.tokens()

    def snapshot(self) -> EngineState:
        """The engine's counts, taken under its lock (servers and metrics read these, nothing else)."""
        with self.lock:
            return EngineState(waiting=len(self.sched.waiting), running=len(self.sched.active),
                               kv_tokens=self.cache.tokens(), prefix_entries=len(self.sched.entries),
                               prefix_bytes=self.sched.cached_bytes(), stats=dict(self.stats))

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
                while not self._stop and not self.sched.waiting and not self.sched.active:
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
            seqs = self.sched.active + self.sched.waiting
            self.sched.waiting = []
            self.sched.reset()
        for s in seqs:
            self._fail(s, err)

    def step(self) -> list[Delta]:
        """One sweep over every active sequence (joining ones prefill in it). Returns the deltas it made.

        A row whose own work fails (drafting, sampling, stop strings, detokenizing) ends alone: its handle gets a
        GenerationError and the other rows go on as if it had never been there. A failure of the shared sweep
        fails the rows in it (each handle gets the error), empties the cache so that the engine can serve later
        requests, and is raised again; waiting requests stay queued."""
        t0 = time.perf_counter()
        sched = self.sched
        with self.lock:
            for s in [s for s in sched.waiting if s.cancelled]:
                sched.waiting.remove(s)
                self._finish(s, "cancelled")
            joining = sched.admit()
        self.stats["prefix_hit_tokens"] = sched.prefix_hit_tokens
        cancelled = [s for s in sched.active if s.cancelled]
        deltas = [self._finish(s, "cancelled") for s in cancelled]
        sched.drop(cancelled)
        if not sched.active and not joining:
            return deltas
        if self.draft is not None and len(sched.active) + len(joining) <= self.draft_rows:
            failed = []
            for r in sched.active:
                try:
                    self._propose(r)
                except Exception as e:
                    failed.append((r, self._row_error(r, "drafting", e)))
            self._drop([], failed)
            if not sched.active and not joining:
                return deltas
        step = sched.record(joining)
        rows = step.rows
        self.stats["prefill_tokens"] += sum(len(s.prompt) - s.shared for s in joining)
        lora = getattr(self.model, "lora", None)
        routing = None if lora is None else lora.routing(
            torch.cat([torch.full((len(n),), s.lslot) for s, n in zip(rows, step.news)]))   # each row's adapter
        prof = getattr(self.model, "profiler", None)
        before = prof.bytes_read if prof is not None else 0
        try:
            logits = self.cache.run(rows, step.news, step.last(), routing)
        except BaseException as e:
            self._sweep_failed(rows, e)
            raise
        self.stats["kv_peak_tokens"] = max(self.stats["kv_peak_tokens"], self.cache.peak())
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
                else:   # a constrained row samples among the tokens its grammar allows next
                    row = mine if s.matcher is None else self._constraints.mask(s.matcher, mine)
                    toks = [int(s.params.next_tokens(row, s.prompt, s.tokens, s.gen)[0])]
                what = "decoding its tokens and applying its stop strings"
                for i, tok in enumerate(toks):
                    if s.matcher is not None:
                        self._constraints.consume(s.matcher, tok)
                    s.tokens.append(tok)
                    self.stats["tokens"] += 1
                    if s.params.logprobs is not None:   # the model's own distribution at this token's position
                        s.logprobs.append(token_logprob(mine[i], tok, s.params.logprobs, self._piece))
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

    def _drop(self, done: list[Seq], failed: list[tuple[Seq, BaseException]]) -> None:
        """Finished rows leave (kept for their prefix); failed ones leave and their handles get their errors."""
        self.sched.drop(done, [s for s, _ in failed])
        for s, err in failed:
            self._fail(s, err)

    def _row_error(self, s: Seq, what: str, e: Exception) -> GenerationError:
        if isinstance(e, GenerationError):
            err = GenerationError(f"request {s.id} failed while {what}: {e}")
        else:
            err = GenerationError(f"request {s.id} failed while {what}: {type(e).__name__}: {e}")
        err.__cause__ = e
        return err

    def _sweep_failed(self, rows: list[Seq], err: BaseException) -> None:
        """The shared sweep raised: the cache may hold some layers' keys of it and not others', so it goes, with
        every row that read it; the error goes to each of their handles."""
        self._swept = err
        self.sched.reset()
        for s in rows:
            self._fail(s, err)

    def _fail(self, s: Seq, err: BaseException) -> None:
        if s.handle.error is not None:   # another choice of this request failed first: the request has its error
            return
        s.handle.error = err
        s.handle._done.set()
        s.handle._put(err)
        if len(s.handle.completions) > 1:   # its other choices stop at the next step
            self.cancel(s.id)

    def _propose(self, s: Seq) -> None:
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
            if s.matcher is not None:   # a constrained row's drafts are drafted under its grammar, which follows them
                tok = int(self._constraints.mask(s.matcher, logits[:1]).argmax())
                self._constraints.consume(s.matcher, tok)
            else:
                tok = int(logits[0].argmax())
            s.drafted.append(tok)
            if tok in self.eos or (s.matcher is not None and s.matcher.is_stopped()):
                break
            feed = [tok]
        if s.matcher is not None:
            s.matcher.rollback(len(s.drafted))   # back to the row's own tokens: the sweep verifies the drafts
        self.stats["drafted"] += len(s.drafted)

    def _verify(self, s: Seq, logits: torch.Tensor) -> list[int]:
        """The tokens a verifying sweep gives a row: the drafted ones the model agrees with, then its own next
        token. The KV of rejected drafts is cut off; the draft's cache is cut back to what stays."""
        if s.matcher is None:
            best = logits.argmax(-1).tolist()     # the model's greedy token after the fed token and each draft
            j = 0
            while j < len(s.drafted) and s.drafted[j] == best[j]:
                j += 1
        else:   # the greedy token among those the grammar allows, in its state after the drafts accepted so far
            best, j = [], 0
            while True:
                best.append(int(self._constraints.mask(s.matcher, logits[j:j + 1]).argmax()))
                if j == len(s.drafted) or s.drafted[j] != best[j]:
                    break
                self._constraints.consume(s.matcher, best[j])
                j += 1
            s.matcher.rollback(j)   # the caller consumes every token it keeps
        self.stats["accepted"] += j
        if len(s.drafted) > j:
            self.cache.reject(s, len(s.drafted) - j)
        keep = s.real     # the draft holds full[:real_before + 1] and the drafts but the last: cut what was rejected
        if s.dlen > keep:
            s.dcache.crop(keep - s.dlen)   # a negative count: the tokens to remove
            s.dlen = keep
        toks = s.drafted[:j] + [best[j]]
        s.drafted = []
        return toks

    def _delta(self, s: Seq, tok: int) -> Delta:
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
            return Delta(s.id, [tok], piece, logprobs=s.logprobs[-1:] if s.params.logprobs is not None else None,
                         index=s.index)
        return self._finish(s, reason, text, tok)

    def _piece(self, tok: int) -> str:
        """One token's text (a piece of a character may be U+FFFD: its bytes come with the next token's)."""
        return self.tokenizer.decode([tok]) if self.tokenizer is not None else ""

    def _finish(self, s: Seq, reason: str, text: str | None = None, tok: int | None = None) -> Delta:
        text = s.text() if text is None else text
        lps = s.params.logprobs is not None
        d = Delta(s.id, [tok] if tok is not None else [], text[s.sent:], reason,
                  logprobs=(s.logprobs[-1:] if tok is not None else []) if lps else None, index=s.index)
        s.handle._finished(s.index, Completion(s.id, len(s.prompt), list(s.tokens), text, reason,
                                               time.perf_counter() - s.t0, list(s.logprobs) if lps else None))
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
