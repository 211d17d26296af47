"""The default compute threads: never more than the cores that are idle (threads that wait for each other at
every matmul collapse when one shares its core with another busy process)."""

import os
import subprocess
import sys
import time

from layerstream.engine.model import _TORCH_THREADS, compute_threads, threads_note
from layerstream.utils import cores, idle_cores


def test_the_default_takes_only_idle_cores_and_an_explicit_count_wins():
    full = compute_threads(None, streaming=False)
    assert full == _TORCH_THREADS
    assert compute_threads(None, streaming=False, idle=0.0) == 1
    assert compute_threads(None, streaming=False, idle=1.4) == min(full, 1)
    assert compute_threads(None, streaming=False, idle=64.0) == full
    assert compute_threads(None, streaming=True, idle=64.0) == max(1, full - 1)   # a core for the loader's copies
    assert compute_threads(None, streaming=True, direct=True, idle=64.0) == full
    assert compute_threads(3, streaming=False, idle=0.0) == 3
    assert "--threads" in threads_note(3, 3, None) and "idle at start" in threads_note(1, None, 0.3)


def test_idle_cores_sees_a_busy_process():
    """/proc/stat's per-CPU idle time: a spinning process takes about one core off what is idle."""
    quiet = idle_cores(interval=0.3, reuse=0)
    assert 0 <= quiet <= cores() + 0.01
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        busy = idle_cores(interval=0.5, reuse=0)
    finally:
        spin.kill()
        spin.wait()
    assert busy <= cores() - 0.7, (quiet, busy)
    assert idle_cores(reuse=3600) == busy   # measured once, then reused


def test_plan_shows_the_compute_threads(tmp_path):
    from conftest import make_model_dir, run_cli

    src = make_model_dir(tmp_path / "src", "llama", layers=1)
    r = run_cli("plan", src, "--store", tmp_path / "store", "--no-measure")
    assert r.returncode == 0, r.stderr
    assert "compute threads: " in r.stdout and "cores idle at start" in r.stdout, r.stdout
    assert os.path.isdir(tmp_path / "store")
