"""The haystack of the RULER-style tasks: CPython's pydoc documentation as plain prose.

`pydoc_data.topics.topics` (the reference text that ships with CPython, ~470 KB on 3.11) is
read in sorted topic order and cleaned to prose paragraphs (`prose_paragraphs`): blocks
separated by blank lines, keeping only those whose first line is not indented (code, grammar
productions and indented lists go), that hold no heading underline or table rule, that start
with a capital letter and end with ".", "?" or "!" and have at least 8 words; wrapped lines are
joined and reST emphasis (`**PEP 448**`, `*hashable*`) unmarked. On 3.11 that is 630
paragraphs, ~25,600 words (~160 KB). The text follows the running Python version, so a
suite is reproducible for one Python version.

A `Stream` is those paragraphs as one sequence of words, rotated to start at a chosen
paragraph (each sample starts at its own), with the word indices where a sentence and a
paragraph start. `Stream.render(n, inserts)` is the text of its first `n` words (one space
between words, a newline between paragraphs) with sentences inserted before given word
indices: the task generators fit `n` to a token budget and put needles at sentence
boundaries (`Stream.boundary`).
"""
from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from functools import lru_cache

MIN_WORDS = 8
_RULE = re.compile(r"[*=\-~^+#|]+")
_EMPHASIS = re.compile(r"\*{1,2}([^*\s][^*]*?)\*{1,2}")
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*$")


@lru_cache(maxsize=1)
def prose_paragraphs() -> tuple[str, ...]:
    """The cleaned prose paragraphs of `pydoc_data.topics`, in sorted topic order (module
    docstring)."""
    from pydoc_data.topics import topics

    out = []
    for name in sorted(topics):
        for block in re.split(r"\n[ \t]*\n", topics[name]):
            lines = block.split("\n")
            if not lines[0].strip() or lines[0][0].isspace():
                continue
            if any(_RULE.fullmatch(line.strip()) for line in lines if line.strip()):
                continue
            text = re.sub(r"\s+", " ", " ".join(line.strip() for line in lines)).strip()
            text = _EMPHASIS.sub(r"\1", text)
            if not re.match(r"[A-Z]", text) or not text.endswith((".", "?", "!")):
                continue
            if len(text.split()) < MIN_WORDS:
                continue
            out.append(text)
    return tuple(out)


@lru_cache(maxsize=1)
def _paragraph_words() -> tuple[tuple[str, ...], ...]:
    return tuple(tuple(p.split()) for p in prose_paragraphs())


@lru_cache(maxsize=1)
def prose_numbers() -> frozenset[str]:
    """Every run of digits in the prose (needle values are drawn outside it)."""
    return frozenset(re.findall(r"\d+", " ".join(prose_paragraphs())))


@lru_cache(maxsize=1)
def prose_upper_words() -> frozenset[str]:
    """Every all-capitals word in the prose (variable names are drawn outside it)."""
    return frozenset(re.findall(r"\b[A-Z]{2,}\b", " ".join(prose_paragraphs())))


@lru_cache(maxsize=1)
def word_pool() -> tuple[str, ...]:
    """Distinct lowercase words of 4-12 letters from the prose, sorted (the common-words task's
    vocabulary; 1,690 on 3.11)."""
    return tuple(sorted(set(re.findall(r"(?<![\w\"'.])[a-z]{4,12}(?![\w\"'])", " ".join(prose_paragraphs())))))


@dataclass(frozen=True)
class Stream:
    """Prose paragraphs as one word sequence (module docstring). `words[i]` is a word;
    `sentence_starts` the sorted indices that begin a sentence (0 and every paragraph start
    included), `paragraph_starts` those that begin a paragraph, `paragraph_of[i]` the index
    into `paragraphs` of word i's paragraph."""
    words: tuple[str, ...]
    sentence_starts: tuple[int, ...]
    paragraph_starts: tuple[int, ...]
    paragraphs: tuple[int, ...]          # the prose_paragraphs() index of each stream paragraph

    @classmethod
    def from_paragraph(cls, start: int) -> "Stream":
        """All prose paragraphs, beginning with paragraph `start` (modulo their count) and
        wrapping round to the first."""
        paras = _paragraph_words()
        order = [(start + k) % len(paras) for k in range(len(paras))]
        words, sentences, starts = [], [], []
        for p in order:
            starts.append(len(words))
            for j, w in enumerate(paras[p]):
                if j == 0 or (_SENTENCE_END.search(paras[p][j - 1]) and re.match(r"[A-Z\"]", w)):
                    sentences.append(len(words))
                words.append(w)
        return cls(tuple(words), tuple(sentences), tuple(starts), tuple(order))

    def __len__(self):
        return len(self.words)

    def boundary(self, depth: float, n: int) -> int:
        """The sentence boundary (a word index in [0, n]: a sentence start, or n itself)
        nearest to `depth` (0 = the start, 1 = the end) of the first n words."""
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {depth!r}")
        want = depth * n
        hi = bisect.bisect_right(self.sentence_starts, n - 1) if n else 0
        cands = list(self.sentence_starts[:hi]) + [n]
        i = bisect.bisect_left(cands, want)
        near = [c for c in cands[max(0, i - 1):i + 1]]
        return min(near, key=lambda c: (abs(c - want), c))

    def paragraph_spans(self, n: int) -> list[tuple[int, int]]:
        """(start, end) word spans of the paragraphs within the first n words; the last one
        may be cut short."""
        spans = []
        for k, s in enumerate(self.paragraph_starts):
            if s >= n:
                break
            end = self.paragraph_starts[k + 1] if k + 1 < len(self.paragraph_starts) else len(self.words)
            spans.append((s, min(end, n)))
        return spans

    def render(self, n: int, inserts: dict[int, list[str]] | None = None) -> str:
        """The first n words as text (" " between words, "\\n" between paragraphs), with
        `inserts[i]` (sentences) placed before word i (i == n: after the last word)."""
        if not 0 <= n <= len(self.words):
            raise ValueError(f"n={n} is outside [0, {len(self.words)}] words of the haystack")
        inserts = inserts or {}
        para = set(self.paragraph_starts)
        out: list[str] = []

        def put(piece: str, i: int):
            if out:
                out.append("\n" if i in para else " ")
            out.append(piece)

        for i in range(n):
            for s in inserts.get(i, ()):
                put(s, i)
            put(self.words[i], i)
        for s in inserts.get(n, ()):
            put(s, n if n < len(self.words) else -1)
        return "".join(out)
