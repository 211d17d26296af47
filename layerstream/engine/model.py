"""The library API: `AutoModel.from_pretrained(...)` -> a model whose `generate` is transformers' own."""

from __future__ import annotations

import sys
import time
import weakref
from contextlib import contextmanager, nullcontext

import torch

from ..arch import build_skeleton, layout
from ..errors import InputError, LayerstreamError
from ..options import Options
from ..plan import choose_io, make_plan, record_expert_counts
from ..quant.kernels import threads as kernel_threads
from ..runtime import Profiler, Streamer
from ..runtime.streamer import block_weights
from ..store import Store, resolve
from ..utils import cores, idle_cores, log
from .step import growing_cache

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


_TORCH_THREADS = torch.get_num_threads()   # torch's own default, before any model changes it


def compute_threads(threads, streaming: bool, direct: bool = False, idle: float | None = None) -> int:
    """torch's compute threads for a model. While streaming through the page cache with copies (io="buffered"),
    one core is left to the loader thread, whose reads are memory copies: on a 2-core machine, 1 compute + 1 I/O
    thread measured faster than 2 compute threads competing with the loader (docs/design.md, "Threads"). O_DIRECT
    reads cost the CPU little (the disk writes into our buffers), so compute keeps every core. An explicit
    `threads` wins.
    `idle` (cores idle at start, `utils.idle_cores`) caps the default: threads that wait for each other at every
    matmul collapse when one of them shares its core with another busy process (6-11x slower measured with one
    other job on 2 cores), so layerstream takes only the cores that are free.
    Each model applies its own count around its own calls (`StreamedModel.running`)."""
    if threads:
        return int(threads)
    n = max(1, _TORCH_THREADS - 1) if streaming and not direct else _TORCH_THREADS
    if idle is not None:
        n = max(1, min(n, int(idle + 0.5)))
    return n


def threads_note(n: int, threads, idle: float | None) -> str:
    """The plan's line on the compute threads and why."""
    if threads:
        return f"compute threads: {n} (--threads)"
    return (f"compute threads: {n} ({idle:.1f} of {cores()} cores idle at start; other busy processes get their "
            f"cores; --threads N to choose)" if idle is not None else f"compute threads: {n}")


def use_kernels(kernels, device: torch.device, store: Store) -> bool:
    """Whether a quantized store's linear layers compute on their blocks with ggml (quant/kernels.py): on a CPU,
    when ggml-python is installed, unless `kernels=False`. Without it, once per process, a line says that the
    weights are dequantized instead (slower) and how to get the kernels; `kernels=True` then is an error."""
    from ..quant import kernels as k

    if kernels is False or device.type != "cpu" or not store.manifest.quantization:
        return False
    if k.available():
        return True
    why = (f"ggml's kernels are not available ({k.unavailable_reason()}): quantized weights are dequantized to "
           f"floats instead, several times slower on a CPU; ./install.sh builds them "
           f"(pip install ggml-python==0.0.45 with CMAKE_ARGS={k.CMAKE_ARGS!r})")
    if kernels:
        raise InputError(why)
    if not _warned:
        _warned.append(1)
        log(why)
    return False


_warned: list = []


class StreamedModel:
    """A transformers causal LM whose weights stream from a layerstream store as the forward pass
    reaches them. `generate` and `__call__` are transformers' own (KV cache, sampling, streamers)."""

    def __init__(self, store_path, options: Options | None = None, **kwargs):
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig

        opts = self.options = options if options is not None else Options.from_kwargs(kwargs)
        # the cores free for compute, measured before this model's own loading keeps them busy
        idle = None if opts.threads else idle_cores()
        self.store = store_path if isinstance(store_path, Store) else Store(store_path)   # or a view of one
        self.store.check_files()
        self.device = parse_device(opts.device)
        self.dtype = parse_dtype(opts.dtype) or getattr(torch, self.store.manifest.dtype)
        self.config = AutoConfig.from_pretrained(self.store.path)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.store.path)
        except (OSError, ValueError, TypeError, ImportError):   # ImportError: a tokenizer needing a missing package
            log("no usable tokenizer in the store: pass token ids to generate")
            self.tokenizer = None
        self.model = build_skeleton(self.config, self.dtype, self.device)
        try:
            self.model.generation_config = GenerationConfig.from_pretrained(self.store.path)
        except OSError:
            pass
        self.layout = layout(self.model)
        self.store.check_units(self.layout)   # every unit of the model in the manifest (`verify` checks the same)
        blocks = set(block_weights(self.model, self.store)) if use_kernels(opts.kernels, self.device, self.store) \
            else set()
        if opts.expert_device == "cpu":   # experts run by their CPU twins, which dequantize them (runtime/experts.py)
            blocks -= {u.name for u in self.layout.units if u.kind == "expert"}
        # without ggml: int4 units computed on their blocks by torch's int4 kernel (bfloat16 only)
        packed = self.device.type == "cpu" and self.dtype == torch.bfloat16
        self.plan = make_plan(self.store, self.device.type, opts.ram_bytes, opts.gpu_bytes, opts.lookahead, packed,
                              expert_device=opts.expert_device, blocks=blocks)
        # torch computes some MoE experts (dequantized) itself: it then keeps its threads beside ggml's (`running`)
        self._torch_experts = any(u.kind == "expert" and u.name not in self.plan.blocks for u in self.plan.units)
        self.profiler = Profiler(opts.profiling)
        resident = sum(u.bytes for u in self.plan.units if u.tier != "disk")
        bar = None
        if opts.progress and resident:
            from tqdm import tqdm
            bar = tqdm(total=resident, unit="B", unit_scale=True, desc="loading resident units", file=sys.stderr,
                       leave=False)
        self.direct, self.plan.cached = choose_io(opts.io, self.plan)
        self.fadvise = opts.io == "fadvise"
        # a CPU's cores compute (one reader: a page-cache read is a memory copy); an accelerator's are free to
        # fill its pinned staging buffers in parallel (one reader copied 5.4 GB/s out of the page cache on an H200 box)
        readers = opts.readers or (4 if self.direct or self.fadvise else
                                   1 if self.device.type == "cpu" else min(8, cores()))
        self.streamer = Streamer(self.model, self.layout, self.store, self.plan, self.device, self.dtype,
                                 opts.prefetch, self.profiler, opts.verify, progress=bar.update if bar else None,
                                 direct=self.direct, readers=readers, fadvise=self.fadvise,
                                 mapped=self.device.type == "cpu" and opts.io in ("auto", "mmap"),
                                 repack=opts.repack)
        if bar:
            bar.close()
        self.lora = self.adapter = None   # LoRA adapters on the linear layers (runtime/lora.py), resident
        if opts.adapter or opts.lora:
            from ..runtime.lora import attach_adapters

            self.lora = attach_adapters(self.model, self.dtype, self.device, opts.adapter, opts.lora)
            if self.lora.default is not None:
                self.adapter = list(self.lora.adapters.values())[self.lora.default]
            self.plan.notes += [a.describe() for a in self.lora.adapters.values()]
        # after the resident load: units computed on packed weights need no streaming
        # mapped units cost the loader no copy: like O_DIRECT reads, they leave every core to the compute
        self.threads = compute_threads(opts.threads, streaming=bool(self.plan.streamed) and opts.prefetch,
                                       direct=self.direct or self.streamer.reader.mapped, idle=idle)
        self.plan.notes.append(threads_note(self.threads, opts.threads, idle))
        self.last_stats: dict = {}
        self.draft = None   # a resident model that drafts tokens for this one (speculative decoding)
        # loader threads stop before the interpreter tears torch down under them (at exit, or when collected)
        self._finalizer = weakref.finalize(self, _close, self.streamer, self.store)

    @contextmanager
    def running(self):
        """This model's compute threads and inference mode around a call (torch's thread count is process-wide:
        each model applies its own while it runs)."""
        before = torch.get_num_threads()
        if before != self.threads:
            torch.set_num_threads(self.threads)
        try:
            # ggml's matmuls on the blocks: torch keeps one thread, unless it computes a MoE model's experts
            with torch.inference_mode(), (kernel_threads(self.threads, self.threads if self._torch_experts else 1)
                                          if self.plan.blocks else nullcontext()):
                yield
        finally:
            if before != self.threads:
                torch.set_num_threads(before)

    # transformers-like surface
    @property
    def generation_config(self):
        return self.model.generation_config

    def __call__(self, *args, **kwargs):
        with self.running():
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
        if self.draft is not None and input_ids.shape[0] == 1 and "assistant_model" not in kwargs \
                and "prompt_lookup_num_tokens" not in kwargs:
            kwargs["assistant_model"] = self.draft.model
        if isinstance(kwargs.get("assistant_model"), StreamedModel):
            kwargs["assistant_model"] = kwargs["assistant_model"].model
        speculative = "assistant_model" in kwargs or "prompt_lookup_num_tokens" in kwargs
        if kwargs.get("cache") is None and kwargs.get("past_key_values") is None and kwargs.get("use_cache", True) \
                and kwargs.get("cache_implementation") is None and self._takes_a_cache():
            kwargs["cache"] = growing_cache(self.model)   # (transformers' DynamicCache, written in place)
        self.profiler.reset()
        t0 = time.perf_counter()
        with self.running():
            out = self.model.generate(input_ids, **kwargs)
        dt = time.perf_counter() - t0
        self._record_experts()
        seq = out.sequences if hasattr(out, "sequences") else out
        new = seq.shape[-1] - input_ids.shape[-1]
        self.last_stats = {"new_tokens": int(new), "seconds": dt, "tokens_per_s": new / dt if dt else 0.0,
                           "sweeps": self.profiler.sweeps, "bytes_read": self.profiler.bytes_read,
                           "bytes_per_token": self.profiler.bytes_read / max(self.profiler.sweeps, 1)}
        if speculative:
            from .speculative import speculative_stats

            self.last_stats.update(speculative_stats(self.profiler, int(new), input_ids.shape[-1]))
        if self.profiler.enabled:
            print(self.profiler.report(), file=sys.stderr, flush=True)
        return out

    def _takes_a_cache(self) -> bool:
        """Whether `generate` would make this model a DynamicCache (its forward takes one; not a family with a cache
        of its own, nor a generation config naming another kind)."""
        import inspect

        return ("cache" in inspect.signature(self.model.forward).parameters
                and self.model._supports_default_dynamic_cache() and not self.config.is_encoder_decoder
                and getattr(self.model.generation_config, "cache_implementation", None) is None)

    def close(self):
        """Stop the loader threads and record the routing seen (idempotent); the draft's too."""
        self._finalizer()
        if self.draft is not None:
            self.draft.close()

    def _record_experts(self):
        _record_routing(self.streamer, self.store)


def _record_routing(streamer, store):
    """Add the routing seen so far to the store's expert counts: later plans keep the experts the router
    chooses most often resident."""
    counts = streamer.expert_counts
    if counts:
        record_expert_counts(store, dict(counts))
        counts.clear()


def _close(streamer, store):
    _record_routing(streamer, store)
    streamer.close()


def open_streamed(source, opts: Options) -> StreamedModel:
    """`source` (see layerstream.api.AutoModel) as a StreamedModel in this process, with its draft model if
    `opts.draft`: what `AutoModel.from_pretrained` returns when the model is not split over a Ray pipeline."""
    path = resolve(source, store_path=opts.store_path, dtype=parse_dtype(opts.dtype), progress=opts.progress,
                   in_place=opts.in_place, quantize=opts.compression)
    if not opts.draft:
        return StreamedModel(path, opts)
    from .speculative import draft_bytes, open_draft

    draft = open_draft(source, opts.draft, opts)
    size = draft_bytes(draft)
    target = opts
    if opts.ram_bytes is not None and opts.device == "cpu":   # the draft comes out of the same budget
        target = opts.replace(max_ram=max(0, opts.ram_bytes - size))
    elif opts.gpu_bytes is not None and opts.device != "cpu":
        target = opts.replace(max_gpu_memory=max(0, opts.gpu_bytes - size))
    m = StreamedModel(path, target)
    m.draft = draft
    m.plan.notes.append(f"draft model ({opts.draft}) resident: {size} bytes of the budget")
    return m
