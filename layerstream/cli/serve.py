"""`layerstream serve`: the OpenAI-compatible server and chat page (layerstream.server)."""

from __future__ import annotations

from ..utils import log
from .common import load_model


def serve_args(p) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 requests")
    p.add_argument("--max-concurrency", type=int, default=8,
                   help="most sequences sharing one sweep (default 8); more requests wait in the queue")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests beyond which new ones get 429 "
                                                             "(default 64)")
    p.add_argument("--prefix-cache", default=None, metavar="SIZE",
                   help="KV memory kept for reuse by later requests with the same prefix (default: a quarter "
                        "of the KV budget, at most 8192 tokens; 0 = off)")
    p.add_argument("--served-model-name", default=None, help="the model id clients use (default: the model's name)")
    p.add_argument("--max-body-bytes", default=None, metavar="SIZE",
                   help="largest request body, refused with 413 as it streams in (default: 32 bytes per token of "
                        "the context plus 1 MiB)")
    p.add_argument("--read-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="a request's headers, and then its body, must arrive within this (default 30); a slower "
                        "connection is closed (headers) or gets 408 (body)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM or Ctrl-C, requests in flight get this long to finish (default 30); the rest "
                        "end with an error event (streams) or a 503")
    p.add_argument("--allowed-hosts", default=None, metavar="NAMES",
                   help="Host header names accepted besides localhost, the bound host and IP addresses (comma "
                        "list; '*' for any: e.g. behind a reverse proxy with its own name)")


def cmd_serve(a) -> int:
    from ..errors import InputError

    if a.max_concurrency < 1:
        raise InputError(f"--max-concurrency must be positive, got {a.max_concurrency}")
    if a.ray is not None and a.pipeline is None:
        raise InputError("--ray needs --pipeline N (the cluster the pipeline's stages run on)")
    if a.max_queue < 0:
        raise InputError(f"--max-queue must be 0 or more, got {a.max_queue}")
    if not 0 <= a.port < 65536:
        raise InputError(f"--port must be in 0..65535, got {a.port}")
    if a.api_key is not None and not a.api_key.strip():
        raise InputError("--api-key is empty: give a key (clients send it as 'Authorization: Bearer KEY'), or leave "
                         "the option out for a server without one")
    if not 0 < a.read_timeout < float("inf"):
        raise InputError(f"--read-timeout must be a positive number of seconds, got {a.read_timeout:g}")
    if not 0 <= a.shutdown_timeout < float("inf"):
        raise InputError(f"--shutdown-timeout must be 0 or more seconds, got {a.shutdown_timeout:g}")
    from ..utils import parse_size

    max_body = parse_size(a.max_body_bytes, "--max-body-bytes")
    if max_body == 0:
        raise InputError("--max-body-bytes must be positive, like '4MiB'")
    hosts = None if a.allowed_hosts is None else [h for h in a.allowed_hosts.split(",") if h.strip()]
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise InputError(f"serve needs fastapi and uvicorn, which layerstream depends on ({e}): reinstall it "
                         f"(pip install -e . in a checkout)") from None
    sock = bind(a.host, a.port)   # before the model loads: a busy port is said at once
    m = load_model(a)
    if not a.verbose and getattr(m, "plan", None) is not None:   # a server says what it keeps where (--verbose
        # printed it already, with the bandwidth; a pipeline's stages said what they hold)
        import sys

        print(m.plan.describe(), file=sys.stderr, flush=True)
    from ..engine.batch import default_model_name
    from ..engine.scheduler import Engine
    from ..server import serve
    from ..utils import fmt_bytes

    prefix = None if a.prefix_cache is None else parse_size(a.prefix_cache)
    engine = Engine(m, max_batch=a.max_concurrency, prefix_cache=prefix)
    name = a.served_model_name or default_model_name(m)
    kv = f"KV budget {fmt_bytes(engine.kv_budget)}" if engine.kv_budget is not None else "KV cache unbounded"
    log(f"engine: up to {a.max_concurrency} sequences per sweep, {kv}, prefix cache "
        f"{fmt_bytes(engine.prefix_budget) if engine.prefix_budget else 'off'}")
    if engine.draft is not None:
        log(f"speculative decoding: the draft proposes up to {engine.draft_tokens} tokens per greedy request while "
            f"at most {engine.draft_rows} run; one sweep verifies them")
    if a.host not in ("127.0.0.1", "localhost", "::1"):
        log(f"warning: binding {a.host}: other machines can reach this server"
            + ("" if a.api_key else " and it has no --api-key"))

    def ready(url):
        log(f"serving {name} at {url}/v1 (OpenAI API), chat page at {url}/ ; Ctrl-C or SIGTERM stops (requests in "
            f"flight get {a.shutdown_timeout:g} s to finish)")

    try:
        serve(engine, name, host=a.host, port=a.port, api_key=a.api_key, max_queue=a.max_queue, ready=ready,
              max_body_bytes=max_body, read_timeout=a.read_timeout, shutdown_timeout=a.shutdown_timeout,
              allowed_hosts=hosts, sock=sock)
    finally:
        engine.stop()
        m.close()
    log("stopped")
    return 0


def bind(host: str, port: int):
    """A socket bound to host:port for the server (uvicorn listens on it), or a one-line error: a port in use, an
    address this machine does not have."""
    import errno
    import socket

    from ..errors import InputError

    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise InputError(f"--host {host}: not an address or name this machine can resolve ({e.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as uvicorn does: a restart reuses the port
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise InputError(f"port {port} on {host} is in use (another server?): stop it, or choose another with "
                             f"--port (0: any free port)") from None
        if e.errno == errno.EACCES:
            raise InputError(f"port {port} on {host}: permission denied (ports below 1024 need privileges): choose "
                             f"another with --port") from None
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.set_inheritable(True)
    return sock
