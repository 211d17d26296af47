"""What a request is and what it gets back: `SamplingParams` (checked values), `Handle` (its deltas as they come,
its `Completion`), and the typed reason a request can never run (`Refusal`)."""

from __future__ import annotations

import math
import operator
import queue
import threading
from dataclasses import dataclass, field

import torch

from ..errors import InputError
from .step import GREEDY_BELOW, penalize, sample

MAX_TOP = 20   # most likely tokens listed beside each chosen one, at most (OpenAI's top_logprobs limit)
MAX_N = 16     # choices of one request, at most


@dataclass
class SamplingParams:
    """Per request: token limit, greedy (temperature 0, or below GREEDY_BELOW = 1e-5) or sampled (temperature,
    top_p, seed), stop strings. Values that cannot be computed (NaN, infinite, out of range) raise InputError,
    here and again at `Engine.submit`."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0                     # 0: all tokens
    min_p: float = 0.0                 # 0: off
    repetition_penalty: float = 1.0    # 1: off (prompt and output tokens; transformers' and llama.cpp's rule)
    frequency_penalty: float = 0.0     # OpenAI's, over the output tokens
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    adapter: str | None = None   # a LoRA adapter of the model by name (None: its default adapter, or none)
    logprobs: int | None = None  # None: off; k: each token's log-probability and the k most likely (0..MAX_TOP)
    n: int = 1                   # choices: n sequences of the prompt (its KV computed once, lent to the others)
    grammar: str | None = None   # an llguidance grammar its tokens are held to (engine/constrain.py: json_schema ...)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.check()

    def check(self) -> None:
        """InputError unless every value can be computed with."""
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens <= 0:
            raise InputError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not _number(self.temperature) or self.temperature < 0:
            raise InputError(f"temperature must be a finite number >= 0 (0: greedy), got {self.temperature!r}")
        if not _number(self.top_p) or not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise InputError(f"top_k must be an integer >= 0 (0: all tokens), got {self.top_k!r}")
        if not _number(self.min_p) or not 0 <= self.min_p < 1:
            raise InputError(f"min_p must be a number in [0, 1), got {self.min_p!r}")
        if not _number(self.repetition_penalty) or not 0 < self.repetition_penalty <= 10:
            raise InputError(f"repetition_penalty must be a number in (0, 10] (1: off), got "
                             f"{self.repetition_penalty!r}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not _number(getattr(self, name)) or not -2 <= getattr(self, name) <= 2:
                raise InputError(f"{name} must be a number in [-2, 2], got {getattr(self, name)!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not -2**63 <= self.seed < 2**64):
            raise InputError(f"seed must be an integer in [-2**63, 2**64), got {self.seed!r}")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise InputError(f"stop must be a string or a list of non-empty strings, got {self.stop!r}")
        if self.adapter is not None and not isinstance(self.adapter, str):
            raise InputError(f"adapter must be an adapter's name, got {self.adapter!r}")
        if self.grammar is not None and not isinstance(self.grammar, str):
            raise InputError("grammar must be an llguidance grammar (layerstream.engine.constrain.json_schema(...))")
        if not isinstance(self.n, int) or isinstance(self.n, bool) or not 1 <= self.n <= MAX_N:
            raise InputError(f"n must be an integer in [1, {MAX_N}] (choices of one prompt), got {self.n!r}")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or isinstance(self.logprobs, bool)
                                          or not 0 <= self.logprobs <= MAX_TOP):
            raise InputError(f"logprobs must be None or an integer in [0, {MAX_TOP}] (the most likely tokens "
                             f"listed beside each chosen one), got {self.logprobs!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or bool(self.frequency_penalty) or bool(self.presence_penalty)

    def next_tokens(self, logits: torch.Tensor, prompt: list[int], tokens: list[int], gen) -> torch.Tensor:
        """This request's next token from its logits [1, vocab], after its penalties."""
        if self.penalized:
            logits = penalize(logits, prompt + tokens, self.repetition_penalty, tokens, self.frequency_penalty,
                              self.presence_penalty)
        return sample(logits, self.temperature, self.top_p, gen, self.top_k, self.min_p)


def _number(x) -> bool:
    """A finite int or float (not a bool)."""
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:   # an int beyond float's range
        return False


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model (log_softmax of its logits, before any sampling
    setting or penalty), and the `top` most likely tokens there as (id, text, log-probability)."""

    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]]


def token_logprob(logits: torch.Tensor, tok: int, k: int, decode) -> TokenLogprob:
    """The TokenLogprob of token `tok` from its position's logits [vocab]; `decode(id)` gives a token's text."""
    lp = torch.log_softmax(logits.float(), -1)
    top = lp.topk(k) if k else None
    return TokenLogprob(tok, decode(tok), float(lp[tok]),
                        [] if top is None else [(int(i), decode(int(i)), float(v))
                                                for v, i in zip(top.values.tolist(), top.indices.tolist())])


@dataclass
class Delta:
    """What one step added to a request: new token ids and the text they complete (stop strings held back)."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str | None = None   # "stop" (end of sequence or a stop string), "length", "cancelled"
    logprobs: list[TokenLogprob] | None = None   # those tokens' (with SamplingParams.logprobs)
    index: int = 0                     # the choice it belongs to (SamplingParams.n)


@dataclass
class Completion:
    request_id: str
    prompt_tokens: int
    token_ids: list[int]
    text: str
    finish_reason: str
    seconds: float = 0.0
    logprobs: list[TokenLogprob] | None = None   # every token's (with SamplingParams.logprobs)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class Handle:
    """A submitted request: its deltas as they come (each with its choice's `index`), and its completions (one per
    choice: `SamplingParams.n`). Done when every choice is, or at the first error."""

    def __init__(self, request_id: str, n: int = 1):
        self.request_id = request_id
        self._q: queue.Queue = queue.Queue()
        self._done = threading.Event()
        self.completions: list[Completion | None] = [None] * n
        self.error: BaseException | None = None
        self.notify = None            # called (on the engine's thread) after each delta: servers wake on it

    @property
    def completion(self) -> Completion | None:
        """The first choice's completion."""
        return self.completions[0]

    def _finished(self, index: int, c: Completion) -> None:
        self.completions[index] = c
        if all(x is not None for x in self.completions):
            self._done.set()

    def _put(self, item) -> None:
        self._q.put(item)
        if self.notify is not None:
            self.notify()

    def drain(self) -> list:
        """The deltas (or an error) that came since the last call, without waiting."""
        items = []
        while True:
            try:
                items.append(self._q.get_nowait())
            except queue.Empty:
                return items

    def stream(self, timeout: float | None = None):
        """Deltas until the request finishes (every choice's last one has a finish_reason)."""
        left = len(self.completions)
        while left:
            item = self._q.get(timeout=timeout)
            if isinstance(item, BaseException):
                raise item
            yield item
            left -= item.finish_reason is not None

    def result(self, timeout: float | None = None) -> Completion:
        """The (first choice's) completion, once the request finished; its error if it failed."""
        return self.results(timeout)[0]

    def results(self, timeout: float | None = None) -> list[Completion]:
        """Every choice's completion, in order."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} not finished after {timeout} s")
        if self.error is not None:
            raise self.error
        return list(self.completions)

    @property
    def done(self) -> bool:
        return self._done.is_set()


def _token_list(prompt_ids) -> list[int]:
    """One prompt's token ids as a list of ints. A (1, n) batch, as a tokenizer's `return_tensors="pt"` gives, is
    that one row; a batch of several rows is refused by name (submit each row: they run batched anyway)."""
    ids = prompt_ids.tolist() if hasattr(prompt_ids, "tolist") else prompt_ids   # a tensor or a numpy array
    if isinstance(ids, (list, tuple)) and ids and all(isinstance(r, (list, tuple)) for r in ids):
        if len(ids) != 1:
            raise InputError(f"submit takes one prompt, got a batch of {len(ids)} rows: submit each row "
                             f"(the engine batches requests itself)")
        ids = ids[0]
    if isinstance(ids, (str, bytes)):
        raise InputError("the prompt must be token ids, not text: encode it with the tokenizer first")
    try:
        return [operator.index(t) for t in ids]   # 1.5 or "3" are not token ids
    except (TypeError, ValueError, OverflowError):
        raise InputError("the prompt must be a sequence of token ids (integers)") from None


@dataclass(frozen=True)
class Refusal:
    """Why a request of some size can never run on an engine: `kind` "context" (prompt + max_tokens beyond the
    model's context) or "kv_budget" (its KV cache beyond the plan's KV budget), and a message saying what to do."""

    kind: str
    message: str


@dataclass(frozen=True)
class EngineState:
    """`Engine.snapshot()`: counts taken under the engine's lock."""

    waiting: int                 # requests queued for a slot
    running: int                 # sequences in the running batch
    kv_tokens: int               # tokens whose keys and values are held (running sequences and the prefix cache)
    prefix_entries: int          # finished sequences kept for their prefix
    prefix_bytes: int            # their KV bytes
    stats: dict                  # a copy of Engine.stats
