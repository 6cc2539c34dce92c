"""`Sample`: one RULER-style task instance as token ids, and the two evaluation protocols.

A sample's prompt is `context_ids + question_ids`:

  context_ids   what a press compresses: the chat template's opening (or the tokenizer's BOS),
                the task instruction and the haystack with its needles
  question_ids  the question; with a chat template also the end of the user turn and the
                assistant's opening; then the answer prefix when the suite uses one (RULER's
                "The special magic number for X mentioned in the provided text is"), so that
                greedy decoding right after it produces the answer
  answer_ids    the answer's tokens as they follow question_ids (see `kvjax.ruler.prompt`)

Protocols (`Sample.inputs`):
  "query_agnostic"  compress context_ids; the question comes after, uncompressed
  "query_aware"     compress context_ids + question_ids together (the press sees the question)
"""
from __future__ import annotations

from dataclasses import dataclass, field

PROTOCOLS = ("query_agnostic", "query_aware")


@dataclass(frozen=True)
class ProtocolInputs:
    """The token sequences of one protocol.

    compress_ids  prefill these (with the press) into an empty cache
    prompt_ids    then feed these, uncompressed; greedy decoding continues after them (empty
                  under query_aware: the first answer token comes from the prefill's last logits)
    feed_ids      teacher forcing: feed these after compress_ids (prompt_ids + answer_ids[:-1])
    n_from_prefill  how many answer tokens the prefill's last logits predict (0 or 1); the
                  last len(answer_ids) - n_from_prefill logits of feed_ids predict the rest
    """
    compress_ids: tuple[int, ...]
    prompt_ids: tuple[int, ...]
    feed_ids: tuple[int, ...]
    n_from_prefill: int


@dataclass(frozen=True)
class Sample:
    """One task instance (module docstring). `answers` holds the answer's items (one for a
    single answer; the values, variables or words of a list answer), `answer_text` them as the
    model should write them (items joined by ", "). `metadata`: target and actual token counts,
    needle depths and texts, the haystack's first paragraph, whether the context/question split
    is clean (`split_clean`: context_ids is exactly the tokenization of the context text), ..."""
    task: str
    length: int                      # the target number of context tokens
    seed: int
    index: int
    chat: bool
    context_ids: tuple[int, ...]
    question_ids: tuple[int, ...]
    answer_text: str
    answers: tuple[str, ...]
    answer_ids: tuple[int, ...]
    context_text: str
    question_text: str
    metadata: dict = field(default_factory=dict, compare=False)

    @property
    def prompt_ids(self) -> tuple[int, ...]:
        """context_ids + question_ids: the whole prompt."""
        return self.context_ids + self.question_ids

    @property
    def n_context_tokens(self) -> int:
        return len(self.context_ids)

    @property
    def is_list(self) -> bool:
        """Whether the answer is a list (scored item by item) rather than one phrase."""
        return self.metadata.get("list_answer", len(self.answers) > 1)

    def inputs(self, protocol: str) -> ProtocolInputs:
        """The sequences of `protocol` ("query_agnostic" or "query_aware"; see ProtocolInputs)."""
        if protocol == "query_agnostic":
            return ProtocolInputs(self.context_ids, self.question_ids,
                                  self.question_ids + self.answer_ids[:-1], 0)
        if protocol == "query_aware":
            return ProtocolInputs(self.prompt_ids, (), self.answer_ids[:-1], 1)
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
