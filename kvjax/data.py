"""Training data with no download: CPython's pydoc text as bytes, and a key-value recall task.

Axis letters: B batch, T sequence, M queries per sequence, V value length (tokens).

Both tasks use the byte vocabulary of `kvjax.ByteTokenizer`: ids 0..255 are raw UTF-8
bytes, then <pad>, <bos>, <eos>. One tokenizer therefore serves both bundled models.

Text (`pydoc_data.topics`): the English reference text that ships with CPython (one
document per topic, ~470 KB on 3.11). Topics, not bytes, are split between train and
held-out, so no sentence is in both. Each document is `<bos> bytes <eos>`; training
windows are random slices of the concatenated train stream; held-out loss is measured
on consecutive windows of the held-out stream. The corpus follows the running Python
version (topics change between releases), so figures are quoted with that version.

Key-value recall: `<bos>` then `num_pairs` pairs `keyvalue;` (e.g. `q7;`) with distinct
random keys, then queries `?keyvalue;` for keys that appeared. The model must produce the
value after `?key`. The value follows its key directly, so the recall is the classic
induction pattern (find the earlier occurrence of the key, copy what came next). The pair-to-query distance is measured in tokens, from the queried pair's first
value token to the query's first value token, and is chosen exactly with `distance=`.
"""
from __future__ import annotations

import string
import zlib
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .tokenizer import ByteTokenizer

BOS_ID, EOS_ID, PAD_ID = ByteTokenizer.BOS, ByteTokenizer.EOS, ByteTokenizer.PAD


# ----------------------------------------------------------------------------- pydoc text

def pydoc_topics() -> dict[str, str]:
    """The pydoc topic texts of the running CPython, sorted by topic name."""
    from pydoc_data.topics import topics

    return {name: topics[name] for name in sorted(topics)}


def is_heldout_topic(name: str, heldout_every: int) -> bool:
    """Deterministic topic-level split: a stable hash of the name, not Python's salted hash()."""
    return zlib.crc32(name.encode("utf-8")) % heldout_every == 0


def split_topics(heldout_every: int = 10) -> tuple[list[str], list[str]]:
    """(train topic names, held-out topic names): disjoint, sorted, same on every run."""
    if not isinstance(heldout_every, int) or heldout_every < 2:
        raise ValueError(f"heldout_every must be an int >= 2, got {heldout_every!r}")
    names = list(pydoc_topics())
    held = [n for n in names if is_heldout_topic(n, heldout_every)]
    train = [n for n in names if not is_heldout_topic(n, heldout_every)]
    if not held or not train:
        raise ValueError(f"heldout_every={heldout_every} leaves an empty split of {len(names)} topics")
    return train, held


def encode_document(text: str) -> np.ndarray:
    """<bos> + UTF-8 bytes + <eos> as int32 [n + 2] (the ByteTokenizer's ids)."""
    body = np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)
    return np.concatenate([[BOS_ID], body, [EOS_ID]]).astype(np.int32)


def text_stream(split: str, heldout_every: int = 10) -> np.ndarray:
    """The concatenated documents of one split ("train" or "heldout") as int32 [N]."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    train, held = split_topics(heldout_every)
    topics = pydoc_topics()
    return np.concatenate([encode_document(topics[n]) for n in (train if split == "train" else held)])


def text_batch(stream: np.ndarray, rng: np.random.Generator, batch_size: int, seq_len: int) -> np.ndarray:
    """Random windows of seq_len + 1 tokens from a stream: int32 [B, T + 1] (inputs and shifted targets)."""
    if len(stream) < seq_len + 1:
        raise ValueError(f"stream of {len(stream)} tokens is shorter than seq_len + 1 = {seq_len + 1}")
    starts = rng.integers(0, len(stream) - seq_len, size=batch_size)
    return stream[starts[:, None] + np.arange(seq_len + 1)[None, :]].astype(np.int32)


def text_eval_windows(stream: np.ndarray, seq_len: int, max_windows: int | None = None) -> np.ndarray:
    """Consecutive windows [n, T + 1] that overlap by one token, so every token after the
    first is predicted exactly once; at most `max_windows` of them (evenly spread)."""
    n = (len(stream) - 1) // seq_len
    if n < 1:
        raise ValueError(f"stream of {len(stream)} tokens is shorter than seq_len + 1 = {seq_len + 1}")
    idx = np.arange(n)
    if max_windows is not None and max_windows < n:
        idx = np.linspace(0, n - 1, max_windows).round().astype(int)
    starts = idx * seq_len
    return stream[starts[:, None] + np.arange(seq_len + 1)[None, :]].astype(np.int32)


# ----------------------------------------------------------------------------- kv recall

@dataclass(frozen=True)
class RecallTask:
    """Shape of a key-value recall sequence.

    A pair is `keyvalue;` (key_len + value_len + 1 tokens), a query `?keyvalue;`
    (one token more). Keys in a sequence are distinct.
    """

    num_pairs: int = 40
    key_len: int = 2
    value_len: int = 2
    key_chars: str = string.ascii_lowercase
    value_chars: str = string.digits
    echo_key: bool = False  # pairs `keyvaluekey;`: the repeated key trains the copy circuit

    def __post_init__(self):
        for f in ("num_pairs", "key_len", "value_len"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"RecallTask.{f} must be a positive int, got {v!r}")
        for f in ("key_chars", "value_chars"):
            chars = getattr(self, f)
            if len(set(chars)) != len(chars) or not chars or set(chars) & set(";?"):
                raise ValueError(f"RecallTask.{f}={chars!r} must be distinct characters, none of ';?'")
        if not all(32 < ord(c) < 127 for c in self.key_chars + self.value_chars):
            raise ValueError("RecallTask key_chars and value_chars must be printable ASCII, no space")
        if len(self.key_chars) ** self.key_len < self.num_pairs:
            raise ValueError(f"RecallTask: {len(self.key_chars)}^{self.key_len} keys cannot give "
                             f"num_pairs={self.num_pairs} distinct keys")

    @property
    def pair_len(self) -> int:
        return self.key_len * (2 if self.echo_key else 1) + self.value_len + 1

    @property
    def query_len(self) -> int:
        return self.pair_len + 1

    def seq_len(self, num_queries: int = 1) -> int:
        """Tokens in a sequence: <bos>, the pairs, the queries."""
        return 1 + self.num_pairs * self.pair_len + num_queries * self.query_len

    def max_queries(self, seq_len: int, num_pairs: int | None = None) -> int:
        """The most queries that fit in `seq_len` tokens after `num_pairs` pairs (default:
        the task's), the inverse of `seq_len`."""
        n = self.num_pairs if num_pairs is None else num_pairs
        return (seq_len - 1 - n * self.pair_len) // self.query_len

    def distances(self) -> list[int]:
        """Every pair-to-query distance (tokens) a single-query sequence can have, ascending.

        Querying the pair i places from the end (i = 1 is the last pair) gives
        i * pair_len + 1: the `?` of the query sits between the two value positions.
        """
        return [i * self.pair_len + 1 for i in range(1, self.num_pairs + 1)]


class RecallBatch(NamedTuple):
    tokens: np.ndarray         # int32 [B, T]: <bos> pairs queries
    answer_mask: np.ndarray    # bool [B, T]: True at the value tokens of the queries
    answer_starts: np.ndarray  # int32 [B, M]: position of each query's first value token
    answers: np.ndarray        # int32 [B, M, V]: the values the queries must produce
    distances: np.ndarray      # int32 [B, M]: tokens from the pair's value to the query's value


def _ids(chars: str) -> np.ndarray:
    return np.frombuffer(chars.encode("ascii"), np.uint8).astype(np.int32)


def recall_batch(task: RecallTask, rng: np.random.Generator, batch_size: int, num_queries: int = 1,
                 distance: int | np.ndarray | None = None, num_pairs: int | None = None,
                 repeat_queries: bool = False) -> RecallBatch:
    """A batch of recall sequences.

    num_queries (M): queries after the pairs, each for a different pair (M <= num_pairs)
    unless `repeat_queries`, where pairs are drawn with replacement (any M): denser
    training signal, and no shortcut of ruling out the values already asked for.
    distance: None for queried pairs drawn at random, or (single query only) an int or
    int [B] from `task.distances()`: each row's query is for the pair at that distance.
    num_pairs: fewer pairs than `task.num_pairs` (shorter sequences, e.g. a curriculum).
    """
    P, K, V = task.pair_len, task.key_len, task.value_len
    n, M = _pair_and_query_counts(task, num_pairs, num_queries, repeat_queries)
    B = batch_size
    queried = _queried_pairs(rng, B, n, M, P, distance, repeat_queries)   # [B, M] pair index
    keys, values = _draw_pairs(task, rng, B, n)                           # [B, n, K], [B, n, V]

    semi = np.full((B, max(n, M), 1), ord(";"), np.int32)
    echo = [keys] if task.echo_key else []
    pairs = np.concatenate([keys, values, *echo, semi[:, :n]], axis=2).reshape(B, n * P)
    rows = np.arange(B)[:, None]
    qk, qv = keys[rows, queried], values[rows, queried]                       # [B, M, K], [B, M, V]
    q = np.full((B, M, 1), ord("?"), np.int32)
    qecho = [qk] if task.echo_key else []
    queries = np.concatenate([q, qk, qv, *qecho, semi[:, :M]], axis=2).reshape(B, M * (P + 1))
    tokens = np.concatenate([np.full((B, 1), BOS_ID, np.int32), pairs, queries], axis=1)

    pair_value_pos = 1 + queried * P + K                                      # [B, M]
    answer_starts = 1 + n * P + np.arange(M)[None, :] * (P + 1) + 1 + K       # [1, M]
    answer_starts = np.broadcast_to(answer_starts, (B, M))
    mask = np.zeros(tokens.shape, bool)
    for j in range(V):
        mask[rows, answer_starts + j] = True
    return RecallBatch(tokens.astype(np.int32), mask, answer_starts.astype(np.int32),
                       qv.astype(np.int32), (answer_starts - pair_value_pos).astype(np.int32))


def _pair_and_query_counts(task: RecallTask, num_pairs, num_queries, repeat_queries: bool) -> tuple[int, int]:
    """(pairs n, queries M) after checking them against the task."""
    n = task.num_pairs
    if num_pairs is not None:
        if not isinstance(num_pairs, (int, np.integer)) or not 1 <= num_pairs <= n:
            raise ValueError(f"num_pairs must be in [1, task.num_pairs={n}], got {num_pairs!r}")
        n = int(num_pairs)
    if not isinstance(num_queries, (int, np.integer)) or num_queries < 1 or (
            num_queries > n and not repeat_queries):
        raise ValueError(f"num_queries must be in [1, num_pairs={n}] (any >= 1 with "
                         f"repeat_queries=True), got {num_queries!r}")
    return n, int(num_queries)


def _queried_pairs(rng: np.random.Generator, B: int, n: int, M: int, P: int, distance,
                   repeat_queries: bool) -> np.ndarray:
    """int [B, M]: the pair each query asks for (at the given distance, with replacement, or
    M distinct pairs at random)."""
    if distance is not None:
        if M != 1:
            raise ValueError(f"distance control needs num_queries=1, got {M}")
        d = np.broadcast_to(np.asarray(distance), (B,))
        back = (d - 1) // P
        if not np.issubdtype(d.dtype, np.integer) or ((d - 1) % P != 0).any() or (back < 1).any() \
                or (back > n).any():
            ok = [b * P + 1 for b in range(1, n + 1)]
            raise ValueError(f"distance {distance!r} is not one of the distances of {n} pairs: "
                             f"{ok[:3]}...{ok[-1]} (i * {P} + 1 for i in 1..{n})")
        return (n - back)[:, None]                                            # [B, 1]
    if repeat_queries:
        return rng.integers(0, n, size=(B, M))
    return np.argsort(rng.random((B, n)), axis=1)[:, :M]                      # distinct pairs


def _draw_pairs(task: RecallTask, rng: np.random.Generator, B: int, n: int):
    """(keys int [B, n, K], values int [B, n, V]) token ids; keys are distinct within a row."""
    K, V = task.key_len, task.value_len
    key_ids, val_ids = _ids(task.key_chars), _ids(task.value_chars)
    nk = len(key_ids)
    # Distinct keys per row: sample key indices (base-nk numbers) without replacement.
    key_space = nk ** K
    if key_space <= 1 << 20:
        codes = np.argsort(rng.random((B, key_space)), axis=1)[:, :n]
    else:
        codes = np.stack([rng.choice(key_space, n, replace=False) for _ in range(B)])
    digits = (codes[:, :, None] // nk ** np.arange(K - 1, -1, -1)[None, None, :]) % nk
    keys = key_ids[digits]                                                    # [B, n, K]
    values = val_ids[rng.integers(0, len(val_ids), size=(B, n, V))]           # [B, n, V]
    return keys, values


def recall_predictions(logits: np.ndarray, batch: RecallBatch) -> np.ndarray:
    """Argmax predictions of every query's value tokens: int32 [B, M, V].

    logits [B, T, vocab] (or [B, T - 1, vocab]) from a causal pass over batch.tokens:
    logits[:, t] predicts token t + 1. Under teacher forcing the first wrong token is the
    first token greedy decoding would get wrong, so an exact match here is an exact match
    of greedy generation.
    """
    V = batch.answers.shape[2]
    pos = batch.answer_starts[:, :, None] - 1 + np.arange(V)[None, None, :]  # [B, M, V]
    pred = np.asarray(logits).argmax(-1)                                      # [B, T]
    return np.take_along_axis(pred, pos.reshape(pred.shape[0], -1), axis=1).reshape(pos.shape)


def exact_match(predicted: np.ndarray, answers: np.ndarray) -> np.ndarray:
    """True where every value token is right: bool [...], from [..., V] arrays."""
    predicted, answers = np.asarray(predicted), np.asarray(answers)
    if predicted.shape != answers.shape:
        raise ValueError(f"predicted shape {predicted.shape} != answers shape {answers.shape}")
    return (predicted == answers).all(-1)


def recall_accuracy(logits: np.ndarray, batch: RecallBatch) -> float:
    """Fraction of queries whose whole value is predicted exactly."""
    return float(exact_match(recall_predictions(logits, batch), batch.answers).mean())


def recall_prompts(batch: RecallBatch) -> tuple[np.ndarray, np.ndarray]:
    """Single-query batch -> (prompts int32 [B, T'] ending at `?key`, answers int32 [B, V]),
    for measuring recall through `generate` (e.g. with a compressed cache)."""
    if batch.answers.shape[1] != 1:
        raise ValueError(f"recall_prompts needs a single-query batch, got {batch.answers.shape[1]} queries")
    start = int(batch.answer_starts[0, 0])
    return batch.tokens[:, :start], batch.answers[:, 0]
