"""The OpenAI-compatible server: FastAPI routes over one `Engine`, run by uvicorn.

(Over 400 lines: every route with its hardening, limits, timeouts, draining, disconnects, in one place.)

Every request becomes an engine request (`OpenAIRequests` parses bodies as batch jobs do), so concurrent
requests share sweeps. Streaming responses are server-sent events fed by the engine's thread through
`Handle.notify`; a client that goes away cancels its request, which frees its slot at the next step.
Errors have OpenAI's JSON shape: 400 (malformed JSON, wrong or unsupported field, prompt beyond the context,
a `Host` not allowed), 401 (key), 404 (model), 408 (body too slow), 413 (body too large), 415 (not JSON),
429 (queue full), 500 (anything unexpected, logged with its traceback), 503 (shutting down).

Limits: a body-size cap read as it streams in, a deadline for a request's headers (the connection's
protocol) and for its body (the route); JSON parsing, tokenizing and templating run on a worker thread, so
the event loop (and /health) stays responsive. Shutdown (SIGTERM, SIGINT) stops accepting connections,
lets requests in flight finish for a grace period, then ends each remaining stream with an error event and
`[DONE]` and answers each remaining non-streaming request with a 503.
"""


import asyncio
import contextlib
import ipaddress
import json
import logging
import secrets
import socket
import threading
import time
from html import escape
from importlib import resources

from ..errors import InputError
from ..protocol import BadLine, OpenAIRequests, short
from ..responses import completion_body, error_body, logprobs_body, usage
from ..utils import log
from .metrics import Metrics

ROUTES = {"/v1/chat/completions": "chat", "/v1/completions": "text"}
MiB = 1 << 20
BODY_BYTES_PER_TOKEN = 32      # the default body cap: this many bytes per token of the context, plus 1 MiB
READ_TIMEOUT = 30.0            # seconds for a request's headers, and again for its body
SHUTDOWN_TIMEOUT = 30.0        # seconds requests in flight get to finish once shutdown begins
logger = logging.getLogger("uvicorn.error")


def default_max_body(context: int | None) -> int:
    """The default cap on a request body: 32 bytes per token of the context plus 1 MiB (16 MiB without one)."""
    return context * BODY_BYTES_PER_TOKEN + MiB if context else 16 * MiB


def json_response(body: dict, status: int, headers: dict | None = None):
    """A JSON response, ASCII-escaped: an error message that quotes a client's invalid string still encodes."""
    from starlette.responses import Response

    return Response(json.dumps(body).encode(), status_code=status, media_type="application/json", headers=headers)


class Drain:
    """Graceful shutdown's state: the requests in flight (their wake events), whether new ones are refused
    (`closing`) and whether the ones left are cut (`cutting`), and counts for the log."""

    def __init__(self):
        self.inflight: dict[str, asyncio.Event] = {}
        self.closing = self.cutting = False
        self.finished = self.cut = self.refused = 0

    def begin(self) -> int:
        self.closing = True
        return len(self.inflight)

    def cut_now(self) -> None:
        self.cutting = True
        for wake in list(self.inflight.values()):
            wake.set()

    def end(self, rid: str, cut: bool = False) -> None:
        if self.inflight.pop(rid, None) is not None and self.closing:
            if cut:
                self.cut += 1
            else:
                self.finished += 1


def host_check(host: str, allowed_hosts=None):
    """Whether a `Host` header may reach this server (DNS rebinding): an IP address always (rebinding needs a
    name), `localhost`, the bound host's name, this machine's names when bound to every address, and
    `allowed_hosts` (`*`: any). The port is not compared. A request without a Host (HTTP/1.0) passes."""
    names = {"localhost"} | {h.strip().lower().rstrip(".") for h in allowed_hosts or () if h.strip()}
    if "*" in names:
        return lambda value: True
    if host in ("", "0.0.0.0", "::"):
        names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
    elif not is_ip(host):
        names.add(host.lower())

    def ok(value: str | None) -> bool:
        if value is None:
            return True
        v = value.strip().lower()
        if v.startswith("["):
            name = v[1:v.find("]")] if "]" in v else v
        else:
            name, sep, port = v.rpartition(":")
            name = name if sep and port.isdigit() else v
        return is_ip(name) or name.rstrip(".") in names

    return ok


def is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


class HostCheck:
    """ASGI middleware: a request whose Host is not allowed gets a 400 in OpenAI's shape (every route)."""

    def __init__(self, app, ok):
        self.app, self.ok = app, ok

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), None)
            if not self.ok(host):
                r = json_response(error_body(f"the Host header {host!r} is not allowed here (a page on another "
                                             f"site may be reaching this server by DNS rebinding): use the "
                                             f"server's address, or start it with --allowed-hosts NAME",
                                             "invalid_host"), 400)
                await r(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(engine, name: str, api_key: str | None = None, max_queue: int = 64, max_body_bytes: int | None = None,
              read_timeout: float = READ_TIMEOUT, host: str = "127.0.0.1", allowed_hosts=None):
    """A FastAPI app serving `engine` (started and stopped with the app) under the model name `name`.
    `max_body_bytes`: the largest request body (default from the context, `default_max_body`); `read_timeout`:
    seconds a request body may take to arrive; `host`, `allowed_hosts`: the Host headers accepted (`host_check`)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect

    if api_key is not None and not api_key.strip():
        raise InputError("--api-key is empty: give a key (clients send it as 'Authorization: Bearer KEY'), or leave "
                         "the option out for a server without one")
    tok = engine.tokenizer
    parser = OpenAIRequests(engine, tok, name)
    parsing = threading.Lock()   # one request at a time through the tokenizer (on worker threads)
    created = int(time.time())
    metrics = Metrics(engine)
    max_body = default_max_body(engine.context) if max_body_bytes is None else max_body_bytes
    drain = Drain()

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="layerstream", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.metrics, app.state.drain = engine, metrics, drain
    app.add_middleware(HostCheck, ok=host_check(host, allowed_hosts))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):   # unknown routes, wrong methods
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return json_response(error_body(f"{request.method} {request.url.path}: {exc.detail}", code),
                             exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception):   # a bug: a 500 in OpenAI's shape (starlette logs it)
        return json_response(error_body(f"an unexpected error in the server (logged with its traceback): "
                                        f"{type(exc).__name__}: {short(str(exc), 200)}", "internal_error",
                                        type="server_error"), 500)

    def fail(status: int, message: str, code: str | None, param: str | None = None,
             type: str = "invalid_request_error", close: bool = False):
        return json_response(error_body(message, code, param, type), status,
                             headers={"Connection": "close"} if close else None)

    def unauthorized(request: Request):
        if api_key is None:
            return None
        scheme, _, got = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and secrets.compare_digest(got.strip().encode(), api_key.encode()):
            return None
        return fail(401, "a wrong or missing API key: send 'Authorization: Bearer KEY' with the key given to "
                         "--api-key", "invalid_api_key", type="authentication_error")

    @app.get("/health")
    async def health():
        now = engine.snapshot()
        state = {"status": "ok", "model": name, "waiting": now.waiting, "running": now.running}
        if drain.closing:
            return json_response({**state, "status": "shutting_down"}, 503)
        return state

    lora = getattr(engine.model, "lora", None)
    # the served model (with the default adapter, if any), then the adapters that requests choose by name
    chosen = [] if lora is None else [n for k, n in enumerate(lora.adapters) if k != lora.default]
    names = [name] + [n for n in chosen if n != name]

    @app.get("/v1/models")
    async def models(request: Request):
        if (r := unauthorized(request)) is not None:
            return r
        return {"object": "list", "data": [model_card(n) for n in names]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        if (r := unauthorized(request)) is not None:
            return r
        if model_id not in names:
            return fail(404, f"the model {model_id!r} does not exist here; this server serves "
                             f"{', '.join(map(repr, names))}", "model_not_found", "model")
        return model_card(model_id)

    def model_card(model_id: str):
        card = {"id": model_id, "object": "model", "created": created, "owned_by": "layerstream",
                "max_model_len": engine.context}
        if model_id != name:   # a LoRA adapter over the served model (vLLM says so the same way)
            card["parent"] = name
        return card

    @app.get("/metrics")
    async def prometheus(request: Request):
        if (r := unauthorized(request)) is not None:
            return r
        body, ctype = metrics.render()
        return Response(body, media_type=ctype)

    @app.get("/")
    async def page():
        html = resources.files(__package__).joinpath("chat.html").read_text(encoding="utf-8")
        return HTMLResponse(html.replace("{{MODEL}}", escape(name)))

    @app.get("/favicon.ico")
    async def favicon():
        return Response(status_code=204)

    async def read_body(request: Request):
        """The body, read as it streams in; or an error response: 413 past `max_body` (before reading it all),
        408 past `read_timeout`, None if the client went away."""
        size = request.headers.get("content-length", "")
        too_large = (413, f"the request body is larger than {max_body} bytes (--max-body-bytes): send a shorter "
                          f"prompt, or start the server with a larger --max-body-bytes", "request_too_large")
        if size.isdigit() and int(size) > max_body:
            return too_large
        buf = bytearray()

        async def read() -> bool:
            async for chunk in request.stream():
                buf.extend(chunk)
                if len(buf) > max_body:
                    return False
            return True

        try:
            if not await asyncio.wait_for(read(), read_timeout):
                return too_large
        except asyncio.TimeoutError:
            return (408, f"the request body did not arrive within {read_timeout:g} s (--read-timeout)",
                    "request_timeout")
        except ClientDisconnect:
            return None
        return bytes(buf)

    def parse(raw: bytes, kind: str):
        """(model asked for, stream, include_usage, prompt ids, sampling params) of a body, or BadLine (with its
        HTTP status). Runs on a worker thread: JSON parsing, templating and tokenizing keep off the event loop."""
        try:
            body = json.loads(raw)
        except RecursionError:
            raise BadLine("invalid_json", "the request body's JSON is nested too deeply", 400) from None
        except (UnicodeDecodeError, ValueError) as e:
            raise BadLine("invalid_json", f"the request body is not valid JSON: {e}", 400) from None
        if not isinstance(body, dict):
            raise BadLine("invalid_request", "the request body must be a JSON object", 400)
        want = body.get("model")
        if want is not None and not isinstance(want, str):
            raise BadLine("invalid_type", f"model must be a string, got {short(want)}", 400, "model")
        if want is not None and want not in names:
            raise BadLine("model_not_found", f"the model {want!r} does not exist here; this server serves "
                                             f"{', '.join(map(repr, names))} (GET /v1/models lists them)", 404,
                          "model")
        stream = body.get("stream")
        stream = False if stream is None else stream
        opts = body.get("stream_options")
        opts = {} if opts is None else opts
        if not isinstance(stream, bool):
            raise BadLine("invalid_type", f"stream must be true or false, got {short(stream)}", 400, "stream")
        if not isinstance(opts, dict) or not isinstance(opts.get("include_usage", False), bool):
            raise BadLine("invalid_type", "stream_options must be an object like {\"include_usage\": true}", 400,
                          "stream_options")
        req = {"kind": kind, "h": secrets.token_hex(8)}
        with parsing:
            prompt, params = parser.request({"body": body}, req)
        return want, stream, opts.get("include_usage", False), prompt, params, req.get("tools")

    async def complete(request: Request, kind: str):
        t0 = time.perf_counter()
        route = "chat" if kind == "chat" else "completions"

        def refuse(status: int, *args, **kw):   # an error answer, counted in /metrics
            metrics.request(route, status)
            return fail(status, *args, **kw)

        if (r := unauthorized(request)) is not None:
            metrics.request(route, r.status_code)
            return r
        ctype = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if ctype != "application/json":
            return refuse(415, f"the request body must be JSON sent with 'Content-Type: application/json', got "
                               f"{short(ctype) if ctype else 'no Content-Type'}", "unsupported_media_type")
        if drain.closing:
            drain.refused += 1
            return refuse(503, "the server is shutting down: retry once it is back", "server_shutting_down",
                          type="server_error", close=True)
        raw = await read_body(request)
        if raw is None:
            metrics.request(route, 499)
            return Response(status_code=499)
        if isinstance(raw, tuple):
            return refuse(raw[0], raw[1], raw[2], close=True)
        try:
            want, stream, include_usage, prompt, params, tools = await asyncio.to_thread(parse, raw, kind)
        except BadLine as e:
            return refuse(e.status or 400, e.message, e.code, e.param)
        del raw
        waiting = engine.snapshot().waiting
        if waiting >= max_queue:
            return refuse(429, f"{waiting} requests are already waiting (--max-queue {max_queue}): "
                               f"retry later", "rate_limit_exceeded", type="rate_limit_error")
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{secrets.token_hex(12)}"
        try:
            handle = engine.submit(prompt, params, request_id=rid)
        except InputError as e:
            return refuse(400, str(e), "invalid_value")
        wake = waker(handle)
        drain.inflight[rid] = wake
        if stream:
            return StreamingResponse(sse(handle, wake, rid, kind, include_usage, route, t0, want or name, tools),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        cut = False
        try:
            while not handle.done:
                wake.clear()
                if handle.done:
                    break
                if drain.cutting:   # shutdown's grace period is over
                    engine.cancel(rid)
                    cut = True
                    return refuse(503, "the server shut down before this request finished (--shutdown-timeout): "
                                       "retry it once the server is back", "server_shutting_down",
                                  type="server_error", close=True)
                try:
                    await asyncio.wait_for(wake.wait(), 0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        engine.cancel(rid)
                        metrics.request(route, 499)
                        return Response(status_code=499)
                handle.drain()
        except BaseException:
            engine.cancel(rid)
            raise
        finally:
            drain.end(rid, cut)
        try:
            cs = handle.results()
        except Exception as e:   # the engine failed this request (reported, and the server goes on)
            return refuse(500, f"generation failed: {type(e).__name__}: {e}", "internal_error", type="server_error")
        metrics.finished(route, cs, time.perf_counter() - t0)
        return completion_body(kind, rid, want or name, int(time.time()), cs, tools)

    async def sse(handle, wake, rid, kind, include_usage, route, t0, model, tools=None):
        made = int(time.time())
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(delta_text=None, finish=None, role=False, lps=None, index=0, calls=None):
            lp = logprobs_body(kind, lps, sent[index]) if lps else None   # the logprobs of this chunk's tokens
            if lps:
                sent[index] += sum(len(e.token) for e in lps)
            if kind == "chat":
                delta = {}
                if role:
                    delta["role"] = "assistant"
                if delta_text is not None:
                    delta["content"] = delta_text
                if calls:   # each call whole, in one delta
                    delta["tool_calls"] = [{"index": k, **c} for k, c in enumerate(calls)]
                choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}
            else:
                choice = {"index": index, "text": delta_text or "", "logprobs": lp, "finish_reason": finish}
            out = {"id": rid, "object": obj, "created": made, "model": model, "choices": [choice]}
            if include_usage:
                out["usage"] = None
            return f"data: {json.dumps(out)}\n\n"

        def error(status, message, code):
            metrics.request(route, status)
            return f"data: {json.dumps(error_body(message, code, type='server_error'))}\n\n"

        done, cut, first = False, False, True
        n = len(handle.completions)
        sent = [0] * n   # each choice: characters of the tokens whose logprobs were sent (completions' text_offset)
        parsed = [tools.stream(i) for i in range(n)] if tools is not None else None   # chat replies' tool calls
        left = n         # choices not finished
        try:
            if kind == "chat":
                for i in range(n):
                    yield chunk("", role=True, index=i)
            while not done:
                wake.clear()
                items = handle.drain()
                if not items:
                    if drain.cutting:   # shutdown's grace period is over: an error event, then [DONE]
                        engine.cancel(rid)
                        yield error(503, "the server shut down before this request finished "
                                         "(--shutdown-timeout): retry it once the server is back",
                                    "server_shutting_down")
                        done = cut = True
                        break
                    await wake.wait()
                    continue
                for d in items:
                    if isinstance(d, BaseException):
                        yield error(500, f"generation failed: {type(d).__name__}: {d}", "internal_error")
                        done = True
                        break
                    if first and d.token_ids:
                        metrics.first_token(time.perf_counter() - t0)
                        first = False
                    text = d.text if parsed is None else parsed[d.index].feed(d.text)
                    if d.finish_reason is not None:
                        finish = d.finish_reason
                        if text or d.logprobs:
                            yield chunk(text, lps=d.logprobs, index=d.index)
                        if parsed is not None:
                            rest, calls = parsed[d.index].finish()
                            if rest or calls:
                                yield chunk(rest or None, index=d.index, calls=calls)
                            finish = "tool_calls" if calls and finish == "stop" else finish
                        yield chunk(None if kind == "chat" else "", finish=finish, index=d.index)
                        left -= 1
                        if left:
                            continue
                        done = True
                        cs = handle.completions
                        metrics.finished(route, cs, time.perf_counter() - t0)
                        if include_usage:
                            last = {"id": rid, "object": obj, "created": made, "model": model, "choices": [],
                                    "usage": usage(cs[0].prompt_tokens, sum(c.completion_tokens for c in cs))}
                            yield f"data: {json.dumps(last)}\n\n"
                        break
                    if text or d.logprobs:
                        yield chunk(text, lps=d.logprobs, index=d.index)
            yield "data: [DONE]\n\n"
        except Exception as e:   # a bug while streaming: the headers are sent, so an error event ends the stream
            logger.exception("streaming %s failed", rid)
            engine.cancel(rid)
            done = True
            yield error(500, f"an unexpected error in the server (logged with its traceback): "
                             f"{type(e).__name__}: {short(str(e), 200)}", "internal_error")
            yield "data: [DONE]\n\n"
        finally:
            drain.end(rid, cut)
            if not done:   # the client went away: free the slot at the next step
                engine.cancel(rid)
                metrics.request(route, 499)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await complete(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, "text")

    return app


def waker(handle) -> asyncio.Event:
    """An asyncio event the engine's thread sets after each of `handle`'s deltas."""
    loop = asyncio.get_running_loop()
    event = asyncio.Event()

    def notify():
        try:
            loop.call_soon_threadsafe(event.set)
        except RuntimeError:   # the loop closed (server shut down): nobody is waiting
            pass

    handle.notify = notify
    event.set()   # deltas may have come before the hook was in place
    return event


def timed_protocol(read_timeout: float):
    """uvicorn's h11 protocol with a deadline on the client: a connection that has not sent a whole request
    head within `read_timeout` s of opening, or of its last response, is closed (uvicorn's keep-alive timer
    restarts on every byte, so a client trickling bytes would hold it forever; the route times the body).
    Its 400 for a malformed request (or a head over h11's 16 KiB) is in OpenAI's JSON shape."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        deadline = None
        armed_for = None

        def arm(self) -> None:
            self.disarm()
            self.armed_for = self.cycle
            self.deadline = self.loop.call_later(read_timeout, self.expire)

        def disarm(self) -> None:
            if self.deadline is not None:
                self.deadline.cancel()
                self.deadline = None

        def expire(self) -> None:
            self.deadline = None
            if not self.transport.is_closing():
                with contextlib.suppress(h11.LocalProtocolError):
                    self.conn.send(h11.ConnectionClosed())
                self.transport.close()

        def connection_made(self, transport):
            super().connection_made(transport)
            self.arm()

        def connection_lost(self, exc):
            self.disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.deadline is not None and self.cycle is not self.armed_for:   # a new request's head came
                self.disarm()

        def on_response_complete(self) -> None:
            if not self.transport.is_closing():
                self.arm()   # before: a pipelined request handled in there disarms it
            super().on_response_complete()
            if self.deadline is not None and self.cycle is not self.armed_for:
                self.disarm()

        def send_400_response(self, msg: str) -> None:
            body = json.dumps(error_body(f"{msg} (a malformed HTTP request, or headers over 16 KiB)",
                                         "invalid_request")).encode()
            for event in (h11.Response(status_code=400, reason=b"Bad Request",
                                       headers=[(b"content-type", b"application/json"), (b"connection", b"close"),
                                                (b"content-length", str(len(body)).encode())]),
                          h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

    return Protocol


def make_server(app, host: str = "127.0.0.1", port: int = 8000, read_timeout: float = READ_TIMEOUT,
                shutdown_timeout: float = SHUTDOWN_TIMEOUT, log_level: str = "warning", ready=None):
    """A uvicorn server for `app` (from `build_app`) with the header deadline (`timed_protocol`) and a graceful
    shutdown: it stops accepting, gives requests in flight `shutdown_timeout` s, then cuts the rest (an error
    event and [DONE] for streams, a 503 otherwise) and logs how many finished and how many were cut. A SIGTERM
    or SIGINT that stopped it this way is not raised again: the process exits normally."""
    import uvicorn

    drain = app.state.drain

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if self.started and ready is not None:
                bound = [sock.getsockname()[1] for srv in self.servers for sock in srv.sockets] or [port]
                ready(f"http://{'[' + host + ']' if ':' in host else host}:{bound[0]}")

        async def shutdown(self, sockets=None):
            n = drain.begin()
            if n:
                log(f"shutting down: {n} request{'s' if n != 1 else ''} in flight get up to {shutdown_timeout:g} s "
                    f"to finish (--shutdown-timeout)")
            timer = asyncio.get_running_loop().call_later(shutdown_timeout, drain.cut_now)
            try:
                await super().shutdown(sockets=sockets)
            finally:
                timer.cancel()
            log(f"shut down: {drain.finished} request{'s' if drain.finished != 1 else ''} finished in the grace "
                f"period, {drain.cut} cut (an error event or a 503), {drain.refused} refused while closing")

        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                try:
                    yield
                finally:
                    self._captured_signals.clear()   # a graceful stop on a signal is a normal exit (status 0)

    # an idle keep-alive connection is closed by the protocol's deadline (`read_timeout` after its last response),
    # not by uvicorn's 5 s timer: that equals httpx's (the openai client's) pool expiry, and a client reusing a
    # connection as the server closes it gets a reset (seen in bench/soak.py)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, http=timed_protocol(read_timeout),
                            timeout_graceful_shutdown=shutdown_timeout + 5, timeout_keep_alive=read_timeout + 1)
    return Server(config)


def serve(engine, name: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_queue: int = 64, log_level: str = "warning", ready=None, max_body_bytes: int | None = None,
          read_timeout: float = READ_TIMEOUT, shutdown_timeout: float = SHUTDOWN_TIMEOUT, allowed_hosts=None,
          sock=None) -> None:
    """Run the server until SIGTERM or SIGINT (a graceful shutdown, `make_server`); `ready(url)` is called once
    it listens. `sock`: a socket already bound to host:port (`cli.serve.bind`), listened on instead."""
    app = build_app(engine, name, api_key=api_key, max_queue=max_queue, max_body_bytes=max_body_bytes,
                    read_timeout=read_timeout, host=host, allowed_hosts=allowed_hosts)
    make_server(app, host=host, port=port, read_timeout=read_timeout, shutdown_timeout=shutdown_timeout,
                log_level=log_level, ready=ready).run(sockets=None if sock is None else [sock])
