"""A batch job's journal: each finished record appended (fsynced) as it is made, so a killed job resumes."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from pathlib import Path

from ..errors import InputError
from ..store import fsync_dir
from ..utils import log

JOURNAL = "layerstream-batch-journal"   # the journal's first line names it and its version
JOURNAL_VERSION = 1


def line_hash(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()[:32]


def dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def fingerprint(model, name: str) -> dict:
    """What the journal's records depend on besides the input: a journal made with another differs."""
    m = model.store.manifest
    return {"store": str(Path(model.store.path).resolve()), "source": (m.source or {}).get("identity"),
            "quantization": m.quantization, "dtype": str(model.dtype), "device": model.device.type,
            "model_name": name, "adapter": _adapters(model)}


def _adapters(model) -> str | None:
    """The adapters' names and identities (the default one marked with *), or None without any."""
    lora = getattr(model, "lora", None)
    if lora is None:
        return None
    return " ".join(f"{'*' if k == lora.default else ''}{a.name}:{a.identity}"
                    for k, a in enumerate(lora.adapters.values()))


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
            self._write((dumps(head) + "\n").encode())
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
        data = (dumps({"i": i, "h": h, "r": record}) + "\n").encode()
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
        fsync_dir(self.path.parent)


def write_output(out: Path, journal: Journal, final: dict[int, int], created: int) -> int:
    """OUT from the journal, in input order, through a temporary file renamed over it."""
    tmp = Path(str(out) + ".tmp")
    with open(journal.path, "rb") as jf, open(tmp, "w", encoding="utf-8") as f:
        for i in sorted(final):
            record = journal.read(jf, final[i])
            if record.get("response") and record["response"].get("status_code") == 200:
                record["response"]["body"]["created"] = created
            f.write(dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    fsync_dir(out.parent)
    return len(final)
