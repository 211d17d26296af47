"""Offline batch jobs in the OpenAI batch format (as `vllm run_batch` reads it), on the continuous-batching Engine.

Input: one request a line, `{"custom_id", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions",
"body": {...}}`; blank lines are skipped. Output: one record a line, in input order, `{"id", "custom_id",
"response": {"status_code", "request_id", "body"}, "error"}`. A line that is not a valid request becomes an
error record and the job goes on, as does a request that fails in the engine (its own sampling, stop strings
or detokenizing: a 500 record, `"code": "internal_error"`; the other requests keep their exact results). Only
a failure of the engine's shared sweep (a damaged store, a read error) stops the job, the journal keeping
what is done.

The paths are checked before the model loads (`check_paths`): the input is a readable file, OUT's directory
exists and is writable, OUT is not a directory, `OUT.tmp` and `OUT.partial` are not links, and the disk has
room for a few lines; an error writing the journal or the output while the job runs (disk full, permission
denied) is a one-line `OutputError`, the journal keeping every finished request.

Resumable and never half-written: each finished request is appended to a journal, `OUT.partial`, as one
line keyed by the input line's index and a hash of its bytes (a changed line is run again; a journal made with
another model is discarded). A rerun reads the journal (a torn last line is cut off) and runs only what is
missing; at the end OUT is written to `OUT.tmp` (made anew: never through a link planted there), fsynced and
renamed over OUT, and the journal is removed.
Every field of the output is a function of the input file and the model, not of time or chance, so a job
killed at any moment and rerun gives the same bytes as a job never interrupted:

  * `id`, `request_id` and the completion's `id` come from a hash of the line's index and bytes;
  * `created` is the input file's modification time (whole seconds);
  * a sampled request without a `seed` gets one from a hash of its line.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path

from ..errors import InputError
from ..protocol import BadLine, OpenAIRequests, envelope
from ..responses import failure, success
from ..utils import log
from .journal import Journal, check_output, fingerprint, journal_path, line_hash, write_output
from .scheduler import Engine, GenerationError


def check_paths(in_path, out_path) -> tuple[Path, Path]:
    """The input and output paths, refused with a one-line message before any model is loaded (the output's
    checks: `journal.check_output`)."""
    src, out = Path(in_path), Path(out_path)
    if not src.is_file():
        raise InputError(f"{src}: no such input file")
    if not os.access(src, os.R_OK):
        raise InputError(f"{src}: cannot read the input file (permission denied)")
    if out.exists() and src.resolve() == out.resolve():
        raise InputError(f"the output {out} is the input file; choose another output path")
    check_output(out)
    return src, out


def run_batch(model, in_path, out_path, batch_size: int = 8, progress: bool = True,
              model_name: str | None = None) -> dict:
    """Run every request of the JSONL file `in_path` on `model` and write the records to `out_path` (see the
    module's docstring). `batch_size`: the engine's most sequences per sweep. `model_name`: the `model` of
    responses whose request names none (default: from the store's source). Returns a summary: requests,
    succeeded, failed, resumed (taken from the journal of an earlier run), ran, prompt_tokens and
    completion_tokens (of this run), seconds, tokens_per_s, output."""
    check_batch_size(batch_size)
    check_paths(in_path, out_path)
    check_tokenizer(model)
    name = model_name or default_model_name(model)
    with Job(in_path, out_path, fingerprint(model, name), progress) as job:
        runner = Runner(model, name, batch_size)
        requests = job.requests()
        inflight: dict = {}
        while True:
            while requests is not None and len(inflight) < 2 * batch_size:   # a few batches ahead of the engine
                nxt = next(requests, None)
                if nxt is None:
                    requests = None
                    break
                handle = runner.submit(*nxt, job.record)
                if handle is not None:
                    inflight[handle.request_id] = (nxt[0], handle)
            if not inflight:   # only when the input is exhausted
                return job.finish()
            runner.engine.step()
            for rid in [rid for rid, (_, h) in inflight.items() if h.done]:
                req, h = inflight.pop(rid)
                job.record(req, *runner.result(req, h, job.created))
            job.sync(runner.engine.stats["tokens"])


def check_batch_size(batch_size) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")


def check_tokenizer(model) -> None:
    tok = model.tokenizer
    if tok is None or not len(tok("x")["input_ids"]):
        raise InputError(f"{model.store.path} has no usable tokenizer, so requests cannot become token ids: copy "
                         f"the model's tokenizer files into the store")


class Job:
    """The bookkeeping of one job, whatever runs its requests (one engine here, Ray replicas in
    `layerstream.ray`): the input's lines checked in order, the journal (its only writer), the counts, the
    progress bar and the output. Use as a context manager; `finish()` writes OUT and returns the summary."""

    def __init__(self, in_path, out_path, header: dict, progress: bool = True):
        self.src, self.out = check_paths(in_path, out_path)
        self.created = int(self.src.stat().st_mtime)
        self.t0 = time.perf_counter()
        self.journal = Journal(journal_path(self.out), header)
        self.bar = None
        self.seen: set[str] = set()
        self.ok = self.failed = self.ran = self.prompt_tokens = self.completion_tokens = self.resumed = 0
        try:
            # first pass: count the requests and find the finished ones the journal holds for these very lines
            self.total, self.resumable = 0, {}
            for i, raw in _lines(self.src):
                self.total += 1
                entry = self.journal.entries.get(i)
                if entry is not None and entry[0] == line_hash(raw) and entry[2]:
                    self.resumable[i] = entry[1]
            if self.resumable:
                log(f"resuming: {len(self.resumable)} of {self.total} requests already done (from "
                    f"{self.journal.path}), {self.total - len(self.resumable)} to run")
            self.final: dict[int, int] = dict(self.resumable)   # line index -> the journal offset of its record
            if progress:
                from tqdm import tqdm

                self.bar = tqdm(total=self.total, initial=len(self.resumable), unit="req", desc="batch",
                                file=sys.stderr, dynamic_ncols=True, smoothing=0.1)
        except BaseException:
            self.journal.close()
            raise

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if self.bar is not None:
            self.bar.close()
        if kind is KeyboardInterrupt:
            log(f"interrupted: {self.journal.path} keeps the finished requests; run the same command again to "
                f"resume")
        self.journal.close()

    def requests(self):
        """(req, obj) for each line to run, in input order: `req` the line's identity (index, hash, digest,
        custom_id, kind), `obj` its request object. Lines that are not requests are recorded as errors here
        and resumed ones counted; a duplicate custom_id is known only in order, so this runs in one place."""
        for i, raw in _lines(self.src):
            h = line_hash(raw)
            digest = hashlib.sha256(f"{i}\n".encode() + raw).hexdigest()[:24]
            req = {"i": i, "h": h, "digest": digest, "custom_id": None}
            try:
                obj = envelope(raw, req)
                if req["custom_id"] in self.seen:
                    raise BadLine("duplicate_custom_id", f"custom_id {req['custom_id']!r} is used by an earlier "
                                                         f"line; each request needs its own")
                self.seen.add(req["custom_id"])
            except BadLine as e:
                if req["custom_id"] is not None and e.code != "duplicate_custom_id":
                    self.seen.add(req["custom_id"])   # a malformed request still claims its custom_id
                self.record(req, failure(req, e))
                continue
            if i in self.resumable:
                self.resumed += 1
                self.ok += 1
                continue
            yield req, obj

    def record(self, req: dict, record: dict, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        """Journal a line's record (made durable by the next `sync`) and count it."""
        self.final[req["i"]] = self.journal.append(req["i"], req["h"], record)
        if record["error"] is None:
            self.ok += 1
            self.ran += 1
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens
        else:
            self.failed += 1
        if self.resumable.pop(req["i"], None) is None and self.bar is not None:   # else the bar counted it
            self.bar.update(1)

    def sync(self, tokens: int | None = None) -> None:
        """fsync the journal; the bar's tokens/s from `tokens` generated so far (default: of finished requests)."""
        self.journal.sync()
        if self.bar is not None:
            dt = time.perf_counter() - self.t0
            tokens = self.completion_tokens if tokens is None else tokens
            self.bar.set_postfix_str(f"{tokens / dt if dt else 0.0:.1f} tok/s", refresh=False)

    def finish(self) -> dict:
        """Write OUT from the journal, remove the journal, and return the summary."""
        self.journal.sync()
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        n_out = write_output(self.out, self.journal, self.final, self.created)
        self.journal.remove()
        dt = time.perf_counter() - self.t0
        return {"requests": self.total, "succeeded": self.ok, "failed": self.failed, "resumed": self.resumed,
                "ran": self.ran, "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "seconds": dt, "tokens_per_s": self.completion_tokens / dt if dt else 0.0, "output": str(self.out),
                "records": n_out}


class Runner:
    """One engine running requests: a request object to a submitted handle, a finished handle to its record."""

    def __init__(self, model, name: str, batch_size: int):
        self.engine = Engine(model, max_batch=batch_size)
        self.parser = OpenAIRequests(self.engine, model.tokenizer, name)

    def submit(self, req: dict, obj: dict, refused):
        """The handle of the request `obj` submitted to the engine, or None after `refused(req, record)` for a
        request whose body is invalid (a 400 record) or that could not be made into token ids (a 500 record)."""
        try:
            try:
                prompt, params = self.parser.request(obj, req)
            except BadLine:
                raise
            except Exception as e:   # the tokenizer or the chat template failed on this line's text
                refused(req, internal_error(req, f"this request could not be made into token ids: "
                                                 f"{type(e).__name__}: {e}"))
                return None
            try:
                return self.engine.submit(prompt, params, request_id=f"line-{req['i']}")
            except InputError as e:
                raise BadLine("invalid_request", str(e), 400) from None
        except BadLine as e:
            refused(req, failure(req, e))
            return None

    def result(self, req: dict, handle, created: int) -> tuple[dict, int, int]:
        """A finished request's record, prompt tokens and completion tokens: a 500 error record for a request
        that failed in the engine on its own (GenerationError); another error (the shared sweep's) is raised."""
        try:
            cs = handle.results()
        except GenerationError as e:
            return internal_error(req, str(e)), 0, 0
        return success(req, cs, created), cs[0].prompt_tokens, sum(c.completion_tokens for c in cs)


def internal_error(req: dict, message: str) -> dict:
    """The error record of a request that failed on the server's side: a 500 with OpenAI's server_error body."""
    record = failure(req, BadLine("internal_error", message, 500))
    record["response"]["body"]["error"]["type"] = "server_error"
    return record


def _lines(path: Path):
    """(index, bytes) of each non-blank line of a file (index: the 0-based line number; line ends stripped)."""
    with open(path, "rb") as f:
        for i, raw in enumerate(f):
            raw = raw.rstrip(b"\r\n")
            if i == 0 and raw.startswith(b"\xef\xbb\xbf"):   # a UTF-8 byte order mark
                raw = raw[3:]
            if raw.strip():
                yield i, raw


def default_model_name(model) -> str:
    """The `model` of a response whose request names none: the source's file or directory name."""
    src = model.store.manifest.source or {}
    path = src.get("path")
    if path:
        name = Path(path).name
        return name[:-5] if name.endswith(".gguf") else name
    return model.store.path.name


