"""Every benchmark scenario of bench/, in one registry: what it measures, against which peers, for which issue, how
to run it, and a smoke run (the same script at tiny sizes, seconds) that the test suite runs (tests/test_bench.py)
so that no scenario rots between the days it is measured. A smoke run has SMOKE_ENV set: the harness does not
wait for a quiet machine then (nothing it prints is a measurement). The measured results live in
docs/benchmarks.md and the README, each with its command.

    .venv/bin/python -m bench list                  # the scenarios
    .venv/bin/python -m bench run NAME [ARGS...]    # one of them, for real (a quiet machine: see harness.py)
    .venv/bin/python -m bench smoke [NAME...]       # their smoke runs (all by default)

(The anchors: mlx-lm's `benchmark` and vLLM's `vllm bench` subcommands.) The parent only starts children; it
imports torch only to ask whether a GPU is there, for the scenarios that need one.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

# peers and optional packages a scenario uses; a smoke run is skipped where one is missing
PEERS = {
    "llama_cpp": "llama.cpp through llama-cpp-python (../shared/wheels/llama_cpp_python-*.whl)",
    "accelerate": "Accelerate's disk offload (pip: accelerate)",
    "airllm": "AirLLM (pip: airllm)",
    "ray": "Ray (./install.sh --test)",
    "openai": "the openai client (./install.sh --test)",
    "xgrammar": "xgrammar (pip install --no-deps xgrammar apache-tvm-ffi)",
    "outlines_core": "outlines-core (pip install --no-deps outlines-core)",
    "cuda": "an NVIDIA GPU",
}


@dataclass(frozen=True)
class Scenario:
    name: str
    script: str                      # bench/<script>
    what: str
    issue: str = ""                  # the issue whose targets it measures ("" for the older tables)
    peers: tuple[str, ...] = ()      # compared against when installed (a run reports "not installed" otherwise)
    needs: tuple[str, ...] = ()      # without these it cannot run at all
    smoke: tuple[str, ...] | None = ()   # arguments of a seconds-long run; None: no small form (why: `big`)
    big: str = ""                    # why there is no smoke run (a model of tens of GB, a GPU)


SCENARIOS = [
    Scenario("embedded", "embedded.py", "the embedded model, every system side by side (tok/s, RSS, tokens)",
             peers=("accelerate", "airllm", "llama_cpp"),
             smoke=("-n", "2", "--skip", "ram", "--skip", "offload", "--skip", "airllm",
                    "--skip", "llama", "--skip", "ls0copy", "--skip", "lsfull")),
    Scenario("big", "big.py", "a 30.7 GB Llama-shaped model on a 24 GiB box: s/token against the peers",
             peers=("accelerate", "airllm", "llama_cpp"), smoke=None, big="writes a 30 GB model"),
    Scenario("batch-big", "batch_big.py", "batch 1 / 8 / 32 on the 30.7 GB model, against Accelerate",
             peers=("accelerate",), smoke=None, big="the 30 GB model of `big`"),
    Scenario("big-int4", "big_int4.py", "the 30.7 GB model as an int4 store", smoke=None,
             big="the 30 GB model of `big`"),
    Scenario("io-modes", "io_modes.py", "O_DIRECT, buffered, fadvise and read-ahead on the 30.7 GB model", smoke=None,
             big="the 30 GB model of `big`"),
    Scenario("big-q4k", "big_q4k.py", "a 70B-shaped Q4_K GGUF (39 GB) against llama.cpp's mmap", issue="20",
             peers=("llama_cpp",), smoke=None, big="writes a 39 GB GGUF"),
    Scenario("kernels", "kernels.py", "decode and prefill on a GGUF's blocks (ggml) against llama.cpp", issue="20",
             peers=("llama_cpp",), smoke=("--only", "smollm2", "--tokens", "2")),
    Scenario("gguf-kernels", "gguf_kernels.py", "per block type: ggml on the blocks against dequantize + matmul",
             issue="20", smoke=("--reps", "1", "--shapes", "SmolLM2 mlp (1536 x 576)")),
    Scenario("gguf-kquants", "gguf_kquants.py", "a Q4_K_M GGUF made by llama.cpp: logits and speed",
             peers=("llama_cpp",), needs=("llama_cpp",), smoke=None,
             big="llama.cpp requantizes the embedded model, then six systems run: 80 s at its smallest"),
    Scenario("quant", "quant.py", "int8 / int4 stores: speed, top-1 and KL against the float model", smoke=None,
             big="its smallest split quantizes a 1 GB checkpoint three times"),
    Scenario("quality", "quality.py", "int8 / int4 quality against established quantizers", smoke=None,
             big="several quantizers over the embedded model, tens of minutes"),
    Scenario("moe", "moe.py", "per-expert streaming: bytes read per token against a dense sweep",
             smoke=("--layers", "2", "--experts", "8", "--topk", "2", "--hidden", "64",
                    "--expert-width", "32")),
    Scenario("speculative", "speculative.py", "int4 self-draft and prompt lookup against plain decoding",
             smoke=("--tokens", "4")),
    Scenario("inplace", "inplace.py", "a safetensors checkpoint served in place against a split store",
             smoke=("--rounds", "1")),
    Scenario("batch", "batch.py", "continuous batching (`layerstream batch`) against static padded batches",
             smoke=("--requests", "4", "--batch-size", "2")),
    Scenario("engine-kv", "engine_kv.py", "the engine's decode step against batch x context, slabs and masked",
             issue="21", smoke=("1x8", "2x8")),
    Scenario("serve", "serve.py", "`layerstream serve` under concurrent openai clients", issue="21",
             needs=("openai",), smoke=("--quick",)),
    Scenario("soak", "soak.py", "a soak of the server: misbehaving and bursting clients, no failure, no growth",
             needs=("openai",), smoke=("--seconds", "5", "--clients", "2", "--burst", "4")),
    Scenario("ray", "ray.py", "a batch job on Ray replicas and a 2-stage pipeline against one process",
             needs=("ray",), smoke=None, big="starts a Ray cluster for minutes (tests/test_ray.py covers it)"),
    Scenario("structured", "structured.py", "a batch job held to a JSON schema against the same job free",
             issue="22", smoke=("--requests", "4")),
    Scenario("grammars", "grammars.py", "llguidance, xgrammar and outlines-core on the embedded vocabulary",
             issue="22", peers=("xgrammar", "outlines_core"), smoke=("--repeat", "1")),
    Scenario("first-start", "first_start.py", "a user's second start and the default threads on a busy machine",
             issue="24", smoke=None, big="a minute of a busy core and repeated starts"),
    Scenario("cuda", "cuda.py", "the GPU path against its peers on one GPU", needs=("cuda",), smoke=None,
             big="a GPU"),
    Scenario("moe-cuda", "moe_cuda.py", "a MoE model bigger than the GPU budget on one GPU", needs=("cuda",),
             smoke=None, big="a GPU"),
    Scenario("paged-spike", "paged_spike.py", "spike: the paged prototype's decode step (issue 21's choice)",
             issue="21", smoke=None, big="a retired spike, kept for its recorded figures"),
    Scenario("paged-families", "paged_families.py", "spike: which families batch on slabs (the survey file)",
             issue="21", smoke=None, big="a survey of every family, minutes"),
]
BY_NAME = {s.name: s for s in SCENARIOS}
SMOKE_ENV = "LAYERSTREAM_BENCH_SMOKE"
LIBRARIES = ("harness.py", "peers.py", "big_model.py", "big_gguf.py", "registry.py", "__main__.py")


def installed(peer: str) -> bool:
    if peer == "cuda":
        try:
            import torch
        except ImportError:
            return False
        return torch.cuda.is_available()
    return importlib.util.find_spec(peer) is not None
