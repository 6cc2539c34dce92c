"""From a task's text to a `Sample`: the prompt format, the fit to a token budget, the split.

Formats (the user message is `instruction + "\\n\\n" + haystack + "\\n\\n" + question`):

  chat   (the tokenizer has a chat template, e.g. SmolLM2; or chat=True on the byte
         tokenizer, whose fixed format then applies) the message is rendered with
         `apply_chat_template([{"role": "user", ...}], add_generation_prompt=True,
         enable_thinking=False)` and the answer prefix (if any) appended after the
         assistant's opening, as RULER does
  plain  (no chat template: Gemma 3 270M base, the bundled byte models)
         `instruction\\n\\nhaystack\\n\\nQuestion: question\\nAnswer:` and the answer prefix
         after a space

The rendered text is split just before the "\\n\\n" that precedes the question: the context
is everything before (template opening, instruction, haystack), the question everything
after. Ids: the whole text is encoded as the model sees it (plain: `encode(text)`, so BOS
is added as the tokenizer adds it; chat: as `apply_chat_template` encodes, i.e. without
added specials for Hugging Face / GGUF tokenizers, `encode(text)` (with <bos>) for the byte
format), and the context text is encoded alone; `context_ids` is the longest common prefix
of the two and `question_ids` the rest of the whole text's ids, so `context_ids +
question_ids` is always exactly the whole prompt's ids. Where a token spans the boundary
(e.g. a BPE that joins "." and "\\n\\n") the context loses its last token or two to the
question; `metadata["split_clean"]` says whether context_ids is the context text's own
tokenization.

Answer ids: as lm-evaluation-harness tokenizes a continuation: the prompt text plus the
answer (after a space when the prompt ends in a non-space character, i.e. after "Answer:"
or an answer prefix; directly after the assistant's "\\n" otherwise) is encoded whole and
answer_ids are the ids past the prompt's. Should those not start with the prompt's ids (a
merge across the boundary; `metadata["answer_clean"]` False), they are `encode(" " +
answer, add_special_tokens=False)` instead. Either way `decode(answer_ids).strip()` is the
answer text.

Fit: the haystack is cut to n units (words, or list items for common words); n is the
largest for which the context ids fit `length` tokens (interpolation and bisection over n,
~5-10 encodes). The context is then within one unit (a word: 1-4 tokens) of the target.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..tokenizer import ByteTokenizer
from .sample import Sample

SEP = "\n\n"
_PLACEHOLDER = "@@QUESTION@@"


@dataclass(frozen=True)
class Question:
    """What a task asks once its haystack is fixed."""
    text: str                        # the question, e.g. "What is the special magic number for X ...?"
    answer_prefix: str               # RULER's answer prefix, e.g. "The special magic number for X ... is"
    answers: tuple[str, ...]         # the answer's items
    list_answer: bool = False        # scored item by item (see kvjax.ruler.score)
    metadata: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Draft:
    """A task instance before tokenization: the instruction, a haystack of n units
    (`body(n) -> (text, metadata)`, n in [0, n_max]) and the question once n is fixed
    (`finish(n, text, metadata) -> Question`)."""
    task: str
    instruction: str
    body: Callable[[int], tuple[str, dict]]
    n_max: int
    finish: Callable[[int, str, dict], Question]
    unit: str = "words"
    metadata: dict = field(default_factory=dict)


def has_chat_template(tokenizer) -> bool:
    """Whether `tokenizer` carries a (Jinja) chat template of its own."""
    return getattr(tokenizer, "chat_template", None) is not None


def resolve_chat(tokenizer, chat) -> bool:
    """chat=None: the chat format where the tokenizer has a template. chat=True on a Hugging
    Face / GGUF tokenizer without one is a ValueError; the byte tokenizer always has its own
    format."""
    if chat is None:
        return has_chat_template(tokenizer)
    if not isinstance(chat, bool):
        raise ValueError(f"chat must be None, True or False, got {chat!r}")
    if chat and not isinstance(tokenizer, ByteTokenizer) and not has_chat_template(tokenizer):
        raise ValueError(f"chat=True but {tokenizer!r} has no chat template; pass chat=False (the plain "
                         f"'Question: ... Answer:' format) or set one with kvjax.tokenizer.use_chat_template")
    return chat


def encode_prompt(tokenizer, text: str, chat: bool) -> list[int]:
    """The ids of a rendered prompt as the model sees it (module docstring)."""
    if not chat:
        return list(tokenizer.encode(text))
    if isinstance(tokenizer, ByteTokenizer):
        if tokenizer.chat_template is not None:      # a Jinja template writes <bos> itself
            return tokenizer.encode_with_specials(text, add_special_tokens=False)
        return tokenizer.encode(text)
    return list(tokenizer.encode(text, add_special_tokens=False))


def chat_messages(instruction: str, body: str, question: str) -> list[dict]:
    """The chat format's one user message."""
    return [{"role": "user", "content": instruction + SEP + body + SEP + question}]


def render(tokenizer, chat: bool, instruction: str, body: str, question: str,
           answer_prefix: str) -> tuple[str, int]:
    """(whole prompt text, character index where the question part starts)."""
    if not chat:
        context = instruction + SEP + body
        tail = SEP + "Question: " + question + "\nAnswer:" + (" " + answer_prefix if answer_prefix else "")
        return context + tail, len(context)
    text = tokenizer.apply_chat_template(chat_messages(instruction, body, question), add_generation_prompt=True,
                                         tokenize=False, enable_thinking=False)
    cut = text.rfind(SEP + question)
    if cut < 0 or not text[:cut].endswith(body):
        raise ValueError(f"the chat template of {tokenizer!r} does not render the user message verbatim; "
                         f"the context/question split needs it to (use chat=False)")
    return text + answer_prefix, cut


def _common_prefix(a: list[int], b: list[int]) -> int:
    k = 0
    for x, y in zip(a, b):
        if x != y:
            break
        k += 1
    return k


def fit(count: Callable[[int], int], target: int, lo: int, c_lo: int, hi: int, c_hi: int) -> int:
    """The largest n in [lo, hi) with count(n) <= target, given count(lo) = c_lo <= target <
    c_hi = count(hi) and count roughly increasing (about linear in n): interpolation steps,
    bisection while the last two steps moved the same end of the bracket."""
    moved: list[bool] = []           # per step: whether it moved the lower end
    while hi - lo > 1:
        stuck = len(moved) >= 2 and moved[-1] == moved[-2]
        n = (lo + hi) // 2 if stuck else lo + int((target - c_lo) * (hi - lo) / max(c_hi - c_lo, 1))
        n = min(max(n, lo + 1), hi - 1)
        c = count(n)
        if c <= target:
            lo, c_lo = n, c
        else:
            hi, c_hi = n, c
        moved.append(c <= target)
    return lo


def build_sample(tokenizer, draft: Draft, length: int, seed: int, index: int, chat: bool,
                 answer_prefix: bool = True) -> Sample:
    """Fit `draft`'s haystack to `length` context tokens and tokenize (module docstring)."""
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be a positive int (context tokens), got {length!r}")

    def context_ids(n: int) -> list[int]:
        body, _ = draft.body(n)
        text, cut = render(tokenizer, chat, draft.instruction, body, _PLACEHOLDER, "")
        return encode_prompt(tokenizer, text[:cut], chat)

    least = len(context_ids(0))
    if least > length:
        raise ValueError(f"length={length} tokens is too small for task {draft.task!r}: its instruction, "
                         f"template and needles alone take {least} context tokens")
    # every unit (a word, a list item) is at least one token, so this many already overflow
    hi = min(draft.n_max, length - least + 1)
    most = len(context_ids(hi))
    if most <= length and hi < draft.n_max:
        hi = draft.n_max
        most = len(context_ids(hi))
    if most <= length:
        raise ValueError(f"length={length} tokens is more than task {draft.task!r}'s haystack holds "
                         f"({most} context tokens with all {draft.n_max} {draft.unit})")
    calls = [0]

    def count(m: int) -> int:
        calls[0] += 1
        return len(context_ids(m))
    n = fit(count, length, 0, least, hi, most)
    body, body_meta = draft.body(n)
    q = draft.finish(n, body, body_meta)
    prefix = q.answer_prefix if answer_prefix else ""
    text, cut = render(tokenizer, chat, draft.instruction, body, q.text, prefix)
    full = encode_prompt(tokenizer, text, chat)
    own = encode_prompt(tokenizer, text[:cut], chat)
    k = _common_prefix(full, own)
    answer_text = ", ".join(q.answers)
    sep = " " if text and not text[-1].isspace() else ""
    whole = encode_prompt(tokenizer, text + sep + answer_text, chat)
    answer_clean = whole[:len(full)] == full and len(whole) > len(full)
    answer_ids = whole[len(full):] if answer_clean else \
        list(tokenizer.encode(sep + answer_text, add_special_tokens=False))
    meta = {**draft.metadata, **body_meta, **q.metadata,
            "target_tokens": length, "n_context_tokens": k, "n_question_tokens": len(full) - k,
            "n_answer_tokens": len(answer_ids), "haystack_units": n, "unit": draft.unit, "fit_encodes": calls[0],
            "split_clean": k == len(own), "answer_clean": answer_clean, "list_answer": q.list_answer,
            "answer_prefix": prefix, "question": q.text}
    return Sample(task=draft.task, length=length, seed=seed, index=index, chat=chat,
                  context_ids=tuple(full[:k]), question_ids=tuple(full[k:]), answer_text=answer_text,
                  answers=tuple(q.answers), answer_ids=tuple(answer_ids), context_text=text[:cut],
                  question_text=text[cut:], metadata=meta)
