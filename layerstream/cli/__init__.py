"""`layerstream` command line: a thin layer over the library API, one module per group of subcommands.

Errors a user can act on print as one line (no traceback) and exit with status 1; bad usage exits 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from .batch import batch_args, cmd_batch
from .common import gen_args, model_args, pipeline_args
from .generate import cmd_chat, cmd_run
from .plan import cmd_plan
from .serve import cmd_serve, serve_args
from .store import cmd_info, cmd_split, cmd_verify


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    p = argparse.ArgumentParser(prog="layerstream", description="Run language models larger than memory.")
    p.add_argument("--version", action="version", version=f"layerstream {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="generate from a prompt, streaming tokens")
    r.add_argument("prompt", nargs="?", default=None,
                   help="the prompt ('-': standard input); default: what is piped in, else a demo prompt")
    r.add_argument("-f", "--file", default=None, metavar="FILE", help="read the prompt from FILE ('-': stdin)")
    r.add_argument("--raw", action="store_true", help="do not wrap the prompt in the chat template")
    model_args(r)
    gen_args(r)
    pipeline_args(r)
    c = sub.add_parser("chat", help="interactive chat that keeps the KV cache between turns")
    c.add_argument("--system", default=None, help="system prompt")
    model_args(c)
    gen_args(c)
    pipeline_args(c)
    b = sub.add_parser("batch", help="run a JSONL file of requests (OpenAI batch format); resumable")
    batch_args(b)
    model_args(b)
    pipeline_args(b, ray=False)   # batch's own --ray: replicas, or with --pipeline the pipeline's cluster
    sv = sub.add_parser("serve", help="an OpenAI-compatible server (and a chat page) on 127.0.0.1")
    serve_args(sv)
    model_args(sv)
    pipeline_args(sv)
    s = sub.add_parser("split", help="split a model into a layer store")
    s.add_argument("source", help="a model directory (safetensors), a .gguf file or a hub id")
    s.add_argument("out", help="the store's directory (made; an interrupted split resumes there)")
    s.add_argument("--dtype", default=None, help="the stored float dtype (default: the source's)")
    s.add_argument("--quantize", default=None, choices=["int8", "int4"],
                   help="block-wise quantized linear weights (int4: GGUF Q4_1 blocks kept exactly)")
    s.add_argument("--workers", type=int, default=None,
                   help="threads quantizing (default: one per core); the store is the same whatever the number")
    s.add_argument("--in-place", action="store_true",
                   help="no copy: index a safetensors checkpoint's own shards, or a GGUF's own blocks (the store "
                        "holds the manifest only)")
    i = sub.add_parser("info", help="describe a store")
    i.add_argument("store", help="a store's directory")
    v = sub.add_parser("verify", help="check every unit file of a store against its manifest (sizes, checksums)")
    v.add_argument("store", help="a store's directory")
    pl = sub.add_parser("plan", help="print the residency plan for budgets")
    pl.add_argument("source", nargs="?", default=None,
                    help="a store, model directory, .gguf file or hub id (default: the embedded model)")
    pl.add_argument("--store", default=None, help="where the store made from SOURCE goes (default: the cache)")
    pl.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    pl.add_argument("--max-ram", default=None, help="RAM budget, e.g. 8GB; 0 = nothing resident (default: free "
                                                     "RAM minus a margin)")
    pl.add_argument("--max-gpu-memory", default=None, help="accelerator budget, e.g. 4GB (default: free device "
                                                            "memory minus a margin)")
    pl.add_argument("--lookahead", type=int, default=2, help="units read ahead of the one computing")
    pl.add_argument("--no-measure", action="store_true", help="skip the read-bandwidth measurement")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from ..errors import LayerstreamError

    try:
        return {"run": cmd_run, "chat": cmd_chat, "split": cmd_split, "info": cmd_info, "verify": cmd_verify,
                "plan": cmd_plan, "batch": cmd_batch, "serve": cmd_serve}[a.cmd](a)
    except LayerstreamError as e:
        print(f"layerstream: error: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("layerstream: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
