"""Tool calls (OpenAI's `tools`, `tool_choice`, `parallel_tool_calls`) for chat requests: checked, rendered through
the model's own chat template, held to the functions' schemas where the call is forced, and parsed back into
`tool_calls`.

- **Rendering.** A template that renders `tools` (Qwen, Llama 3.1+, Mistral, Hermes, SmolLM3...) gets them through
  transformers' `apply_chat_template(tools=...)`, and earlier calls and `role: "tool"` results as its own
  messages. A template that ignores them (the embedded SmolLM2's) gets the tools described in the system message
  in the Hermes format (`<tools>` signatures, calls written `<tool_call>{"name", "arguments"}</tool_call>`, what
  Qwen 2.5's own template writes), and earlier calls and results as that text.
- **Forcing.** `tool_choice: "required"` and a named function hold the reply to JSON (engine/constrain.py, as
  `response_format` does): a named function's reply is its arguments, matching its `parameters` schema; a required
  call's reply is a list of `{"name", "arguments"}` objects, each matching its function. So forced arguments always
  parse (vLLM's approach, whatever the model's own format).
- **Parsing** `auto` replies: the tokenizer's own `response_template` if it has one, else the Hermes format through
  transformers' response parser (`transformers.utils.chat_parsing`) where the template writes `<tool_call>` or
  the tools were described here, else a reply that is only a JSON call or list of calls (Llama 3.1's
  `{"name", "parameters"}`, Mistral's `[TOOL_CALLS][...]`). A reply that does not parse is returned as content.
"""

from __future__ import annotations

import json
import re

from .engine.constrain import COMPACT, json_schema
from .errors import InputError

MAX_TOOLS = 128                         # OpenAI's limit
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
OPEN = "<tool_call>"
# the Hermes format as a transformers response template (what its serve uses for Qwen 2/3)
HERMES = {"defaults": {"role": "assistant"}, "start_anchor_pattern": r"\A",
          "fields": {"tool_calls": {"open_pattern": r"\s*<tool_call>", "close": "</tool_call>", "repeats": True,
                                    "content": "json", "transform": {"type": "function", "function": "{content}"}},
                     "content": {"content": "text"}}}
JSON_PREFIXES = ("<|python_tag|>", "[TOOL_CALLS]")   # what Llama 3.1 and Mistral write before a JSON call


def params(tool: dict) -> dict:
    """A function's parameters schema for a forced call: no properties beyond those declared, unless it says."""
    p = tool["function"].get("parameters") or {"type": "object", "properties": {}}
    return p if p.get("type") != "object" or "additionalProperties" in p else {**p, "additionalProperties": False}


class BadTools(InputError):
    """A `tools`, `tool_choice` or message field that is not valid; `param` names it."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def system_prompt(tools: list[dict]) -> str:
    """The tools described in the Hermes format (Qwen 2.5's template's words), for a template that ignores them."""
    sigs = "\n".join(json.dumps(t) for t in tools)
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with "
            f"function signatures within <tools></tools> XML tags:\n<tools>\n{sigs}\n</tools>\n\nFor each function "
            "call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n"
            "<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>")


class Tools:
    """One chat request's tools: `mode` is "auto", "required" or "named" ("none" makes no Tools)."""

    def __init__(self, tools: list[dict], mode: str, name: str | None = None, parallel: bool = True,
                 template: dict | None = None, hermes: bool = False, prefix: str = "", id_prefix: str = "call"):
        self.tools, self.mode, self.name, self.parallel = tools, mode, name, parallel
        self.template = template      # the tokenizer's own response template, if any
        self.hermes = hermes          # replies write <tool_call> blocks
        self.prefix = prefix          # the rendered prompt (the tokenizer's template may need it)
        self.id_prefix = id_prefix
        self.names = {t["function"]["name"] for t in tools}

    def grammar(self) -> str | None:
        """The grammar (engine/constrain.py) a forced reply is held to; None for auto; InputError for parameters
        that are not a usable JSON schema. A named function: its arguments. Required, where replies write
        <tool_call> blocks: one or more of them (the model may end after any), each a {"name", "arguments"} call
        of one of the functions; else a JSON list of such calls."""
        if self.mode == "named":
            return json_schema(params(next(t for t in self.tools if t["function"]["name"] == self.name)))
        if self.mode != "required":
            return None
        one = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]}, "arguments": params(t)},
                "required": ["name", "arguments"], "additionalProperties": False} for t in self.tools]
        call = one[0] if len(one) == 1 else {"anyOf": one}
        if not self.hermes:
            return json_schema({"type": "array", "items": call, "minItems": 1,
                                **({} if self.parallel else {"maxItems": 1})})
        import llguidance

        body = json.dumps({"x-guidance": COMPACT, **call})
        more = ' ("\\n" call)*' if self.parallel else ""   # (Lark: a newline between calls)
        lark = f'start: call{more}\ncall: "{OPEN}\\n" %json {body} "\\n</tool_call>"\n'
        try:
            return llguidance.LLMatcher.grammar_from_lark(lark)
        except Exception as e:
            raise InputError(f"the tools' parameters cannot be used: {e}") from None

    def calls(self, found: list[tuple[str, object]], choice: int = 0) -> list[dict]:
        if not self.parallel:
            found = found[:1]
        return [{"id": f"{self.id_prefix}_{choice}_{i}", "type": "function",
                 "function": {"name": name, "arguments": args if isinstance(args, str) else json.dumps(args)}}
                for i, (name, args) in enumerate(found)]

    def parse(self, text: str, choice: int = 0) -> tuple[str | None, list[dict]]:
        """(content, tool_calls) of a finished reply; a reply that does not parse is all content, no calls."""
        found = self.found(text)
        if found is None:
            return text, []
        content, calls = found
        return (content or None) if calls else text, self.calls(calls, choice)

    def found(self, text: str) -> tuple[str, list[tuple[str, object]]] | None:
        if self.mode == "named":
            try:
                json.loads(text)
            except ValueError:
                return None   # cut short (max_tokens)
            return "", [(self.name, text.strip())]
        if self.mode == "required" and not self.hermes:
            return "", self.json_calls(text) or []
        if self.template is not None or self.hermes:
            from transformers.utils.chat_parsing import parse_response

            template = self.template if self.template is not None else HERMES
            prefix = self.prefix if self.template is not None else ""
            try:
                msg = parse_response(text, template, prefix=prefix, tools=self.tools)
            except ValueError:   # a call that is not JSON; or the last one cut short (max_tokens): those before it
                end = text.rfind("</tool_call>") if self.template is None else -1
                try:
                    msg = parse_response(text[:end + len("</tool_call>")], template, prefix=prefix, tools=self.tools)
                except ValueError:
                    end = -1
                if end < 0:
                    return None
            out = []
            for tc in msg.get("tool_calls") or []:
                fn = tc.get("function", tc) if isinstance(tc, dict) else None
                if not isinstance(fn, dict) or fn.get("name") not in self.names:
                    return None
                out.append((fn["name"], fn.get("arguments", {})))
            content = msg.get("content") or ""
            return (content.strip() if out else content), out
        calls = self.json_calls(text)
        return ("", calls) if calls else None

    def json_calls(self, text: str) -> list[tuple[str, object]] | None:
        """A reply that is only a JSON call or a list of them ({"name", "arguments" or "parameters"})."""
        text = text.strip()
        for p in JSON_PREFIXES:
            text = text.removeprefix(p).lstrip()
        try:
            obj = json.loads(text)
        except ValueError:
            return None
        out = []
        for c in obj if isinstance(obj, list) else [obj]:
            if not isinstance(c, dict) or c.get("name") not in self.names:
                return None
            args = c.get("arguments", c.get("parameters", {}))
            if isinstance(args, str):
                try:
                    args = json.loads(args)
                except ValueError:
                    return None
            if not isinstance(args, dict):
                return None
            out.append((c["name"], args))
        return out or None

    def stream(self, choice: int = 0) -> ToolStream:
        return ToolStream(self, choice)


class ToolStream:
    """One choice's streamed reply: `feed` gives the content that can go out now (text before a call starts is
    content; from a call's opening on, the reply is held back), `finish` the rest and the calls."""

    def __init__(self, tools: Tools, choice: int):
        self.tools, self.choice = tools, choice
        self.text, self.sent, self.held = "", 0, tools.mode != "auto" or tools.template is not None

    def feed(self, piece: str) -> str:
        self.text += piece
        if self.held:
            return ""
        t = self.tools
        if t.hermes:
            at = self.text.find(OPEN)
            if at >= 0:
                self.held = True
                end = at
            else:   # keep back what may begin the opening, and whitespace (the parser drops it before a call)
                end = len(self.text)
                for k in range(min(len(OPEN) - 1, end), 0, -1):
                    if self.text.endswith(OPEN[:k]):
                        end -= k
                        break
            end = len(self.text[:end].rstrip())
        else:   # a JSON call is the whole reply: hold back a reply that starts like one
            head = self.text.lstrip()
            if not head or head.startswith(("{", "[")) or any(p.startswith(head[:len(p)]) for p in JSON_PREFIXES):
                return ""
            end = len(self.text)
        out = self.text[self.sent:max(end, self.sent)]
        self.sent = max(end, self.sent)
        return out

    def finish(self) -> tuple[str, list[dict]]:
        """The content not yet sent, and the calls."""
        content, calls = self.tools.parse(self.text, self.choice)
        content = content or ""
        done = self.text[:self.sent]
        return (content[len(done):] if content.startswith(done) else ""), calls


def parse_tools(body: dict) -> tuple[list[dict], str, str | None, bool] | None:
    """(tools, mode, named function, parallel) of a chat body, None when it has no tools or tool_choice is
    "none"; BadTools for what is malformed."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise BadTools(f"parallel_tool_calls must be true or false, got {parallel!r}", "parallel_tool_calls")
    if tools is None or tools == []:
        if choice not in (None, "none"):
            raise BadTools("tool_choice needs tools: list the functions the model may call", "tool_choice")
        return None
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise BadTools(f"tools must be a list of at most {MAX_TOOLS} {{\"type\": \"function\", \"function\": "
                       "{...}} objects", "tools")
    clean, names = [], set()
    for k, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict):
            raise BadTools(f"tools[{k}] must be {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                           "\"parameters\": {...}}}}", f"tools[{k}]")
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise BadTools(f"tools[{k}].function.name must be 1 to 64 letters, digits, _ or -, got {name!r}",
                           f"tools[{k}].function.name")
        if name in names:
            raise BadTools(f"tools[{k}]: two functions are named {name!r}", f"tools[{k}].function.name")
        names.add(name)
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise BadTools(f"tools[{k}].function.parameters must be a JSON schema object", f"tools[{k}].function"
                                                                                           ".parameters")
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            raise BadTools(f"tools[{k}].function.description must be a string", f"tools[{k}].function.description")
        clean.append({"type": "function", "function": {k2: v for k2, v in fn.items()
                                                        if k2 in ("name", "description", "parameters", "strict")}})
    choice = "auto" if choice is None else choice
    name = None
    if isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if choice.get("type") != "function" or name not in names:
            raise BadTools(f"tool_choice {json.dumps(choice)[:120]} must name one of the tools: "
                           f"{{\"type\": \"function\", \"function\": {{\"name\": one of {sorted(names)}}}}}",
                           "tool_choice")
        mode = "named"
    elif choice in ("auto", "required"):
        mode = choice
    elif choice == "none":
        return None
    else:
        raise BadTools(f"tool_choice must be \"none\", \"auto\", \"required\" or {{\"type\": \"function\", "
                       f"\"function\": {{\"name\": ...}}}}, got {json.dumps(choice)[:120]}", "tool_choice")
    return clean, mode, name, parallel is not False


def messages_for(messages: list[dict], native: bool, tools: list[dict] | None) -> list[dict]:
    """Chat messages with tool calls and results as the template takes them: for a template that renders tools,
    each call's `arguments` as an object (transformers' convention); for one that ignores them, calls and results
    as Hermes text (results as user turns) and the tools described in the system message."""
    out, results = [], None   # results: the user turn holding the latest run of tool results (Hermes text)
    for k, msg in enumerate(messages):
        calls = msg.get("tool_calls")
        if calls is not None:
            if msg["role"] != "assistant" or not isinstance(calls, list):
                raise BadTools(f"messages[{k}].tool_calls must be a list, on an assistant message",
                               f"messages[{k}].tool_calls")
            parsed = []
            for j, c in enumerate(calls):
                fn = c.get("function") if isinstance(c, dict) else None
                args = fn.get("arguments") if isinstance(fn, dict) else None
                try:
                    args = json.loads(args) if isinstance(args, str) else args
                except ValueError:
                    args = None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(args, dict):
                    raise BadTools(f"messages[{k}].tool_calls[{j}] must be {{\"id\", \"type\": \"function\", "
                                   "\"function\": {\"name\": ..., \"arguments\": a JSON object as a string}}",
                                   f"messages[{k}].tool_calls[{j}]")
                parsed.append({**c, "function": {"name": fn["name"], "arguments": args}})
            if native:
                out.append({**msg, "tool_calls": parsed})
            else:
                text = "\n".join(f"{OPEN}\n{json.dumps(c['function'])}\n</tool_call>" for c in parsed)
                out.append({"role": "assistant", "content": "\n".join(x for x in (msg["content"], text) if x)})
        elif msg["role"] == "tool" and not native:
            text = f"<tool_response>\n{msg['content']}\n</tool_response>"
            if out and out[-1] is results:   # results of one turn's calls: one user turn
                results["content"] += "\n" + text
            else:
                results = {"role": "user", "content": text}
                out.append(results)
        else:
            out.append(msg)
    if tools and not native:
        prompt = system_prompt(tools)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{prompt}" if out[0]["content"] else prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def renders_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders `tools` (its text changes when one is passed)."""
    probe = [{"role": "user", "content": "x"}]
    tool = [{"type": "function", "function": {"name": "probe_tool_7f3a", "description": "d",
                                              "parameters": {"type": "object", "properties": {}}}}]
    try:
        a = tokenizer.apply_chat_template(probe, add_generation_prompt=True, tokenize=False)
        b = tokenizer.apply_chat_template(probe, tools=tool, add_generation_prompt=True, tokenize=False)
    except Exception:
        return False
    return a != b
