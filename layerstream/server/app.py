"""The OpenAI-compatible server: FastAPI routes over one `Engine`, run by uvicorn.

Every request becomes an engine request (`OpenAIRequests` parses bodies as batch jobs do), so concurrent
requests share sweeps. Streaming responses are server-sent events fed by the engine's thread through
`Handle.notify`; a client that goes away cancels its request, which frees its slot at the next step.
Errors have OpenAI's JSON shape: 400 (malformed JSON, wrong field, prompt beyond the context), 401 (key),
404 (model), 429 (queue full).
"""


import asyncio
import json
import secrets
import time
from html import escape
from importlib import resources

from ..engine.openai import BadLine, OpenAIRequests, completion_body, error_body, usage
from ..errors import InputError
from .metrics import Metrics

ROUTES = {"/v1/chat/completions": "chat", "/v1/completions": "text"}


def build_app(engine, name: str, api_key: str | None = None, max_queue: int = 64):
    """A FastAPI app serving `engine` (started and stopped with the app) under the model name `name`."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    tok = engine.tokenizer
    parser = OpenAIRequests(engine, tok, name)
    created = int(time.time())
    metrics = Metrics(engine)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="layerstream", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine, app.state.metrics = engine, metrics

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):   # unknown routes, wrong methods
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(error_body(f"{request.method} {request.url.path}: {exc.detail}", code),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    def fail(status: int, message: str, code: str | None, param: str | None = None,
             type: str = "invalid_request_error"):
        return JSONResponse(error_body(message, code, param, type), status_code=status)

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
        return {"status": "ok", "model": name, "waiting": len(engine.waiting), "running": len(engine.active)}

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
    async def prometheus():
        body, ctype = metrics.render()
        return Response(body, media_type=ctype)

    @app.get("/")
    async def page():
        html = resources.files(__package__).joinpath("chat.html").read_text(encoding="utf-8")
        return HTMLResponse(html.replace("{{MODEL}}", escape(name)))

    @app.get("/favicon.ico")
    async def favicon():
        return Response(status_code=204)

    async def complete(request: Request, kind: str):
        t0 = time.perf_counter()
        route = "chat" if kind == "chat" else "completions"

        def refuse(status: int, *args, **kw):   # an error answer, counted in /metrics
            metrics.request(route, status)
            return fail(status, *args, **kw)

        if (r := unauthorized(request)) is not None:
            metrics.request(route, r.status_code)
            return r
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, ValueError) as e:
            return refuse(400, f"the request body is not valid JSON: {e}", "invalid_json")
        if not isinstance(body, dict):
            return refuse(400, "the request body must be a JSON object", "invalid_request")
        want = body.get("model")
        if want is not None and not isinstance(want, str):
            return refuse(400, f"model must be a string, got {want!r}", "invalid_type", "model")
        if want is not None and want not in names:
            return refuse(404, f"the model {want!r} does not exist here; this server serves "
                               f"{', '.join(map(repr, names))} (GET /v1/models lists them)", "model_not_found",
                          "model")
        stream = body.get("stream")
        stream = False if stream is None else stream
        opts = body.get("stream_options")
        opts = {} if opts is None else opts
        if not isinstance(stream, bool):
            return refuse(400, f"stream must be true or false, got {stream!r}", "invalid_type", "stream")
        if not isinstance(opts, dict) or not isinstance(opts.get("include_usage", False), bool):
            return refuse(400, "stream_options must be an object like {\"include_usage\": true}", "invalid_type",
                          "stream_options")
        try:
            prompt, params = parser.request({"body": body}, {"kind": kind, "h": secrets.token_hex(8)})
        except BadLine as e:
            return refuse(e.status or 400, e.message, e.code, e.param)
        if len(engine.waiting) >= max_queue:
            return refuse(429, f"{len(engine.waiting)} requests are already waiting (--max-queue {max_queue}): "
                               f"retry later", "rate_limit_exceeded", type="rate_limit_error")
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{secrets.token_hex(12)}"
        try:
            handle = engine.submit(prompt, params, request_id=rid)
        except InputError as e:
            return refuse(400, str(e), "invalid_value")
        wake = waker(handle)
        if stream:
            return StreamingResponse(sse(handle, wake, rid, kind, opts.get("include_usage", False), route, t0,
                                         want or name),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            while not handle.done:
                wake.clear()
                if handle.done:
                    break
                try:
                    await asyncio.wait_for(wake.wait(), 0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        engine.cancel(rid)
                        metrics.request(route, 499)
                        return Response(status_code=499)
                handle.drain()
        except asyncio.CancelledError:
            engine.cancel(rid)
            raise
        try:
            c = handle.result()
        except Exception as e:   # the engine failed this request (reported, and the server goes on)
            return refuse(500, f"generation failed: {type(e).__name__}: {e}", "internal_error", type="server_error")
        metrics.finished(route, c, time.perf_counter() - t0)
        return completion_body(kind, rid, want or name, int(time.time()), c)

    async def sse(handle, wake, rid, kind, include_usage, route, t0, model):
        made = int(time.time())
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(delta_text=None, finish=None, role=False):
            if kind == "chat":
                delta = {}
                if role:
                    delta["role"] = "assistant"
                if delta_text is not None:
                    delta["content"] = delta_text
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta_text or "", "logprobs": None, "finish_reason": finish}
            out = {"id": rid, "object": obj, "created": made, "model": model, "choices": [choice]}
            if include_usage:
                out["usage"] = None
            return f"data: {json.dumps(out)}\n\n"

        done, first = False, True
        try:
            if kind == "chat":
                yield chunk("", role=True)
            while not done:
                wake.clear()
                items = handle.drain()
                if not items:
                    await wake.wait()
                    continue
                for d in items:
                    if isinstance(d, BaseException):
                        metrics.request(route, 500)
                        err = error_body(f"generation failed: {type(d).__name__}: {d}", "internal_error",
                                         type="server_error")
                        yield f"data: {json.dumps(err)}\n\n"
                        done = True
                        break
                    if first and d.token_ids:
                        metrics.first_token(time.perf_counter() - t0)
                        first = False
                    if d.finish_reason is not None:
                        done = True
                        if d.text:
                            yield chunk(d.text)
                        yield chunk(None if kind == "chat" else "", finish=d.finish_reason)
                        c = handle.completion
                        metrics.finished(route, c, time.perf_counter() - t0)
                        if include_usage:
                            last = {"id": rid, "object": obj, "created": made, "model": model, "choices": [],
                                    "usage": usage(c.prompt_tokens, c.completion_tokens)}
                            yield f"data: {json.dumps(last)}\n\n"
                        break
                    if d.text:
                        yield chunk(d.text)
            yield "data: [DONE]\n\n"
        finally:
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


def serve(engine, name: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_queue: int = 64, log_level: str = "warning", ready=None) -> None:
    """Run the server until Ctrl-C (uvicorn's signal handling); `ready(url)` is called once it listens."""
    import uvicorn

    app = build_app(engine, name, api_key=api_key, max_queue=max_queue)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    if ready is not None:
        orig = server.startup

        async def startup(sockets=None):
            await orig(sockets=sockets)
            if server.started:
                bound = [sock.getsockname()[1] for srv in server.servers for sock in srv.sockets] or [port]
                ready(f"http://{'[' + host + ']' if ':' in host else host}:{bound[0]}")

        server.startup = startup
    server.run()
