"""`layerstream` command line: a thin layer over the library API.

Errors a user can act on print as one line (no traceback) and exit with status 1; bad usage exits 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def say(msg: str) -> None:
    print(f"[layerstream] {msg}", file=sys.stderr, flush=True)


def _model_args(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--io", default="auto", choices=["auto", "buffered", "direct", "fadvise"],
                   help="direct = O_DIRECT reads (models larger than RAM); auto picks (default)")
    p.add_argument("--quantize", default=None, choices=["int8", "int4"],
                   help="use a block-wise quantized store (made once from --model)")
    p.add_argument("--copy", action="store_true",
                   help="split a safetensors model into a store of its own instead of serving it in place")
    p.add_argument("--verbose", "-v", action="store_true", help="print the residency plan")


def _gen_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", "-n", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)


def _gen_kwargs(a) -> dict:
    kw = {"max_new_tokens": a.max_new_tokens}
    if a.temperature and a.temperature > 0:
        kw.update(do_sample=True, temperature=a.temperature)
        if a.top_p is not None:
            kw["top_p"] = a.top_p
    else:
        kw["do_sample"] = False
    if a.seed is not None:
        import torch

        torch.manual_seed(a.seed)
    return kw


def _load(a):
    say("importing torch and transformers …")
    t0 = time.perf_counter()
    from .model import AutoModel
    say(f"imported in {time.perf_counter() - t0:.1f} s; opening {a.model or 'the embedded SmolLM2-135M-Instruct'}")
    m = AutoModel.from_pretrained(a.model, device=a.device, dtype=a.dtype, max_ram=a.max_ram,
                                  max_gpu_memory=a.max_gpu_memory, prefetch=not a.no_prefetch,
                                  store_path=a.store, profiling=a.profile, lookahead=a.lookahead, threads=a.threads,
                                  io=a.io, in_place=False if a.copy else None, compression=a.quantize)
    if a.verbose:
        if m.plan.bytes_per_sweep:
            from .plan import measure_read_bandwidth

            say("measuring the store's read bandwidth (O_DIRECT, 4 readers, ~2 s) for the plan …")
            m.plan.bandwidth = measure_read_bandwidth(m.store)
        print(m.plan.describe(), file=sys.stderr, flush=True)
    say(f"ready: {len(m.plan.streamed)} units streamed per sweep, "
        f"{sum(1 for u in m.plan.units if u.tier != 'disk')} resident; first sweep …")
    return m


def _stats(m) -> str:
    from .utils import fmt_bytes, peak_rss

    s = m.last_stats
    return (f"{s['new_tokens']} tokens in {s['seconds']:.2f} s, {s['tokens_per_s']:.2f} tok/s, "
            f"{fmt_bytes(s['bytes_per_token'])} read per token, peak RSS {fmt_bytes(peak_rss())}")


def _tokenizer(m):
    from .errors import InputError

    tok = m.tokenizer
    if tok is None or not len(tok("x")["input_ids"]):
        raise InputError(f"{m.store.path} has no usable tokenizer, so text cannot become token ids: copy the "
                         f"model's tokenizer files into the store, or call generate() with token ids")
    return tok


def cmd_run(a) -> int:
    from .errors import InputError

    prompt = a.prompt if a.prompt is not None else "Write a short poem about the sea."
    if not prompt.strip():
        raise InputError("the prompt is empty")
    if a.max_new_tokens <= 0:
        raise InputError(f"--max-new-tokens must be positive, got {a.max_new_tokens}")
    m = _load(a)
    from transformers import TextStreamer

    tok = _tokenizer(m)
    if not a.raw and getattr(tok, "chat_template", None):
        enc = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt")
    else:
        enc = tok(prompt, return_tensors="pt")
    m.generate(enc, streamer=TextStreamer(tok, skip_prompt=True, skip_special_tokens=True), **_gen_kwargs(a))
    print(flush=True)
    say(_stats(m))
    return 0


def cmd_chat(a) -> int:
    from transformers import TextStreamer

    from .chat import ChatSession
    from .errors import InputError

    m = _load(a)
    _tokenizer(m)
    chat = ChatSession(m, system=a.system)
    interactive = sys.stdin.isatty()
    say("chat: type a message; /reset clears the history, /exit or Ctrl-D quits")
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        line = line.strip()
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            chat.reset()
            continue
        if not line:
            continue
        try:
            chat.send(line, streamer=TextStreamer(m.tokenizer, skip_prompt=True, skip_special_tokens=True),
                      **_gen_kwargs(a))
        except InputError as e:
            say(f"error: {e}")
            continue
        print(flush=True)
        say(_stats(m) + f"; prefilled {chat.last_prefill} new tokens")
    return 0


def cmd_split(a) -> int:
    say("importing torch and transformers …")
    from .model import parse_dtype
    from .split import index_in_place, open_source, split

    if a.in_place:
        out = index_in_place(open_source(a.source), a.out)
    else:
        out = split(a.source, a.out, dtype=parse_dtype(a.dtype), quantize=a.quantize)
    say(f"store ready: {out}")
    return 0


def cmd_info(a) -> int:
    from .store import Store
    from .utils import fmt_bytes

    s = Store(a.store)
    m = s.manifest
    print(f"store      {s.path}\narchitecture {m.architecture} ({m.model_type})\ndtype      {m.dtype}"
          f"\nquantization {m.quantization or 'none'}\nsource     {m.source.get('kind')}: {m.source.get('path')}"
          f"\nunits      {len(m.units)} ({sum(u.kind == 'layer' for u in m.units)} layers)"
          f"\nsize       {fmt_bytes(m.total_bytes)}\ntied       {', '.join(f'{k} = {v}' for k, v in m.tied.items()) or 'none'}")
    return 0


def cmd_verify(a) -> int:
    from tqdm import tqdm

    from .store import Store

    s = Store(a.store)
    with tqdm(total=s.manifest.total_bytes, unit="B", unit_scale=True, desc="verify", file=sys.stderr) as bar:
        problems = s.verify(progress=bar.update)
    if problems:
        for p in problems:
            print(f"damaged: {p}", file=sys.stderr)
        say(f"{len(problems)} damaged unit file(s): split the model again into a new directory "
            f"(`layerstream split SRC OUT`)")
        return 1
    say(f"ok: {len(s.manifest.units)} units match their sha256 checksums")
    return 0


def cmd_plan(a) -> int:
    say("importing torch and transformers …")
    from .model import choose_direct_io
    from .plan import make_plan, measure_read_bandwidth
    from .split import resolve
    from .store import Store
    from .utils import parse_size

    store = Store(resolve(a.source, store_path=a.store))
    plan = make_plan(store, a.device.split(":")[0], parse_size(a.max_ram, "--max-ram"),
                     parse_size(a.max_gpu_memory, "--max-gpu-memory"), a.lookahead)
    if not choose_direct_io("auto", plan):
        plan.notes.append("streamed units fit in the page cache: read through it (io auto)")
    else:
        plan.notes.append("streamed units do not fit in the page cache: O_DIRECT reads (io auto)")
    if plan.bytes_per_sweep and not a.no_measure:
        say("measuring the read bandwidth of the store (O_DIRECT, 4 readers, ~2 s) …")
        plan.bandwidth = measure_read_bandwidth(store)
    print(plan.describe())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="layerstream", description="Run language models larger than memory.")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="generate from a prompt, streaming tokens")
    r.add_argument("prompt", nargs="?", default=None)
    r.add_argument("--raw", action="store_true", help="do not wrap the prompt in the chat template")
    _model_args(r)
    _gen_args(r)
    c = sub.add_parser("chat", help="interactive chat that keeps the KV cache between turns")
    c.add_argument("--system", default=None, help="system prompt")
    _model_args(c)
    _gen_args(c)
    s = sub.add_parser("split", help="split a model into a layer store")
    s.add_argument("source")
    s.add_argument("out")
    s.add_argument("--dtype", default=None)
    s.add_argument("--quantize", default=None, choices=["int8", "int4"],
                   help="block-wise quantized linear weights (int4: GGUF Q4_1 blocks kept exactly)")
    s.add_argument("--in-place", action="store_true",
                   help="no copy: index a safetensors checkpoint's own shards (the store holds the manifest only)")
    i = sub.add_parser("info", help="describe a store")
    i.add_argument("store")
    v = sub.add_parser("verify", help="check every unit file of a store against its sha256")
    v.add_argument("store")
    pl = sub.add_parser("plan", help="print the residency plan for budgets")
    pl.add_argument("source", nargs="?", default=None)
    pl.add_argument("--store", default=None)
    pl.add_argument("--device", default="cpu")
    pl.add_argument("--max-ram", default=None)
    pl.add_argument("--max-gpu-memory", default=None)
    pl.add_argument("--lookahead", type=int, default=2)
    pl.add_argument("--no-measure", action="store_true", help="skip the read-bandwidth measurement")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from .errors import LayerstreamError

    try:
        return {"run": cmd_run, "chat": cmd_chat, "split": cmd_split, "info": cmd_info, "verify": cmd_verify,
                "plan": cmd_plan}[a.cmd](a)
    except LayerstreamError as e:
        print(f"layerstream: error: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("layerstream: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
