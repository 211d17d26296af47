"""The accelerator path (CUDA, or ROCm through torch's cuda API). Skipped where torch sees no GPU."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from layerstream import AutoModel

from conftest import make_model_dir

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA/ROCm device")]


@pytest.mark.parametrize("tiers", ["all-device", "ram-streamed", "disk-streamed", "mixed"])
def test_cuda_matches_transformers(tmp_path, tiers):
    src = make_model_dir(tmp_path / "src", "llama", layers=6)
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).to("cuda").eval()
    store = tmp_path / "store"
    units = AutoModel.from_pretrained(src, max_ram=0, store_path=store, progress=False).store.units
    layer = units["layer.0"].bytes
    inflight = 3 * max(units["head"].bytes + units["embed"].bytes, layer)
    budgets = {"all-device": dict(max_gpu_memory="1GB"),
               "ram-streamed": dict(max_gpu_memory=inflight, max_ram="1GB"),
               "disk-streamed": dict(max_gpu_memory=inflight, max_ram=0),
               "mixed": dict(max_gpu_memory=inflight + 2 * layer, max_ram=2 * layer)}[tiers]
    m = AutoModel.from_pretrained(store, device="cuda", progress=False, **budgets)
    layer_tiers = {u.tier for u in m.plan.units if u.kind == "layer"}
    assert layer_tiers == {"all-device": {"device"}, "ram-streamed": {"ram"}, "disk-streamed": {"disk"},
                           "mixed": {"device", "ram", "disk"}}[tiers], m.plan.describe()
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]], device="cuda")
    with torch.no_grad():
        want_logits = ref(ids).logits
    torch.testing.assert_close(m(ids).logits, want_logits, rtol=1e-3, atol=1e-3)
    want = ref.generate(ids, max_new_tokens=10, do_sample=False)
    assert m.generate(ids, max_new_tokens=10, do_sample=False).tolist() == want.tolist()
    if tiers != "all-device":
        assert m.profiler.allocations <= 8  # buffers reused, not allocated per token
    m.close()


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_cuda_quantized_store_dequantized_on_the_device(tmp_path, kind):
    from layerstream.quant import dequantize, quantizable, quantize

    src = make_model_dir(tmp_path / "src", "llama", layers=4)
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "embed_tokens" not in name and quantizable(name, p.shape, kind):
                p.copy_(dequantize(kind, quantize(p, kind), torch.float32))
    ref = ref.to("cuda")
    m = AutoModel.from_pretrained(src, device="cuda", compression=kind, max_gpu_memory="4MB", max_ram=0,
                                  store_path=tmp_path / "store", progress=False)
    assert m.plan.dequant_bytes
    ids = torch.tensor([[1, 5, 9, 13]], device="cuda")
    assert m.generate(ids, max_new_tokens=8, do_sample=False).tolist() == \
        ref.generate(ids, max_new_tokens=8, do_sample=False).tolist()


@pytest.mark.parametrize("max_ram", [0, "1GB"])
def test_cuda_moe_streams_routed_experts(tmp_path, max_ram):
    from conftest import make_moe_dir
    from test_moe import routing_of

    src = make_moe_dir(tmp_path / "src", "qwen3_moe")
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).to("cuda").eval()
    units = AutoModel.from_pretrained(src, max_ram=0, store_path=tmp_path / "store", progress=False).store.units
    inflight = 3 * max(units["layer.0"].bytes, units["head"].bytes + units["embed"].bytes) + \
        2 * 2 * units["layer.0.expert.0"].bytes   # and the routed experts' buffers
    m = AutoModel.from_pretrained(tmp_path / "store", device="cuda", max_gpu_memory=inflight, max_ram=max_ram,
                                  progress=False)
    assert {u.tier for u in m.plan.units if u.kind == "expert"} == ({"disk"} if max_ram == 0 else {"ram"})
    ids = torch.tensor([[1, 17, 33, 5, 90, 64, 12]], device="cuda")
    with torch.no_grad():
        want_logits = ref(ids).logits
    torch.testing.assert_close(m(ids).logits, want_logits, rtol=1e-3, atol=1e-3)
    want, want_calls = routing_of(ref, ids, 10)
    m.profiler.reset()
    assert m.generate(ids, max_new_tokens=10, do_sample=False).tolist() == want.tolist()
    # per experts call: the experts transformers routes to, and exactly those of them on disk read from it
    calls = m.profiler.experts
    assert [(int(layer.split(".")[1]), routed) for layer, routed, _ in calls] == want_calls
    tiers = {u.name: u.tier for u in m.plan.units}
    assert all(read == sum(tiers[f"{layer}.expert.{j}"] == "disk" for j in routed) for layer, routed, read in calls)
    assert (sum(read for _, _, read in calls) > 0) == (max_ram == 0)
    assert all(len(routed) == 2 for _, routed, _ in calls[-3:])   # a decode step: one token, top-2 of 8
    m.close()


@pytest.mark.parametrize("max_ram", [0, "1GB"])
def test_cuda_moe_experts_computed_on_the_cpu(tmp_path, max_ram):
    """expert_device="cpu": the dense part on the GPU, the experts in host RAM (or read from disk into it) and
    computed by the CPU; transformers' logits and tokens and its routing, and no expert on the device."""
    from conftest import make_moe_dir
    from test_moe import routing_of

    src = make_moe_dir(tmp_path / "src", "qwen3_moe")
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).to("cuda").eval()
    m = AutoModel.from_pretrained(src, device="cuda", max_ram=max_ram, expert_device="cpu",
                                  store_path=tmp_path / "store", progress=False)
    assert {u.tier for u in m.plan.units if u.kind == "expert"} == ({"disk"} if max_ram == 0 else {"ram"})
    assert {u.tier for u in m.plan.units if u.kind == "layer"} == {"device"}
    assert set(m.streamer.cpu_experts) == set(m.layout.experts)
    ids = torch.tensor([[1, 17, 33, 5, 90, 64, 12]], device="cuda")
    with torch.no_grad():
        want_logits = ref(ids).logits
    torch.testing.assert_close(m(ids).logits, want_logits, rtol=1e-3, atol=1e-3)
    want, want_calls = routing_of(ref, ids, 10)
    m.profiler.experts.clear()
    assert m.generate(ids, max_new_tokens=10, do_sample=False).tolist() == want.tolist()
    assert [(int(layer.split(".")[1]), routed) for layer, routed, _ in m.profiler.experts] == want_calls
    m.close()
