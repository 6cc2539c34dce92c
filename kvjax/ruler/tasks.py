"""RULER-style task generators (after NVIDIA/RULER's scripts/data/synthetic), deterministic
given (seed, index), on the pydoc haystack (`kvjax.ruler.haystack`).

Each generator draws its random choices from `random.Random("kvjax-ruler:<task>:<seed>:<index>")`
(string seeding is stable across processes and platforms) and returns a `Draft`;
`make_sample` fits it to a token budget (`kvjax.ruler.prompt`). Answers are short (7-digit
numbers, 5-letter variable names, single words, a three-word phrase) but passage_copy's,
a whole passage written out: a long generation.

  niah_single       one needle "One of the special magic numbers for {key} is: {value}." at a
                    sentence boundary; asks the key's number
  niah_multikey     `num_needles` (4) needles with distinct keys; asks one (the rest distract)
  niah_multivalue   `num_values` (4) needles for one key; asks all its numbers (in text order)
  niah_multiquery   `num_queries` (4) needles with distinct keys; asks all of them (in the
                    order asked)
  variable_tracking `num_chains` (1) chains of `num_hops` (4) hops, "VAR QXBZT = 47213." then
                    "VAR MLKAE = QXBZT." ..., statements in chain order at sentence boundaries;
                    asks every variable that holds the first chain's value (in chain order)
  common_words      no haystack: a numbered list of words from the pydoc vocabulary in which
                    `top_k` (3) words appear `freq_common` times (30, fewer at short lengths:
                    about a third of n/top_k, at least freq_rare + 3) and the others at most
                    `freq_rare` (3) times; asks the top_k (in order of first appearance)
  passage_qa        the haystack as numbered passages ("Passage 1:\\n..."); asks which three
                    words come right after a quoted cue of six words in one passage (the answer
                    is copied from it); the cue occurs once in the context
  passage_copy      a long answer: the numbered passages; asks to write out, word for word,
                    the whole passage (`min_words`..`max_words`: 60..160 words; the longest
                    under max_words where no passage is that long) that begins with a quoted
                    three-word cue (unique in the context); the answer prefix is the
                    passage's first six words and the answer the rest (~70-220 tokens)

Needle depths (`depth` in [0, 1], or one per needle) are drawn uniformly unless given.
"""
from __future__ import annotations

import random
import re
from typing import Callable

from .haystack import Stream, prose_numbers, prose_paragraphs, prose_upper_words, word_pool
from .prompt import Draft, Question, build_sample, resolve_chat
from .sample import Sample

ADJECTIVES = ("amber", "ancient", "bitter", "bold", "brave", "bright", "calm", "clever", "cold", "crimson",
              "curious", "dusty", "eager", "early", "faint", "fancy", "fierce", "gentle", "golden", "grand",
              "green", "hidden", "hollow", "humble", "icy", "jolly", "kind", "lively", "lonely", "lucky",
              "misty", "modest", "narrow", "noble", "odd", "pale", "polite", "proud", "quiet", "rapid",
              "rustic", "silent", "silver", "sleepy", "smooth", "solid", "steady", "sunny", "swift", "tender",
              "tidy", "velvet", "vivid", "wandering", "warm", "wild", "wise", "witty", "young", "zealous")
NOUNS = ("anchor", "apple", "badger", "banjo", "beacon", "blossom", "bridge", "butter", "camel", "candle",
         "canyon", "castle", "cedar", "comet", "copper", "cottage", "falcon", "feather", "fountain", "garden",
         "glacier", "harbor", "hammer", "island", "jacket", "kettle", "lantern", "lemon", "meadow", "mirror",
         "mountain", "needle", "orchard", "otter", "pebble", "pepper", "piano", "pigeon", "pillow", "planet",
         "quarry", "rabbit", "raven", "ribbon", "river", "saddle", "salmon", "shadow", "spider", "spoon",
         "teapot", "thistle", "tiger", "tulip", "valley", "violin", "walnut", "willow", "window", "zebra")

NIAH_INSTRUCTION = ("Some special magic numbers are hidden within the following text. Make sure to memorize "
                    "them. I will quiz you about the numbers afterwards.")
NEEDLE = "One of the special magic numbers for {key} is: {value}."
VT_INSTRUCTION = "Memorize and track the chain(s) of variable assignment hidden in the following text."
CWE_INSTRUCTION = ("Below is a numbered list of words. In these words, some appear more often than others. "
                   "Memorize the ones that appear most often.")
QA_INSTRUCTION = ("Below are numbered passages from the Python documentation. Read them carefully: I will ask "
                  "you to quote from one of them afterwards.")
COPY_INSTRUCTION = ("Below are numbered passages from the Python documentation. Read them carefully: I will "
                    "ask you to write one of them out word for word afterwards.")
QA_ANSWER_WORDS, QA_CUE_WORDS = 3, 6
COPY_CUE_WORDS = 3       # passage_copy: the words the question quotes (the answer prefix has QA_CUE_WORDS)
SEP_QA = "\n\n"


def rng_for(task: str, seed: int, index: int) -> random.Random:
    """The random source of sample `index` of `task` under `seed`."""
    return random.Random(f"kvjax-ruler:{task}:{int(seed)}:{int(index)}")


def _keys(rng: random.Random, k: int) -> list[str]:
    pairs = rng.sample([(a, n) for a in ADJECTIVES for n in NOUNS], k)
    return [f"{a}-{n}" for a, n in pairs]


def _numbers(rng: random.Random, k: int, digits: int = 7) -> list[str]:
    out: list[str] = []
    taken = prose_numbers()
    while len(out) < k:
        v = str(rng.randrange(10 ** (digits - 1), 10 ** digits))
        if v not in taken and v not in out:
            out.append(v)
    return out


def _depths(rng: random.Random, k: int, depth) -> list[float]:
    if depth is None:
        return sorted(rng.random() for _ in range(k))
    ds = [depth] * k if isinstance(depth, (int, float)) else list(depth)
    if len(ds) != k or not all(isinstance(d, (int, float)) and 0 <= d <= 1 for d in ds):
        raise ValueError(f"depth must be a number in [0, 1] or {k} of them, got {depth!r}")
    return [float(d) for d in ds]


def _count(name: str, value, least: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    return value


def _needle_body(stream: Stream, sentences: list[str], depths: list[float]):
    """body(n): the first n haystack words with `sentences[i]` at the boundary nearest
    depths[i] (in order; equal boundaries keep that order)."""
    def body(n: int):
        inserts: dict[int, list[str]] = {}
        at = []
        for s, d in zip(sentences, depths):
            b = stream.boundary(d, n)
            inserts.setdefault(b, []).append(s)
            at.append(b / n if n else 0.0)
        return stream.render(n, inserts), {"needle_depths": at}
    return body


def _niah(task: str, rng: random.Random, num_keys: int, num_values: int, asked: list[int], depth,
          question: Callable, prefix: Callable, shuffle_values: bool = False) -> Draft:
    keys = _keys(rng, num_keys)
    values = [_numbers(rng, num_values) for _ in keys]
    needles = [(k, v) for k, vs in zip(keys, values) for v in vs]
    rng.shuffle(needles)
    depths = _depths(rng, len(needles), depth)
    stream = Stream.from_paragraph(rng.randrange(len(prose_paragraphs())))
    texts = [NEEDLE.format(key=k, value=v) for k, v in needles]
    asked_keys = [keys[i] for i in asked]
    if num_values > 1:     # one key, several values: answer them in the order they appear
        answers = [v for k, v in needles if k == asked_keys[0]]
    else:
        answers = [values[i][0] for i in asked]

    def finish(n, text, meta):
        return Question(question(asked_keys), prefix(asked_keys), tuple(answers), list_answer=len(answers) > 1,
                        metadata={"keys": asked_keys})
    return Draft(task, NIAH_INSTRUCTION, _needle_body(stream, texts, depths), len(stream), finish,
                 metadata={"needles": texts, "haystack_start": stream.paragraphs[0]})


def niah_single(rng: random.Random, depth=None) -> Draft:
    return _niah("niah_single", rng, 1, 1, [0], depth,
                 lambda k: f"What is the special magic number for {k[0]} mentioned in the provided text?",
                 lambda k: f"The special magic number for {k[0]} mentioned in the provided text is")


def niah_multikey(rng: random.Random, num_needles: int = 4, depth=None) -> Draft:
    n = _count("num_needles", num_needles, 2)
    return _niah("niah_multikey", rng, n, 1, [rng.randrange(n)], depth,
                 lambda k: f"What is the special magic number for {k[0]} mentioned in the provided text?",
                 lambda k: f"The special magic number for {k[0]} mentioned in the provided text is")


def niah_multivalue(rng: random.Random, num_values: int = 4, depth=None) -> Draft:
    n = _count("num_values", num_values, 2)
    return _niah("niah_multivalue", rng, 1, n, [0], depth,
                 lambda k: f"What are all the special magic numbers for {k[0]} mentioned in the provided text?",
                 lambda k: f"The special magic numbers for {k[0]} mentioned in the provided text are")


def _join(keys: list[str]) -> str:
    return ", ".join(keys[:-1]) + " and " + keys[-1] if len(keys) > 1 else keys[0]


def niah_multiquery(rng: random.Random, num_queries: int = 4, depth=None) -> Draft:
    n = _count("num_queries", num_queries, 2)
    order = list(range(n))
    rng.shuffle(order)
    return _niah("niah_multiquery", rng, n, 1, order, depth,
                 lambda k: f"What are all the special magic numbers for {_join(k)} mentioned in the provided text?",
                 lambda k: f"The special magic numbers for {_join(k)} mentioned in the provided text are")


def variable_tracking(rng: random.Random, num_chains: int = 1, num_hops: int = 4, depth=None) -> Draft:
    chains_n = _count("num_chains", num_chains)
    hops = _count("num_hops", num_hops)
    taken = prose_upper_words()
    names: list[str] = []
    while len(names) < chains_n * (hops + 1):
        v = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if v not in taken and v not in names:
            names.append(v)
    values = _numbers(rng, chains_n, 5)
    chains = [names[c * (hops + 1):(c + 1) * (hops + 1)] for c in range(chains_n)]
    statements = []          # each chain's statements in order; chains interleaved at random
    for c, chain in enumerate(chains):
        statements.append([f"VAR {chain[0]} = {values[c]}."] +
                          [f"VAR {chain[j]} = {chain[j - 1]}." for j in range(1, len(chain))])
    order = [c for c in range(chains_n) for _ in range(hops + 1)]
    rng.shuffle(order)
    pos = [0] * chains_n
    texts = []
    for c in order:
        texts.append(statements[c][pos[c]])
        pos[c] += 1
    depths = _depths(rng, len(texts), depth)
    stream = Stream.from_paragraph(rng.randrange(len(prose_paragraphs())))
    answers = tuple(chains[0])

    def finish(n, text, meta):
        return Question(f"Find all variables that are assigned the value {values[0]} in the text above.",
                        f"According to the chain(s) of variable assignment in the text above, {len(answers)} "
                        f"variables are assigned the value {values[0]}, they are:", answers, list_answer=True,
                        metadata={"value": values[0], "chains": chains, "values": values})
    return Draft("variable_tracking", VT_INSTRUCTION, _needle_body(stream, texts, depths), len(stream), finish,
                 metadata={"needles": texts, "haystack_start": stream.paragraphs[0]})


def common_words(rng: random.Random, top_k: int = 3, freq_common: int = 30, freq_rare: int = 3) -> Draft:
    k = _count("top_k", top_k)
    fr = _count("freq_rare", freq_rare)
    fc_max = _count("freq_common", freq_common, fr + 1)
    pool = list(word_pool())
    rng.shuffle(pool)
    common, rare = pool[:k], pool[k:]
    order_seed = rng.randrange(2 ** 32)
    n_max = 6 * len(rare)

    def freqs(n: int) -> tuple[int, int]:
        r = max(fr, -(-n // len(rare)))
        return max(min(fc_max, n // (3 * k)), r + 3), r

    def body(n: int):
        fc, r = freqs(n)
        words = common * fc + [rare[i // r] for i in range(n)]
        random.Random(order_seed).shuffle(words)
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words)), {"freq_common": fc, "freq_rare": r,
                                                                          "n_items": len(words)}

    def finish(n, text, meta):
        first = sorted(common, key=lambda w: text.index(f". {w} ") if f". {w} " in text else text.index(f". {w}"))
        return Question(f"What are the {k} most common words in the above list?",
                        f"The top {k} words that appear most often in the list are:", tuple(first),
                        list_answer=k > 1, metadata={"common_words": first})
    return Draft("common_words", CWE_INSTRUCTION, body, n_max, finish, unit="list items")


_ALPHA = re.compile(r"[A-Za-z]+")
_CUE_WORD = re.compile(r"[^\"`*]+")


def passage_qa(rng: random.Random, depth=None) -> Draft:
    stream = Stream.from_paragraph(rng.randrange(len(prose_paragraphs())))
    d = _depths(rng, 1, depth)[0]
    pick_seed = rng.randrange(2 ** 32)

    def finish(n, text, meta):
        spans = stream.paragraph_spans(n)
        ranked = _whole_passages(stream, n, d, "passage_qa")
        pick = random.Random(pick_seed)
        for i in ranked:
            s, e = spans[i]
            words = stream.words[s:e]
            cands = [j for j in range(QA_CUE_WORDS, len(words) - QA_ANSWER_WORDS + 1)
                     if all(_ALPHA.fullmatch(w) for w in words[j:j + QA_ANSWER_WORDS])
                     and all(_CUE_WORD.fullmatch(w) for w in words[j - QA_CUE_WORDS:j])]
            pick.shuffle(cands)
            for j in cands:
                cue = " ".join(words[j - QA_CUE_WORDS:j])
                answer = " ".join(words[j:j + QA_ANSWER_WORDS])
                if text.count(cue) == 1:
                    return Question(f'In Passage {i + 1}, which three words come right after "{cue}"?',
                                    "The three words that come right after it are:", (answer,),
                                    metadata={"passage": i + 1, "n_passages": len(spans), "cue": cue,
                                              "passage_text": " ".join(words),
                                              "needle_depths": [(i + 0.5) / len(spans)]})
        raise ValueError("passage_qa: no passage in this context has a unique six-word cue")
    return Draft("passage_qa", QA_INSTRUCTION, _passage_body(stream), len(stream), finish,
                 metadata={"haystack_start": stream.paragraphs[0]})


def _passage_body(stream: Stream):
    """body(n): the first n haystack words as numbered passages ("Passage 1:\\n...")."""
    def body(n: int):
        parts = [f"Passage {i + 1}:\n" + " ".join(stream.words[s:e])
                 for i, (s, e) in enumerate(stream.paragraph_spans(n))]
        return SEP_QA.join(parts), {}
    return body


def _whole_passages(stream: Stream, n: int, depth: float, task: str) -> list[int]:
    """Indices of the passages within the first n words that are not cut short, nearest to
    `depth` (as a share of the passages) first."""
    spans = stream.paragraph_spans(n)
    whole = [i for i, (s, e) in enumerate(spans)
             if i + 1 < len(spans) or e == _paragraph_end(stream, len(spans) - 1)]
    if not whole:
        raise ValueError(f"{task}: the length leaves no whole passage; use a larger length")
    return sorted(whole, key=lambda i: (abs((i + 0.5) / len(spans) - depth), i))


def passage_copy(rng: random.Random, depth=None, min_words: int = 60, max_words: int = 160) -> Draft:
    """A long generation: write out one whole passage (of min_words..max_words words where the
    context holds one, else its longest that fits max_words), given its opening."""
    _count("min_words", min_words, QA_CUE_WORDS + 1)
    _count("max_words", max_words, min_words)
    stream = Stream.from_paragraph(rng.randrange(len(prose_paragraphs())))
    d = _depths(rng, 1, depth)[0]

    def finish(n, text, meta):
        spans = stream.paragraph_spans(n)
        fits = [i for i in _whole_passages(stream, n, d, "passage_copy")
                if QA_CUE_WORDS < spans[i][1] - spans[i][0] <= max_words
                and text.count(" ".join(stream.words[spans[i][0]:spans[i][0] + COPY_CUE_WORDS])) == 1]
        if not fits:
            raise ValueError(f"passage_copy: no whole passage of at most {max_words} words with a unique "
                             f"opening in this context; use a larger length")
        long = [i for i in fits if spans[i][1] - spans[i][0] >= min_words]
        # else the longest; max keeps the first of equals, i.e. the one nearest the depth
        i = long[0] if long else max(fits, key=lambda i: spans[i][1] - spans[i][0])
        s, e = spans[i]
        cue = " ".join(stream.words[s:s + COPY_CUE_WORDS])
        opening = " ".join(stream.words[s:s + QA_CUE_WORDS])
        # the question names fewer words than the answer prefix repeats: the prefix's last words
        # then occur only in the passage, so copying continues from there (quoting the whole
        # opening, SmolLM2 copied the question's closing quote instead)
        return Question(f'Write out, word for word, the passage that begins "{cue}".', opening,
                        (" ".join(stream.words[s + QA_CUE_WORDS:e]),),
                        metadata={"passage": i + 1, "n_passages": len(spans), "words": e - s, "cue": cue,
                                  "opening": opening, "needle_depths": [(i + 0.5) / len(spans)]})
    return Draft("passage_copy", COPY_INSTRUCTION, _passage_body(stream), len(stream), finish,
                 metadata={"haystack_start": stream.paragraphs[0]})



def _paragraph_end(stream: Stream, k: int) -> int:
    return stream.paragraph_starts[k + 1] if k + 1 < len(stream.paragraph_starts) else len(stream.words)


TASKS: dict[str, Callable[..., Draft]] = {
    "niah_single": niah_single,
    "niah_multikey": niah_multikey,
    "niah_multivalue": niah_multivalue,
    "niah_multiquery": niah_multiquery,
    "variable_tracking": variable_tracking,
    "common_words": common_words,
    "passage_qa": passage_qa,
    "passage_copy": passage_copy,
}


def check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; the tasks are {', '.join(TASKS)}")
    return task


def make_sample(tokenizer, task: str, length: int, seed: int = 0, index: int = 0, chat=None,
                answer_prefix: bool = True, **options) -> Sample:
    """Sample `index` of `task` under `seed`, its context fitted to `length` tokens of
    `tokenizer`. chat: None (the chat format where the tokenizer has a template), True or False.
    answer_prefix: end the question with RULER's answer prefix. `options` go to the generator
    (e.g. num_needles=, depth=, top_k=)."""
    check_task(task)
    for name, v in (("seed", seed), ("index", index)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    chat = resolve_chat(tokenizer, chat)
    try:
        draft = TASKS[task](rng_for(task, seed, index), **options)
    except TypeError as e:
        raise ValueError(f"task {task!r}: {e}") from None
    return build_sample(tokenizer, draft, length, seed, index, chat, answer_prefix)


def make_suite(tokenizer, tasks=tuple(TASKS), lengths=(1024, 2048, 4096), n_per_task: int = 10, seed: int = 0,
               chat=None, answer_prefix: bool = True, options: dict | None = None) -> dict:
    """{(task, length): [Sample, ...]}: `n_per_task` samples (indices 0..n-1) of every task at
    every length. `options`: {task: {generator option: value}}. Everything is checked before
    the first sample is built."""
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    lengths = [lengths] if isinstance(lengths, int) else list(lengths)
    if not tasks or not lengths:
        raise ValueError("make_suite needs at least one task and one length")
    for t in tasks:
        check_task(t)
    for n in lengths:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"lengths must be positive ints (context tokens), got {n!r}")
    _count("n_per_task", n_per_task)
    options = dict(options or {})
    for t in options:
        check_task(t)
    chat = resolve_chat(tokenizer, chat)
    return {(t, n): [make_sample(tokenizer, t, n, seed, i, chat, answer_prefix, **options.get(t, {}))
                     for i in range(n_per_task)]
            for t in tasks for n in lengths}
