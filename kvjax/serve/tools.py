"""Tool calls on /v1/chat/completions: OpenAI's `tools` and `tool_choice`.

- `check_tools(tools, tool_choice)` validates the request's functions and the choice ("none",
  "auto", "required" or {"type": "function", "function": {"name": ...}}) into a `ToolPlan`.
- The chat template renders the functions for the model (`tools=` as Hugging Face templates
  take them); "auto" needs a template that does (`renders_tools`), else a 400 says to pass
  `--chat-template`.
- "required" and a named function force the call through structured output: the answer is
  constrained to the JSON {"name": ..., "arguments": {...}} of one of the functions
  (`forced_schema`; the arguments follow the function's `parameters` schema), so it always
  parses and the arguments always validate.
- "auto": the model decides; its answer is parsed for calls in the Hermes format most open
  models use (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, several allowed),
  or, failing that, an answer that is exactly such a JSON object naming a given function.
  Text outside the calls stays the message's content.
- Streamed answers send their calls as they form: serve/toolstream.py.
"""
from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass

NAME_CHARS = r"[a-zA-Z0-9_-]{1,64}"              # OpenAI's function-name rule
NAME = re.compile(f"^{NAME_CHARS}$")
MAX_TOOLS = 128
HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


class ToolError(ValueError):
    """A malformed tools / tool_choice field; `.param` names it (the server's 400)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ToolPlan:
    """tools: the request's function definitions (OpenAI's shape); mode: "none" | "auto" |
    "required" | "named"; name: the forced function (mode "named")."""
    tools: tuple
    mode: str
    name: str | None = None

    @property
    def forced(self) -> bool:
        return self.mode in ("required", "named")

    @property
    def functions(self) -> dict:
        return {t["function"]["name"]: t["function"] for t in self.tools}


def check_tools(tools, tool_choice) -> ToolPlan | None:
    """The request's tools and tool_choice, checked (ToolError naming the field); None when
    the request has no tools (a tool_choice other than "none" then is an error)."""
    if not tools:
        if tool_choice not in (None, "none"):
            raise ToolError("tool_choice", f"tool_choice {tool_choice!r} needs tools")
        return None
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise ToolError("tools", f"tools must be a list of at most {MAX_TOOLS} functions")
    names = [_check_tool(t, i) for i, t in enumerate(tools)]
    if len(set(names)) != len(names):
        raise ToolError("tools", f"tools has two functions with the same name: {names}")
    choice = "auto" if tool_choice is None else tool_choice
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise ToolError("tool_choice", f"tool_choice must be 'none', 'auto', 'required' or a function, "
                                           f"got {choice!r}")
        return ToolPlan(tuple(tools), choice)
    fn = choice.get("function") if isinstance(choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if choice.get("type") != "function" or not isinstance(name, str) or name not in names:
        raise ToolError("tool_choice", f"tool_choice must name one of the tools {names} as "
                                       f'{{"type": "function", "function": {{"name": ...}}}}, got {choice!r}')
    return ToolPlan(tuple(tools), "named", name)


def _check_tool(tool, i: int) -> str:
    where = f"tools[{i}]"
    fn = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
        raise ToolError(where, f'{where} must be {{"type": "function", "function": {{"name": ..., ...}}}}')
    name = fn.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise ToolError(f"{where}.function.name", f"{where}.function.name must be 1-64 letters, digits, _ or -, "
                                                  f"got {name!r}")
    params = fn.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise ToolError(f"{where}.function.parameters", f"{where}.function.parameters must be a JSON Schema "
                                                        f"object, got {type(params).__name__}")
    return name


def forced_schema(plan: ToolPlan) -> dict:
    """The JSON Schema a forced answer follows: one call of the named function, or of any."""
    def call(fn):
        return {"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                "properties": {"name": {"const": fn["name"]},
                               "arguments": fn.get("parameters") or {"type": "object"}}}
    fns = plan.functions
    if plan.mode == "named":
        return call(fns[plan.name])
    return call(next(iter(fns.values()))) if len(fns) == 1 else {"anyOf": [call(f) for f in fns.values()]}


def renders_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template shows the model its tools."""
    template = getattr(tokenizer, "chat_template", None)
    getter = getattr(tokenizer, "get_chat_template", None)
    if callable(getter):
        try:
            template = getter(tools=[])
        except (ValueError, TypeError):
            pass
    return isinstance(template, str) and "tools" in template


def parse_calls(text: str, plan: ToolPlan) -> tuple[str | None, list]:
    """(content, calls) of an answer: calls as (name, arguments dict) pairs; content is the
    text outside the calls, stripped (None when empty and there are calls). A Hermes block
    that is not a valid call of a given function stays in the content."""
    if plan.forced:
        call = json.loads(text)                       # constrained: always this JSON
        return None, [(call["name"], call["arguments"])]
    calls, kept, last = [], [], 0
    for m in HERMES.finditer(text):
        call = valid_call(m.group(1), plan)
        if call is not None:
            calls.append(call)
            kept.append(text[last:m.start()])
            last = m.end()
    if calls:
        rest = "".join(kept + [text[last:]]).strip()
        return rest or None, calls
    whole = valid_call(text.strip(), plan)
    return (None, [whole]) if whole is not None else (text.strip(), [])


def valid_call(blob: str, plan: ToolPlan):
    """(name, arguments dict) when `blob` is the JSON of a call of one of the plan's
    functions ("arguments" or "parameters", an object or its JSON string); else None."""
    try:
        obj = json.loads(blob)
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in plan.functions:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    return (obj["name"], args) if isinstance(args, dict) else None


def call_entry(name: str, arguments: str) -> dict:
    """One OpenAI tool_calls entry: a fresh id, type, name and the arguments' JSON text."""
    return {"id": f"call_{secrets.token_hex(12)}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


def openai_calls(calls: list) -> list:
    """OpenAI's tool_calls entries of a whole answer (arguments as a JSON string)."""
    return [call_entry(name, json.dumps(args)) for name, args in calls]


def template_messages(messages: list) -> list:
    """Chat messages for a template: assistant tool_calls with their arguments as dicts (as
    Hugging Face templates expect them), a missing content as ""."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("content") is None:
            m["content"] = ""
        if m.get("tool_calls"):
            m["tool_calls"] = [_as_template_call(c) for c in m["tool_calls"]]
        out.append(m)
    return out


def _as_template_call(call):
    fn = dict(call.get("function", {})) if isinstance(call, dict) else {}
    if isinstance(fn.get("arguments"), str):
        try:
            fn["arguments"] = json.loads(fn["arguments"])
        except ValueError:
            pass
    return {**call, "function": fn} if isinstance(call, dict) else call
