"""Tokens -> text as they arrive: incremental detokenization and stop strings.

`TextStream` turns the token ids of one request, pushed in bursts as the engine produces
them, into text deltas whose concatenation is exactly `tokenizer.decode(all ids)`, the
text `kvjax generate` prints (stop tokens such as EOS are not text). A delta is held back
while the decoded tail is an incomplete character (U+FFFD at the end: a UTF-8 sequence
cut between byte tokens) and, when stop strings are given, while the tail could still be
the start of one. A stop string ends the text before it (it is not part of the answer,
as in the OpenAI API).

Decoding is windowed (the offsets scheme of vLLM / text-generation-inference): each push
decodes only the ids since the last emitted boundary, so a long answer costs O(n), and
`finish` reconciles with one full decode so that the concatenation is exact.
"""
from __future__ import annotations

from ..tokenizer import ByteTokenizer


class TextStream:
    def __init__(self, tokenizer, stop=(), skip_ids=(), min_tokens: int = 0):
        self.tok = tokenizer
        self.min_tokens = min_tokens    # stop strings count only from this many tokens on (vLLM's rule)
        self.pushed = 0                 # tokens pushed, stop tokens included
        self.stop = tuple(stop)
        self.hold = max((len(s) for s in self.stop), default=1) - 1   # chars a stop may still need
        self.skip = frozenset(int(i) for i in skip_ids)
        self.ids: list[int] = []        # text-bearing ids (stop tokens removed)
        self._prefix = 0                # window start (ids before it are emitted and stable)
        self._read = 0                  # ids decoded up to here
        self.text = ""                  # decoded so far (stable part)
        self.sent = 0                   # chars of self.text already handed out
        self.stopped = False            # a stop string was found; text ends before it

    def push(self, ids) -> str:
        """Feed new token ids; returns the text that is now safe to send ('' if none)."""
        ids = [int(i) for i in ids]
        before = self.min_tokens - 1 - self.pushed   # tokens whose text no stop string may end in
        if 0 < before < len(ids):                    # (vLLM looks from token min_tokens on)
            return self.push(ids[:before]) + self.push(ids[before:])
        if self.stopped:
            return ""
        self.pushed += len(ids)
        ids = [i for i in ids if i not in self.skip]
        if ids:
            self.ids += ids
            before = self.tok.decode(self.ids[self._prefix:self._read])
            now = self.tok.decode(self.ids[self._prefix:])
            if len(now) > len(before) and not now.endswith("\ufffd") and now.startswith(before):
                self.text += now[len(before):]
                self._prefix, self._read = self._read, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The request ended: the rest of the text (what a full decode gives past what was sent)."""
        if not self.stopped:
            full = self.tok.decode(self.ids)
            if full.startswith(self.text[:self.sent]):
                self.text = full
            else:  # a tokenizer whose windowed decode differs: keep what was sent, add the rest
                self.text = self.text[:self.sent] + full[len(self.text[:self.sent]):]
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stop and not self.stopped and self.pushed >= self.min_tokens:
            start = max(0, self.sent - self.hold)
            hits = [(p, s) for s in self.stop if (p := self.text.find(s, start)) >= 0]
            if hits:
                cut = min(p for p, _ in hits)
                self.text = self.text[:cut]
                self.stopped = True
                final = True
        end = len(self.text) if final else max(self.sent, len(self.text) - self.hold)
        out = self.text[self.sent:end]
        self.sent = end
        return out

    @property
    def full_text(self) -> str:
        """Everything handed out so far (after `finish`: the whole answer)."""
        return self.text[:self.sent]


def token_text(tokenizer, token_id: int) -> str:
    """One token as text for logprobs listings (specials shown, e.g. '<eos>').

    A byte token that is not a character on its own (part of a UTF-8 sequence) is
    written `bytes:\\xNN`, as vLLM does, rather than U+FFFD."""
    s = tokenizer.decode([int(token_id)], skip_special_tokens=False)
    if s == "\ufffd" and int(token_id) < 256 and isinstance(tokenizer, ByteTokenizer):
        return f"bytes:\\x{int(token_id):02x}"
    return s


def token_bytes(tokenizer, token_id: int) -> list[int]:
    """The UTF-8 bytes of a token (the chat API's `bytes` field)."""
    if int(token_id) < 256 and isinstance(tokenizer, ByteTokenizer):
        return [int(token_id)]
    return list(token_text(tokenizer, token_id).encode("utf-8"))
