"""Timing jitted work honestly: wait for the device, compile first, report the median.

JAX dispatches asynchronously, so every timed call ends in `jax.block_until_ready`.
The first call of a new shape compiles; `measure` times it separately (`first_s`,
compile plus one run) and reports the median of the following repeats.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import jax


def timed(fn, *args, **kwargs):
    """(result, seconds) of one call, waiting for every output array."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args, **kwargs))
    return out, time.perf_counter() - start


@dataclass
class Timing:
    first_s: float                          # first call: compile (if new) + one run
    times: list[float] = field(default_factory=list)  # the timed repeats after it

    @property
    def median_s(self) -> float:
        return statistics.median(self.times)

    @property
    def min_s(self) -> float:
        return min(self.times)

    @property
    def compile_s(self) -> float:
        """Compile time, estimated as first call minus a steady run (floored at 0)."""
        return max(self.first_s - self.median_s, 0.0)


def measure(fn, repeats: int):
    """Call `fn()` once to warm up, then `repeats` timed calls; returns (last result, Timing)."""
    out, first = timed(fn)
    t = Timing(first)
    for _ in range(repeats):
        out, s = timed(fn)
        t.times.append(s)
    return out, t
