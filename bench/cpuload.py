"""How busy the machine is with other processes (shared 2-core machines make single figures unreliable).
Torch-free, so a benchmark's parent process can use it without importing torch."""

from __future__ import annotations

import os
import time


def cpu_snapshot():
    """(wall, busy CPU seconds of the whole machine or None off Linux, CPU seconds of this process and of
    the children it has waited for)."""
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


def wait_until_quiet(max_wait: float, threshold: float = 0.2, window: float = 2.0) -> float | None:
    """Wait (at most `max_wait` s) until other processes use < `threshold` cores over `window` s; return
    the last measured load (None where it cannot be measured)."""
    deadline = time.perf_counter() + max_wait
    while True:
        before = cpu_snapshot()
        time.sleep(window)
        load = foreign_load(before, cpu_snapshot())
        if load is None or load < threshold or time.perf_counter() >= deadline:
            return load


def child_result(cmd: list[str]) -> tuple[dict | None, str]:
    """Run a benchmark child (`cmd`) that prints its result as one `RESULT <json>` line: (the result or
    None, the last line of its stderr for a failure note)."""
    import json
    import subprocess

    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    tail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
    return (json.loads(line[7:]) if line else None), tail
