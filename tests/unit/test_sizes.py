"""layerstream.utils: sizes as the user writes them (parse_size) and as layerstream prints them (fmt_bytes)."""

import pytest

from layerstream.errors import BudgetError, LayerstreamError
from layerstream.utils import fmt_bytes, parse_size


@pytest.mark.parametrize("value, want", [
    (None, None),
    (0, 0),
    (12345, 12345),
    (2.9, 2),                       # bytes: a float is truncated to whole bytes
    ("0", 0),
    ("4096", 4096),
    ("10B", 10),
    ("2K", 2_000),
    ("2KB", 2_000),
    ("3M", 3_000_000),
    ("512MB", 512_000_000),
    ("2GB", 2_000_000_000),
    ("1T", 10**12),
    ("1TB", 10**12),
    ("1KiB", 1024),
    ("512MiB", 512 * 2**20),
    ("1.5GiB", 3 * 2**29),
    ("2TiB", 2 * 2**40),
    ("1.5G", 1_500_000_000),
    (".5GB", 500_000_000),
    ("0.25MB", 250_000),
    ("2gb", 2_000_000_000),         # units are case-insensitive
    ("4 GiB", 4 * 2**30),           # space between number and unit
    ("  64kb  ", 64_000),           # surrounding spaces
])
def test_parse_size_accepts_units_and_decimals(value, want):
    got = parse_size(value)
    assert got == want
    assert got is None or type(got) is int


@pytest.mark.parametrize("value, match", [
    (-1, "cannot be negative"),
    (-0.5, "cannot be negative"),
    (True, "expected a size"),       # a bool is an int to Python, not a size
    (False, "expected a size"),
    ("-1GB", "cannot parse"),
    ("lots", "cannot parse 'lots'"),
    ("", "cannot parse"),
    ("GB", "cannot parse"),
    ("2XB", "cannot parse"),
    ("2 G B", "cannot parse"),
    ("1e9", "cannot parse"),
    ("1.5.2GB", "cannot parse"),
    ("2GB of RAM", "cannot parse"),
])
def test_parse_size_rejects_garbage_with_a_budget_error(value, match):
    with pytest.raises(BudgetError, match=match):
        parse_size(value)


def test_parse_size_names_what_it_parses():
    with pytest.raises(BudgetError, match=r"^max_ram: cannot parse 'x'") as e:
        parse_size("x", "max_ram")
    assert isinstance(e.value, LayerstreamError)   # the command line prints it as one line
    with pytest.raises(BudgetError, match=r"^max_gpu_memory: a size cannot be negative \(-3\)"):
        parse_size(-3, "max_gpu_memory")


@pytest.mark.parametrize("n, want", [
    (0, "0 B"),
    (1, "1 B"),
    (999, "999 B"),
    (1000, "1.0 KB"),
    (1536, "1.5 KB"),
    (999_000, "999.0 KB"),
    (1_000_000, "1.0 MB"),
    (538_000_000, "538.0 MB"),
    (1_500_000_000, "1.5 GB"),
    (2e12, "2.0 TB"),
    (5e15, "5000.0 TB"),             # TB is the largest unit
    (-1500, "-1.5 KB"),
    (12.6, "13 B"),
])
def test_fmt_bytes(n, want):
    assert fmt_bytes(n) == want


def test_fmt_bytes_reads_back_with_parse_size():
    for n in (0, 999, 4_000, 7_300_000, 2_500_000_000, 3_100_000_000_000):
        text = fmt_bytes(n).replace(" ", "")
        assert abs(parse_size(text) - n) <= 0.05 * n


def test_decimal_sizes_round_to_the_nearest_byte():
    assert parse_size("2.01KB") == 2010
    assert parse_size("1.1MB") == 1_100_000


@pytest.mark.parametrize("value", [float("inf"), float("nan"), float("-inf")])
def test_non_finite_sizes_are_budget_errors(value):
    with pytest.raises(BudgetError, match="finite"):
        parse_size(value, "max_ram")


def test_rounding_carries_into_the_next_unit():
    assert fmt_bytes(999_999) == "1.0 MB"
    assert fmt_bytes(999_949) == "999.9 KB"
