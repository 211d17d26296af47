"""Small shared helpers: sizes, cache directory, memory facts."""

from __future__ import annotations

import hashlib
import math
import os
import re
import sys
import time
from pathlib import Path

from .errors import BudgetError

_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
          "T": 10**12, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(value, what: str = "size") -> int | None:
    """Bytes from an int or a string such as "2GB", "512MiB", "1.5G", "0". None stays None."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise BudgetError(f"{what}: expected a size like '2GB', got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise BudgetError(f"{what}: a size must be a finite number, got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise BudgetError(f"{what}: a size cannot be negative ({value})")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
    if not m or m.group(2).upper() not in _UNITS:
        raise BudgetError(f"{what}: cannot parse {value!r}; use bytes or a size like '512MB', '2GB', '1.5GiB'")
    return round(float(m.group(1)) * _UNITS[m.group(2).upper()])   # "2.01KB" is 2010 bytes, not 2009


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(round(n, 1 if unit != "B" else 0)) < 1000 or unit == "TB":   # 999,999 B is "1.0 MB", not "1000.0 KB"
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def cache_dir() -> Path:
    """Where layerstream keeps stores it makes: $LAYERSTREAM_CACHE, else $XDG_CACHE_HOME/layerstream."""
    env = os.environ.get("LAYERSTREAM_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "layerstream"


def available_ram() -> int:
    """MemAvailable from /proc/meminfo (bytes), or a cgroup limit if lower; psutil-free."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if avail is None:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),):
        try:
            limit = open(limit_file).read().strip()
            if limit != "max":
                avail = min(avail, int(limit) - int(open(usage_file).read().strip()))
        except (OSError, ValueError):
            pass
    return max(avail, 0)


def cores() -> int:
    """The CPUs this process may run on (its affinity mask, which a container's cpuset narrows)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


_IDLE: tuple[float, float] | None = None   # (when, idle cores): one measurement serves a process for a while


def idle_cores(interval: float = 0.2, reuse: float = 60.0) -> float:
    """How many of the CPUs this process may run on were idle over `interval` seconds (from /proc/stat's
    per-CPU idle and iowait times); measured once per `reuse` seconds per process. Without /proc/stat: `cores()`."""
    global _IDLE
    if _IDLE is not None and time.monotonic() - _IDLE[0] < reuse:
        return _IDLE[1]

    def sample() -> dict[int, tuple[int, int]]:
        out = {}
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("cpu") and line[3:4].isdigit():
                    name, *vals = line.split()
                    ticks = [int(v) for v in vals[:8]]
                    out[int(name[3:])] = (ticks[3] + ticks[4], sum(ticks))
        return out

    try:
        mine = os.sched_getaffinity(0)
        before = sample()
        time.sleep(interval)
        after = sample()
    except (OSError, AttributeError, ValueError, IndexError):
        return float(cores())
    free = 0.0
    for c in mine:
        if c in before and c in after:
            total = after[c][1] - before[c][1]
            free += (after[c][0] - before[c][0]) / total if total > 0 else 1.0
    _IDLE = (time.monotonic(), free)
    return free


def peak_rss() -> int:
    """Peak resident set size of this process in bytes."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def log(msg: str) -> None:
    """What layerstream is doing, on stderr (the library and the command line say it the same way)."""
    print(f"[layerstream] {msg}", file=sys.stderr, flush=True)


def file_identity(files: list[Path]) -> str:
    """A short identity of a set of files (names, sizes, mtimes): a changed source gets a new default store."""
    h = hashlib.sha256()
    for f in sorted(files):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]
