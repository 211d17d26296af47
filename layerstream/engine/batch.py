"""Offline batch jobs in the OpenAI batch format (as `vllm run_batch` reads it), on the continuous-batching Engine.

Input: one request a line, `{"custom_id", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions",
"body": {...}}`; blank lines are skipped. Output: one record a line, in input order, `{"id", "custom_id",
"response": {"status_code", "request_id", "body"}, "error"}`. A line that is not a valid request becomes an
error record and the job goes on.

Resumable and never half-written: each finished request is appended to a journal, `OUT.partial`, as one
line keyed by the input line's index and a hash of its bytes (a changed line is run again; a journal made with
another model is discarded). A rerun reads the journal (a torn last line is cut off) and runs only what is
missing; at the end OUT is written to `OUT.tmp`, fsynced and renamed over OUT, and the journal is removed.
Every field of the output is a function of the input file and the model, not of time or chance, so a job
killed at any moment and rerun gives the same bytes as a job never interrupted:

  * `id`, `request_id` and the completion's `id` come from a hash of the line's index and bytes;
  * `created` is the input file's modification time (whole seconds);
  * a sampled request without a `seed` gets one from a hash of its line.
"""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

from ..errors import InputError
from ..utils import log
from .journal import Journal, fingerprint, line_hash, write_output
from .openai import BadLine, OpenAIRequests, envelope, failure, success
from .scheduler import Engine


def journal_path(out_path) -> Path:
    return Path(str(out_path) + ".partial")


def check_paths(in_path, out_path) -> tuple[Path, Path]:
    """The input and output paths, refused with a clear message before any model is loaded."""
    src, out = Path(in_path), Path(out_path)
    if not src.is_file():
        raise InputError(f"{src}: no such input file")
    if out.exists() and src.resolve() == out.resolve():
        raise InputError(f"the output {out} is the input file; choose another output path")
    if out.is_dir():
        raise InputError(f"the output {out} is a directory; give a file path")
    if not out.parent.is_dir():
        raise InputError(f"{out.parent}: no such directory for the output")
    return src, out


def run_batch(model, in_path, out_path, batch_size: int = 8, progress: bool = True,
              model_name: str | None = None) -> dict:
    """Run every request of the JSONL file `in_path` on `model` and write the records to `out_path` (see the
    module's docstring). `batch_size`: the engine's most sequences per sweep. `model_name`: the `model` of
    responses whose request names none (default: from the store's source). Returns a summary: requests,
    succeeded, failed, resumed (taken from the journal of an earlier run), ran, prompt_tokens and
    completion_tokens (of this run), seconds, tokens_per_s, output."""
    src, out = check_paths(in_path, out_path)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
    tok = model.tokenizer
    if tok is None or not len(tok("x")["input_ids"]):
        raise InputError(f"{model.store.path} has no usable tokenizer, so requests cannot become token ids: copy "
                         f"the model's tokenizer files into the store")
    name = model_name or default_model_name(model)
    created = int(src.stat().st_mtime)
    t0 = time.perf_counter()
    journal = Journal(journal_path(out), fingerprint(model, name))
    bar = None
    try:
        # first pass: count the requests and find the finished ones the journal holds for these very lines
        total, resumable = 0, {}
        for i, raw in _lines(src):
            total += 1
            entry = journal.entries.get(i)
            if entry is not None and entry[0] == line_hash(raw) and entry[2]:
                resumable[i] = entry[1]
        if resumable:
            log(f"resuming: {len(resumable)} of {total} requests already done (from {journal.path}), "
                f"{total - len(resumable)} to run")
        job = _Job(model, tok, name, created, journal, resumable, batch_size)
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=len(resumable), unit="req", desc="batch", file=sys.stderr,
                       dynamic_ncols=True, smoothing=0.1)
        job.run(_lines(src), bar)
        if bar is not None:
            bar.close()
            bar = None
        n_out = write_output(out, journal, job.final, created)
        journal.remove()
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        log(f"interrupted: {journal.path} keeps the finished requests; run the same command again to resume")
        raise
    finally:
        journal.close()
    dt = time.perf_counter() - t0
    return {"requests": total, "succeeded": job.ok, "failed": job.failed, "resumed": job.resumed, "ran": job.ran,
            "prompt_tokens": job.prompt_tokens, "completion_tokens": job.completion_tokens, "seconds": dt,
            "tokens_per_s": job.completion_tokens / dt if dt else 0.0, "output": str(out), "records": n_out}


class _Job:
    """One pass over the input: parse each line, submit requests (at most a few batches ahead of the
    engine), journal each record as it is made."""

    def __init__(self, model, tok, name, created, journal, resumable, batch_size):
        self.model, self.tok, self.name, self.created = model, tok, name, created
        self.journal, self.resumable = journal, resumable
        self.engine = Engine(model, max_batch=batch_size)
        self.parser = OpenAIRequests(self.engine, tok, name)
        self.context = self.engine.context
        self.ahead = 2 * batch_size
        self.final: dict[int, int] = dict(resumable)   # line index -> the journal offset of its record
        self.seen: set[str] = set()
        self.inflight: dict = {}
        self.ok = self.failed = self.ran = self.prompt_tokens = self.completion_tokens = 0
        self.resumed = 0

    def run(self, lines, bar):
        t0 = time.perf_counter()
        exhausted = False
        while True:
            while not exhausted and len(self.inflight) < self.ahead:
                nxt = next(lines, None)
                if nxt is None:
                    exhausted = True
                    break
                if self._take(*nxt) and bar is not None:
                    bar.update(1)
            if not self.inflight:   # only when the input is exhausted
                self.journal.sync()
                return
            self.engine.step()
            finished = [rid for rid, req in self.inflight.items() if req["handle"].done]
            for rid in finished:
                req = self.inflight.pop(rid)
                c = req["handle"].result()
                self._record(req, success(req, c, self.created))
                self.ok += 1
                self.ran += 1
                self.prompt_tokens += c.prompt_tokens
                self.completion_tokens += c.completion_tokens
            self.journal.sync()
            if bar is not None:
                if finished:
                    bar.update(len(finished))
                dt = time.perf_counter() - t0
                bar.set_postfix_str(f"{self.engine.stats['tokens'] / dt if dt else 0.0:.1f} tok/s", refresh=False)

    def _take(self, i: int, raw: bytes) -> bool:
        """Handle one input line: resumed, an error record, or submitted. True when it is settled now (an error
        record for a line the progress bar has not counted yet)."""
        h = line_hash(raw)
        digest = hashlib.sha256(f"{i}\n".encode() + raw).hexdigest()[:24]
        req = {"i": i, "h": h, "digest": digest, "custom_id": None}
        try:
            obj = envelope(raw, req)
            if req["custom_id"] in self.seen:
                raise BadLine("duplicate_custom_id", f"custom_id {req['custom_id']!r} is used by an earlier line; "
                                                     f"each request needs its own")
            self.seen.add(req["custom_id"])
            if i in self.resumable:
                self.resumed += 1
                self.ok += 1
                return False
            prompt, params = self.parser.request(obj, req)
            try:
                req["handle"] = self.engine.submit(prompt, params, request_id=f"line-{i}")
            except InputError as e:
                raise BadLine("invalid_request", str(e), 400) from None
            self.inflight[req["handle"].request_id] = req
            return False
        except BadLine as e:
            if req["custom_id"] is not None and req["custom_id"] not in self.seen and e.code != "duplicate_custom_id":
                self.seen.add(req["custom_id"])   # a malformed request still claims its custom_id
            self._record(req, failure(req, e))
            self.failed += 1
            counted = i in self.resumable   # the bar counted it as done already
            self.resumable.pop(i, None)
            return not counted

    def _record(self, req, record):
        self.final[req["i"]] = self.journal.append(req["i"], req["h"], record)

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


