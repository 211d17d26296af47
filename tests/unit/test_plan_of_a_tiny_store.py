"""make_plan on a real (tiny) store: a random llama checkpoint indexed in place, no weights loaded."""

import pytest

import layerstream.plan.planner as planner
from layerstream.plan import make_plan
from layerstream.store import Store

from conftest import make_model_dir

pytestmark = pytest.mark.slow   # building the tiny checkpoint imports transformers: over 10 s on a busy 2-core box


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    from layerstream.sources import open_source
    from layerstream.store import index_in_place

    root = tmp_path_factory.mktemp("tiny-plan")
    src = make_model_dir(root / "src", "llama", tie=True, layers=8)
    return Store(index_in_place(open_source(src), root / "store", progress=False))


def test_units_of_a_tiny_store(tiny_store):
    m = tiny_store.manifest
    assert [u.name for u in m.units] == ["embed"] + [f"layer.{i}" for i in range(8)] + ["head"]
    assert m.tied == {"lm_head.weight": "model.embed_tokens.weight"}
    embed = m.units[0]
    assert embed.bytes == 128 * 64 * 4                        # vocab x hidden, float32
    assert len({u.bytes for u in m.units if u.kind == "layer"}) == 1


def test_plan_of_a_tiny_store(tiny_store):
    roomy = planner.Machine(10**12)
    units = {u.name: u.bytes for u in tiny_store.manifest.units}
    streamed = make_plan(tiny_store, "cpu", max_ram=0, machine=roomy)
    assert {u.tier for u in streamed.units} == {"disk"}
    # the tied head reads the embedding each sweep, so every byte of the store is streamed
    assert streamed.bytes_per_sweep == sum(units.values())
    resident = make_plan(tiny_store, "cpu", max_ram=None, machine=roomy)
    assert {u.tier for u in resident.units} == {"ram"} and resident.bytes_per_sweep == 0
    # room for the in-flight buffers, the head with its tied embedding and two layers, and the reserve
    budget = int((streamed.inflight_bytes + units["head"] + units["embed"] + 2 * units["layer.0"]) / 0.9) + 1
    partial = make_plan(tiny_store, "cpu", max_ram=budget, machine=roomy)
    tiers = {u.name: u.tier for u in partial.units}
    assert tiers["head"] == tiers["embed"] == "ram"
    on_disk = [n for n, t in tiers.items() if t == "disk"]
    assert on_disk == ["layer.0", "layer.1", "layer.3", "layer.4", "layer.5", "layer.7"]   # 2 and 6 resident: spread
    assert partial.bytes_per_sweep == len(on_disk) * units["layer.0"]
    assert partial.resident("ram") + partial.inflight_bytes <= 0.9 * budget
