"""A layer pipeline on Ray: a model's decoder layers split over N stages that together keep resident what no
single one could.

(Over 400 lines: the stage actor, the driver's model and the engine's runner share the stage protocol and its
replay on a restart.)

Each stage is a Ray actor holding a contiguous range of layers (the embedding in the first, the final norm and
head in the last; a tied head's embedding in both) with its own budget and its own plan: a `StreamedModel`
opened on a view of the store that lists only its units, so its planner, loader and hooks see nothing else.
It runs transformers' own forward over the whole (weightless) skeleton in which the other stages' layers are
replaced by pass-throughs: a hook before its first layer puts in the hidden states the previous stage sent, a
hook after its last layer takes them out and stops the forward there. Only hidden states travel between stages
(batch x tokens x hidden numbers); each stage keeps the KV cache of its own layers, per sequence.

`PipelineModel.generate` splits the prompt rows into micro-batches (one per stage by default), each a sequence
of its own whose rows share their sweeps, and sends every micro-batch's step down the chain before waiting for
any: Ray runs an actor's calls in order, so while the last stage computes micro-batch 0 the first already
computes micro-batch 1 (the stages stay busy). Greedy tokens are those of one process.

A stage that dies is restarted by Ray from the store (`max_restarts`); the sequences in flight are replayed (their
tokens so far sent down the chain again from position 0, every stage starting their caches anew), so nothing is
lost and greedy output is unchanged.

The engine (serve, batch) drives a pipeline through `PipelineSlabs`, its runner: each stage keeps its layers' keys
and values per sequence (engine/kv.py's slabs, `Stage.step`), a step's rows go down as micro-batches, and the
driver keeps every sequence's token ids to replay them into a restarted stage.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import os
import re
import time

import torch
from torch import nn

from ..errors import InputError, LayerstreamError
from ..options import Options
from ..plan import head_tied_to_embedding
from ..utils import log
from . import RESTARTS, connect, failed_for_good

_LAYER = re.compile(r"layer\.(\d+)(?:\.|$)")


def stage_ranges(store, n: int) -> list[tuple[int, int]]:
    """Contiguous decoder-layer ranges [a, b) for n stages, balanced by bytes (the embedding counted in the
    first stage, the head in the last)."""
    layer_bytes: dict[int, int] = {}
    edge = {"embed": 0, "head": 0}
    for u in store.manifest.units:
        m = _LAYER.match(u.name)
        if m:
            layer_bytes[int(m[1])] = layer_bytes.get(int(m[1]), 0) + u.bytes
        elif u.name in edge:
            edge[u.name] += u.bytes
    layers = len(layer_bytes)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise InputError(f"pipeline must be a positive number of stages, got {n!r}")
    if n > layers:
        raise InputError(f"pipeline={n} stages for a model of {layers} layers: at most one stage per layer")
    sizes = [layer_bytes[i] for i in range(layers)]
    sizes[0] += edge["embed"]
    sizes[-1] += edge["head"]
    before = [0, *itertools.accumulate(sizes)]   # before[j]: bytes of layers 0..j-1
    cuts = [0]
    for k in range(1, n):   # stage k starts at the cut nearest k/n of the bytes, leaving a layer to each stage
        cuts.append(min(range(cuts[-1] + 1, layers - (n - k) + 1), key=lambda j: abs(before[j] - before[-1] * k / n)))
    bounds = cuts + [layers]
    return list(zip(bounds[:-1], bounds[1:]))


def stage_store(store, a: int, b: int, first: bool, last: bool):
    """A view of `store` whose manifest lists only a stage's units: layers a..b-1 (and their experts), the
    embedding in the first stage, the head in the last (and the embedding when the head is tied to it)."""
    tied = head_tied_to_embedding(store)

    def mine(name: str) -> bool:
        m = _LAYER.match(name)
        if m:
            return a <= int(m[1]) < b
        return (name == "embed" and (first or (last and tied))) or (name == "head" and last)

    view = copy.copy(store)
    view.manifest = dataclasses.replace(store.manifest, units=[u for u in store.manifest.units if mine(u.name)])
    view.units = {u.name: u for u in view.manifest.units}
    return view


class _Skip(nn.Module):
    """Another stage's decoder layer: hands the hidden states on unchanged (keeps the attributes the model's
    forward reads of its layers, such as `attention_type`)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        for key in ("attention_type", "layer_type", "is_sliding", "layer_idx"):
            value = getattr(layer, key, None)
            if value is not None and not isinstance(value, nn.Module):
                setattr(self, key, value)

    def forward(self, *args, **kwargs):
        return args[0] if args else kwargs["hidden_states"]


class MissingKV(Exception):
    """A stage was asked to go on with a sequence whose keys and values it does not hold (it was restarted since
    a chat's last turn): the driver replays the sequence from its first token."""


class _Handoff(Exception):
    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden


class Stage:
    """A Ray actor: layers a..b-1 of the model in the store at `path`, with `options`' budget and plan."""

    def __init__(self, path, options: Options, a: int, b: int, first: bool, last: bool):
        from ..engine.model import StreamedModel
        from ..store import Store

        self.a, self.b, self.first, self.last = a, b, first, last
        self.m = StreamedModel(stage_store(Store(path), a, b, first, last), options)
        inner = self.m.model.get_submodule(self.m.layout.layers_prefix)
        check_pipelinable(self.m.model)
        for i in range(len(inner)):
            if not a <= i < b:
                inner[i] = _Skip(inner[i])
        if not first:
            inner[a].register_forward_pre_hook(self._take_in, with_kwargs=True)
        if not last:
            inner[b - 1].register_forward_hook(self._hand_off)
        self.incoming: torch.Tensor | None = None
        self.caches: dict = {}
        self.slabs = None   # the engine's per-sequence KV of this stage's layers (engine/kv.py), made at first use

    def ready(self) -> dict:
        """What this stage holds: its layers, process, plan (units resident and streamed, bytes, its KV budget)."""
        plan = self.m.plan
        return {"layers": (self.a, self.b), "pid": os.getpid(), "device": str(self.m.device),
                "resident": sum(u.bytes for u in plan.units if u.tier != "disk"),
                "streamed": sum(u.bytes for u in plan.streamed), "units": len(plan.units),
                "kv_budget": plan.kv_budget}

    def _slabs(self):
        if self.slabs is None:
            from ..engine.kv import SlabStep

            self.slabs = SlabStep(self.m, layers=(self.a, self.b))
        return self.slabs

    def step(self, rows: list[tuple[int, int]], x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """An engine step on this stage's layers: rows (sequence key, new tokens' count), packed one after the other
        in `x` (first stage: ids [1, T]; others: hidden states [1, T, hidden]); each row's tokens attend only its
        own keys and values (engine/kv.py). Returns the hidden states after this stage's last layer, or on the last
        stage float32 logits of the packed positions `keep` [len(keep), vocab]."""
        st = self._slabs()
        kwargs = self._inputs(x, st.begin(rows))
        if self.last:
            kwargs["logits_to_keep"] = keep.to(self.m.device)
        try:
            with st.attention(), self.m.running():
                out = self.m.model(**kwargs)
        except _Handoff as h:
            st.end()
            return h.hidden.cpu()
        finally:
            self.incoming = None
            st.kv.rows = []
        st.end()
        return out.logits[0].float().cpu()

    def _inputs(self, x: torch.Tensor, kwargs: dict) -> dict:
        """The forward's input: ids on the first stage; elsewhere zeros that the hook before this stage's first
        layer replaces by `x`, the previous stage's hidden states."""
        if self.first:
            kwargs["input_ids"] = x.to(self.m.device)
        else:
            self.incoming = x.to(self.m.device)
            kwargs["inputs_embeds"] = torch.zeros(x.shape, dtype=self.m.dtype, device=self.m.device)
        return kwargs

    def kv(self, op: str, *args):
        """One of the engine's KV operations (limit, copy_prefix, truncate, shrink, free, clear) on this stage."""
        if op not in ("limit", "copy_prefix", "truncate", "shrink", "free", "clear"):
            raise ValueError(f"no KV operation {op!r}")
        return getattr(self._slabs(), op)(*args)

    def forward(self, seq, x: torch.Tensor, start: int, keep: int = 1) -> torch.Tensor:
        """Run tokens (first stage: ids [1, n]; others: hidden states [1, n, hidden]) at positions start..start+n-1
        of sequence `seq` after what its cache holds (start 0: a new cache). Returns the hidden states after this
        stage's last layer, or on the last stage float32 logits of the last `keep` positions (0: all)."""
        from ..engine.step import new_cache

        if start and seq not in self.caches:
            raise MissingKV(f"sequence {seq} is not on this stage (layers {self.a}-{self.b - 1})")
        if start == 0:
            self.caches[seq] = _stage_cache(new_cache(self.m), self.a, self.b)
        n = x.shape[1]
        kwargs = self._inputs(x, {"cache": self.caches[seq], "use_cache": True,
                                  "position_ids": torch.arange(start, start + n, device=self.m.device)[None]})
        if self.last:
            kwargs["logits_to_keep"] = keep
        try:
            with self.m.running():
                out = self.m.model(**kwargs)
        except _Handoff as h:
            return h.hidden.cpu()
        finally:
            self.incoming = None
        return out.logits.float().cpu()

    def drop(self, seq) -> None:
        self.caches.pop(seq, None)

    def crop(self, seq, n: int) -> None:
        """Keep the first `n` tokens of sequence `seq`'s cache (a chat session's common prefix)."""
        cache = self.caches.get(seq)
        if cache is None or n >= cache.get_seq_length():
            return
        cut = n - cache.get_seq_length()   # (transformers' crop takes the tokens to remove, negative)
        for layer in {id(x): x for x in cache.layers}.values():   # once each: _stage_cache aliases some entries
            layer.crop(cut)

    def bytes_read(self) -> int:
        return self.m.profiler.bytes_read

    def _take_in(self, module, args, kwargs):
        if args:
            return (self.incoming, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": self.incoming}

    def _hand_off(self, module, args, output):
        raise _Handoff(output[0] if isinstance(output, tuple) else output)


def check_pipelinable(model: nn.Module) -> None:
    """The pass-through layers need a model whose forward takes each layer's output as the new hidden states
    (`hidden_states = decoder_layer(...)`, most families); older ones index a tuple."""
    import inspect

    base = model.get_submodule(model.base_model_prefix) if getattr(model, "base_model_prefix", "") else model
    try:
        src = inspect.getsource(type(base).forward)
    except (OSError, TypeError):
        return
    if "= decoder_layer(" in src and "hidden_states = decoder_layer(" not in src:
        raise InputError(f"{type(model).__name__} is not supported in a pipeline yet (its decoder layers return "
                         f"tuples); run it in one process")


def _stage_cache(cache, a: int, b: int):
    """A stage's cache: transformers sizes masks and positions by the first layer of each kind (layer 0, the first
    full-attention or sliding layer), which may be another stage's. Those entries point at this stage's first
    layer of the same kind, so they see this stage's sequence length."""
    layers = cache.layers
    for r in {0, *(next((i for i, x in enumerate(layers) if type(x) is t), None) for t in {type(x) for x in layers})}:
        if r is None or a <= r < b:
            continue
        mine = next((i for i in range(a, b) if type(layers[i]) is type(layers[r])), None)
        if mine is not None:
            layers[r] = layers[mine]
    return cache


class PipelineModel:
    """A model whose layers are split over `options.pipeline` Ray stages (see the module's docstring); each
    stage gets `options`' budgets (max_ram / max_gpu_memory) for its own layers. `generate` (greedy or sampled,
    a prompt a row), `__call__` (logits), `tokenizer`, `config`, `last_stats`, `close`."""

    def __init__(self, source, options: Options, address: str | None = None):
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig

        from ..store import Store, resolve

        opts = options
        if opts.draft:
            raise InputError("a pipeline has no speculative decoding yet: drop draft / --draft")
        ray = self.ray = connect(address)
        path = resolve(source, store_path=opts.store_path, progress=opts.progress, in_place=opts.in_place,
                       quantize=opts.compression)
        self.store = Store(path)
        self.ranges = stage_ranges(self.store, opts.pipeline)
        n = len(self.ranges)
        self.config = AutoConfig.from_pretrained(path)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError, TypeError, ImportError):
            self.tokenizer = None
        try:
            self.generation_config = GenerationConfig.from_pretrained(path)
        except OSError:
            self.generation_config = GenerationConfig.from_model_config(self.config)
        cuda = opts.device.startswith("cuda")
        resources = {"num_gpus": 1, "num_cpus": 1} if cuda else {"num_cpus": opts.pipeline_cpus}
        if opts.ram_bytes and not cuda:
            resources["memory"] = opts.ram_bytes
        stage_opts = opts.replace(pipeline=None, progress=False, device="cuda" if cuda else opts.device)
        cls = ray.remote(Stage).options(max_restarts=RESTARTS, **resources)
        log(f"starting a {n}-stage pipeline on Ray: layers {', '.join(f'{a}-{b - 1}' for a, b in self.ranges)}")
        self.stages = [cls.remote(path, stage_opts, a, b, k == 0, k == n - 1) for k, (a, b) in enumerate(self.ranges)]
        try:
            self.info = ray.get([s.ready.remote() for s in self.stages])
        except ray.exceptions.RayActorError as e:
            self.close()
            cause = getattr(e, "cause", None) or e
            raise LayerstreamError(f"a pipeline stage failed to start: {cause}") from None
        self.device = torch.device("cpu")
        self.dtype = getattr(torch, self.store.manifest.dtype)
        self.last_stats: dict = {}
        self.restarts = 0
        self._seqs = 0
        # the engine's KV budget, in bytes of the whole model's KV: the tightest stage's, each holding its layers'
        budgets = [i.get("kv_budget") for i in self.info]
        layers = self.ranges[-1][1]
        self.kv_budget = None if any(b is None for b in budgets) else \
            min(b * layers // (r[1] - r[0]) for b, r in zip(budgets, self.ranges))

    def slab_runner(self) -> PipelineSlabs:
        """The engine's runner (`Engine(pipeline_model)`): per-sequence KV on every stage (engine/kv.py)."""
        from ..engine.kv import SLAB_FAMILIES, pageable

        if not pageable(self):
            raise InputError(f"the engine (serve, batch) runs a pipeline only for the families whose keys and values "
                             f"it keeps per sequence ({', '.join(sorted(SLAB_FAMILIES)[:8])}, ...); "
                             f"{self.config.get_text_config().model_type} is not one: run it in one process, or "
                             f"through PipelineModel.generate")
        return PipelineSlabs(self)

    def _chain(self, seq, x: torch.Tensor, start: int, keep: int = 1):
        for s in self.stages:
            x = s.forward.remote(seq, x, start, keep)
        return x

    def _run(self, feeds: dict) -> dict:
        """Logits for each sequence's feed {seq: (ids, start, keep, replay)}: every chain sent before any is
        awaited. A stage that died is awaited back and the sequences replayed (`replay`: all their ids)."""
        ray = self.ray
        while True:
            refs = {seq: self._chain(seq, ids, start, keep) for seq, (ids, start, keep, _) in feeds.items()}
            try:
                return dict(zip(refs, ray.get(list(refs.values()))))
            except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError):
                self._await_stages()
            except ray.exceptions.RayTaskError as e:   # a stage restarted between two calls of a session
                if not isinstance(getattr(e, "cause", None), MissingKV):
                    raise
            feeds = {seq: (replay, 0, keep, replay) for seq, (_, _, keep, replay) in feeds.items()}

    def _await_stages(self) -> None:
        self.restarts += 1
        log("a pipeline stage died; waiting for Ray to restart it from the store, then replaying the sequences")
        deaths = 0
        while True:
            try:
                self.info = self.ray.get([s.ready.remote() for s in self.stages])
                return
            except self.ray.exceptions.RayActorError as e:
                deaths += not isinstance(e, self.ray.exceptions.ActorUnavailableError)
                if failed_for_good(self.ray, e, deaths):
                    raise LayerstreamError("a pipeline stage died and did not come back (its restarts are used "
                                           "up)") from None
                time.sleep(0.5)

    def __call__(self, input_ids: torch.Tensor):
        """transformers-like: an object with `.logits` [batch, tokens, vocab] (float32), one sequence per row."""
        ids = _rows(input_ids)
        seqs = {self._new_seq(): row for row in ids}
        out = self._run({s: (row[None], 0, 0, row[None]) for s, row in seqs.items()})
        self._drop(seqs)
        return _Output(torch.cat([out[s] for s in seqs]))

    def generate(self, input_ids=None, max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int | None = None, min_p: float | None = None,
                 repetition_penalty: float | None = None, eos_token_id=None, pad_token_id=None, streamer=None,
                 seed: int | None = None,
                 attention_mask=None, micro_batches: int | None = None, use_cache: bool = True,
                 session: int | None = None, past: int = 0, stopping_criteria=None,
                 **unknown) -> torch.Tensor:
        """Prompt rows (no padding) -> [rows, prompt + new] token ids, rows that ended early padded with
        `pad_token_id` (as transformers does). The rows go down the pipeline as `micro_batches` groups (default:
        one per stage), each a sequence of its own that shares its sweeps: while one stage computes a group the
        others compute the next. Greedy by default; `do_sample` with `temperature`, `top_p`, `top_k`, `min_p`,
        `seed`; `repetition_penalty` as transformers applies it.
        `streamer.put(ids)` / `.end()` as transformers calls them (one row); `stopping_criteria` as transformers
        calls them (one row), after each token.
        `session` (from `new_session()`, one row): the row's keys and values stay on the stages after the call, and
        the first `past` tokens of the prompt are taken as already there (the stages' caches cut back to them):
        a chat keeps its history's KV between turns (ChatSession)."""
        from ..engine.step import eos_ids, penalize, sample

        if unknown:
            raise InputError(f"a pipeline's generate does not take {', '.join(sorted(unknown))}")
        if hasattr(input_ids, "keys"):
            attention_mask = input_ids.get("attention_mask")
            input_ids = input_ids["input_ids"]
        if attention_mask is not None and not bool(torch.as_tensor(attention_mask).all()):
            raise InputError("a pipeline takes prompts of one length without padding")
        rows = _rows(input_ids)
        if session is not None and (len(rows) != 1 or not 0 <= past < rows.shape[1]):
            raise InputError(f"a session takes one row and past in [0, its length), got {len(rows)} rows, "
                             f"past={past}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        eos = set(eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]) \
            if eos_token_id is not None else set(eos_ids(self))
        pad = pad_token_id if pad_token_id is not None else (self.generation_config.pad_token_id or
                                                             (min(eos) if eos else 0))
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        groups = torch.tensor_split(rows, max(1, min(len(rows), micro_batches or len(self.stages))))
        fed = {self._new_seq() if session is None else session: g.tolist() for g in groups}   # ids so far (pads
        # after a row ends)
        if session is not None:   # what the stages hold of this session beyond `past` goes
            self.ray.get([st.crop.remote(session, past) for st in self.stages])
        outs = {s: [list(r) for r in f] for s, f in fed.items()}   # each row's ids up to its end
        ended = {s: [False] * len(f) for s, f in fed.items()}
        plen = rows.shape[1]
        if streamer is not None:
            streamer.put(rows.cpu())
        before = self._bytes_read()
        t0 = time.perf_counter()
        feeds = {s: (torch.tensor(f)[:, past:], past, 1, torch.tensor(f)) for s, f in fed.items()}
        steps = 0
        while feeds:
            logits = self._run(feeds)
            steps += 1
            feeds = {}
            for s, lg in logits.items():
                last_logits = lg[:, -1]
                if repetition_penalty not in (None, 1.0):
                    last_logits = torch.stack([penalize(row, outs[s][j], repetition_penalty)
                                               for j, row in enumerate(last_logits)])
                nxt = sample(last_logits, temperature if do_sample else 0.0, top_p, gen, top_k or 0,
                             min_p or 0.0).tolist()
                for j, t in enumerate(nxt):
                    if not ended[s][j]:
                        outs[s][j].append(t)
                        ended[s][j] = t in eos or len(outs[s][j]) - plen >= max_new_tokens
                if streamer is not None and len(rows) == 1:
                    streamer.put(torch.tensor(nxt))
                if stopping_criteria and len(rows) == 1 and not ended[s][0]:
                    now = torch.tensor([outs[s][0]])
                    ended[s][0] = any(bool(torch.as_tensor(c(now, None)).all()) for c in stopping_criteria)
                if not all(ended[s]):
                    last = [pad if e else t for t, e in zip(nxt, ended[s])]
                    for row, t in zip(fed[s], last):
                        row.append(t)
                    feeds[s] = (torch.tensor(last)[:, None], len(fed[s][0]) - 1, 1, torch.tensor(fed[s]))
        dt = time.perf_counter() - t0
        if streamer is not None:
            streamer.end()
        if session is None:
            self._drop(fed)
        done = [r for s in fed for r in outs[s]]
        width = max(len(r) for r in done)
        new = sum(len(r) - plen for r in done)
        read = self._bytes_read() - before
        self.last_stats = {"new_tokens": new, "seconds": dt, "tokens_per_s": new / dt if dt else 0.0,
                           "sweeps": steps, "bytes_read": read, "bytes_per_token": read / max(steps, 1),
                           "stages": len(self.stages), "restarts": self.restarts}
        return torch.tensor([r + [pad] * (width - len(r)) for r in done])

    def describe(self) -> str:
        from ..utils import fmt_bytes

        return f"ready: {len(self.stages)} stages on Ray; " + "; ".join(
            f"layers {i['layers'][0]}-{i['layers'][1] - 1} on {i['device']}: {fmt_bytes(i['resident'])} resident, "
            f"{fmt_bytes(i['streamed'])} streamed per sweep" for i in self.info)

    def _new_seq(self) -> int:
        self._seqs += 1
        return self._seqs

    def new_session(self) -> int:
        """A sequence whose keys and values stay on the stages between `generate(session=...)` calls."""
        return self._new_seq()

    def end_session(self, session: int) -> None:
        self._drop([session])

    def _drop(self, seqs) -> None:
        for st in self.stages:
            for s in seqs:
                st.drop.remote(s)

    def _bytes_read(self) -> int:
        return sum(self.ray.get([s.bytes_read.remote() for s in self.stages]))

    def close(self) -> None:
        for s in getattr(self, "stages", []):
            self.ray.kill(s)
        self.stages = []


class PipelineSlabs:
    """The engine's runner over a pipeline (engine/kv.py's SlabStep is the one-process one): each stage keeps the
    per-sequence KV of its own layers; a step's rows go down the chain as micro-batches (one per stage at most),
    every micro-batch sent before any is awaited, so while the last stage computes one the first computes the next.
    The driver keeps each sequence's token ids: a stage that dies is restarted by Ray, every stage's KV is
    cleared, and every sequence (running, or kept for its prefix) is replayed from position 0 before the step
    goes on, so nothing is lost and greedy output is unchanged."""

    def __init__(self, pipe: PipelineModel):
        self.pipe = pipe
        self.ids: dict[int, list[int]] = {}     # each sequence's token ids whose KV the stages hold
        self.limits: dict[int, int] = {}

    def _all(self, op: str, *args) -> None:
        # Ray runs one caller's calls to an actor in order: later steps see these
        for st in self.pipe.stages:
            st.kv.remote(op, *args)

    def limit(self, key, tokens: int) -> None:
        self.limits[key] = tokens
        self._all("limit", key, tokens)

    def copy_prefix(self, key, src, m: int) -> None:
        self.ids[key] = self.ids[src][:m]
        self._all("copy_prefix", key, src, m)

    def truncate(self, key, n: int) -> None:
        self.ids[key] = self.ids.get(key, [])[:n]
        self._all("truncate", key, n)

    def shrink(self, key) -> None:
        self._all("shrink", key)

    def free(self, key) -> None:
        self.ids.pop(key, None)
        self.limits.pop(key, None)
        self._all("free", key)

    def clear(self) -> None:
        self.ids.clear()
        self.limits.clear()
        self._all("clear")

    def tokens(self) -> int:
        return sum(len(x) for x in self.ids.values())

    capacity = tokens

    def forward(self, rows: list[tuple[int, list[int]]], keep: torch.Tensor | None = None,
                routing=None) -> torch.Tensor:
        """Logits of each row's last new token [rows, vocab] (float32)."""
        if routing is not None:
            raise InputError("a pipeline serves one adapter (--adapter), not several chosen per request")
        if keep is not None and len(keep) != len(rows):
            raise InputError("a pipeline computes the logits of each row's last token only (no drafted tokens)")
        ray, lost = self.pipe.ray, False
        while True:
            try:
                if lost:
                    self._replay()
                out = self._send(rows)
                break
            except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError):
                self.pipe._await_stages()   # (raises once a stage's restarts are used up)
                lost = True
        for key, toks in rows:
            self.ids.setdefault(key, []).extend(toks)
        return out

    def _send(self, rows) -> torch.Tensor:
        k = max(1, min(len(rows), len(self.pipe.stages)))
        bounds = [round(i * len(rows) / k) for i in range(k + 1)]
        refs = []
        for g in (rows[a:b] for a, b in zip(bounds, bounds[1:])):
            lens = torch.tensor([len(t) for _, t in g])
            x = torch.tensor([t for _, toks in g for t in toks])[None]
            for st in self.pipe.stages:
                x = st.step.remote([(key, len(toks)) for key, toks in g], x, lens.cumsum(0) - 1)
            refs.append(x)
        return torch.cat(self.pipe.ray.get(refs))

    def _replay(self) -> None:
        """Every stage's KV anew: each sequence's ids so far sent down again (the step's rows go after)."""
        log(f"replaying {len(self.ids)} sequences' KV down the restarted pipeline")
        self._all("clear")
        for key, n in self.limits.items():
            self._all("limit", key, n)
        held = [(key, ids) for key, ids in self.ids.items() if ids]
        if held:
            self._send(held)


class _Output:
    def __init__(self, logits):
        self.logits = logits


def _rows(input_ids) -> torch.Tensor:
    ids = input_ids if torch.is_tensor(input_ids) else torch.tensor(input_ids)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.numel() == 0:
        raise InputError("the prompt is empty")
    return ids.long().cpu()
