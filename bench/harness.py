"""The harness every bench script shares: children, RSS, a quiet machine, tables.

- Children. Each system runs in a fresh process (threads, memory and caches do not leak from one system to
  the next). The child prints its result as one ``RESULT <json>`` line (``emit``); the parent runs it with
  ``run_child`` and gets a ``Child`` back: the result (None when the child failed, ``note`` saying why),
  wall seconds, the child's peak RSS (its ``ru_maxrss``, from ``wait4``) and how many cores other processes
  kept busy meanwhile. ``self_cmd(__file__, ...)`` is the command line of a script's own child.
- A quiet machine. These machines are shared and have 2 cores: a figure means little unless the machine
  was quiet. ``wait_until_quiet`` waits (up to a timeout) until other processes leave the CPUs idle, and
  warns when they do not; ``run_child(..., wait_quiet=s)`` does it before the child starts.
- Measuring inside a child: ``timed_generate`` (a warm-up, then timed greedy tokens); ``Meter`` stamps
  time and bytes read at every generated token; ``rss_now``; ``drop_caches`` / ``drop_file_cache`` (the
  page cache, before a cold run).
- Tables. ``table`` prints a markdown table (pasteable into the README); ``ratio`` and ``fmt`` format cells.

Torch-free: a parent imports it without loading torch, which would take memory from its children.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from layerstream.errors import LayerstreamError
from layerstream.utils import fmt_bytes, parse_size

# where scenarios keep what they make (checkpoints, stores, reference logits); a smoke run (bench/__main__.py)
# gets a private directory of its own, so that no run reuses a store another checkout made
WORK = Path(os.environ.get("LAYERSTREAM_BENCH_DIR") or Path(tempfile.gettempdir()) / "layerstream-bench")

QUIET_CORES = 0.2   # other processes using more than this many cores on average disturb a figure


# ---------------------------------------------------------------------------- command lines

def parser(doc: str, wait_quiet: float | None = None) -> argparse.ArgumentParser:
    """A script's parser: its docstring as the help; `--wait-quiet` (default `wait_quiet` seconds) if given."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0], epilog=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    if wait_quiet is not None:
        if os.environ.get("LAYERSTREAM_BENCH_SMOKE"):   # a smoke run (bench/registry.py): no figure to protect
            wait_quiet = 0.0
        p.add_argument("--wait-quiet", type=float, default=wait_quiet, metavar="SECONDS",
                       help="before each timed child, wait up to this long for other processes to leave the CPUs "
                            "idle (0: do not wait; default %(default)s)")
    return p


def size_arg(s: str) -> int:
    """argparse `type` for sizes: "16GB" (10^9), "1.5GiB", "512MB" or bytes (layerstream's convention)."""
    try:
        return parse_size(s)
    except LayerstreamError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def fmt_b(n) -> str:
    """Bytes for a table cell ("-" for None)."""
    return "-" if n is None else fmt_bytes(n)


# ---------------------------------------------------------------------------- children

def self_cmd(script: str, *args) -> list[str]:
    """The command line running `script` (a bench script's `__file__`) again, as a child, with `args`."""
    return [sys.executable, str(Path(script).resolve()), *map(str, args)]


def emit(result: dict) -> None:
    """In a child: print the result for the parent (one `RESULT <json>` line on stdout)."""
    print("RESULT " + json.dumps(result), flush=True)


@dataclass
class Child:
    result: dict | None     # what the child emitted; None: it failed (see note)
    note: str               # the last line of its stderr, or its exit status, for a failure
    returncode: int
    wall: float             # seconds, start to exit
    peak_rss: int | None    # the child's peak resident set size, bytes
    others: float | None    # cores busy with other processes, on average, while it ran
    load_before: float | None   # the same just before it started (after any wait)
    stdout: str
    stderr: str


def run_child(cmd: list[str], timeout: float | None = None, wait_quiet: float = 0.0, log: Path | None = None,
              show_stderr: bool = False) -> Child:
    """Run `cmd` (a child that `emit`s its result): wait for a quiet machine first (at most `wait_quiet` s),
    kill it after `timeout` s, write its output to `log`; with `show_stderr` its stderr (progress bars) goes to
    ours instead of being captured."""
    load = wait_until_quiet(wait_quiet) if wait_quiet > 0 else None
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        before = cpu_snapshot()
        proc = subprocess.Popen(cmd, stdout=out, stderr=None if show_stderr else err, text=True)
        killed = threading.Event()
        timer = threading.Timer(timeout, lambda: (killed.set(), proc.kill())) if timeout else None
        if timer:
            timer.start()
        _, status, usage = os.wait4(proc.pid, 0)      # wait4: the child's own rusage (its peak RSS)
        if timer:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        after = cpu_snapshot()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if killed.is_set() and proc.returncode < 0:
        stderr += f"\ntimed out after {timeout:.0f} s"
    if log is not None:
        log.write_text(stdout + "\n--- stderr ---\n" + stderr)
    line = next((x for x in reversed(stdout.splitlines()) if x.startswith("RESULT ")), None)
    note = (stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1][:300]
    return Child(json.loads(line[7:]) if line else None, note, proc.returncode, after[0] - before[0],
                 usage.ru_maxrss * 1024, foreign_load(before, after), load, stdout, stderr)


# ---------------------------------------------------------------------------- a quiet machine

def cpu_snapshot():
    """(wall, busy CPU seconds of the whole machine or None off Linux, CPU seconds of this process and of the
    children it has waited for)."""
    machine = None
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)        # idle + iowait
        machine = (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # without guest time
    except (OSError, ValueError, IndexError):
        pass
    t = os.times()
    return time.perf_counter(), machine, t.user + t.system + t.children_user + t.children_system


def foreign_load(before, after) -> float | None:
    """Cores busy with processes other than this one and its finished children, on average."""
    wall = after[0] - before[0]
    if before[1] is None or after[1] is None or wall <= 0:
        return None
    return max(0.0, ((after[1] - before[1]) - (after[2] - before[2])) / wall)


def wait_until_quiet(max_wait: float, threshold: float = QUIET_CORES, window: float = 2.0) -> float | None:
    """Wait (at most `max_wait` s) until other processes use < `threshold` cores over `window` s; return the last
    load measured (None where it cannot be measured), after a warning on stdout if the machine stayed busy."""
    deadline = time.perf_counter() + max_wait
    while True:
        before = cpu_snapshot()
        time.sleep(window)
        load = foreign_load(before, cpu_snapshot())
        if load is None or load < threshold:
            return load
        if time.perf_counter() >= deadline:
            print(f"warning: other processes still use {load:.2f} cores after {max_wait:.0f} s of waiting; "
                  f"the next figure is disturbed", flush=True)
            return load


# ---------------------------------------------------------------------------- measuring inside a child

def timed_generate(model, ids, n: int, warmup: int = 2, **kw) -> tuple[list[int], float]:
    """Greedy `model.generate` of `n` new tokens after an untimed `warmup`-token one (allocator, first-call
    costs): (the new tokens, seconds). `kw` goes to both calls."""
    if warmup:
        model.generate(ids, max_new_tokens=warmup, do_sample=False, **kw)
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=n, do_sample=False, **kw)
    seconds = time.perf_counter() - t0
    out = out.sequences if hasattr(out, "sequences") else out
    return out[0, ids.shape[1]:].tolist(), seconds


def prep_store(model_dir) -> dict:
    """The untimed one-time layerstream preparation of a benchmark checkpoint: its store at `model_dir/ls-store`
    (in place for safetensors)."""
    from layerstream.store import resolve

    t0 = time.perf_counter()
    path = resolve(str(model_dir), store_path=str(Path(model_dir) / "ls-store"), progress=True)
    return {"what": "layerstream index", "path": str(path), "seconds": time.perf_counter() - t0}


def stamped_generate(model, ids, new_tokens: int, **gen) -> tuple:
    """Greedy `generate` with a CUDA-synchronized time stamp at each token: (output ids, seconds to the first
    token, mean seconds per later token or None)."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    stamps = []

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids, scores):
            torch.cuda.synchronize()
            stamps.append(time.perf_counter())
            return scores

    with torch.inference_mode():
        t1 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False,
                             logits_processor=LogitsProcessorList([Stamp()]), **gen)
    out = out.sequences if hasattr(out, "sequences") else out
    decode = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else None
    return out, stamps[0] - t1, decode


def rss_now() -> int:
    """This process's resident set size now, bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def read_bytes() -> int | None:
    """Bytes this process has read from disk (/proc/self/io read_bytes), None where unknown."""
    try:
        with open("/proc/self/io") as f:
            return next((int(x.split()[1]) for x in f if x.startswith("read_bytes:")), None)
    except OSError:
        return None


def drop_caches() -> bool:
    """Drop the page cache (root only); False where it could not."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def drop_file_cache(path) -> None:
    """Drop one file's pages from the page cache (any user)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    except OSError:
        pass


class Meter:
    """Time and bytes read at each generated token: pass `processor()` as `generate`'s `logits_processor`
    (or call `mark()` per token), `start()` just before generating; `result()` gives time to the first token,
    seconds per decode token = (time of token n - time of token 1) / (n - 1), and bytes read likewise."""

    def __init__(self):
        self.t0 = self.io0 = None
        self.stamps: list[tuple[float, int | None]] = []

    def start(self):
        self.stamps, self.io0, self.t0 = [], read_bytes(), time.perf_counter()

    def mark(self):
        self.stamps.append((time.perf_counter(), read_bytes()))

    def processor(self):
        from transformers import LogitsProcessor, LogitsProcessorList

        meter = self

        class Stamp(LogitsProcessor):
            def __call__(self, input_ids, scores):
                meter.mark()
                return scores

        return LogitsProcessorList([Stamp()])

    def result(self) -> dict:
        s, n = self.stamps, len(self.stamps)
        io = n > 1 and s[0][1] is not None
        return {"first_s": s[0][0] - self.t0 if n else None,
                "decode_s": (s[-1][0] - s[0][0]) / (n - 1) if n > 1 else None,
                "gen_s": s[-1][0] - self.t0 if n else None,
                "read_prefill": s[0][1] - self.io0 if n and self.io0 is not None and s[0][1] is not None else None,
                "read_per_token": (s[-1][1] - s[0][1]) / (n - 1) if io else None,
                "token_s": [round(b[0] - a[0], 3) for a, b in zip(s, s[1:])]}


# ---------------------------------------------------------------------------- tables

def fmt(x, spec: str = ".2f") -> str:
    """`x` formatted with `spec`, "-" for None."""
    return "-" if x is None else format(x, spec)


def ratio(x, y, spec: str = ".2f") -> str:
    """x / y as "1.23x", "-" when either is missing or zero."""
    return f"{x / y:{spec}}x" if x and y else "-"


def table(header: list[str], rows: list[list]) -> None:
    """Print a markdown table: columns padded to their widest cell, the first left-aligned, the others right.
    Cells are printed with str() (None as "-")."""
    cells = [[str(h) for h in header]] + [["-" if c is None else str(c) for c in r] for r in rows]
    width = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                       for i, (c, w) in enumerate(zip(r, width))) + " |"
    print(line(cells[0]))
    print("|" + "|".join(("-" * (w + 1) + ":") if i else (":" + "-" * (w + 1)) for i, w in enumerate(width)) + "|")
    for r in cells[1:]:
        print(line(r))
