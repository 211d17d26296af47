"""layerstream.options.Options: every knob of from_pretrained, validated once."""

import dataclasses

import pytest

from layerstream.errors import BudgetError, InputError
from layerstream.options import AIRLLM_KEYWORDS, IO_MODES, VERIFY_MODES, Options


def test_defaults():
    o = Options()
    assert (o.device, o.dtype, o.max_ram, o.max_gpu_memory) == ("cpu", None, None, None)
    assert (o.ram_bytes, o.gpu_bytes) == (None, None)
    assert (o.prefetch, o.lookahead, o.io, o.verify) == (True, 2, "auto", "first")
    assert (o.store_path, o.in_place, o.compression, o.readers, o.threads) == (None, None, None, None, None)


def test_sizes_are_parsed_into_bytes():
    o = Options(max_ram="2GB", max_gpu_memory="512MiB")
    assert o.ram_bytes == 2_000_000_000 and o.gpu_bytes == 512 * 2**20
    assert o.max_ram == "2GB"   # what the user wrote is kept
    assert Options(max_ram=0).ram_bytes == 0


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(max_ram="lots"), BudgetError, "max_ram: cannot parse 'lots'"),
    (dict(max_ram=-1), BudgetError, "max_ram: a size cannot be negative"),
    (dict(max_gpu_memory="1QB"), BudgetError, "max_gpu_memory: cannot parse"),
    (dict(max_ram=True), BudgetError, "max_ram: expected a size"),
    (dict(io="mapped"), InputError, "io must be one of auto, buffered, direct, fadvise, mmap, got 'mapped'"),
    (dict(verify="sometimes"), InputError, "verify must be one of first, always, never"),
    (dict(lookahead=0), InputError, "lookahead must be a positive integer, got 0"),
    (dict(lookahead=-2), InputError, "lookahead must be a positive integer"),
    (dict(lookahead="2"), InputError, "lookahead must be a positive integer, got '2'"),
    (dict(lookahead=1.5), InputError, "lookahead must be a positive integer"),
    (dict(lookahead=True), InputError, "lookahead must be a positive integer, got True"),
])
def test_invalid_values_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        Options(**kwargs)


@pytest.mark.parametrize("io", IO_MODES)
@pytest.mark.parametrize("verify", VERIFY_MODES)
def test_every_documented_mode_is_accepted(io, verify):
    o = Options(io=io, verify=verify, lookahead=1)
    assert (o.io, o.verify, o.lookahead) == (io, verify, 1)


def test_from_kwargs_takes_every_field():
    names = {f.name for f in dataclasses.fields(Options)}
    o = Options.from_kwargs({"device": "cuda:1", "max_ram": "1GB", "lookahead": 3, "io": "direct",
                             "compression": "4bit", "profiling": True, "progress": False})
    assert (o.device, o.ram_bytes, o.lookahead, o.io, o.compression, o.profiling, o.progress) == \
        ("cuda:1", 10**9, 3, "direct", "4bit", True, False)
    assert {"device", "max_ram", "max_gpu_memory", "store_path", "in_place", "compression"} <= names


def test_from_kwargs_unknown_keyword_is_a_type_error():
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_rma'"):
        Options.from_kwargs({"max_ram": 0, "max_rma": 0})


def test_from_kwargs_validates_too():
    with pytest.raises(InputError, match="io must be"):
        Options.from_kwargs({"io": "bogus"})


def test_airllm_keywords_are_accepted():
    assert set(AIRLLM_KEYWORDS) == {"layer_shards_saving_path", "hf_token", "delete_original"}
    o = Options.from_kwargs({"hf_token": "hf_xxx", "delete_original": True})
    assert o == Options()   # accepted and ignored
    o = Options.from_kwargs({"layer_shards_saving_path": "/tmp/shards"})
    assert o.store_path == "/tmp/shards"   # AirLLM's store location
    o = Options.from_kwargs({"layer_shards_saving_path": "/tmp/shards", "store_path": "/tmp/mine"})
    assert o.store_path == "/tmp/mine"     # our own keyword wins


def test_replace_revalidates():
    o = Options(max_ram="1GB")
    p = o.replace(max_ram="3GB", io="buffered")
    assert p.ram_bytes == 3 * 10**9 and p.io == "buffered"
    assert o.ram_bytes == 10**9 and o.io == "auto"   # the original is unchanged
    with pytest.raises(InputError, match="verify must be"):
        o.replace(verify="no")
    with pytest.raises(BudgetError):
        o.replace(max_gpu_memory="much")
