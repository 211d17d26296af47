"""`layerstream batch IN.jsonl OUT.jsonl`: an offline job in the OpenAI batch format (layerstream.engine.batch)."""

from __future__ import annotations

from pathlib import Path

from ..utils import log
from .common import load_model, options_of


def batch_args(p) -> None:
    p.add_argument("input", help="requests, one JSON object a line (OpenAI batch format)")
    p.add_argument("output", help="responses, one a line in input order; OUTPUT.partial journals a running job")
    p.add_argument("--batch-size", type=int, default=8, help="most sequences per sweep (default 8)")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="spread the requests over replicas on a Ray cluster (ADDRESS, else RAY_ADDRESS, else a new "
                        "local Ray); with --pipeline N: the cluster the pipeline's stages run on")
    p.add_argument("--replicas", type=int, default=None,
                   help="with --ray: how many replicas, one engine each (default: one per node, or per GPU)")
    p.add_argument("--replica-cpus", type=int, default=None,
                   help="with --ray: CPUs per replica (default: a node's worth, shared when replicas outnumber nodes)")


def cmd_batch(a) -> int:
    from ..errors import InputError

    if a.batch_size < 1:
        raise InputError(f"--batch-size must be positive, got {a.batch_size}")
    for flag, value in (("--replicas", a.replicas), ("--replica-cpus", a.replica_cpus)):
        if value is not None and a.ray is None:
            raise InputError(f"{flag} needs --ray")
        if value is not None and a.pipeline is not None:
            raise InputError(f"{flag} is for replicas; with --pipeline N one engine runs over the N stages")
        if value is not None and value < 1:
            raise InputError(f"{flag} must be positive, got {value}")
    # before the model loads (run_batch checks them again): the input, the output's directory (exists, writable,
    # room for a few lines), OUT not a directory, OUT.tmp and OUT.partial not links
    if not Path(a.input).is_file():   # the commonest mistake, said before torch is imported
        raise InputError(f"{a.input}: no such input file")
    from ..engine.batch import check_paths

    check_paths(a.input, a.output)
    if a.ray is not None and a.pipeline is None:
        from ..ray import require, run_batch

        require()
        s = run_batch(a.model, a.input, a.output, options_of(a), replicas=a.replicas, batch_size=a.batch_size,
                      cpus=a.replica_cpus, address=a.ray or None)
    else:
        m = load_model(a)
        from ..engine.batch import run_batch

        s = run_batch(m, a.input, a.output, batch_size=a.batch_size)
    log(f"batch: {s['requests']} requests, {s['succeeded']} succeeded ({s['resumed']} resumed from an earlier run, "
        f"{s['ran']} run now), {s['failed']} failed; {s['completion_tokens']} tokens in {s['seconds']:.1f} s, "
        f"{s['tokens_per_s']:.2f} tok/s; wrote {s['output']}")
    return 0
