"""expert_device="cpu": a MoE layer's experts computed by the CPU where they lie in host RAM (the dense part
on the accelerator; llama.cpp's --override-tensor exps=CPU). On a CPU machine the twin path runs as it would
beside a GPU, moving nothing: tested against transformers here, the GPU side in tests/test_cuda.py."""

import pytest
import torch

from layerstream import AutoModel
from layerstream.errors import InputError

from conftest import assert_like_transformers, make_moe_dir, reference
from test_moe import IDS, routing_of


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3"])
@pytest.mark.parametrize("max_ram", [None, 0])
def test_experts_on_the_cpu_match_transformers(tmp_path, family, max_ram):
    """All in RAM: each layer's twin fused once. max_ram=0: the routed experts read from disk into host
    memory, stacked, the routing remapped. Either way transformers' logits and tokens, and its routing."""
    src = make_moe_dir(tmp_path / "src", family)
    ref = reference(src)
    m = AutoModel.from_pretrained(src, max_ram=max_ram, store_path=tmp_path / "store", progress=False,
                                  expert_device="cpu")
    assert set(m.streamer.cpu_experts) == set(m.layout.experts) and not m.streamer.fused
    assert all(getattr(t, "ls_fused", False) == (max_ram is None) for t in m.streamer.cpu_experts.values())
    assert_like_transformers(m, ref, IDS, 10)
    want, want_calls = routing_of(ref, IDS, 10)
    m.profiler.experts.clear()
    assert m.generate(IDS, max_new_tokens=10, do_sample=False).tolist() == want.tolist()
    calls = m.profiler.experts
    assert [(int(layer.split(".")[1]), routed) for layer, routed, _ in calls] == want_calls
    assert all(read == (len(routed) if max_ram == 0 else 0) for _, routed, read in calls)
    m.close()


def test_quantized_experts_on_the_cpu_compute_what_the_loader_does(tmp_path):
    """An int4 store's experts, dequantized on the CPU per call: the logits of the dequantize path, which
    dequantizes them in the loader (with ggml, the default computes on the experts' blocks instead:
    tests/test_moe.py)."""
    src = make_moe_dir(tmp_path / "src", "qwen3_moe")
    kw = dict(max_ram=0, compression="int4", store_path=tmp_path / "q4", progress=False, kernels=False)
    want = AutoModel.from_pretrained(src, **kw)
    got = AutoModel.from_pretrained(src, expert_device="cpu", **kw)
    torch.testing.assert_close(got(IDS).logits, want(IDS).logits, rtol=1e-5, atol=1e-5)
    assert got.generate(IDS, max_new_tokens=8, do_sample=False).tolist() == \
        want.generate(IDS, max_new_tokens=8, do_sample=False).tolist()


def test_expert_device_is_checked():
    with pytest.raises(InputError, match="expert_device must be None or 'cpu'"):
        AutoModel.from_pretrained("unused", expert_device="cuda")


def test_command_line_sets_expert_device():
    from layerstream.cli import build_parser
    from layerstream.cli.common import options_of

    for cmd in ("run", "chat", "serve", "batch"):
        args = [cmd, "--expert-device", "cpu"] + (["in.jsonl", "out.jsonl"] if cmd == "batch" else [])
        assert options_of(build_parser().parse_args(args)).expert_device == "cpu", cmd
    assert options_of(build_parser().parse_args(["run"])).expert_device is None
