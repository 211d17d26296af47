"""Tool calls (layerstream/tools.py): `tools` / `tool_choice` checked, rendered, forced and parsed; with the real
`openai` client against the server on the embedded model, and in a batch job."""

import copy
import json

import pytest
from pydantic import BaseModel, Field

from layerstream.tools import HERMES, BadTools, Tools, messages_for, parse_tools, renders_tools

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from layerstream import AutoModel  # noqa: E402
from layerstream.engine.scheduler import Engine  # noqa: E402
from layerstream.server import build_app  # noqa: E402

from conftest import start  # noqa: E402


class Weather(BaseModel):
    city: str = Field(max_length=24)
    unit: str = Field(pattern="^(celsius|fahrenheit)$")


class Clock(BaseModel):
    timezone: str = Field(max_length=24)


def tool(name, model, description):
    return {"type": "function", "function": {"name": name, "description": description,
                                             "parameters": model.model_json_schema()}}


TOOLS = [tool("get_weather", Weather, "The current weather in a city"),
         tool("get_time", Clock, "The current time in a timezone")]
CITIES = ["Paris", "Tokyo", "Lima", "Cairo", "Oslo", "Quito", "Hanoi", "Dakar", "Perth", "Seoul",
          "Rome", "Delhi", "Accra", "Sofia", "Havana", "Kyiv", "Doha", "Minsk", "Lagos", "Bern"]


def tools(mode="auto", hermes=True, parallel=True, name=None):
    return Tools(copy.deepcopy(TOOLS), mode, name, parallel, hermes=hermes, id_prefix="call_x")


# ---- parsing, without a model ----

def test_hermes_replies_parse_into_content_and_calls():
    t = tools()
    text = 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}\n' \
           '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"timezone": "CET"}}\n</tool_call>'
    content, calls = t.parse(text)
    assert content == "Let me look."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
        [("get_weather", {"city": "Oslo", "unit": "celsius"}), ("get_time", {"timezone": "CET"})]
    assert [c["id"] for c in calls] == ["call_x_0_0", "call_x_0_1"] and all(c["type"] == "function" for c in calls)
    assert len(tools(parallel=False).parse(text)[1]) == 1   # parallel_tool_calls false: the first call only
    for text in ["Just text.", "<tool_call>\n{not json}\n</tool_call>",                 # text, a call that is not JSON,
                 '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>',     # a function not offered,
                 '<tool_call>\n{"name": "get_time", "arguments": {"timez']:             # a call cut short
        assert t.parse(text) == (text, []), text


def test_json_replies_parse_llama_and_mistral_calls():
    t = tools(hermes=False)
    for text in ['{"name": "get_time", "parameters": {"timezone": "UTC"}}',
                 '<|python_tag|>{"name": "get_time", "arguments": {"timezone": "UTC"}}',
                 '[TOOL_CALLS] [{"name": "get_time", "arguments": "{\\"timezone\\": \\"UTC\\"}"}]']:
        content, calls = t.parse(text)
        assert content is None and len(calls) == 1, text
        assert calls[0]["function"] == {"name": "get_time", "arguments": '{"timezone": "UTC"}'}
    for text in ['{"name": "nope", "parameters": {}}', '{"city": "Oslo"}', "The time is noon."]:
        assert t.parse(text) == (text, [])


def test_a_stream_sends_the_text_before_a_call_and_holds_the_call():
    """Fed a character at a time: the content sent is exactly the parse's content, no piece of the call's markup
    leaks out, and the calls come at the end."""
    text = 'Sure, one moment.\n<tool_call>\n{"name": "get_time", "arguments": {"timezone": "UTC"}}\n</tool_call>'
    for t in (tools(), tools(hermes=False)):
        s = t.stream()
        sent = "".join(s.feed(ch) for ch in text)
        rest, calls = s.finish()
        content, want = t.parse(text)
        assert sent + rest == (content or "") and calls == want
        if t.hermes:
            assert sent == "Sure, one moment." and "<" not in sent and len(calls) == 1
    s = tools().stream()   # a reply with no call: all of it goes out, the held-back tail at the end
    sent = "".join(s.feed(ch) for ch in "a < b <tool")
    assert sent == "a < b" and s.finish() == (" <tool", [])
    s = tools(hermes=False).stream()   # a JSON call is the whole reply: held from its first brace
    assert s.feed(' {"name": "get_time", ') == "" and s.feed('"arguments": {}}') == ""
    assert s.finish()[1][0]["function"]["name"] == "get_time"
    s = tools(mode="named", name="get_time").stream()   # a forced call: nothing goes out as content
    assert s.feed('{"timezone": "UTC"}') == "" and s.finish() == ("", [
        {"id": "call_x_0_0", "type": "function", "function": {"name": "get_time", "arguments": '{"timezone": "UTC"}'}}])


def test_malformed_tools_are_named():
    def bad(body, param):
        with pytest.raises(BadTools) as e:
            parse_tools(body)
        assert e.value.param == param, str(e.value)

    bad({"tools": {"a": 1}}, "tools")
    bad({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name")
    bad({"tools": [{"type": "function"}]}, "tools[0]")
    bad({"tools": TOOLS + [TOOLS[0]]}, "tools[2].function.name")
    bad({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "tools[0].function.parameters")
    bad({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice")
    bad({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice")
    bad({"tool_choice": "required"}, "tool_choice")
    bad({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls")
    assert parse_tools({"tools": TOOLS, "tool_choice": "none"}) is None and parse_tools({"tools": []}) is None
    assert parse_tools({"tools": TOOLS})[1:] == ("auto", None, True)
    assert parse_tools({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_time"}},
                        "parallel_tool_calls": False})[1:] == ("named", "get_time", False)
    with pytest.raises(BadTools) as e:
        messages_for([{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f",
                                                                                        "arguments": "{oops"}}]}],
                     False, None)
    assert e.value.param == "messages[0].tool_calls[0]"


def test_templates_that_render_tools_get_them_and_others_get_a_system_prompt(embedded_store):
    """The embedded model's template ignores tools: they are described in its system message, earlier calls and
    results become text. A template that renders tools gets them, and calls' arguments as objects."""
    tok = AutoModel.from_pretrained(embedded_store, progress=False).tokenizer
    assert not renders_tools(tok)
    chat = [{"role": "user", "content": "Time in Oslo?"},
            {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", "function": {
                "name": "get_time", "arguments": '{"timezone": "CET"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "12:00"}, {"role": "tool", "content": "(cached)"}]
    msgs = messages_for(chat, False, TOOLS)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in msgs[0]["content"]
    assert msgs[2]["content"] == '<tool_call>\n{"name": "get_time", "arguments": {"timezone": "CET"}}\n</tool_call>'
    assert msgs[3]["content"] == "<tool_response>\n12:00\n</tool_response>\n<tool_response>\n(cached)\n</tool_response>"
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\n# Tools") and "<tool_response>\n12:00" in text
    tok.chat_template = ("{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}\n{% endif %}"
                         "{% for m in messages %}{{ m.role }}: {{ m.content }}{% for c in m.tool_calls or [] %}"
                         "CALL {{ c.function.name }} {{ c.function.arguments.timezone }}{% endfor %}\n{% endfor %}")
    assert renders_tools(tok)
    msgs = messages_for(chat, True, TOOLS)
    assert msgs[1]["tool_calls"][0]["function"]["arguments"] == {"timezone": "CET"} and msgs[2]["role"] == "tool"
    assert "CALL get_time CET" in tok.apply_chat_template(msgs, tools=TOOLS, tokenize=False)


def test_forced_grammars_compile():
    import llguidance

    for t in (tools("required"), tools("required", hermes=False), tools("required", parallel=False),
              tools("named", name="get_weather")):
        g = t.grammar()
        assert llguidance.LLMatcher.validate_grammar(g) == "", g   # (its error, empty when valid)
    assert tools("auto").grammar() is None
    assert HERMES["fields"]["tool_calls"]["open_pattern"].endswith("<tool_call>")


# ---- end to end ----

@pytest.fixture(scope="module")
def served(embedded_store):
    m = AutoModel.from_pretrained(embedded_store, progress=False)
    engine = Engine(m, max_batch=4)
    server, thread, port = start(uvicorn.Server(uvicorn.Config(build_app(engine, "smol", max_queue=16),
                                                               host="127.0.0.1", port=0, log_level="warning")))
    yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
    server.should_exit = True
    thread.join(30)
    m.close()


def ask(c, city, **kw):
    kw = {"max_tokens": 60, **kw}
    return c.chat.completions.create(model="smol", temperature=0, tools=TOOLS,
                                     messages=[{"role": "user", "content": f"What is the weather in {city}?"}], **kw)


def test_required_calls_parse_as_their_schemas_20_of_20(served):
    """tool_choice "required": every call names an offered function and its arguments parse as its schema."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        rs = list(pool.map(lambda city: ask(served, city, tool_choice="required"), CITIES))
    models = {"get_weather": Weather, "get_time": Clock}
    for r in rs:
        ch = r.choices[0]
        assert ch.message.tool_calls and ch.finish_reason in ("tool_calls", "length"), ch
        for call in ch.message.tool_calls:
            models[call.function.name].model_validate_json(call.function.arguments)
            assert call.id.startswith("call_") and call.type == "function"
    assert len({call.id for r in rs for call in r.choices[0].message.tool_calls}) == \
        sum(len(r.choices[0].message.tool_calls) for r in rs)


def test_a_named_function_streams_as_it_answers_and_the_result_goes_back(served):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    r = ask(served, "Lima", tool_choice=choice, n=2)
    assert [ch.finish_reason for ch in r.choices] == ["tool_calls", "tool_calls"]
    calls = [ch.message.tool_calls for ch in r.choices]
    assert all(len(c) == 1 and c[0].function.name == "get_weather" for c in calls)
    assert calls[0][0].function.arguments == calls[1][0].function.arguments   # greedy: the same
    args = Weather.model_validate_json(calls[0][0].function.arguments)
    assert r.choices[0].message.content is None
    pieces = list(ask(served, "Lima", tool_choice=choice, stream=True))
    deltas = [p.choices[0].delta for p in pieces if p.choices]
    streamed = [tc for d in deltas for tc in d.tool_calls or []]
    assert len(streamed) == 1 and streamed[0].function.arguments == calls[0][0].function.arguments
    assert streamed[0].function.name == "get_weather" and streamed[0].index == 0
    assert not "".join(d.content or "" for d in deltas)
    assert [p.choices[0].finish_reason for p in pieces if p.choices][-1] == "tool_calls"
    # the call and its result sent back: the next turn is answered
    chat = [{"role": "user", "content": "What is the weather in Lima?"},
            r.choices[0].message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": calls[0][0].id, "content": f"19 degrees {args.unit}, cloudy"}]
    r2 = served.chat.completions.create(model="smol", messages=chat, tools=TOOLS, max_tokens=20, temperature=0)
    assert r2.choices[0].message.content and r2.usage.prompt_tokens > r.usage.prompt_tokens
    # tool_choice "none": the tools are not shown and nothing is parsed
    r3 = ask(served, "Lima", tool_choice="none", max_tokens=5)
    assert r3.choices[0].message.tool_calls is None and r3.usage.prompt_tokens < r.usage.prompt_tokens


def test_bad_tool_requests_are_400s_naming_the_field(served):
    def error(param, **kw):
        with pytest.raises(openai.BadRequestError) as e:
            served.chat.completions.create(model="smol", max_tokens=2, **{
                "messages": [{"role": "user", "content": "hi"}], **kw})
        assert e.value.status_code == 400 and e.value.body["param"] == param, e.value.body

    error("tools[0].function.name", tools=[{"type": "function", "function": {"name": ""}}])
    error("tool_choice", tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})
    error("tool_choice", tool_choice="required")
    error("tool_choice", tools=TOOLS, tool_choice="required", response_format={"type": "json_object"})
    error("tools", tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}],
          tool_choice="required")
    error("messages[1].tool_calls[0]", messages=[
        {"role": "user", "content": "hi"},
        {"role": "assistant", "tool_calls": [{"id": "a", "type": "function", "function": {"name": "f"}}]}])
    assert ask(served, "Oslo", tool_choice="auto", max_tokens=2).choices[0].finish_reason == "length"   # still up


def test_a_batch_line_takes_tools(embedded_store, tmp_path):
    """Batch jobs take tools per line, as the server does."""
    from layerstream.engine.batch import run_batch

    body = {"messages": [{"role": "user", "content": "Time in Oslo?"}], "tools": TOOLS, "max_tokens": 40,
            "temperature": 0, "tool_choice": {"type": "function", "function": {"name": "get_time"}}}
    lines = [{"custom_id": "t", "method": "POST", "url": "/v1/chat/completions", "body": body},
             {"custom_id": "bad", "method": "POST", "url": "/v1/chat/completions",
              "body": {**body, "tool_choice": "always"}}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    m = AutoModel.from_pretrained(embedded_store, progress=False)
    try:
        run_batch(m, tmp_path / "in.jsonl", tmp_path / "out.jsonl", progress=False)
    finally:
        m.close()
    good, bad = (json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines())
    choice = good["response"]["body"]["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_time" and Clock.model_validate_json(call["function"]["arguments"])
    assert bad["response"]["status_code"] == 400 and bad["response"]["body"]["error"]["param"] == "tool_choice"


def test_structured_outputs_hold_replies_to_a_regex_a_grammar_or_a_choice(served):
    """vLLM's `structured_outputs` (extra_body with the openai client): a completion held to a regex, chat replies to
    a choice and to a GBNF grammar; what does not compile is a 400 naming the field."""
    import re

    r = served.completions.create(model="smol", prompt="Call me at", max_tokens=20, temperature=0,
                                  extra_body={"structured_outputs": {"regex": r" [0-9]{3}-[0-9]{4}"}})
    assert re.fullmatch(r" [0-9]{3}-[0-9]{4}", r.choices[0].text) and r.choices[0].finish_reason == "stop"
    chat = [{"role": "user", "content": "Is the sea salty? Answer yes or no."}]
    r = served.chat.completions.create(model="smol", messages=chat, max_tokens=5, temperature=0,
                                       extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert r.choices[0].message.content in ("yes", "no")
    gbnf = 'root ::= "The answer is " [0-9] [0-9]? "."'
    r = served.chat.completions.create(model="smol", messages=[{"role": "user", "content": "What is 6 times 7?"}],
                                       max_tokens=10, temperature=0,
                                       extra_body={"structured_outputs": {"grammar": gbnf}})
    assert re.fullmatch(r"The answer is [0-9][0-9]?\.", r.choices[0].message.content), r.choices[0].message.content
    for body, param in (({"structured_outputs": {"regex": "[0-9"}}, "structured_outputs"),
                        ({"structured_outputs": {"grammar": "root ::= ("}}, "structured_outputs"),
                        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
                        ({"structured_outputs": {"choice": ["a"]}, "response_format": {"type": "json_object"}},
                         "structured_outputs")):
        with pytest.raises(openai.BadRequestError) as e:
            served.chat.completions.create(model="smol", messages=chat, max_tokens=2, extra_body=body)
        assert e.value.body["param"] == param, e.value.body
