"""Data-parallel batch jobs: one job's requests spread over Ray actors, each a replica holding one engine.

The driver does what `layerstream.engine.batch.run_batch` does around the engine, with the same `Job`: reads
the input and the journal, checks each line in order (duplicate custom_ids are only known in order), is the
journal's only writer, keeps one progress bar and writes OUT. The replicas get the requests still to run in
small chunks, a few chunks ahead per replica so that each engine always has sequences to batch, and send back
each chunk's records. Records depend on the input and the model only, so OUT is byte for byte what one process
writes, and a killed driver resumes from the journal like a single-process job (in either mode).

A replica that dies (killed, its node lost) loses only the chunks it held: they go back to the queue and the
other replicas take them; Ray restarts the replica (`max_restarts`) from the store, and it gets work again once
it answers. Nothing is journaled twice: a chunk's records are written only when the whole chunk came back.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import deque

from ..errors import InputError, LayerstreamError
from ..options import Options
from ..utils import log
from . import RESTARTS, connect, failed_for_good

CHUNKS_AHEAD = 4       # chunks in flight per replica (each of half a batch: two batches' worth in its engine)


class Replica:
    """A Ray actor: one model and its engine, stepping on a thread while chunks of requests come in."""

    def __init__(self, source, options: Options, batch_size: int, model_name: str | None):
        from ..api import AutoModel
        from ..engine.batch import Runner, check_tokenizer, default_model_name
        from ..engine.journal import fingerprint

        self.error = None
        self.lock = threading.Lock()   # one chunk parsed at a time (the tokenizer is shared)
        try:
            model = AutoModel.from_pretrained(source, options)
            check_tokenizer(model)
            name = model_name or default_model_name(model)
            self.header = fingerprint(model, name)
            self.runner = Runner(model, name, batch_size)
            self.runner.engine.start()
        except LayerstreamError as e:   # said by describe(): a constructor that raises reads as a dead actor
            self.error = e

    def describe(self) -> tuple[dict, int]:
        """The journal header this replica's records belong to, and its process id."""
        if self.error is not None:
            raise self.error
        return self.header, os.getpid()

    def run(self, chunk: list, created: int) -> list:
        """Run a chunk of (req, obj) to the end: [(req, record, prompt_tokens, completion_tokens)]."""
        done, handles = [], []
        with self.lock:
            for req, obj in chunk:
                h = self.runner.submit(req, obj, lambda r, record: done.append((r, record, 0, 0)))
                if h is not None:
                    handles.append((req, h))
        for req, h in handles:
            done.append((req, *self.runner.result(req, h, created)))
        return done


def run_batch(source, in_path, out_path, options: Options | None = None, replicas: int | None = None,
              batch_size: int = 8, cpus: int | None = None, address: str | None = None, progress: bool = True,
              model_name: str | None = None) -> dict:
    """`layerstream.engine.batch.run_batch` over `replicas` Ray actors, each opening `source` with `options`
    (the store is made once here first: its path must be one every node sees). Resources per replica: one GPU
    on a CUDA device, else `cpus` CPUs (default: a node's worth, or a share of one when there are more
    replicas than nodes) and, when `max_ram` is set, that much Ray `memory`. `replicas` default: one per
    GPU, else one per node. Connects to the Ray cluster of this process, else `address` / `RAY_ADDRESS`, else
    starts a local one. Returns run_batch's summary plus `replicas` and `resubmitted` (chunks a dead replica
    held, run again elsewhere)."""
    from ..engine.batch import Job, check_batch_size, check_paths
    from ..store import resolve

    check_batch_size(batch_size)
    check_paths(in_path, out_path)
    for key, value in (("replicas", replicas), ("cpus", cpus)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise InputError(f"{key} must be a positive integer, got {value!r}")
    opts = options if options is not None else Options()
    ray = connect(address)
    resolve(source, store_path=opts.store_path, dtype=opts.dtype, progress=progress and opts.progress,
            in_place=opts.in_place, quantize=opts.compression)   # once, before the replicas open it
    n, resources = replica_resources(ray, opts, replicas, cpus)
    device = opts.device.split(":")[0]   # Ray gives each replica its own GPU as cuda:0
    cls = ray.remote(Replica).options(max_restarts=RESTARTS, max_concurrency=CHUNKS_AHEAD + 1, **resources)
    log(f"starting {n} replica{'s' * (n > 1)} on Ray ({', '.join(f'{k}={v}' for k, v in resources.items())} each)")
    actors = [cls.remote(source, opts.replace(device=device, progress=False), batch_size, model_name)
              for _ in range(n)]
    try:
        headers = ray.get([a.describe.remote() for a in actors])
        with Job(in_path, out_path, headers[0][0], progress) as job:
            pool = _Pool(ray, actors, job, max(1, batch_size // 2))
            pool.run()
            return {**job.finish(), "replicas": n, "resubmitted": pool.resubmitted}
    except ray.exceptions.RayTaskError as e:   # a replica's own error (no tokenizer, a bad budget ...)
        if isinstance(e.cause, LayerstreamError):
            raise e.cause from None
        raise
    finally:
        for a in actors:
            ray.kill(a)


def replica_resources(ray, opts: Options, replicas: int | None, cpus: int | None) -> tuple[int, dict]:
    """How many replicas and the Ray resources of each, refused when the cluster cannot hold them."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    total = ray.cluster_resources()
    if opts.device.startswith("cuda"):
        gpus = int(total.get("GPU", 0))
        n = replicas or gpus
        if n < 1 or n > gpus:
            raise InputError(f"{n} replicas on {opts.device} need {n} GPUs; the Ray cluster has {gpus}")
        resources = {"num_gpus": 1, "num_cpus": cpus or 1}
    else:
        n = replicas or len(nodes)
        node_cpus = min((int(c) for node in nodes if (c := node["Resources"].get("CPU", 0)) >= 1), default=1)
        resources = {"num_cpus": cpus or max(1, node_cpus // math.ceil(n / len(nodes)))}
        if n * resources["num_cpus"] > total.get("CPU", 0):
            raise InputError(f"{n} replicas of {resources['num_cpus']} CPUs need {n * resources['num_cpus']}; the "
                             f"Ray cluster has {int(total.get('CPU', 0))}: lower --replicas or --replica-cpus")
    if opts.ram_bytes:   # the budget, declared so that Ray places replicas where it is free
        resources["memory"] = opts.ram_bytes
    return n, resources


class _Pool:
    """Hands a job's requests to replicas in chunks and takes their records back, resubmitting the chunks
    of replicas that died."""

    def __init__(self, ray, actors, job, chunk_size: int):
        self.ray, self.job, self.chunk_size = ray, job, chunk_size
        self.live = {k: 0 for k in range(len(actors))}   # replica -> chunks in flight
        self.actors = actors
        self.probing: dict[int, int] = {}   # replica -> failed probes (after it died, until it answers again)
        self.queue: deque = deque()         # chunks to run again
        self.refs: dict = {}                # ref -> ("chunk", replica, chunk) or ("probe", replica, None)
        self.resubmitted = 0

    def run(self) -> None:
        requests = self.job.requests()
        exhausted = False
        while True:
            for k in list(self.live):
                while self.live.get(k, CHUNKS_AHEAD) < CHUNKS_AHEAD:
                    chunk = self.queue.popleft() if self.queue else [] if exhausted else self._chunk(requests)
                    if not chunk:
                        exhausted = True
                        break
                    self.refs[self.actors[k].run.remote(chunk, self.job.created)] = ("chunk", k, chunk)
                    self.live[k] += 1
            if exhausted and not self.queue and all(kind == "probe" for kind, _, _ in self.refs.values()):
                return
            if not self.live and not self.probing:
                raise LayerstreamError("every replica died; the journal keeps the finished requests: run the same "
                                       "command again to resume")
            ready, _ = self.ray.wait(list(self.refs), num_returns=1)
            for ref in ready:
                self._take(ref)
            self.job.sync()

    def _chunk(self, requests) -> list:
        chunk = []
        for item in requests:
            chunk.append(item)
            if len(chunk) == self.chunk_size:
                break
        return chunk

    def _take(self, ref) -> None:
        kind, k, chunk = self.refs.pop(ref)
        try:
            result = self.ray.get(ref)
        except (self.ray.exceptions.RayActorError, self.ray.exceptions.ObjectLostError) as e:
            if kind == "chunk":
                self.queue.appendleft(chunk)
                self.resubmitted += 1
                self.live.pop(k, None)
                if k not in self.probing:
                    log(f"replica {k} died; its unfinished requests go to the others while Ray restarts it")
                    self.probing[k] = 0
                    self.refs[self.actors[k].describe.remote()] = ("probe", k, None)
            else:   # the probe: not back yet, or dead for good
                self.probing[k] += not isinstance(e, self.ray.exceptions.ActorUnavailableError)
                if failed_for_good(self.ray, e, self.probing[k]):
                    del self.probing[k]
                    log(f"replica {k} is lost for good")
                else:
                    time.sleep(0.5)
                    self.refs[self.actors[k].describe.remote()] = ("probe", k, None)
            return
        if kind == "probe":
            del self.probing[k]
            self.live[k] = sum(1 for kind2, k2, _ in self.refs.values() if kind2 == "chunk" and k2 == k)
            log(f"replica {k} is back")
            return
        if k in self.live:
            self.live[k] -= 1
        for req, record, prompt_tokens, completion_tokens in result:
            self.job.record(req, record, prompt_tokens, completion_tokens)

