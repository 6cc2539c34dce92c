"""Tool calls on /v1/chat/completions (kvjax/serve/tools.py): tools and tool_choice checked,
rendered by a chat template that shows the model its functions (tests/fixtures/
chatml_tools.jinja: ChatML with Hermes-style calls, the format of Qwen2.5 and Hermes
models), calls parsed out of the answer into OpenAI's tool_calls, and forced calls
("required", a named function) constrained by the function's JSON Schema.

The server runs the bundled text model with that template (an in-process app). The model
was never trained to call tools, so "auto" answers are steered with a guided_regex into a
call (the parser's input is then known); forced calls need nothing: the grammar makes them.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvjax.serve.tools import ToolError, ToolPlan, check_tools, forced_schema, parse_calls, renders_tools
from kvjax.serve.toolstream import ToolCallStream
from kvjax.tokenizer import ByteTokenizer, use_chat_template

TEMPLATE = Path(__file__).parent / "fixtures" / "chatml_tools.jinja"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The forecast for a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "days"],
                   "properties": {"city": {"enum": ["Oslo", "Lima", "Pune"]},
                                  "days": {"type": "integer", "minimum": 1, "maximum": 7}}}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "additionalProperties": False, "required": ["zone"],
                                       "properties": {"zone": {"enum": ["UTC", "CET"]}}}}}
ASK = [{"role": "user", "content": "Weather in Oslo?"}]


# ---------------------------------------------------------------- pure parts
@pytest.mark.parametrize("tools, choice, param", [
    ([{"type": "function"}], None, "tools[0]"),
    ([{"type": "function", "function": {"name": "bad name"}}], None, "tools[0].function.name"),
    ([{"type": "function", "function": {"name": "f", "parameters": []}}], None, "tools[0].function.parameters"),
    ([WEATHER, WEATHER], None, "tools"),
    ([WEATHER], "sometimes", "tool_choice"),
    ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "tool_choice"),
    (None, "required", "tool_choice"),
])
def test_bad_tools_name_the_field(tools, choice, param):
    with pytest.raises(ToolError) as e:
        check_tools(tools, choice)
    assert e.value.param == param


def test_parse_calls_hermes_bare_json_and_plain_text():
    plan = ToolPlan((WEATHER, TIME), "auto")
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lima", "days": 2}}\n'
            '</tool_call>\n<tool_call>{"name": "get_time", "arguments": "{\\"zone\\": \\"UTC\\"}"}</tool_call>')
    assert parse_calls(text, plan) == ("Let me check.", [("get_weather", {"city": "Lima", "days": 2}),
                                                         ("get_time", {"zone": "UTC"})])
    assert parse_calls('{"name": "get_time", "arguments": {"zone": "CET"}}', plan) == \
        (None, [("get_time", {"zone": "CET"})])
    assert parse_calls('{"name": "other", "arguments": {}}', plan) == ('{"name": "other", "arguments": {}}', [])
    assert parse_calls("It is sunny.", plan) == ("It is sunny.", [])
    broken = 'A <tool_call>{"name": "get_time"</tool_call> B <tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    assert parse_calls(broken, plan) == ('A <tool_call>{"name": "get_time"</tool_call> B', [("get_time", {})])


def merge_deltas(deltas):
    """(content, [(name, arguments text)]) as a client adds up streamed deltas."""
    content, calls = "".join(d.get("content") or "" for d in deltas), {}
    for d in deltas:
        for c in d.get("tool_calls", []):
            entry = calls.setdefault(c["index"], ["", ""])
            if "id" in c:
                assert c["type"] == "function" and c["id"].startswith("call_") and not entry[0]
                entry[0] = c["function"]["name"]
            entry[1] += c["function"]["arguments"]
    return content, [tuple(calls[i]) for i in range(len(calls))]


def stream_pieces(text, plan, finish, seed):
    """Deltas of `text` pushed in random pieces of 1-5 characters, and the finish_reason;
    also how many deltas went out before the end."""
    import random

    rng, ts, out, i = random.Random(seed), ToolCallStream(plan), [], 0
    while i < len(text):
        n = rng.randint(1, 5)
        out += ts.push(text[i:i + n])
        i += n
    before = len(out)
    last, reason = ts.finish(finish)
    return out + last, reason, before


@pytest.mark.parametrize("text", [
    'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lima", "days": 2}}\n</tool_call>\n'
    '<tool_call>{"name": "get_time", "arguments": "{\\"zone\\": \\"UTC\\"}"}</tool_call>',
    '  Hi <tool_call>not json</tool_call> there\n<tool_call>{"name":"get_time","parameters":{}}</tool_call> end <tool_',
    '{"name": "get_time", "arguments": {"zone": "CET"}}',
    ' It is sunny. <tool_call>{"name": "get_time", "arguments": {}',
    "It is <b>sunny</b>.\n\n",
])
def test_streamed_auto_calls_add_up_to_the_whole_answer(text):
    plan = ToolPlan((WEATHER, TIME), "auto")
    content, calls = parse_calls(text, plan)
    for seed in range(4):
        deltas, reason, _ = stream_pieces(text, plan, "stop", seed)
        got_content, got_calls = merge_deltas(deltas)
        assert got_content == (content or "") and reason == ("tool_calls" if calls else "stop")
        assert [(n, json.loads(a)) for n, a in got_calls] == calls


def test_streamed_forced_call_sends_its_arguments_as_they_form():
    text = '{"name": "get_weather", "arguments": {"city": "Oslo", "days": 3, "x": {"a": [1, {"b": "}"}]}} }'
    for mode, name, reason in (("required", None, "tool_calls"), ("named", "get_weather", "stop")):
        plan = ToolPlan((WEATHER, TIME), mode, name)
        for seed in range(4):
            deltas, got_reason, before = stream_pieces(text, plan, "stop", seed)
            content, calls = merge_deltas(deltas)
            assert content == "" and got_reason == reason
            assert [(n, json.loads(a)) for n, a in calls] == parse_calls(text, plan)[1]
            assert before >= len(deltas) - 1 and before > 5     # all but the last piece went out early
    cut, reason, _ = stream_pieces(text[:60], ToolPlan((WEATHER,), "required"), "length", 0)
    assert reason == "length" and merge_deltas(cut)[1][0][0] == "get_weather"   # cut off: what was sent stays


def test_forced_schema_and_template_detection():
    one = forced_schema(ToolPlan((WEATHER, TIME), "named", "get_time"))
    assert one["properties"]["name"] == {"const": "get_time"}
    assert len(forced_schema(ToolPlan((WEATHER, TIME), "required"))["anyOf"]) == 2
    assert renders_tools(use_chat_template(ByteTokenizer(), TEMPLATE.read_text()))
    assert not renders_tools(ByteTokenizer())


def test_the_template_renders_tools_calls_and_results():
    from kvjax.serve import protocol as P
    from kvjax.serve.routes import _render_chat

    tok = use_chat_template(ByteTokenizer(), TEMPLATE.read_text())
    messages = P.chat_messages([P.ChatMessage(**m) for m in [
        *ASK, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 1}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "rain"}]])
    text = tok.decode(_render_chat(tok, messages, [WEATHER]))
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 1}}' in text
    assert "<tool_response>\nrain\n</tool_response>" in text and text.endswith("<|im_start|>assistant\n")


# ---------------------------------------------------------------- through the server
@pytest.fixture(scope="module")
def api():
    pytest.importorskip("llguidance")
    from starlette.testclient import TestClient

    from kvjax.cli import build_parser
    from kvjax.serve import cli as serve_cli

    args = build_parser().parse_args(["serve", "--model", "text", "--max-slots", "2", "--max-len", "1024",
                                      "--chat-template", str(TEMPLATE), "--warmup", "none",
                                      "--compilation-cache", "none"])
    app, engine, _ = serve_cli.build(args)
    try:
        yield TestClient(app, base_url="http://127.0.0.1")
    finally:
        engine.close()


def chat(api, **body):
    r = api.post("/v1/chat/completions", json={"messages": ASK, "tools": [WEATHER, TIME], "max_tokens": 120,
                                               "temperature": 0, **body})
    return r


def arguments_valid(call, tool):
    jsonschema = pytest.importorskip("jsonschema")
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == tool["function"]["name"]
    jsonschema.validate(json.loads(call["function"]["arguments"]), tool["function"]["parameters"])


def test_forced_calls_always_validate(api):
    named = chat(api, tool_choice={"type": "function", "function": {"name": "get_weather"}}).json()
    choice = named["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["message"]["content"] is None, choice
    arguments_valid(choice["message"]["tool_calls"][0], WEATHER)
    required = chat(api, tool_choice="required", temperature=1.0, seed=4, n=2).json()
    for c in required["choices"]:
        call = c["message"]["tool_calls"][0]
        assert c["finish_reason"] == "tool_calls"
        arguments_valid(call, WEATHER if call["function"]["name"] == "get_weather" else TIME)


def test_auto_calls_are_parsed_and_streamed(api):
    steer = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'
    body = dict(tool_choice="auto", guided_regex=steer.replace("{", r"\{").replace("}", r"\}"))
    answer = chat(api, **body).json()["choices"][0]
    assert answer["finish_reason"] == "tool_calls" and answer["message"]["content"] is None
    assert answer["message"]["tool_calls"][0]["function"] == {"name": "get_time", "arguments": '{"zone": "UTC"}'}
    with api.stream("POST", "/v1/chat/completions", json={"messages": ASK, "tools": [WEATHER, TIME],
                                                          "max_tokens": 120, "temperature": 0, "stream": True,
                                                          **body}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    calls = [d["tool_calls"] for d in deltas if "tool_calls" in d]
    assert calls[0][0]["index"] == 0 and calls[0][0]["function"]["name"] == "get_time"
    assert not any(d.get("content") for d in deltas)
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_a_forced_call_streams_its_arguments(api):
    body = {"messages": ASK, "tools": [WEATHER, TIME], "max_tokens": 120, "temperature": 0, "stream": True,
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    with api.stream("POST", "/v1/chat/completions", json=body) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    content, calls = merge_deltas(deltas)
    assert content == "" and len(calls) == 1 and chunks[-1]["choices"][0]["finish_reason"] == "stop"
    arguments_valid({"type": "function", "id": "call_x", "function": {"name": calls[0][0], "arguments": calls[0][1]}},
                    WEATHER)
    assert sum("tool_calls" in d for d in deltas) > 3        # the arguments came in pieces, not at the end


def test_a_conversation_with_tool_results_and_bad_choices(api):
    turn = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_9", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_9", "content": "sunny"}]
    r = chat(api, messages=turn, tool_choice="none", max_tokens=8)
    assert r.status_code == 200 and "tool_calls" not in r.json()["choices"][0]["message"]
    bad = chat(api, tool_choice={"type": "function", "function": {"name": "nope"}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tool_choice"
    both = chat(api, tool_choice="required", response_format={"type": "json_object"})
    assert both.status_code == 400 and both.json()["error"]["param"] == "tool_choice"
