"""`Options`: how a model is opened and run, built once by the API, the command line and the server."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import InputError
from .utils import parse_size

IO_MODES = ("auto", "buffered", "direct", "fadvise", "mmap")
VERIFY_MODES = ("first", "always", "never")
# AirLLM's keywords, accepted and ignored (or mapped) so that its scripts run unchanged
AIRLLM_KEYWORDS = ("layer_shards_saving_path", "hf_token", "delete_original")


@dataclass
class Options:
    """Every knob of `AutoModel.from_pretrained` in one place.

    Store choice: `store_path` (where the store made from a source goes; default: the cache), `in_place`
    (serve a safetensors checkpoint from its own shards; None: whenever it needs no conversion),
    `compression` ("int8" / "int4", AirLLM's "8bit" / "4bit"). Memory: `max_ram` / `max_gpu_memory` (bytes
    or "2GB"; None: what is free, with a margin; 0: nothing resident). Runtime: `device`, `dtype` (compute
    dtype; default the store's), `prefetch` and `lookahead` (units read ahead of the compute), `io`
    ("auto", "buffered", "direct" = O_DIRECT, "fadvise"), `readers` (parallel reads per unit), `threads`
    (torch compute threads; default chosen by layerstream), `verify` ("first", "always", "never": when a
    unit's xxh3 is checked), `profiling`, `progress` (bars on long work). Speculative decoding: `draft`
    ("int4": a resident int4 copy of the same model drafts tokens; or a path to another model). Beyond one
    machine: `pipeline` (N: the layers split over N Ray actors, each with these budgets; `pipeline_cpus` CPUs
    each, or one GPU each on a CUDA device; layerstream.ray.pipeline). Mixture of experts: `expert_device`
    ("cpu": on a GPU, the experts stay in host RAM and the CPU computes them where they lie, the dense part
    on the GPU; runtime/experts.py). Fine-tuned variants: `adapter` (a PEFT LoRA directory, kept resident and
    added to the linear layers' outputs, the store unchanged; runtime/lora.py) and `lora` ({name: directory}:
    more adapters, each request choosing one by name in the engine, the server and batch jobs). Quantized weights
    on a CPU: `kernels` (None: computed on as blocks with ggml when it is installed; False: dequantized to floats,
    the reference path; True: ggml or an error) and `repack` (True: resident blocks of the types ggml has faster
    kernels for on this CPU, Q4_0 and Q4_K with AVX2, are repacked for them once, as llama.cpp does by default;
    their results then agree with the streamed blocks' to float rounding, not bit for bit; False: never)."""

    device: str = "cpu"
    dtype: object = None
    max_ram: int | str | None = None
    max_gpu_memory: int | str | None = None
    prefetch: bool = True
    lookahead: int = 2
    io: str = "auto"
    readers: int | None = None
    threads: int | None = None
    verify: str = "first"
    profiling: bool = False
    progress: bool = True
    store_path: str | None = None
    in_place: bool | None = None
    compression: str | None = None
    draft: str | None = None
    pipeline: int | None = None
    pipeline_cpus: float = 1
    expert_device: str | None = None
    adapter: str | None = None
    lora: dict | None = None
    kernels: bool | None = None
    repack: bool = True

    def __post_init__(self):
        self.ram_bytes = parse_size(self.max_ram, "max_ram")
        self.gpu_bytes = parse_size(self.max_gpu_memory, "max_gpu_memory")
        if self.io not in IO_MODES:
            raise InputError(f"io must be one of {', '.join(IO_MODES)}, got {self.io!r}")
        if self.verify not in VERIFY_MODES:
            raise InputError(f"verify must be one of {', '.join(VERIFY_MODES)}, got {self.verify!r}")
        if not isinstance(self.lookahead, int) or isinstance(self.lookahead, bool) or self.lookahead < 1:
            raise InputError(f"lookahead must be a positive integer, got {self.lookahead!r}")
        if self.pipeline is not None and (not isinstance(self.pipeline, int) or isinstance(self.pipeline, bool)
                                          or self.pipeline < 1):
            raise InputError(f"pipeline must be a positive number of stages, got {self.pipeline!r}")
        if not isinstance(self.pipeline_cpus, (int, float)) or self.pipeline_cpus <= 0:
            raise InputError(f"pipeline_cpus must be a positive number, got {self.pipeline_cpus!r}")
        if self.lora is not None and not (isinstance(self.lora, dict) and
                                          all(isinstance(k, str) and k for k in self.lora)):
            raise InputError(f"lora must be a dict of adapter name -> directory, got {self.lora!r}")
        if self.kernels not in (None, True, False):
            raise InputError(f"kernels must be None, True or False, got {self.kernels!r}")
        if self.repack not in (True, False):
            raise InputError(f"repack must be True or False, got {self.repack!r}")
        if self.expert_device not in (None, "cpu"):
            raise InputError(f"expert_device must be None or 'cpu', got {self.expert_device!r}")

    @classmethod
    def from_kwargs(cls, kwargs: dict) -> "Options":
        """Options from keyword arguments, AirLLM's included; an unknown keyword is a TypeError as in Python."""
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in kwargs.items() if k in names}
        for k, v in kwargs.items():
            if k in names:
                continue
            if k not in AIRLLM_KEYWORDS:
                raise TypeError(f"from_pretrained() got an unexpected keyword argument {k!r}")
            if k == "layer_shards_saving_path" and known.get("store_path") is None:
                known["store_path"] = v
        return cls(**known)

    def replace(self, **changes) -> "Options":
        return dataclasses.replace(self, **changes)
