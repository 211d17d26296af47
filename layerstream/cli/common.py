"""What the commands that run a model share: model and generation arguments, loading, the stats line."""

from __future__ import annotations

import argparse
import os
import sys
import time

from ..utils import log


def model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None,
                   help="transformers directory, .gguf file, hub id or store (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--store", default=None, help="where to put the store made from --model (default: the cache)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (default cpu)")
    p.add_argument("--dtype", default=None, help="compute dtype: float32, bfloat16, float16 (default: the store's)")
    p.add_argument("--max-ram", default=None, help="host RAM for resident weights, e.g. 2GB; 0 = stream everything")
    p.add_argument("--max-gpu-memory", default=None, help="GPU memory for resident weights, e.g. 4GB")
    p.add_argument("--lookahead", type=int, default=2, help="units read ahead of the compute (default 2)")
    p.add_argument("--no-prefetch", action="store_true", help="read each unit when it is needed")
    p.add_argument("--threads", type=int, default=None, help="torch compute threads (default: chosen by layerstream)")
    p.add_argument("--profile", action="store_true", help="print per-unit I/O, copy and compute times")
    p.add_argument("--io", default="auto", choices=["auto", "buffered", "direct", "fadvise", "mmap"],
                   help="direct = O_DIRECT reads (models larger than RAM); mmap = units the page cache holds taken "
                        "as views of the mapped file, no copy; buffered = copied; auto picks (default: direct "
                        "when larger than RAM, else mmap)")
    p.add_argument("--quantize", default=None, choices=["int8", "int4"],
                   help="use a block-wise quantized store (made once from --model)")
    p.add_argument("--copy", action="store_true",
                   help="split a safetensors or GGUF model into a store of its own (float weights) instead of "
                        "serving it in place")
    p.add_argument("--draft", default=None, metavar="int4|PATH",
                   help="speculative decoding: a resident int4 copy of the model (or another model) drafts tokens")
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="a PEFT LoRA adapter directory (adapter_config.json, adapter_model.safetensors), kept resident")
    p.add_argument("--lora", action="append", default=[], metavar="NAME=DIR",
                   help="another LoRA adapter, chosen per request by its NAME (the `model` of an OpenAI request); "
                        "repeatable")
    p.add_argument("--no-kernels", action="store_true",
                   help="dequantize quantized weights to floats instead of computing on their blocks with ggml "
                        "(the reference path; slower on a CPU)")
    p.add_argument("--no-repack", action="store_true",
                   help="compute on resident Q4_0 / Q4_K blocks as they are stored, not repacked for ggml's faster "
                        "kernels (results then equal the streamed path's bit for bit)")
    p.add_argument("--expert-device", default=None, choices=["cpu"],
                   help="a MoE model on a GPU: its experts stay in RAM and the CPU computes them")
    p.add_argument("--verbose", "-v", action="store_true", help="print the residency plan")


def gen_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", "-n", type=int, default=128, help="most tokens to generate (default 128)")
    p.add_argument("--temperature", "-t", type=float, default=None,
                   help="sampling temperature; 0 = greedy (default: the model's generation_config, else 0.8)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: keep the most likely tokens "
                                                              "whose probabilities sum to P (default 0.95)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the K most likely tokens; 0 = all "
                                                            "(default 40)")
    p.add_argument("--min-p", type=float, default=None, help="drop tokens less likely than P x the most likely "
                                                              "one (default 0.05)")
    p.add_argument("--repeat-penalty", type=float, default=None,
                   help="divide the scores of tokens already seen by this; 1 = off (default 1.1 when sampling)")
    p.add_argument("--greedy", action="store_true",
                   help="always the most likely token, no penalty: exact and reproducible (same as -t 0)")
    p.add_argument("--seed", type=int, default=None, help="seed the sampling, for reproducible samples")
    p.add_argument("--prompt-lookup", type=int, default=None, metavar="N",
                   help="speculative decoding from the prompt itself: up to N tokens copied from it per sweep")


def pipeline_args(p: argparse.ArgumentParser, ray: bool = True) -> None:
    p.add_argument("--pipeline", type=int, default=None, metavar="N",
                   help="split the layers over N Ray actors (on as many nodes as the cluster has), each with the "
                        "--max-ram / --max-gpu-memory budget (one GPU each on CUDA)")
    p.add_argument("--pipeline-cpus", type=float, default=1, help="with --pipeline: CPUs per stage (default 1)")
    if ray:
        p.add_argument("--ray", default=None, metavar="ADDRESS",
                       help="with --pipeline: the Ray cluster (default: RAY_ADDRESS, else a new local Ray)")


def check_sampling_args(a) -> None:
    """`run` / `chat`'s sampling options in range, before the model loads."""
    import math

    from ..errors import InputError

    for flag, v, ok in (("--temperature", a.temperature, lambda v: v >= 0),
                        ("--top-p", a.top_p, lambda v: 0 < v <= 1), ("--top-k", a.top_k, lambda v: v >= 0),
                        ("--min-p", a.min_p, lambda v: 0 <= v < 1),
                        ("--repeat-penalty", a.repeat_penalty, lambda v: v > 0)):
        if v is not None and not (math.isfinite(v) and ok(v)):
            raise InputError(f"{flag} {v} is out of range")


def sampling_of(a, model):
    """The sampling settings of `run` / `chat`: the model's defaults (`layerstream.sampling`) with the options
    given."""
    from ..sampling import choose, model_defaults

    check_sampling_args(a)
    return choose(model_defaults(getattr(model, "generation_config", None)), a.temperature, a.top_p, a.top_k,
                  a.min_p, a.repeat_penalty, greedy=a.greedy)


def gen_kwargs(a, model) -> dict:
    """transformers' `generate` arguments for `run` / `chat`."""
    s = sampling_of(a, model)
    kw = {"max_new_tokens": a.max_new_tokens, **s.generate_kwargs()}
    if not getattr(a, "_said_sampling", False):
        log(f"sampling: {s.describe()}" + ("" if s.greedy else "; --greedy for exact, reproducible answers"))
        a._said_sampling = True
    if getattr(a, "prompt_lookup", None):
        kw["prompt_lookup_num_tokens"] = a.prompt_lookup
    if a.seed is not None:
        import torch

        torch.manual_seed(a.seed)
    return kw


def import_stack() -> None:
    """Import torch, transformers and the engine, saying so (seconds on a cold start); once per process."""
    if "layerstream.engine.model" in sys.modules:
        return
    log("importing torch and transformers …")
    t0 = time.perf_counter()
    import layerstream.engine.model  # noqa: F401
    log(f"imported in {time.perf_counter() - t0:.1f} s")


def load_model(a):
    import_stack()
    from ..api import AutoModel

    log(f"opening {a.model or 'the embedded SmolLM2-135M-Instruct'}")
    if getattr(a, "ray", None) and getattr(a, "pipeline", None):
        os.environ["RAY_ADDRESS"] = a.ray
    m = AutoModel.from_pretrained(a.model, options_of(a))
    if getattr(m, "stages", None) is not None:   # a pipeline: its stages said what they hold
        log(m.describe())
        return m
    if a.verbose:
        if m.plan.bytes_per_sweep:
            from ..plan import measure_read_bandwidth

            log("measuring the store's read bandwidth (O_DIRECT, 4 readers, ~2 s) for the plan …")
            m.plan.bandwidth = measure_read_bandwidth(m.store)
        print(m.plan.describe(), file=sys.stderr, flush=True)
    log(f"ready: {len(m.plan.streamed)} units streamed per sweep, "
        f"{sum(1 for u in m.plan.units if u.tier != 'disk')} resident; first sweep …")
    return m


def stats_line(m) -> str:
    from ..utils import fmt_bytes, peak_rss

    s = m.last_stats
    return (f"{s['new_tokens']} tokens in {s['seconds']:.2f} s, {s['tokens_per_s']:.2f} tok/s, "
            f"{fmt_bytes(s['bytes_per_token'])} read per sweep, peak RSS {fmt_bytes(peak_rss())}"
            + (f"; speculative: {s['sweeps']} sweeps, {s['tokens_per_sweep']:.2f} tokens per sweep, "
               f"{s['accepted']}/{s['drafted']} drafted tokens accepted" if "drafted" in s else ""))


def tokenizer_of(m):
    from ..errors import InputError

    tok = m.tokenizer
    if tok is None or not len(tok("x")["input_ids"]):
        raise InputError(f"{m.store.path} has no usable tokenizer, so text cannot become token ids: copy the "
                         f"model's tokenizer files into the store, or call generate() with token ids")
    return tok




def options_of(a):
    """The `Options` a command's model arguments describe (built once, as the API builds them)."""
    from ..options import Options

    return Options(device=a.device, dtype=a.dtype, max_ram=a.max_ram, max_gpu_memory=a.max_gpu_memory,
                   prefetch=not a.no_prefetch, store_path=a.store, profiling=a.profile, lookahead=a.lookahead,
                   threads=a.threads, io=a.io, in_place=False if a.copy else None, compression=a.quantize,
                   draft=getattr(a, "draft", None), pipeline=getattr(a, "pipeline", None),
                   pipeline_cpus=getattr(a, "pipeline_cpus", 1), expert_device=getattr(a, "expert_device", None),
                   adapter=getattr(a, "adapter", None), lora=lora_of(getattr(a, "lora", None)),
                   kernels=False if getattr(a, "no_kernels", False) else None,
                   repack=not getattr(a, "no_repack", False))


def lora_of(specs) -> dict | None:
    """{name: directory} from --lora NAME=DIR arguments."""
    from ..errors import InputError

    out = {}
    for spec in specs or ():
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise InputError(f"--lora takes NAME=DIR, got {spec!r}")
        if name in out:
            raise InputError(f"--lora {name}= is given twice")
        out[name] = path
    return out or None
