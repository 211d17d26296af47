"""`layerstream verify` makes the checks a load makes (the manifest's shape, every unit present, the files'
sizes, each unit file's header, the xxh3 of each unit's bytes) and agrees with it: what verify calls damaged
a load refuses, and a store verify calls ok loads."""

import json
import shutil

import pytest
import torch

from layerstream import AutoModel
from layerstream.errors import StoreError
from layerstream.sources import open_source
from layerstream.store import index_in_place, split

from conftest import make_model_dir, run_cli


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """A tiny model, split and indexed in place."""
    root = tmp_path_factory.mktemp("verify")
    src = make_model_dir(root / "src", "llama", layers=2)
    return split(src, root / "split", progress=False), index_in_place(open_source(src), root / "inplace",
                                                                      progress=False)


def _manifest(store, edit):
    m = json.loads((store / "manifest.json").read_text())
    edit(m)
    (store / "manifest.json").write_text(json.dumps(m))


def _drop_layer(store):
    _manifest(store, lambda m: m.update(units=[u for u in m["units"] if u["name"] != "layer.1"]))


def _no_units(store):
    _manifest(store, lambda m: m.update(units=[]))


def _wrong_checksum(store):
    _manifest(store, lambda m: m["units"][2].update(xxh3="0123456789abcdef"))


def _missing_file(store):
    (store / "units/layer.0.safetensors").unlink()


def _load(store):
    m = AutoModel.from_pretrained(store, max_ram=0, progress=False)
    try:
        return m.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False)
    finally:
        m.close()


@pytest.mark.parametrize("damage, match", [
    (_no_units, "it lists no units"),
    (_drop_layer, "lacks unit layer.1"),
    (_missing_file, "layer.0.safetensors: unit file missing"),
    (_wrong_checksum, "layer.1.safetensors: content checksum mismatch"),
], ids=["no-units", "missing-unit", "missing-file", "wrong-checksum"])
def test_verify_and_a_load_refuse_the_same_damage(stores, tmp_path, damage, match):
    store = tmp_path / "store"
    shutil.copytree(stores[0], store)
    damage(store)
    r = run_cli("verify", store)
    assert r.returncode == 1, r.stderr
    assert match in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert "ok:" not in r.stderr
    with pytest.raises(StoreError, match=match):
        _load(store)


@pytest.mark.parametrize("kind", [0, 1], ids=["split", "in-place"])
def test_verify_says_ok_on_a_good_store_and_it_loads(stores, kind):
    r = run_cli("verify", stores[kind])
    assert r.returncode == 0, r.stderr
    assert "ok: 4 units match their xxh3 checksums" in r.stderr
    assert _load(stores[kind]).shape == (1, 5)

