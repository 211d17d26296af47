"""The residency planner (layerstream.plan.planner) on stores described by a manifest only: which units
stay resident, in which tier, what a sweep streams; and choose_io's read mode."""

import pytest

import layerstream.plan.planner as planner
from layerstream.errors import BudgetError, InputError
from layerstream.plan import choose_io
from layerstream.plan.planner import UnitPlan, _choose, _compact
from layerstream.store import Manifest, Store, UnitInfo

LAYER, HEAD, EMBED = 1000, 800, 500
TB = 10**12


def make_plan(store, *args, machine=None, **kwargs):
    """The planner on a machine with a terabyte of free RAM, unless told another (its default budget, page-cache
    set and choose_io depend on it): the machine's facts are passed, not read."""
    return planner.make_plan(store, *args, machine=machine or planner.Machine(TB), **kwargs)


def fake_store(path, layers=6, tied=False, layer_bytes=LAYER, experts=0, topk=2) -> Store:
    """A store as the planner sees it: a manifest (and a config for MoE), no weights."""
    def unit(name, kind, nbytes, tensors):
        return UnitInfo(name, kind, f"units/{name}.safetensors", nbytes, "0" * 64, "0" * 16, tensors)

    units = [unit("embed", "embed", EMBED, ["model.embed_tokens.weight"])]
    for i in range(layers):
        units.append(unit(f"layer.{i}", "layer", layer_bytes, [f"model.layers.{i}.mlp.weight"]))
        units += [unit(f"layer.{i}.expert.{j}", "expert", 100, [f"model.layers.{i}.experts.{j}.w"])
                  for j in range(experts)]
    units.append(unit("head", "head", HEAD, ["model.norm.weight"] + ([] if tied else ["lm_head.weight"])))
    m = Manifest("LlamaForCausalLM", "llama", "float32", {"kind": "safetensors"}, units,
                 tied={"lm_head.weight": "model.embed_tokens.weight"} if tied else {})
    path.mkdir(parents=True, exist_ok=True)
    (path / "manifest.json").write_text(m.to_json())
    (path / "config.json").write_text(f'{{"num_experts_per_tok": {topk}}}')
    return Store(path)


def ups(*spec):
    """UnitPlans from (name, kind, bytes) triples."""
    return [UnitPlan(n, k, b, [n]) for n, k, b in spec]


def layers(n, b=LAYER):
    return [(f"layer.{i}", "layer", b) for i in range(n)]


# ------------------------------------------------------------------ _choose: one tier's resident set

def test_choose_everything_when_it_fits():
    cands = ups(("embed", "embed", EMBED), *layers(4), ("head", "head", HEAD))
    assert _choose(cands, EMBED + 4 * LAYER + HEAD) == cands


def test_choose_head_first_then_layers_spread_evenly():
    cands = ups(("embed", "embed", EMBED), *layers(6), ("head", "head", HEAD))
    got = [u.name for u in _choose(cands, HEAD + 2 * LAYER + 10)]
    assert got == ["head", "layer.1", "layer.4"]   # spread, not the first two
    got = [u.name for u in _choose(cands, HEAD + 3 * LAYER)]
    assert got == ["head", "layer.1", "layer.3", "layer.5"]


def test_choose_skips_what_does_not_fit():
    cands = ups(("embed", "embed", EMBED), *layers(6), ("head", "head", 5000))
    assert [u.name for u in _choose(cands, 2 * LAYER)] == ["layer.1", "layer.4"]   # the head is too big
    assert _choose(cands, LAYER - 1) == []
    assert _choose(cands, 0) == []


def test_choose_tied_embedding_before_layers_untied_never():
    tied = ups(("embed", "embed", EMBED), *layers(4), ("head", "head", HEAD))
    tied[0].tied_embed = True
    assert [u.name for u in _choose(tied, HEAD + EMBED + LAYER)] == ["head", "embed", "layer.2"]
    untied = ups(("embed", "embed", EMBED), *layers(4), ("head", "head", HEAD))
    # an untied embedding is read by rows: never worth a resident slot in a partial budget
    assert "embed" not in [u.name for u in _choose(untied, HEAD + EMBED + 3 * LAYER + 10)]


def test_choose_experts_by_heat_then_expert_index_then_layer():
    cands = ups(*[(f"layer.{i}.expert.{j}", "expert", 100) for i in range(3) for j in range(4)])
    assert [u.name for u in _choose(cands, 400)] == ["layer.0.expert.0", "layer.1.expert.0", "layer.2.expert.0",
                                                     "layer.0.expert.1"]
    by_name = {u.name: u for u in cands}
    by_name["layer.2.expert.3"].heat = 50
    by_name["layer.1.expert.2"].heat = 7
    assert [u.name for u in _choose(cands, 300)] == ["layer.2.expert.3", "layer.1.expert.2", "layer.0.expert.0"]


# ------------------------------------------------------------------ _compact: unit lists as plan lines show them

@pytest.mark.parametrize("names, want", [
    ([], ""),
    (["head"], "head"),
    (["layer.4"], "layer.4"),
    (["embed", "layer.0", "layer.1", "layer.2", "layer.5", "head"], "embed, layer.0-2, layer.5, head"),
    (["layer.1", "layer.3", "layer.5"], "layer.1, layer.3, layer.5"),
    (["layer.9", "layer.10", "layer.11"], "layer.9-11"),
    (["layer.0.expert.0", "layer.1.expert.0", "layer.1.expert.3"], "3 experts of 2 layers"),
    (["head", "layer.0", "layer.1", "layer.2.expert.5"], "head, layer.0-1, 1 experts of 1 layers"),
])
def test_compact(names, want):
    assert _compact(names) == want


# ------------------------------------------------------------------ make_plan on the CPU

def tiers(plan):
    return {u.name: u.tier for u in plan.units}


def test_nothing_resident_at_max_ram_0(tmp_path):
    plan = make_plan(fake_store(tmp_path), "cpu", max_ram=0)
    assert set(tiers(plan).values()) == {"disk"}
    assert plan.resident("ram") == 0
    # every layer and the head each sweep; an untied embedding by rows only (not counted)
    assert plan.bytes_per_sweep == 6 * LAYER + HEAD
    assert [u.name for u in plan.streamed] == [f"layer.{i}" for i in range(6)] + ["head"]
    assert plan.inflight_bytes == 3 * LAYER   # lookahead 2: the three largest loads
    assert any("below the in-flight buffers" in n for n in plan.notes)


def test_a_budget_that_leaves_no_room_for_the_kv_cache_says_its_minimum_comes_on_top(tmp_path):
    store = fake_store(tmp_path)
    (tmp_path / "config.json").write_text('{"num_hidden_layers": 6, "num_key_value_heads": 2, "head_dim": 8}')
    plan = make_plan(Store(tmp_path), "cpu", max_ram=0)
    assert plan.kv_per_token == 2 * 6 * 2 * 8 * 4 and plan.kv_budget == planner.MIN_KV
    assert any("KV cache: it gets the minimum" in n for n in plan.notes)
    roomy = make_plan(store, "cpu", max_ram=10 * planner.MIN_KV)
    assert roomy.kv_budget > planner.MIN_KV and not any("KV cache" in n for n in roomy.notes)


def test_tied_head_reads_the_embedding_each_sweep(tmp_path):
    plan = make_plan(fake_store(tmp_path, tied=True), "cpu", max_ram=0)
    head = next(u for u in plan.units if u.name == "head")
    assert head.load == ["head", "embed"]
    assert plan.parts(head) == ["head", "embed"]
    assert plan.bytes_per_sweep == 6 * LAYER + HEAD + EMBED
    assert plan.inflight_bytes == (HEAD + EMBED) + 2 * LAYER   # the head's load is the largest now


def test_everything_resident_when_it_fits(tmp_path):
    plan = make_plan(fake_store(tmp_path), "cpu", max_ram=10**6)
    assert set(tiers(plan).values()) == {"ram"}
    assert plan.bytes_per_sweep == 0 and plan.streamed == [] and plan.cached == []
    assert plan.ram_budget == 10**6


def test_default_budget_is_free_ram_minus_a_margin(tmp_path):
    plan = make_plan(fake_store(tmp_path), "cpu", max_ram=None)
    assert plan.ram_budget == TB - planner.RAM_MARGIN
    assert set(tiers(plan).values()) == {"ram"}
    assert any("ram budget by default" in n for n in plan.notes)


def test_partial_budget_holds_resident_units_and_buffers(tmp_path):
    budget = 6000
    plan = make_plan(fake_store(tmp_path), "cpu", max_ram=budget)
    t = tiers(plan)
    resident = [n for n, tier in t.items() if tier == "ram"]
    assert t["head"] == "ram" and t["embed"] == "disk"
    assert 0 < len(resident) < 7
    reserve = min(planner.RUNTIME_RESERVE, budget // 10)
    assert plan.resident("ram") + plan.inflight_bytes <= budget - reserve
    # no resident layer could be added without breaking that
    disk_layers = [n for n, tier in t.items() if tier == "disk" and n.startswith("layer.")]
    assert disk_layers and plan.resident("ram") + LAYER + plan.inflight_bytes > budget - reserve
    # what is streamed each sweep is what is not resident
    assert plan.bytes_per_sweep == LAYER * len(disk_layers)
    # every streamed layer goes through the page cache (plenty of RAM beside the budget)
    assert plan.cached == disk_layers


def test_more_ram_never_means_more_streaming(tmp_path):
    store = fake_store(tmp_path, layers=10)
    streamed = [make_plan(store, "cpu", max_ram=b).bytes_per_sweep for b in range(0, 14001, 500)]
    assert streamed == sorted(streamed, reverse=True)
    assert streamed[0] == 10 * LAYER + HEAD and streamed[-1] == 0


def test_page_cache_set_sized_to_free_ram(tmp_path):
    store = fake_store(tmp_path, layers=8)
    plan = make_plan(store, "cpu", max_ram=0, machine=planner.Machine(planner.RAM_MARGIN + 3 * LAYER))
    assert plan.cached == ["layer.1", "layer.4", "layer.6"]   # three layers fit, spread over the eight
    assert make_plan(store, "cpu", max_ram=0, machine=planner.Machine(0)).cached == []


def test_experts_share_and_routed_buffers(tmp_path):
    store = fake_store(tmp_path, layers=3, experts=8, topk=2)
    plan = make_plan(store, "cpu", max_ram=0)
    assert plan.expert_topk == 2 and plan.expert_share == 2 / 8
    # experts are read on demand, not in the sweep: a token's expected share of them per sweep
    assert all(u.kind != "expert" for u in plan.streamed)
    assert plan.bytes_per_sweep == 3 * LAYER + HEAD + int(3 * 8 * 100 * 2 / 8)
    assert plan.inflight_bytes == 3 * LAYER + 2 * 2 * 100
    assert "24 experts of 3 layers" in plan.describe()


# ------------------------------------------------------------------ make_plan on an accelerator (no device needed)

def test_gpu_budget_that_fits_everything(tmp_path):
    plan = make_plan(fake_store(tmp_path), "cuda", max_ram=0, max_gpu_memory=10**6)
    assert set(tiers(plan).values()) == {"device"}
    assert plan.gpu_budget == 10**6 and plan.compute_tier == "device"


def test_gpu_budget_below_the_inflight_buffers_is_refused(tmp_path):
    with pytest.raises(BudgetError, match=r"max_gpu_memory 2.0 KB cannot hold the units in flight: 3 x 1.0 KB"):
        make_plan(fake_store(tmp_path), "cuda", max_ram=0, max_gpu_memory=2000)


def test_gpu_then_pinned_ram_then_disk(tmp_path):
    need = 3 * LAYER   # lookahead 2: three of the largest load
    plan = make_plan(fake_store(tmp_path), "cuda", max_ram=4 * LAYER, max_gpu_memory=need + HEAD + LAYER)
    t = tiers(plan)
    assert t["head"] == "device" and [n for n, v in t.items() if v == "device"] == ["layer.3", "head"]
    assert {t[f"layer.{i}"] for i in range(6)} >= {"device", "ram", "disk"}
    assert plan.resident("device") <= HEAD + LAYER


def test_gpu_ram_tier_costs_its_bytes_and_the_staging_of_disk_reads(tmp_path):
    """On an accelerator the in-flight buffers are device memory (in the GPU budget); host RAM holds the
    RAM-resident units and one pinned staging buffer per size of the parts read from disk. tests/test_cuda.py's
    `mixed` case: max_ram of 2 layers = 1 resident layer + the staging of a layer (the RAM budget was charged
    with the 3 device-side loads and no layer stayed in RAM)."""
    store = fake_store(tmp_path)
    plan = make_plan(store, "cuda", max_ram=2 * LAYER, max_gpu_memory=3 * LAYER + 2 * LAYER)
    t = tiers(plan)
    assert [n for n, v in t.items() if v == "device"] == ["layer.3", "head"]
    assert [n for n, v in t.items() if v == "ram"] == ["layer.2"]
    assert {t[f"layer.{i}"] for i in range(6)} == {"device", "ram", "disk"}
    assert plan.host_inflight_bytes == LAYER and plan.inflight_bytes == 3 * LAYER
    assert plan.resident("ram") + plan.host_inflight_bytes <= plan.ram_budget
    assert "pinned staging in RAM 1.0 KB" in plan.describe()
    # everything but the head in RAM: nothing read from disk, no staging
    plan = make_plan(store, "cuda", max_ram=7 * LAYER + EMBED, max_gpu_memory=3 * LAYER + HEAD)
    assert plan.host_inflight_bytes == 0 and plan.resident("ram") == 6 * LAYER + EMBED
    # on a CPU the in-flight buffers are host RAM: the same budget keeps nothing resident
    assert make_plan(store, "cpu", max_ram=2 * LAYER).resident("ram") == 0


def test_gpu_second_staging_buffer_only_where_it_costs_no_resident_unit(tmp_path):
    """A second pinned staging buffer per size (a read fills one while the other's copy runs) where the buffers
    come on top of the budget anyway (max_ram=0) or where the budget has room left for it; not at the price
    of a RAM-resident unit."""
    store = fake_store(tmp_path)
    gpu = 3 * LAYER + 2 * LAYER
    plan = make_plan(store, "cuda", max_ram=0, max_gpu_memory=gpu)
    assert plan.staging == 2 and plan.host_inflight_bytes == 2 * LAYER and plan.resident("ram") == 0
    assert any("below the pinned staging buffers (2.0 KB)" in n for n in plan.notes)
    everything = make_plan(store, "cuda", max_ram=0, max_gpu_memory=10**6)   # nothing read from disk: no note
    assert everything.host_inflight_bytes == 0 and not any("below the" in n for n in everything.notes)
    plan = make_plan(store, "cuda", max_ram=2 * LAYER, max_gpu_memory=gpu)   # the mixed case: 1 layer + 1 buffer
    assert plan.staging == 1 and plan.resident("ram") == LAYER
    plan = make_plan(store, "cuda", max_ram=4 * LAYER, max_gpu_memory=gpu)
    assert plan.resident("ram") + plan.host_inflight_bytes <= plan.ram_budget
    assert make_plan(store, "cpu", max_ram=0).staging == 1


def test_gpu_experts_on_the_cpu_stay_in_ram_and_take_no_device_buffers(tmp_path):
    """expert_device="cpu": the dense part takes the GPU, the experts RAM (then disk); the GPU holds no
    buffers for routed experts, so a budget of the dense loads in flight is enough."""
    store = fake_store(tmp_path, layers=3, experts=8, topk=2)
    dense = 3 * LAYER + HEAD   # the untied embedding is read by rows
    with pytest.raises(BudgetError, match="routed experts"):
        make_plan(store, "cuda", max_ram=10**6, max_gpu_memory=3 * LAYER)
    plan = make_plan(store, "cuda", max_ram=10**6, max_gpu_memory=3 * LAYER, expert_device="cpu")
    t = tiers(plan)
    assert {v for n, v in t.items() if ".expert." in n} == {"ram"} and plan.inflight_bytes == 3 * LAYER
    plan = make_plan(store, "cuda", max_ram=10**6, max_gpu_memory=dense + 3 * LAYER, expert_device="cpu")
    t = tiers(plan)
    assert all(v == "device" for n, v in t.items() if ".expert." not in n and n != "embed")
    assert {v for n, v in t.items() if ".expert." in n} == {"ram"}
    plan = make_plan(store, "cuda", max_ram=0, max_gpu_memory=dense + 3 * LAYER, expert_device="cpu")
    assert {v for n, v in tiers(plan).items() if ".expert." in n} == {"disk"}
    assert plan.host_inflight_bytes == 2 * 2 * 100   # the routed experts read into host memory


# ------------------------------------------------------------------ choose_io

def test_choose_io_explicit_modes(tmp_path):
    plan = make_plan(fake_store(tmp_path), "cpu", max_ram=0)
    assert plan.cached
    assert choose_io("direct", plan) == (True, [])
    assert choose_io("buffered", plan) == (False, [])
    assert choose_io("fadvise", plan) == (False, plan.cached)
    assert choose_io("mmap", plan) == (False, [])   # buffered; the reader maps what it has checked
    with pytest.raises(InputError, match="io must be"):
        choose_io("mapped", plan)


def test_choose_io_auto_goes_direct_only_when_the_stream_cannot_stay_cached(tmp_path):
    store = fake_store(tmp_path)
    plan = make_plan(store, "cpu", max_ram=0)
    streamed = plan.bytes_per_sweep
    assert choose_io("auto", plan) == (False, [])          # it all fits in the page cache
    room = int(streamed / 0.8) - 1                         # just too little room beside the buffers
    tight = make_plan(store, "cpu", max_ram=0, machine=planner.Machine(room + plan.inflight_bytes))
    assert choose_io("auto", tight) == (True, tight.cached)
    enough = make_plan(store, "cpu", max_ram=0, machine=planner.Machine(room + 2 + plan.inflight_bytes))
    assert choose_io("auto", enough) == (False, [])


def test_choose_io_auto_is_buffered_when_nothing_streams(tmp_path):
    plan = make_plan(fake_store(tmp_path), "cpu", max_ram=10**6, machine=planner.Machine(0))
    assert plan.bytes_per_sweep == 0
    assert choose_io("auto", plan) == (False, [])


def test_expert_counts_of_processes_sharing_a_store_add_up(tmp_path):
    """Pipeline stages each see only their own units; replicas record at the same time: no count is lost."""
    import json
    import threading
    from types import SimpleNamespace

    from layerstream.plan import EXPERT_COUNTS, read_expert_counts, record_expert_counts

    first = SimpleNamespace(path=tmp_path, units={"layer.0.expert.1": None})
    second = SimpleNamespace(path=tmp_path, units={"layer.1.expert.2": None})
    record_expert_counts(first, {"layer.0.expert.1": 3})
    record_expert_counts(second, {"layer.1.expert.2": 5})
    assert json.loads((tmp_path / EXPERT_COUNTS).read_text()) == {"layer.0.expert.1": 3, "layer.1.expert.2": 5}
    assert read_expert_counts(first) == {"layer.0.expert.1": 3}

    threads = [threading.Thread(target=lambda: [record_expert_counts(first, {"layer.0.expert.1": 1})
                                                for _ in range(25)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert read_expert_counts(first) == {"layer.0.expert.1": 103}
    assert read_expert_counts(second) == {"layer.1.expert.2": 5}
