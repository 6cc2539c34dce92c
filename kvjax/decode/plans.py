"""Static plans of a generate call: how much of the cache each decode segment reads, and when
a DecodingPress compacts. Plans are small NamedTuples of ints (hashable), passed to the jitted
programs as static arguments: a new plan is a new program, the same plan reuses one.

Axis letters: S cache slots, N new tokens.
"""
from __future__ import annotations

from typing import Any, NamedTuple

from ..buckets import pow2
from ..cache import KVCache

# Attention reads a power-of-two prefix of the cache that covers every row's live tokens
# (at least MIN_LIVE slots), so a step's cost follows the live context, not max_len.
MIN_LIVE = 128
# Longest-row lengths are rounded up to this before planning, so prompts whose lengths
# differ within one band share a compiled program.
LIVE_BAND = 64
# A chunked prefill's multi-token chunks read full dense/int8 layers in key blocks of this
# many slots (fewer when the cache is smaller), in a loop that stops at the rows' ends.
FLASH_BLOCK = 256


class Segment(NamedTuple):
    """`steps` decode steps in one `lax.scan`, reading cache slots [0, live) (None: every slot);
    `compress`: a DecodingPress compaction after them; the whole repeated `repeat` times."""
    steps: int
    live: int | None = None
    compress: bool = False
    repeat: int = 1


class Plan(NamedTuple):
    """A generate call's static plan: prefill reads [0, prefill_live) (None: every slot), then
    the decode segments; `press` compacts the prompt, `decoding` is a DecodingPress."""
    prefill_live: int | None
    segments: tuple            # of Segment
    press: Any = None
    decoding: Any = None


def live_bucket(n: int, max_len: int) -> int:
    """Slots attention reads when the longest row holds n tokens."""
    return pow2(n, floor=MIN_LIVE, cap=max_len)


def live_for(cache: KVCache, longest: int) -> int | None:
    """Slots a call reads when its longest row ends at `longest` tokens: a power-of-two prefix
    of a dense/int8 cache, or None (every slot) for rings, pressed and KIVI caches."""
    return live_bucket(longest, cache.max_len) if cache.reads_live_prefix else None


def flash_block(cache: KVCache, mesh=None) -> int | None:
    """Key block width of a chunked prefill's flash-style attention on this cache, or None
    (the static live prefix and one materialised softmax, as before): caches on a mesh,
    pressed, KIVI and all-ring caches keep that path (the ring layers of a hybrid cache keep
    it layer by layer)."""
    return FLASH_BLOCK if mesh is None and cache.reads_live_prefix else None


def live_plan(end_of_prompt: int, max_new_tokens: int, cache: KVCache, decoding=None,
              prompt_width: int = 1) -> tuple[int | None, tuple]:
    """(prefill live, segments) for a generate whose longest row holds `end_of_prompt` tokens
    after the prompt.

    Ring and pressed caches always read all their slots (live None). `decoding`: a
    DecodingPress, whose compressions fall on steps fixed by its interval (see
    `decoding_segments`).
    """
    S = cache.max_len
    if decoding is not None:
        return None, decoding_segments(max_new_tokens, decoding, prompt_width)
    if not cache.reads_live_prefix:
        return None, (Segment(max_new_tokens),)
    start = min(-(-end_of_prompt // LIVE_BAND) * LIVE_BAND, S)
    segments = []
    for i in range(max_new_tokens):        # step i writes a token at position <= start + i
        live = live_bucket(start + i + 1, S)
        if segments and segments[-1][1] == live:
            segments[-1][0] += 1
        else:
            segments.append([1, live])
    return live_bucket(start, S), tuple(Segment(n, live) for n, live in segments)


def decoding_segments(max_new_tokens: int, press, prompt_width: int) -> tuple:
    """kvpress's DecodingPress schedule as static segments (compress after, repeat).

    The prefill counts as step 1 (compressed right away if the interval is 1 or the chunk is
    at least target_size wide); decode step i is forward i + 2; a compression follows the
    forward that brings the count to the interval, and the count restarts.
    """
    interval = press.compression_interval
    count = 0 if prefill_compresses(press, prompt_width) else 1
    first = interval - count                     # decode steps until the first compression
    out, left = [], max_new_tokens
    if left < first:                         # the count never reaches the interval
        return (Segment(left),) if left else ()
    out.append(Segment(first, None, True))   # the step that reaches it compresses, also the last
    left -= first
    periods, tail = divmod(left, interval)
    if periods:
        out.append(Segment(interval, None, True, periods))
    if tail:
        out.append(Segment(tail))
    return tuple(out)


def prefill_compresses(press, prompt_width: int) -> bool:
    """Whether a DecodingPress compacts right after the prefill of a prompt this wide."""
    return press.compression_interval == 1 or prompt_width >= press.target_size
