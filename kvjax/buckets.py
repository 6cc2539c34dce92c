"""Shape buckets: the one rounding rule that keeps the number of compiled programs small.

A program compiled for a width of n serves every width that rounds up to the same bucket,
so lengths that vary from call to call cost O(log n) compilations, not one each.
"""
from __future__ import annotations


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of `multiple` >= n (and >= multiple)."""
    return -(-max(1, int(n)) // multiple) * multiple


def pow2(n: int, floor: int = 1, cap: int | None = None) -> int:
    """The smallest power of two >= n (and >= floor), capped at `cap` when given."""
    b = max(1 << max(int(n) - 1, 0).bit_length(), floor)
    return b if cap is None else min(b, cap)
