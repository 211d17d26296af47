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

import fcntl
import hashlib
import json
import os
import sys
import time
from pathlib import Path

from ..errors import InputError
from ..utils import log
from .scheduler import Engine, SamplingParams

URLS = {"/v1/chat/completions": "chat", "/v1/completions": "text"}
JOURNAL = "layerstream-batch-journal"   # the journal's first line names it and its version
JOURNAL_VERSION = 1
CHAT_MAX_TOKENS = 256                   # chat's default max_tokens (bounded by the context); completions: 16


class BadLine(Exception):
    """A line that is not a request we can run. `status` None: not a request at all (response null);
    400: a request whose body is invalid (response with an OpenAI error body)."""

    def __init__(self, code: str, message: str, status: int | None = None, param: str | None = None):
        super().__init__(message)
        self.code, self.message, self.status, self.param = code, message, status, param


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
            if entry is not None and entry[0] == _line_hash(raw) and entry[2]:
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
        n_out = _write_output(out, journal, job.final, created)
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
                self._record(req, _success(req, c, self.created))
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
        h = _line_hash(raw)
        digest = hashlib.sha256(f"{i}\n".encode() + raw).hexdigest()[:24]
        req = {"i": i, "h": h, "digest": digest, "custom_id": None}
        try:
            obj = _envelope(raw, req)
            if req["custom_id"] in self.seen:
                raise BadLine("duplicate_custom_id", f"custom_id {req['custom_id']!r} is used by an earlier line; "
                                                     f"each request needs its own")
            self.seen.add(req["custom_id"])
            if i in self.resumable:
                self.resumed += 1
                self.ok += 1
                return False
            prompt, params = self._request(obj, req)
            try:
                req["handle"] = self.engine.submit(prompt, params, request_id=f"line-{i}")
            except InputError as e:
                raise BadLine("invalid_request", str(e), 400) from None
            self.inflight[req["handle"].request_id] = req
            return False
        except BadLine as e:
            if req["custom_id"] is not None and req["custom_id"] not in self.seen and e.code != "duplicate_custom_id":
                self.seen.add(req["custom_id"])   # a malformed request still claims its custom_id
            self._record(req, _failure(req, e))
            self.failed += 1
            counted = i in self.resumable   # the bar counted it as done already
            self.resumable.pop(i, None)
            return not counted

    def _record(self, req, record):
        self.final[req["i"]] = self.journal.append(req["i"], req["h"], record)

    def _request(self, obj: dict, req: dict) -> tuple[list[int], SamplingParams]:
        """Token ids and sampling parameters of a request body, or BadLine (status 400)."""
        body, kind = obj["body"], req["kind"]
        model = body.get("model")
        req["model"] = model if isinstance(model, str) and model else self.name
        n = body.get("n")
        if n is not None and n != 1:
            raise BadLine("invalid_value", f"n must be 1 here (one choice per request), got {n!r}", 400, "n")
        if kind == "chat":
            prompt = self._chat_ids(body.get("messages"))
            max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
            param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        else:
            prompt = self._text_ids(body.get("prompt"))
            max_tokens, param = body.get("max_tokens"), "max_tokens"
        if not prompt:
            raise BadLine("invalid_value", "the prompt is empty", 400, "messages" if kind == "chat" else "prompt")
        room = self.context - len(prompt) if self.context else None
        if max_tokens is None:
            max_tokens = 16 if kind == "text" else (min(CHAT_MAX_TOKENS, room) if room is not None else CHAT_MAX_TOKENS)
        if room is not None and (room < 1 or (isinstance(max_tokens, int) and len(prompt) + max_tokens > self.context)):
            raise BadLine("context_length_exceeded",
                          f"this model's context is {self.context} tokens; the prompt has {len(prompt)} and "
                          f"max_tokens asks for {max_tokens}: shorten the prompt or lower max_tokens", 400, param)
        temperature = body.get("temperature")
        temperature = 1.0 if temperature is None else temperature
        top_p = body.get("top_p")
        top_p = 1.0 if top_p is None else top_p
        seed = body.get("seed")
        if seed is not None:
            if not isinstance(seed, int) or isinstance(seed, bool) or not -2**63 <= seed < 2**63:
                raise BadLine("invalid_value", f"seed must be a 64-bit integer, got {seed!r}", 400, "seed")
            seed = seed % 2**63
        elif isinstance(temperature, (int, float)) and temperature > 0:
            seed = int(req["h"][:15], 16)   # sampled without a seed: one from the line, so reruns agree
        stop = body.get("stop")
        stop = [] if stop is None else stop
        if not isinstance(stop, (str, list)):
            raise BadLine("invalid_value", f"stop must be a string or a list of strings, got {stop!r}", 400, "stop")
        for key, value in (("max_tokens", max_tokens), ("temperature", temperature), ("top_p", top_p)):
            if isinstance(value, bool):
                raise BadLine("invalid_value", f"{key} must be a number, got {value!r}", 400, key)
        try:
            params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                    stop=stop)
        except InputError as e:
            raise BadLine("invalid_value", str(e), 400) from None
        need = (len(prompt) + params.max_tokens) * self.engine.kv_per_token
        if self.engine.kv_budget is not None and need > self.engine.kv_budget:
            raise BadLine("kv_budget_exceeded", f"this request's KV cache ({need} bytes) exceeds the plan's KV "
                                                f"budget ({self.engine.kv_budget} bytes): lower max_tokens or "
                                                f"raise --max-ram / --max-gpu-memory", 400, param)
        return prompt, params

    def _chat_ids(self, messages) -> list[int]:
        if not isinstance(messages, list) or not messages:
            raise BadLine("invalid_value" if messages is not None else "missing_required_parameter",
                          "messages must be a non-empty list of {role, content} objects", 400, "messages")
        clean = []
        for k, msg in enumerate(messages):
            if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
                raise BadLine("invalid_value", f"messages[{k}] must be an object with a string role", 400,
                              f"messages[{k}]")
            content = msg.get("content")
            if isinstance(content, list):   # content parts: text only
                texts = []
                for part in content:
                    text = part.get("text") if isinstance(part, dict) and part.get("type") == "text" else None
                    if not isinstance(text, str):
                        raise BadLine("invalid_value", f"messages[{k}].content: only text parts are supported", 400,
                                      f"messages[{k}].content")
                    texts.append(text)
                content = "".join(texts)
            elif content is not None and not isinstance(content, str):
                raise BadLine("invalid_value", f"messages[{k}].content must be a string or a list of text parts",
                              400, f"messages[{k}].content")
            clean.append({**msg, "content": content if content is not None else ""})
        if not getattr(self.tok, "chat_template", None):
            raise BadLine("invalid_request", "this model has no chat template: use /v1/completions with a prompt",
                          400, "messages")
        try:
            enc = self.tok.apply_chat_template(clean, add_generation_prompt=True, tokenize=True)
        except Exception as e:   # the template refused these messages (roles out of order, ...)
            raise BadLine("invalid_value", f"the chat template cannot render these messages: {e}", 400,
                          "messages") from None
        ids = enc["input_ids"] if hasattr(enc, "keys") else enc
        return [int(t) for t in ids]

    def _text_ids(self, prompt) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return [int(t) for t in self.tok(prompt)["input_ids"]]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            vocab = self.model.config.get_text_config().vocab_size
            if not all(0 <= t < vocab for t in prompt):
                raise BadLine("invalid_value", f"prompt token ids must be in [0, {vocab})", 400, "prompt")
            return list(prompt)
        if prompt is None:
            raise BadLine("missing_required_parameter", "prompt is required", 400, "prompt")
        raise BadLine("invalid_value", "prompt must be a string or a list of token ids (one prompt per request)",
                      400, "prompt")


def _envelope(raw: bytes, req: dict) -> dict:
    """The request object of a line (custom_id, method, url, body checked), or BadLine (response null)."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise BadLine("invalid_json", f"the line is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise BadLine("invalid_request", "the line must be a JSON object")
    cid = obj.get("custom_id")
    if not isinstance(cid, str) or not cid:
        raise BadLine("invalid_request", "custom_id is missing or not a non-empty string")
    req["custom_id"] = cid
    if obj.get("method") != "POST":
        raise BadLine("invalid_request", f"method must be \"POST\", got {obj.get('method')!r}")
    url = obj.get("url")
    if url not in URLS:
        raise BadLine("invalid_url", f"url {url!r} is not supported; use one of {', '.join(URLS)}")
    req["kind"] = URLS[url]
    if not isinstance(obj.get("body"), dict):
        raise BadLine("invalid_request", "body is missing or not a JSON object")
    return obj


def _success(req: dict, c, created: int) -> dict:
    d, chat = req["digest"], req["kind"] == "chat"
    choice = {"index": 0}
    if chat:
        choice["message"] = {"role": "assistant", "content": c.text}
    else:
        choice["text"] = c.text
    choice.update(logprobs=None, finish_reason=c.finish_reason)
    body = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{d}", "object": "chat.completion" if chat else "text_completion",
            "created": created, "model": req["model"], "choices": [choice],
            "usage": {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                      "total_tokens": c.prompt_tokens + c.completion_tokens}}
    return {"id": f"batch_req_{d}", "custom_id": req["custom_id"],
            "response": {"status_code": 200, "request_id": f"req_{d}", "body": body}, "error": None}


def _failure(req: dict, e: BadLine) -> dict:
    d = req["digest"]
    response = None
    if e.status is not None:
        response = {"status_code": e.status, "request_id": f"req_{d}",
                    "body": {"error": {"message": e.message, "type": "invalid_request_error", "param": e.param,
                                       "code": e.code}}}
    return {"id": f"batch_req_{d}", "custom_id": req["custom_id"], "response": response,
            "error": {"code": e.code, "message": e.message}}


def _lines(path: Path):
    """(index, bytes) of each non-blank line of a file (index: the 0-based line number; line ends stripped)."""
    with open(path, "rb") as f:
        for i, raw in enumerate(f):
            raw = raw.rstrip(b"\r\n")
            if i == 0 and raw.startswith(b"\xef\xbb\xbf"):   # a UTF-8 byte order mark
                raw = raw[3:]
            if raw.strip():
                yield i, raw


def _line_hash(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()[:32]


def _dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def default_model_name(model) -> str:
    """The `model` of a response whose request names none: the source's file or directory name."""
    src = model.store.manifest.source or {}
    path = src.get("path")
    if path:
        name = Path(path).name
        return name[:-5] if name.endswith(".gguf") else name
    return model.store.path.name


def fingerprint(model, name: str) -> dict:
    """What the journal's records depend on besides the input: a journal made with another differs."""
    m = model.store.manifest
    return {"store": str(Path(model.store.path).resolve()), "source": (m.source or {}).get("identity"),
            "quantization": m.quantization, "dtype": str(model.dtype), "device": model.device.type,
            "model_name": name}


class Journal:
    """`OUT.partial`: a header line, then one record a line `{"i": index, "h": line hash, "r": record}` appended
    as each request finishes. Locked while a job holds it (two jobs on one output are refused)."""

    def __init__(self, path: Path, header: dict):
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise InputError(f"another `layerstream batch` is writing {path} (the journal of this output); wait for "
                             f"it or choose another output") from None
        self.dirty = True
        self.entries: dict[int, tuple[str, int, bool]] = {}   # index -> (line hash, offset, succeeded)
        head = {JOURNAL: JOURNAL_VERSION, **header}
        try:
            size, first = self._read()
        except BaseException:
            self.close()
            raise
        if first is None or first != head:
            if first is not None:
                log(f"{path} was made by another model or version; its records are not reused")
            self.entries.clear()
            os.ftruncate(self.fd, 0)
            size = 0
            self._write((_dumps(head) + "\n").encode())
            self.sync()
        elif os.fstat(self.fd).st_size != size:
            os.ftruncate(self.fd, size)   # a torn last line (killed while writing it)
        self.size = os.fstat(self.fd).st_size

    def _read(self) -> tuple[int, dict | None]:
        """Index the complete lines: (bytes they span, the header or None)."""
        off, first = 0, None
        with open(self.path, "rb") as f:
            for n, line in enumerate(f):
                if not line.endswith(b"\n"):
                    break
                try:
                    obj = json.loads(line)
                except ValueError:
                    obj = None
                if n == 0:
                    if not isinstance(obj, dict) or JOURNAL not in obj:
                        raise InputError(f"{self.path} exists and is not a layerstream batch journal; move it away "
                                         f"(layerstream keeps its journal there while it writes the output)")
                    first = obj
                elif isinstance(obj, dict) and isinstance(obj.get("i"), int) and isinstance(obj.get("r"), dict):
                    self.entries[obj["i"]] = (obj.get("h"), off, obj["r"].get("error") is None)
                off += len(line)
        return off, first

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]

    def append(self, i: int, h: str, record: dict) -> int:
        """Append one record; returns its offset (made durable by the next `sync`)."""
        off = self.size
        data = (_dumps({"i": i, "h": h, "r": record}) + "\n").encode()
        self._write(data)
        self.size += len(data)
        self.dirty = True
        return off

    def sync(self) -> None:
        """fsync what was appended since the last sync (a kill loses nothing written; a power cut loses at
        most the records of one step)."""
        if self.dirty:
            os.fsync(self.fd)
            self.dirty = False

    def read(self, f, off: int) -> dict:
        f.seek(off)
        return json.loads(f.readline())["r"]

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        _fsync_dir(self.path.parent)


def _write_output(out: Path, journal: Journal, final: dict[int, int], created: int) -> int:
    """OUT from the journal, in input order, through a temporary file renamed over it."""
    tmp = Path(str(out) + ".tmp")
    with open(journal.path, "rb") as jf, open(tmp, "w", encoding="utf-8") as f:
        for i in sorted(final):
            record = journal.read(jf, final[i])
            if record.get("response") and record["response"].get("status_code") == 200:
                record["response"]["body"]["created"] = created
            f.write(_dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    _fsync_dir(out.parent)
    return len(final)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
