"""The OpenAI protocol: request bodies to token ids and `SamplingParams`, and OpenAI's error codes for what is
refused (the engine says why in its own terms, `Refusal`), shared by batch jobs and the server.

`OpenAIRequests.request` turns a chat or completion body (`messages` through the model's chat template, or
`prompt`; `max_tokens`, `temperature`, `top_p`, `top_k`, `min_p`, `repetition_penalty`, `frequency_penalty`,
`presence_penalty`, `seed`, `stop`, `n`, `logprobs`, `response_format`, `structured_outputs`, chat's `tools`
(layerstream/tools.py); what is left out comes from the model's sampling defaults, `layerstream.sampling`) into
token ids and `SamplingParams`,
or raises `BadLine` with OpenAI's error code, message and parameter (also for a field we do not honour, a
string that is not valid Unicode, or a text longer than the context could hold, refused before tokenizing);
the response objects and batch records are built in `layerstream/responses.py`.
"""

from __future__ import annotations

import json
import math

from .engine.constrain import schema_of, structured
from .engine.requests import MAX_N, MAX_TOP, SamplingParams
from .errors import InputError
from .sampling import choose, model_defaults
from .tools import OPEN, BadTools, Tools, messages_for, parse_tools, renders_tools

URLS = {"/v1/chat/completions": "chat", "/v1/completions": "text"}
CHAT_MAX_TOKENS = 256                   # chat's default max_tokens (bounded by the context); completions: 16
MAX_CHARS_PER_TOKEN = 32                # a text longer than context x this is refused before it is tokenized
MAX_STOP = 16                           # stop strings per request
REFUSALS = {"context": "context_length_exceeded", "kv_budget": "kv_budget_exceeded"}   # the engine's, as codes
# OpenAI fields not honoured here, and the values that mean "not used" (accepted: clients send them as defaults)
UNSUPPORTED = {"functions": (None, []), "function_call": (None, "none"),
               "logit_bias": (None, {}), "best_of": (None, 1), "echo": (None, False), "suffix": (None, ""),
               "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,)}
CHAT_ONLY = {"tools": (None, []), "tool_choice": (None, "none"), "parallel_tool_calls": (None, True, False)}


class BadLine(Exception):
    """A line that is not a request we can run. `status` None: not a request at all (response null);
    400: a request whose body is invalid (response with an OpenAI error body)."""

    def __init__(self, code: str, message: str, status: int | None = None, param: str | None = None):
        super().__init__(message)
        self.code, self.message, self.status, self.param = code, message, status, param


class OpenAIRequests:
    """Parses request bodies for one engine: its tokenizer, context and KV budget."""

    def __init__(self, engine, tokenizer, default_name: str):
        self.engine, self.tok, self.name = engine, tokenizer, default_name
        self.context = engine.context
        self.vocab = engine.model.config.get_text_config().vocab_size
        self.defaults = model_defaults(getattr(engine.model, "generation_config", None))
        self.native = None   # whether the chat template renders tools (found at the first chat request)

    def request(self, obj: dict, req: dict) -> tuple[list[int], SamplingParams]:
        """Token ids and sampling parameters of a request body, or BadLine (status 400)."""
        body, kind = obj["body"], req["kind"]
        model = body.get("model")
        req["model"] = model if isinstance(model, str) and model else self.name
        n = body.get("n")
        n = 1 if n is None else n
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_N:
            raise BadLine("invalid_value", f"n must be an integer in [1, {MAX_N}], got {short(n)}", 400, "n")
        for key, defaults in UNSUPPORTED.items():
            if key in body and not unused(body[key], defaults):
                raise BadLine("unsupported_parameter", f"{key} is not supported here yet (got "
                                                       f"{short(body[key])}): leave it out", 400, key)
        where = invalid_text(body)
        if where is not None:
            raise BadLine("invalid_value", f"{where} is not valid Unicode text (a lone UTF-16 surrogate such as "
                                           f"\\ud800): send whole characters", 400, where)
        tools = None
        for key, defaults in CHAT_ONLY.items():
            if kind == "text" and key in body and not unused(body[key], defaults):
                raise BadLine("unsupported_parameter", f"{key} is not supported by /v1/completions: send tools to "
                                                       f"/v1/chat/completions", 400, key)
        if kind == "chat":
            try:
                spec = parse_tools(body)
            except BadTools as e:
                raise BadLine("invalid_value", str(e), 400, e.param) from None
            prompt = self.chat_ids(body.get("messages"), spec[0] if spec else None)
            if spec is not None:
                template = getattr(self.tok, "response_template", None)
                tools = Tools(*spec, template=template, hermes=not self.native or OPEN in str(self.tok.chat_template),
                              prefix=self.tok.decode(prompt) if template is not None else "",
                              id_prefix=f"call_{req['h'][:12]}")
            max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
            param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        else:
            prompt = self.text_ids(body.get("prompt"))
            max_tokens, param = body.get("max_tokens"), "max_tokens"
        if not prompt:
            raise BadLine("invalid_value", "the prompt is empty", 400, "messages" if kind == "chat" else "prompt")
        room = self.context - len(prompt) if self.context else None   # the context's own check: engine.refusal
        if max_tokens is None:
            max_tokens = 16 if kind == "text" else min(CHAT_MAX_TOKENS, max(room, 1)) if room is not None \
                else CHAT_MAX_TOKENS
        number = (int, float)
        checks = ((param, max_tokens, isinstance(max_tokens, int) and max_tokens > 0, "a positive integer"),
                  ("temperature", body.get("temperature"), isinstance(body.get("temperature"), number)
                   and math.isfinite(body["temperature"]) and body["temperature"] >= 0, "a finite number >= 0"),
                  ("top_p", body.get("top_p"), isinstance(body.get("top_p"), number) and 0 < body["top_p"] <= 1,
                   "a number in (0, 1]"),
                  ("top_k", body.get("top_k"), isinstance(body.get("top_k"), int) and body["top_k"] >= -1,
                   "an integer >= -1 (0 or -1: all tokens)"),
                  ("min_p", body.get("min_p"), isinstance(body.get("min_p"), number) and 0 <= body["min_p"] < 1,
                   "a number in [0, 1)"),
                  ("repetition_penalty", body.get("repetition_penalty"),
                   isinstance(body.get("repetition_penalty"), number) and 0 < body["repetition_penalty"] <= 10,
                   "a number in (0, 10] (1: off)"),
                  ("frequency_penalty", body.get("frequency_penalty"),
                   isinstance(body.get("frequency_penalty"), number) and -2 <= body["frequency_penalty"] <= 2,
                   "a number in [-2, 2]"),
                  ("presence_penalty", body.get("presence_penalty"),
                   isinstance(body.get("presence_penalty"), number) and -2 <= body["presence_penalty"] <= 2,
                   "a number in [-2, 2]"))
        for key, value, ok, what in checks:
            if (value is not None or key == param) and (not ok or isinstance(value, bool)):
                raise BadLine("invalid_value", f"{key} must be {what}, got {value!r}", 400, key)
        # what the request leaves out comes from the model's defaults (its generation_config, else llama.cpp's:
        # layerstream.sampling); a temperature below sampling.MIN_TEMPERATURE is greedy (logits / 1e-300 overflow)
        top_k = body.get("top_k")
        sampling = choose(self.defaults, body.get("temperature"), body.get("top_p"),
                          None if top_k is None else max(top_k, 0), body.get("min_p"), body.get("repetition_penalty"))
        temperature = sampling.temperature
        seed = body.get("seed")
        if seed is not None:
            if not isinstance(seed, int) or isinstance(seed, bool) or not -2**63 <= seed < 2**63:
                raise BadLine("invalid_value", f"seed must be a 64-bit integer, got {seed!r}", 400, "seed")
            seed = seed % 2**63
        elif isinstance(temperature, (int, float)) and temperature > 0:
            seed = int(req["h"][:15], 16)   # sampled without a seed: one from the line, so reruns agree
        stop = body.get("stop")
        stop = [] if stop is None else stop
        if not (isinstance(stop, str) and stop) and not (isinstance(stop, list) and
                                                         all(isinstance(x, str) and x for x in stop)):
            raise BadLine("invalid_value", f"stop must be a non-empty string or a list of them, got {short(stop)}",
                          400, "stop")
        if isinstance(stop, list) and len(stop) > MAX_STOP:   # each is searched for after every token
            raise BadLine("invalid_value", f"stop may list at most {MAX_STOP} strings (OpenAI allows 4), got "
                                           f"{len(stop)}", 400, "stop")
        logprobs = self.logprobs(body, kind)
        grammar = None
        for key, form in (("response_format", schema_of), ("structured_outputs", structured)):
            try:
                g = form(body.get(key))
                if g is not None:
                    self.engine.check_grammar(g)
            except InputError as e:
                raise BadLine("invalid_value", str(e), 400, key) from None
            if g is not None and grammar is not None:
                raise BadLine("invalid_value", "give response_format or structured_outputs, not both", 400, key)
            grammar = grammar or g
        if tools is not None and tools.mode != "auto":   # required or a named function: held to the schemas
            if grammar is not None:
                raise BadLine("invalid_value", "a required or named tool_choice cannot be combined with a JSON "
                                               "response_format: the reply is the tool call", 400, "tool_choice")
            try:
                grammar = tools.grammar()
                self.engine.check_grammar(grammar)
            except InputError as e:
                raise BadLine("invalid_value", f"the tools' parameters cannot be used as JSON schemas: {e}", 400,
                              "tools") from None
        req["tools"] = tools
        lora = getattr(self.engine.model, "lora", None)   # a `model` naming one of its adapters chooses it
        adapter = req["model"] if lora is not None and req["model"] in lora.adapters else None
        try:
            params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=sampling.top_p,
                                    top_k=sampling.top_k, min_p=sampling.min_p,
                                    repetition_penalty=sampling.repeat_penalty,
                                    frequency_penalty=body.get("frequency_penalty") or 0.0,
                                    presence_penalty=body.get("presence_penalty") or 0.0, seed=seed, stop=stop,
                                    adapter=adapter, logprobs=logprobs, n=n, grammar=grammar)
        except InputError as e:
            raise BadLine("invalid_value", str(e), 400) from None
        why = self.engine.refusal(len(prompt), params.max_tokens)
        if why is not None:
            raise BadLine(REFUSALS[why.kind], why.message, 400, param)
        return prompt, params

    @staticmethod
    def logprobs(body: dict, kind: str) -> int | None:
        """SamplingParams.logprobs of a body: chat's `logprobs` (true / false) and `top_logprobs` (0..20, with
        logprobs); completions' `logprobs` (the number of most likely tokens, 0..20)."""
        lp, top = body.get("logprobs"), body.get("top_logprobs")
        if kind == "chat":
            if lp is not None and not isinstance(lp, bool):
                raise BadLine("invalid_value", f"logprobs must be true or false, got {short(lp)}", 400, "logprobs")
            if top is not None and (not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= MAX_TOP):
                raise BadLine("invalid_value", f"top_logprobs must be an integer in [0, {MAX_TOP}], got "
                                               f"{short(top)}", 400, "top_logprobs")
            if top and not lp:
                raise BadLine("invalid_value", "top_logprobs needs logprobs: true", 400, "top_logprobs")
            return (top or 0) if lp else None
        if top is not None:
            raise BadLine("invalid_value", "top_logprobs is a chat field; completions take logprobs: N", 400,
                          "top_logprobs")
        if lp is None or lp is False:   # (false: what some clients send for "off")
            return None
        if not isinstance(lp, int) or isinstance(lp, bool) or not 0 <= lp <= MAX_TOP:
            raise BadLine("invalid_value", f"logprobs must be an integer in [0, {MAX_TOP}] here, got {short(lp)}",
                          400, "logprobs")
        return lp

    def chat_ids(self, messages, tools: list[dict] | None = None) -> list[int]:
        """The prompt of chat `messages` through the model's chat template; `tools` (checked OpenAI tool objects)
        rendered by the template, or described in the system message where the template ignores them
        (layerstream/tools.py)."""
        if not isinstance(messages, list) or not messages:
            raise BadLine("invalid_value" if messages is not None else "missing_required_parameter",
                          "messages must be a non-empty list of {role, content} objects", 400, "messages")
        clean = []
        for k, msg in enumerate(messages):
            if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
                raise BadLine("invalid_value", f"messages[{k}] must be an object with a string role", 400,
                              f"messages[{k}]")
            content = msg.get("content")
            if isinstance(content, list):   # content parts: text only
                texts = []
                for part in content:
                    text = part.get("text") if isinstance(part, dict) and part.get("type") == "text" else None
                    if not isinstance(text, str):
                        raise BadLine("invalid_value", f"messages[{k}].content: only text parts are supported", 400,
                                      f"messages[{k}].content")
                    texts.append(text)
                content = "".join(texts)
            elif content is not None and not isinstance(content, str):
                raise BadLine("invalid_value", f"messages[{k}].content must be a string or a list of text parts",
                              400, f"messages[{k}].content")
            clean.append({**msg, "content": content if content is not None else ""})
        self.check_length(sum(len(v) for msg in clean for v in msg.values() if isinstance(v, str)), "messages")
        if not getattr(self.tok, "chat_template", None):
            raise BadLine("invalid_request", "this model has no chat template: use /v1/completions with a prompt",
                          400, "messages")
        if self.native is None:
            self.native = renders_tools(self.tok)
        if tools or any(m.get("tool_calls") is not None or m["role"] == "tool" for m in clean):
            try:
                clean = messages_for(clean, self.native, tools)
            except BadTools as e:
                raise BadLine("invalid_value", str(e), 400, e.param) from None
        try:
            enc = self.tok.apply_chat_template(clean, tools=tools if self.native else None,
                                               add_generation_prompt=True, tokenize=True)
        except Exception as e:   # the template refused these messages (roles out of order, ...)
            raise BadLine("invalid_value", f"the chat template cannot render these messages: {e}", 400,
                          "messages") from None
        ids = enc["input_ids"] if hasattr(enc, "keys") else enc
        return [int(t) for t in ids]

    def check_length(self, chars: int, param: str) -> None:
        """Refuse, before tokenizing it, a text too long for the context at any plausible characters per token."""
        if self.context and chars > self.context * MAX_CHARS_PER_TOKEN:
            raise BadLine("context_length_exceeded", f"the prompt has {chars} characters, more than this model's "
                                                     f"context of {self.context} tokens can hold (at most "
                                                     f"{MAX_CHARS_PER_TOKEN} characters a token): shorten it", 400,
                          param)

    def text_ids(self, prompt) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            self.check_length(len(prompt), "prompt")
            return [int(t) for t in self.tok(prompt)["input_ids"]]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            vocab = self.vocab
            if not all(0 <= t < vocab for t in prompt):
                raise BadLine("invalid_value", f"prompt token ids must be in [0, {vocab})", 400, "prompt")
            return list(prompt)
        if prompt is None:
            raise BadLine("missing_required_parameter", "prompt is required", 400, "prompt")
        raise BadLine("invalid_value", "prompt must be a string or a list of token ids (one prompt per request)",
                      400, "prompt")


def envelope(raw: bytes, req: dict) -> dict:
    """The request object of a line (custom_id, method, url, body checked), or BadLine (response null)."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise BadLine("invalid_json", f"the line is not valid JSON: {e}") from None
    except RecursionError:
        raise BadLine("invalid_json", "the line's JSON is nested too deeply") from None
    if not isinstance(obj, dict):
        raise BadLine("invalid_request", "the line must be a JSON object")
    cid = obj.get("custom_id")
    if not isinstance(cid, str) or not cid:
        raise BadLine("invalid_request", "custom_id is missing or not a non-empty string")
    # a custom_id with a lone surrogate is kept: the records write it back as its JSON escape
    req["custom_id"] = cid
    if obj.get("method") != "POST":
        raise BadLine("invalid_request", f"method must be \"POST\", got {obj.get('method')!r}")
    url = obj.get("url")
    if url not in URLS:
        raise BadLine("invalid_url", f"url {url!r} is not supported; use one of {', '.join(URLS)}")
    req["kind"] = URLS[url]
    if not isinstance(obj.get("body"), dict):
        raise BadLine("invalid_request", "body is missing or not a JSON object")
    return obj


def invalid_text(body) -> str | None:
    """Where in a parsed JSON body a string (or key) is not valid Unicode (a lone surrogate, which JSON's \\u
    escapes allow), e.g. "messages[0].content"; None if every string is valid. Iterative: any depth."""
    def at(path, k):
        return f"{path}[{k}]" if isinstance(k, int) else f"{path}.{k}" if path else k

    todo = [(body, "")]
    while todo:
        obj, path = todo.pop()
        for k, v in (obj.items() if isinstance(obj, dict) else enumerate(obj)):
            if isinstance(k, str) and not encodable(k):
                return at(path, short(k))
            if isinstance(v, str) and not encodable(v):
                return at(path, k)
            if isinstance(v, (dict, list)):
                todo.append((v, at(path, k)))
    return None


def unused(value, defaults) -> bool:
    """Whether `value` is one of a field's `defaults` (None and booleans by identity: `0` is not `false`)."""
    return any(value is d if d is None or isinstance(d, bool) else value == d and not isinstance(value, bool)
               for d in defaults)


def encodable(s: str) -> bool:
    if s.isascii():
        return True
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def short(value, n: int = 60) -> str:
    r = repr(value)
    return r if len(r) <= n else r[:n] + "..."
