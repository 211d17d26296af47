"""The other half of the benchmark scenarios' smoke runs (tests/test_bench.py has the first)."""

import pytest
from test_bench import SMOKES, run_smoke


@pytest.mark.slow
@pytest.mark.parametrize("name", SMOKES[1::2])
def test_smoke(name):
    run_smoke(name)
