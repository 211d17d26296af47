"""bench/ as one tool (bench/registry.py, `python -m bench`): every script is a registered scenario or a library,
the list names them, and each scenario with a small form runs it here (tiny sizes, no timing asserted: benchmarks
are not tests). The smoke runs are split over this file and test_bench_smoke.py, so that two workers share them."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# loaded from its file, bench/ kept off sys.path: it holds a ray.py that would shadow Ray in this process
_spec = importlib.util.spec_from_file_location("bench_registry", ROOT / "bench" / "registry.py")
registry = sys.modules["bench_registry"] = importlib.util.module_from_spec(_spec)   # (its dataclasses look it up)
_spec.loader.exec_module(registry)

SMOKES = [s.name for s in registry.SCENARIOS if s.smoke is not None]


def run_smoke(name: str) -> None:
    """A scenario's smoke run through `python -m bench smoke NAME`: it exits 0 and prints its results (skipped
    where the runner skips it: something it needs is missing)."""
    r = subprocess.run([sys.executable, "-m", "bench", "smoke", name, "--timeout", "400"], cwd=ROOT,
                       capture_output=True, text=True, timeout=450, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    if r.stdout.startswith(f"{name}: skipped ("):
        pytest.skip(r.stdout.strip())
    assert r.stdout.startswith(f"{name}: ok ("), r.stdout[-2000:]


def test_every_script_is_a_scenario_or_a_library():
    scripts = {p.name for p in (ROOT / "bench").glob("*.py")}
    named = {s.script for s in registry.SCENARIOS}
    assert scripts == named | set(registry.LIBRARIES), (scripts - named - set(registry.LIBRARIES),
                                                        named - scripts)
    assert len(registry.BY_NAME) == len(registry.SCENARIOS)
    for s in registry.SCENARIOS:   # a scenario without a small form says why
        assert (s.smoke is None) == bool(s.big), s.name
        assert set(s.peers) | set(s.needs) <= set(registry.PEERS), s.name


def test_the_list_names_every_scenario_and_an_unknown_one_is_refused():
    r = subprocess.run([sys.executable, "-m", "bench", "list"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    listed = {line.split()[0] for line in r.stdout.splitlines() if line and not line[0].isspace()}
    assert listed == set(registry.BY_NAME)
    r = subprocess.run([sys.executable, "-m", "bench", "smoke", "nope"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0 and "no scenario 'nope'" in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("name", SMOKES[0::2])
def test_smoke(name):
    run_smoke(name)
