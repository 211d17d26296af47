"""The library API: `AutoModel.from_pretrained(...)` -> a model whose `generate` is transformers' own."""

from __future__ import annotations

import atexit
import sys
import time
import weakref

import torch

from .adapters import build_skeleton, layout
from .errors import InputError, LayerstreamError
from .plan import make_plan, record_expert_counts
from .runtime import Profiler, Streamer
from .split import log, resolve
from .store import Store
from .utils import parse_size

DTYPE_ALIASES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
                 "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "auto": None}


def parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype).replace("torch.", "") in DTYPE_ALIASES:
        return DTYPE_ALIASES[str(dtype).replace("torch.", "")]
    raise InputError(f"dtype {dtype!r} is not one of {', '.join(DTYPE_ALIASES)}")


def parse_device(device) -> torch.device:
    dev = torch.device(device or "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LayerstreamError("device 'cuda' was asked for but torch sees no CUDA/ROCm device; use --device cpu")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


_TORCH_THREADS = torch.get_num_threads()   # torch's own default, before layerstream changes it


def set_threads(threads, streaming: bool, direct: bool = False) -> int:
    """torch's compute threads. While streaming through the page cache, one core is left to the loader
    thread, whose reads are memory copies: on a 2-core machine, 1 compute + 1 I/O thread measured faster
    than 2 compute threads competing with the loader (README, "Threads"). O_DIRECT reads cost the CPU
    little (the disk writes into our buffers), so compute keeps every core. An explicit `threads` wins."""
    if threads:
        torch.set_num_threads(int(threads))
    elif streaming and not direct:
        torch.set_num_threads(max(1, _TORCH_THREADS - 1))
    else:
        torch.set_num_threads(_TORCH_THREADS)
    return torch.get_num_threads()


def choose_direct_io(io: str, plan) -> bool:
    """O_DIRECT when what is streamed each sweep cannot stay in the page cache anyway (the model is larger
    than RAM): reads skip the copy through the cache and evict nothing. Buffered while it fits: a page-cache
    hit is faster than any disk."""
    if io not in ("auto", "buffered", "direct", "fadvise"):
        raise InputError(f"io must be 'auto', 'buffered', 'direct' or 'fadvise', got {io!r}")
    if io == "fadvise":
        return False       # buffered reads dropped after use; the page-cache tier stays as planned
    if io != "auto":
        plan.cached = []   # an explicit choice applies to every streamed unit
        return io == "direct"
    from .utils import available_ram

    streamed = plan.bytes_per_sweep
    room = available_ram() - plan.inflight_bytes - plan.resident("ram")   # host RAM on any device
    if not (streamed > 0 and streamed > 0.8 * max(0, room)):
        plan.cached = []
        return False
    return True


class StreamedModel:
    """A transformers causal LM whose weights stream from a layerstream store as the forward pass
    reaches them. `generate` and `__call__` are transformers' own (KV cache, sampling, streamers)."""

    def __init__(self, store_path, device="cpu", dtype=None, max_ram=None, max_gpu_memory=None, prefetch=True,
                 lookahead=2, profiling=False, verify="first", threads=None, progress=True, io="auto",
                 readers=None):
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig

        self.store = Store(store_path)
        self.store.check_files()
        self.device = parse_device(device)
        store_dtype = getattr(torch, self.store.manifest.dtype)
        self.dtype = parse_dtype(dtype) or store_dtype
        self.config = AutoConfig.from_pretrained(self.store.path)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.store.path)
        except (OSError, ValueError, TypeError, ImportError):   # ImportError: a tokenizer class needing a missing package
            log("no usable tokenizer in the store: pass token ids to generate")
            self.tokenizer = None
        self.model = build_skeleton(self.config, self.dtype, self.device)
        try:
            self.model.generation_config = GenerationConfig.from_pretrained(self.store.path)
        except OSError:
            pass
        self.layout = layout(self.model)
        self.plan = make_plan(self.store, self.device.type, parse_size(max_ram, "max_ram"),
                              parse_size(max_gpu_memory, "max_gpu_memory"), lookahead)
        self.profiler = Profiler(profiling)
        resident = sum(u.bytes for u in self.plan.units if u.tier != "disk")
        bar = None
        if progress and resident:
            from tqdm import tqdm
            bar = tqdm(total=resident, unit="B", unit_scale=True, desc="loading resident units", file=sys.stderr,
                       leave=False)
        self.direct = choose_direct_io(io, self.plan)
        self.fadvise = io == "fadvise"
        readers = readers or (4 if self.direct or self.fadvise else 1)
        self.streamer = Streamer(self.model, self.layout, self.store, self.plan, self.device, self.dtype, prefetch,
                                 self.profiler, verify, progress=bar.update if bar else None, direct=self.direct,
                                 readers=readers, fadvise=self.fadvise)
        if bar:
            bar.close()
        # after the resident load: units computed on packed weights need no streaming
        self.threads = set_threads(threads, streaming=bool(self.plan.streamed) and prefetch, direct=self.direct)
        self.last_stats: dict = {}
        _LIVE.add(self)

    # transformers-like surface
    @property
    def generation_config(self):
        return self.model.generation_config

    def __call__(self, *args, **kwargs):
        with torch.inference_mode():
            return self.model(*args, **kwargs)

    def _check_inputs(self, input_ids, kwargs):
        if input_ids is None:
            input_ids = kwargs.get("inputs")
        if input_ids is None:
            raise InputError("generate needs input_ids (token ids of the prompt)")
        if hasattr(input_ids, "keys") and "input_ids" in input_ids:   # a BatchEncoding
            kwargs.setdefault("attention_mask", input_ids.get("attention_mask"))
            input_ids = input_ids["input_ids"]
        if not torch.is_tensor(input_ids):
            input_ids = torch.tensor(input_ids)
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        if input_ids.numel() == 0 or input_ids.shape[-1] == 0:
            raise InputError("the prompt is empty")
        for key in ("max_new_tokens", "max_length"):
            if key in kwargs and kwargs[key] is not None and kwargs[key] <= 0:
                raise InputError(f"{key} must be positive, got {kwargs[key]}")
        ctx = getattr(self.config.get_text_config(), "max_position_embeddings", None)
        if ctx and input_ids.shape[-1] + (kwargs.get("max_new_tokens") or 0) > ctx:
            raise InputError(f"prompt ({input_ids.shape[-1]} tokens) plus max_new_tokens "
                             f"({kwargs.get('max_new_tokens') or 0}) exceeds the model's context of {ctx} tokens")
        return input_ids.to(self.device)

    def generate(self, input_ids=None, **kwargs):
        """transformers' `generate`, with the weights streamed. Returns what transformers returns."""
        input_ids = self._check_inputs(input_ids, kwargs)
        kwargs.pop("inputs", None)
        if "attention_mask" in kwargs and torch.is_tensor(kwargs["attention_mask"]):
            kwargs["attention_mask"] = kwargs["attention_mask"].to(self.device)
        if self.tokenizer is not None and "pad_token_id" not in kwargs and self.generation_config.pad_token_id is None:
            kwargs["pad_token_id"] = self.tokenizer.pad_token_id or self.tokenizer.eos_token_id
        self.profiler.reset()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(input_ids, **kwargs)
        dt = time.perf_counter() - t0
        self._record_experts()
        seq = out.sequences if hasattr(out, "sequences") else out
        new = seq.shape[-1] - input_ids.shape[-1]
        self.last_stats = {"new_tokens": int(new), "seconds": dt, "tokens_per_s": new / dt if dt else 0.0,
                           "sweeps": self.profiler.sweeps, "bytes_read": self.profiler.bytes_read,
                           "bytes_per_token": self.profiler.bytes_read / max(self.profiler.sweeps, 1)}
        if self.profiler.enabled:
            print(self.profiler.report(), file=sys.stderr, flush=True)
        return out

    def close(self):
        self._record_experts()
        self.streamer.close()

    def _record_experts(self):
        """Add the routing seen so far to the store's expert counts: later plans keep the experts the
        router chooses most often resident."""
        counts = self.streamer.expert_counts
        if counts:
            record_expert_counts(self.store, dict(counts))
            counts.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


_LIVE: "weakref.WeakSet[StreamedModel]" = weakref.WeakSet()


@atexit.register
def _close_all():
    """Stop loader threads before the interpreter tears torch down under them."""
    for m in list(_LIVE):
        m.close()


class AutoModel:
    """Drop-in for AirLLM's `AutoModel`: `AutoModel.from_pretrained(source, ...)`."""

    @staticmethod
    def from_pretrained(source=None, device="cpu", dtype=None, max_ram=None, max_gpu_memory=None, prefetch=True,
                        store_path=None, profiling=False, lookahead=2, verify="first", threads=None,
                        progress=True, io="auto", readers=None, in_place=None, compression=None,
                        **ignored) -> StreamedModel:
        """Open `source` (None: the embedded default model; a transformers directory; a .gguf file; a hub id;
        a layerstream store), splitting it into a store once, and return a streaming model.

        max_ram / max_gpu_memory: bytes or strings like "2GB" bounding the weights kept resident between
        sweeps and the buffers in flight (0: nothing resident); default: what is free, with a margin.
        compression: "int8" / "int4" (AirLLM's "8bit" / "4bit"): a block-wise quantized store."""
        for k in ignored:
            if k not in ("layer_shards_saving_path", "hf_token", "delete_original"):
                raise TypeError(f"from_pretrained() got an unexpected keyword argument {k!r}")
        parse_size(max_ram, "max_ram")
        parse_size(max_gpu_memory, "max_gpu_memory")
        path = resolve(source, store_path=store_path or ignored.get("layer_shards_saving_path"),
                       dtype=parse_dtype(dtype), progress=progress, in_place=in_place, quantize=compression)
        return StreamedModel(path, device=device, dtype=dtype, max_ram=max_ram, max_gpu_memory=max_gpu_memory,
                             prefetch=prefetch, lookahead=lookahead, profiling=profiling, verify=verify,
                             threads=threads, progress=progress, io=io, readers=readers)
