"""Tool calls streamed as the model writes them: OpenAI's `tool_calls` deltas (the first for a
call carries its index, id, type and name with arguments ""; the next ones carry argument
text to append), with the content outside the calls streamed as it arrives.

`ToolCallStream(plan)`: `push(text)` takes each new piece of the answer and returns the
delta dicts to send now; `finish(finish_reason)` returns the last deltas and the choice's
finish_reason. What it sends adds up to what the non-streamed answer holds (serve/tools.py
`parse_calls`): the same content, the same calls with arguments that parse to the same JSON.

- Forced calls ("required", a named function): the grammar makes the answer
  `{"name": "<function>", "arguments": <JSON>}`, so the call's header goes out as soon as
  the name is complete and the arguments stream token by token; only a closing brace that
  may be the outer object's (and whitespace around it) is held back. A forced call cut off
  by max_tokens has sent part of its arguments (as OpenAI's stream does); finish_reason
  "length" says so.
- "auto" (Hermes `<tool_call>...</tool_call>` blocks): content streams with any tail that
  could start `<tool_call>` held back and whitespace at its ends trimmed (as the
  non-streamed content is); a block goes out as one complete call once `</tool_call>`
  closes it and it names a given function with object arguments, so a client never sees
  a call that does not parse (unconstrained models write broken calls; such a block stays
  content, as in `parse_calls`). An answer whose first character is `{` may be a bare call
  and is held to the end.
"""
from __future__ import annotations

import json
import re

from .tools import NAME_CHARS, ToolPlan, call_entry, parse_calls, valid_call

OPEN, CLOSE = "<tool_call>", "</tool_call>"
HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*"(' + NAME_CHARS + r')"\s*,\s*"arguments"\s*:\s*')


def call_delta(index: int, name: str, arguments: str) -> dict:
    """A call's first delta: index, a fresh id, type, name and the arguments so far."""
    return {"tool_calls": [{"index": index, **call_entry(name, arguments)}]}


def args_delta(index: int, text: str) -> dict:
    return {"tool_calls": [{"index": index, "function": {"arguments": text}}]}


def _held_args(text: str) -> str:
    """The argument text that is surely the arguments': without trailing whitespace and a
    last `}` (which may close the outer object)."""
    s = text.rstrip()
    return s[:-1].rstrip() if s.endswith("}") else s


def _open_prefix(text: str) -> int:
    """Length of the longest tail of `text` that could begin `<tool_call>`."""
    for n in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-n:]):
            return n
    return 0


class ToolCallStream:
    """One streamed chat choice's tool calls and content (see the module docstring)."""

    def __init__(self, plan: ToolPlan):
        self.plan, self.text, self.pos = plan, "", 0
        self.mode = "forced" if plan.forced else "start"   # start | content | block | whole
        self.calls = 0              # calls sent
        self.args_at = None         # forced: where the arguments begin in text, once known
        self.sent = 0               # forced: argument characters sent
        self.pending_ws, self.started = "", False

    # ------------------------------------------------------------ content
    def _content(self, s: str) -> list[dict]:
        """Content text, trimmed at both ends of the whole answer's content."""
        s = self.pending_ws + s
        if not self.started:
            s = s.lstrip()
        body = s.rstrip()
        self.pending_ws = s[len(body):]
        if not body:
            return []
        self.started = True
        return [{"content": body}]

    # ------------------------------------------------------------ pushing
    def push(self, piece: str) -> list[dict]:
        self.text += piece
        if self.mode == "forced":
            return self._push_forced()
        if self.mode == "start":
            head = self.text.lstrip()
            if not head:
                return []
            self.mode = "whole" if head.startswith("{") else "content"
        return [] if self.mode == "whole" else self._push_auto()

    def _push_forced(self) -> list[dict]:
        out = []
        if self.args_at is None:
            m = HEADER.match(self.text)
            if m is None or m.group(1) not in self.plan.functions:
                return []
            self.args_at = m.end()
            out.append(call_delta(0, m.group(1), ""))
            self.calls = 1
        ready = _held_args(self.text[self.args_at:])
        if len(ready) > self.sent:
            out.append(args_delta(0, ready[self.sent:]))
            self.sent = len(ready)
        return out

    def _push_auto(self) -> list[dict]:
        out = []
        while True:
            if self.mode == "content":
                at = self.text.find(OPEN, self.pos)
                if at < 0:
                    end = len(self.text) - _open_prefix(self.text[self.pos:])
                    out += self._content(self.text[self.pos:end])
                    self.pos = end
                    return out
                out += self._content(self.text[self.pos:at])
                self.pos, self.mode = at + len(OPEN), "block"
            end = self.text.find(CLOSE, self.pos)
            if end < 0:
                return out
            out += self._block(self.text[self.pos:end])
            self.pos, self.mode = end + len(CLOSE), "content"

    def _block(self, blob: str) -> list[dict]:
        call = valid_call(blob.strip(), self.plan)
        if call is None:                                   # not a call: it stays content
            return self._content(OPEN + blob + CLOSE)
        self.calls += 1
        return [call_delta(self.calls - 1, call[0], json.dumps(call[1]))]

    # ------------------------------------------------------------ the end
    def finish(self, finish_reason: str) -> tuple[list[dict], str]:
        """The last deltas and the finish_reason ("tool_calls" once a call was sent; "stop"
        for a named function, as OpenAI; a forced call cut off keeps "length")."""
        if self.mode == "forced":
            out = self._finish_forced(finish_reason)
        elif self.mode == "whole":
            out = self._finish_whole()
        else:
            rest = self.text[self.pos:]
            out = self._content(OPEN + rest if self.mode == "block" else rest)
        if not self.calls or finish_reason != "stop" and self.plan.forced:
            return out, finish_reason
        return out, "stop" if self.plan.mode == "named" else "tool_calls"

    def _finish_forced(self, finish_reason: str) -> list[dict]:
        if finish_reason != "stop":                       # cut off: what was sent stays
            return [] if self.calls else self._content(self.text)
        name, args = parse_calls(self.text, self.plan)[1][0]
        if self.args_at is None:                          # the header never matched
            self.calls = 1
            return [call_delta(0, name, json.dumps(args))]
        raw = _held_args(self.text[self.args_at:])
        return [args_delta(0, raw[self.sent:])] if len(raw) > self.sent else []

    def _finish_whole(self) -> list[dict]:
        content, calls = parse_calls(self.text, self.plan)
        out = self._content(content or "")
        for name, args in calls:
            out.append(call_delta(self.calls, name, json.dumps(args)))
            self.calls += 1
        return out
