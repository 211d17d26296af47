"""`python -m bench`: list, run and smoke-run the benchmark scenarios of bench/registry.py."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from registry import BY_NAME, PEERS, SCENARIOS, SMOKE_ENV, installed  # noqa: E402


def command(name: str, args) -> list[str]:
    return [sys.executable, str(HERE / BY_NAME[name].script), *map(str, args)]


def cmd_list(_a) -> int:
    width = max(len(s.name) for s in SCENARIOS)
    for s in SCENARIOS:
        tags = [f"issue {s.issue}"] if s.issue else []
        tags += [f"vs {p}" + ("" if installed(p) else " (not installed)") for p in s.peers]
        tags += [f"needs {p}" + ("" if installed(p) else " (missing)") for p in s.needs if p not in s.peers]
        smoke = "smoke: " + (" ".join(s.smoke) or "(no arguments)") if s.smoke is not None else f"no smoke: {s.big}"
        print(f"{s.name:<{width}}  bench/{s.script}: {s.what}")
        print(f"{'':<{width}}  {'; '.join(tags + [smoke])}")
    return 0


def cmd_run(a) -> int:
    if a.name not in BY_NAME:
        sys.exit(f"no scenario {a.name!r}: `python -m bench list` shows them")
    return subprocess.call(command(a.name, a.args))


def smoke(name: str, timeout: float = 600) -> tuple[str, str]:
    """(status, detail) of one scenario's smoke run: "ok" (detail: its seconds and output), "failed", "skipped"
    (no smoke form, or something it needs is missing)."""
    s = BY_NAME[name]
    if s.smoke is None:
        return "skipped", f"no smoke run: {s.big}"
    missing = [p for p in s.needs if not installed(p)]
    if missing:
        return "skipped", "missing " + ", ".join(PEERS[p] for p in missing)
    t = time.perf_counter()
    work = tempfile.mkdtemp(prefix=f"bench-smoke-{name}-")   # (harness.WORK: nothing shared with other runs)
    try:
        r = subprocess.run(command(name, s.smoke), capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL, env={**os.environ, SMOKE_ENV: "1", "LAYERSTREAM_BENCH_DIR": work})
    except subprocess.TimeoutExpired:
        return "failed", f"still running after {timeout:.0f} s"
    finally:
        shutil.rmtree(work, ignore_errors=True)
    took = time.perf_counter() - t
    if r.returncode != 0:
        return "failed", f"exit {r.returncode} after {took:.0f} s:\n{(r.stdout + r.stderr)[-3000:]}"
    return "ok", f"{took:.0f} s\n{r.stdout}"


def cmd_smoke(a) -> int:
    names = a.names or [s.name for s in SCENARIOS]
    bad = [n for n in names if n not in BY_NAME]
    if bad:
        sys.exit(f"no scenario {', '.join(map(repr, bad))}: `python -m bench list` shows them")
    failed = 0
    for n in names:
        status, detail = smoke(n, a.timeout)
        failed += status == "failed"
        print(f"{n}: {status} ({detail.splitlines()[0] if status == 'ok' else detail})", flush=True)
    return 1 if failed else 0


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="the scenarios, their peers and smoke runs")
    r = sub.add_parser("run", help="run one scenario for real (its own arguments follow)")
    r.add_argument("name")
    r.add_argument("args", nargs=argparse.REMAINDER)
    s = sub.add_parser("smoke", help="the scenarios' smoke runs (tiny sizes): all, or those named")
    s.add_argument("names", nargs="*")
    s.add_argument("--timeout", type=float, default=600)
    a = p.parse_args()
    return {"list": cmd_list, "run": cmd_run, "smoke": cmd_smoke}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
