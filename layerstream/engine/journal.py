"""A batch job's journal: each finished record appended (fsynced) as it is made, so a killed job resumes; the
output written from it through a new temporary file (never through a link planted there); and the checks of the
output's paths that a job makes before its model loads."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from ..errors import DiskSpaceError, InputError, LayerstreamError
from ..store import fsync_dir
from ..utils import log

JOURNAL = "layerstream-batch-journal"   # the journal's first line names it and its version
JOURNAL_VERSION = 1
MIN_FREE = 1 << 20   # free bytes a job needs at its start: room for its journal's first lines (a record is ~1 KB)
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class OutputError(LayerstreamError):
    """A batch job's journal or output cannot be written (no space, permission denied, ...)."""


def journal_path(out_path) -> Path:
    return Path(str(out_path) + ".partial")


def tmp_path(out_path) -> Path:
    return Path(str(out_path) + ".tmp")


def check_output(out_path) -> Path:
    """The output path, refused with a one-line message unless a job can write it: its directory exists and is
    writable, it is not a directory, OUT.tmp and OUT.partial are not links or directories, and the file system
    has MIN_FREE bytes free. Made before any model loads."""
    out = Path(out_path)
    parent = out.parent
    if out.is_dir():
        raise InputError(f"the output {out} is a directory; give a file path")
    if not parent.is_dir():
        raise InputError(f"{parent}: no such directory for the output")
    for path, role in ((journal_path(out), "keeps its journal there"),
                       (tmp_path(out), "writes its output there before renaming it")):
        if path.is_symlink():
            raise InputError(f"{path} is a symbolic link: a batch job {role}, and never writes through a link; "
                             f"remove it (or choose another output path)")
        if path.exists() and not path.is_file():
            raise InputError(f"{path} exists and is not a file: a batch job {role}; move it away")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"cannot write in {parent} (permission denied): choose another output path or make the "
                         f"directory writable")
    journal = journal_path(out)
    if journal.exists() and not os.access(journal, os.R_OK | os.W_OK):
        raise InputError(f"cannot read and write {journal} (the journal of an earlier run of this job; permission "
                         f"denied): fix its permissions or move it away")
    free = shutil.disk_usage(parent).free
    if free < MIN_FREE:
        raise DiskSpaceError(f"{parent} has {free} bytes free; a batch job needs at least {MIN_FREE} for its "
                             f"journal and output: free some space or choose another output path")
    return out


@contextmanager
def writing(path: Path, what: str, after: str):
    """OSErrors of writing `path` (`what` it is) as one-line OutputErrors ending with `after` (what to do)."""
    try:
        yield
    except OSError as e:
        why = e.strerror or str(e)
        if e.errno == errno.ELOOP:
            why = "it is a symbolic link, which a batch job never writes through"
        elif e.errno in SPACE:
            why = f"{why}: the disk (or a file size limit) is full"
        raise OutputError(f"cannot write {what} {path} ({why}); {after}") from e


def line_hash(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()[:32]


def dumps(obj) -> str:
    """Compact JSON, UTF-8 text as it is; a record holding a lone surrogate (a JSON "\\ud800" escape in its
    line) is written with ASCII escapes, which read back to the same strings."""
    s = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        s = json.dumps(obj, ensure_ascii=True, separators=(",", ":"))
    return s


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

    RESUME = "the finished requests it holds are kept: make room (or fix the permissions) and run the same " \
             "command again to resume"

    def __init__(self, path: Path, header: dict):
        self.path = path
        self.fd = None
        with writing(path, "the journal", self.RESUME):
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | NOFOLLOW, 0o644)
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
            with writing(path, "the journal", self.RESUME):
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
        except BaseException:
            self.close()
            raise

    def reader(self):
        """The journal for reading (its own descriptor's file: whatever may be at its path now)."""
        f = open(os.dup(self.fd), "rb")
        f.seek(0)
        return f

    def _read(self) -> tuple[int, dict | None]:
        """Index the complete lines: (bytes they span, the header or None)."""
        off, first = 0, None
        with self.reader() as f:
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
        with writing(self.path, "the journal", self.RESUME):
            self._write(data)
        self.size += len(data)
        self.dirty = True
        return off

    def sync(self) -> None:
        """fsync what was appended since the last sync (a kill loses nothing written; a power cut loses at
        most the records of one step)."""
        if self.dirty:
            with writing(self.path, "the journal", self.RESUME):
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
        with writing(self.path, "the journal", "the output is complete: remove the journal by hand"):
            self.path.unlink(missing_ok=True)
            fsync_dir(self.path.parent)


def write_output(out: Path, journal: Journal, final: dict[int, int], created: int) -> int:
    """OUT from the journal, in input order, through a temporary file renamed over it: OUT.tmp, made anew
    (O_EXCL | O_NOFOLLOW: a file or a link already there is removed first, never written through)."""
    tmp = tmp_path(out)
    made = False
    with writing(tmp, "the output", f"{journal.path} keeps every finished request: make room (or fix the "
                                    f"permissions) and run the same command again"):
        try:
            fd = _create(tmp)
            made = True
            with open(fd, "w", encoding="utf-8") as f, journal.reader() as jf:
                for i in sorted(final):
                    record = journal.read(jf, final[i])
                    if record.get("response") and record["response"].get("status_code") == 200:
                        record["response"]["body"]["created"] = created
                    f.write(dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, out)
            made = False
            fsync_dir(out.parent)
        except BaseException:
            if made:
                tmp.unlink(missing_ok=True)
            raise
    return len(final)


def _create(path: Path) -> int:
    """A new file at `path` for writing, never through a link: whatever is there (a file a killed job left, a
    planted link) is removed first (removing a link leaves its target alone)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW
    try:
        return os.open(path, flags, 0o666)
    except FileExistsError:
        path.unlink()
        return os.open(path, flags, 0o666)
