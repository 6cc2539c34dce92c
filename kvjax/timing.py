"""Timings that can be trusted: warm, calibrated, repeated, synchronised; compilation apart.

One method serves every figure kvjax prints (the runner's kinds, `kvjax generate`,
benchmarks/decode_bench.py and the transformers baseline):

  1. The first call compiles (if the shapes are new) and runs once. Its wall time, the
     seconds JAX spent compiling and the number of compilations (counted from
     `jax.monitoring`'s backend-compile events) are recorded apart and never mixed into
     the timed figures.
  2. Calibration (as timeit's autorange): warm calls in batches of 1, 2, 4, ... until a
     batch lasts a quarter of `min_seconds`; a measurement is then `calls` back-to-back
     calls ended by one synchronisation, `calls` chosen so it lasts about `min_seconds`
     (0.2 s by default), which dwarfs timer and dispatch noise. One batch of `calls` is
     run to check: shorter than half of `min_seconds` (a calibration batch slowed by a
     preemption), `calls` is scaled up again (at most 3 times).
  3. `repeats` measurements; each gives seconds per call = measurement / calls.
     Alternatives to compare (`measure_interleaved`) are calibrated apart and then
     measured in turn (ABBA order), so drift in the machine's speed cancels in their ratio.

A `Timing` reports the median, the minimum and the spread (max - min) of the per-call
times, divided by `units` (e.g. decode steps per call) where asked. A result is *invalid*,
with the reason, when a time is not positive or the spread is wider than the median;
callers add their own checks (an MBU above 100% on an accelerator) with `invalidate`.
Nothing is clamped: an impossible number is refused, not printed.

With several processes (multi-host), process 0 makes the calibration decisions and
broadcasts them, so every process runs the same sequence of programs (collectives would
otherwise mismatch: caught by the two-process `kvjax run` test).

Calls that thread a donated buffer (a KV cache) take the previous call's result as their
argument: `measure(call, state)` calls `state = call(state)`.
"""
from __future__ import annotations

import functools
import gc
import math
import statistics
import time
from dataclasses import dataclass, field

import jax
import numpy as np

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_COMPILE_PREFIX = "/jax/core/compile/"


class _CompileLog:
    """Process-wide totals of JAX compile events (a listener registered once)."""
    count = 0        # backend compilations
    seconds = 0.0    # tracing + lowering + backend compile
    registered = False

    @classmethod
    def ensure(cls):
        if not cls.registered:
            def on_duration(event, duration, **_):
                if event.startswith(_COMPILE_PREFIX):
                    cls.seconds += duration
                if event == _BACKEND_COMPILE:
                    cls.count += 1
            jax.monitoring.register_event_duration_secs_listener(on_duration)
            cls.registered = True


class compile_watch:
    """Context manager: compilations and compile seconds JAX reported inside the block.

    `seen` is False when this JAX version reports no compile events at all (checked once
    by compiling a fresh function), so callers can say the figure includes compilation.
    """
    _works: bool | None = None

    def __enter__(self):
        _CompileLog.ensure()
        if compile_watch._works is None:
            before = _CompileLog.count
            # a program no process compiled before (its constant is new), so a persistent
            # compilation cache cannot answer it and a silent probe means no compile events
            fresh = float(time.perf_counter_ns() % 1_000_003)
            jax.jit(lambda x: x + fresh)(0.0).block_until_ready()
            compile_watch._works = _CompileLog.count > before
        self.seen = compile_watch._works
        self._count0, self._sec0 = _CompileLog.count, _CompileLog.seconds
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.wall_s = time.perf_counter() - self._t0
        self.compiles = _CompileLog.count - self._count0
        self.compile_s = _CompileLog.seconds - self._sec0
        return False


@dataclass
class Timing:
    """Per-call seconds of `repeats` calibrated measurements, and the first call apart."""
    per_call: list[float] = field(default_factory=list)  # seconds per call, one per measurement
    calls: int = 1           # back-to-back calls in each measurement (calibrated)
    units: int = 1           # units of work per call (decode steps, tokens); per-unit figures divide by it
    first_s: float = 0.0     # first call: compile (if new) + one run
    compile_s: float = 0.0   # compile seconds JAX reported during the first call and calibration
    compiles: int = 0        # compilations during the whole measurement (0 after the first call is the norm)
    timed_compiles: int = 0  # compilations inside the timed measurements (must be 0)
    reasons: list[str] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        """Median seconds per unit."""
        return statistics.median(self.per_call) / self.units

    @property
    def min_s(self) -> float:
        return min(self.per_call) / self.units

    @property
    def spread_s(self) -> float:
        """max - min of the per-unit times."""
        return (max(self.per_call) - min(self.per_call)) / self.units

    @property
    def valid(self) -> bool:
        return not self.reasons

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)

    def invalidate(self, reason: str) -> None:
        self.reasons.append(reason)

    def check(self) -> "Timing":
        """Mark impossible or untrustworthy results invalid (never clamp them)."""
        if not self.per_call:
            self.invalidate("no timed measurement")
        elif min(self.per_call) <= 0:
            self.invalidate(f"non-positive time {min(self.per_call):.3g} s")
        elif self.spread_s > self.median_s:
            self.invalidate(f"spread {self.spread_s:.3g} s wider than the median {self.median_s:.3g} s")
        if self.timed_compiles:
            self.invalidate(f"{self.timed_compiles} compilation(s) inside the timed region")
        return self

    def fields(self, prefix: str, scale: float = 1e3, unit: str = "ms") -> dict:
        """Flat metrics: {prefix}_{unit} (median), _min_, _spread_, calls, compiles, validity."""
        out = {f"{prefix}_{unit}": scale * self.median_s if self.per_call else None,
               f"{prefix}_min_{unit}": scale * self.min_s if self.per_call else None,
               f"{prefix}_spread_{unit}": scale * self.spread_s if self.per_call else None,
               f"{prefix}_calls": self.calls, f"{prefix}_repeats": len(self.per_call),
               f"{prefix}_compile_s": self.compile_s, f"{prefix}_compiles": self.compiles,
               f"{prefix}_valid": self.valid}
        if not self.valid:
            out[f"{prefix}_invalid_reason"] = self.reason
        return out


def _agree(value):
    """Process 0's value on every process. With several processes every one must run the same
    sequence of (collective) programs, so calibration decisions, which depend on each
    process's own clock, are made by process 0 alone."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils
    return type(value)(multihost_utils.broadcast_one_to_all(np.asarray(value)).item())


def _sync(x):
    return jax.block_until_ready(x)


def _batch(call, state, n: int, sync):
    """`n` back-to-back calls ended by one sync: (state, seconds)."""
    t0 = time.perf_counter()
    for _ in range(n):
        state = call(state)
    sync(state)
    return state, time.perf_counter() - t0


def _calibrate(call, state, t: Timing, min_seconds: float, max_calls: int, sync):
    """First call (compile) and calibration into `t`; returns the state."""
    with compile_watch() as first:
        state = call(state)
        sync(state)
    t.first_s = first.wall_s
    with compile_watch() as calib:   # timeit's autorange: double the calls until a batch lasts
        k = 1                          # a quarter of min_seconds, then scale to min_seconds
        while True:
            state, elapsed = _batch(call, state, k, sync)
            if _agree(elapsed >= min_seconds / 4 or k >= max_calls):
                break
            k = min(max_calls, 2 * k)
        t.calls = _agree(max(1, min(max_calls, math.ceil(k * min_seconds / max(elapsed, 1e-9)))))
        for _ in range(3):   # a batch slowed by a preemption scales the calls down: check
            state, elapsed = _batch(call, state, t.calls, sync)
            if _agree(elapsed >= min_seconds / 2 or t.calls >= max_calls):
                break
            t.calls = _agree(min(max_calls, math.ceil(t.calls * min_seconds / max(elapsed, 1e-9))))
    t.compile_s = first.compile_s + calib.compile_s
    t.compiles = first.compiles + calib.compiles
    return state


def _one_measurement(call, state, t: Timing, sync):
    """One timed measurement (`t.calls` back-to-back calls, one sync) appended to `t`."""
    with compile_watch() as timed:
        state, elapsed = _batch(call, state, t.calls, sync)
        t.per_call.append(elapsed / t.calls)
    t.compiles += timed.compiles
    t.timed_compiles += timed.compiles
    return state


def _check_counts(repeats: int, units: int) -> None:
    if repeats < 1 or units < 1:
        raise ValueError(f"repeats and units must be >= 1, got repeats={repeats}, units={units}")


def measure(call, state=None, *, units: int = 1, repeats: int = 5, min_seconds: float = 0.2,
            max_calls: int = 100_000, sync=_sync):
    """Time `state = call(state)` as described in the module docstring; returns (state, Timing).

    units: work per call (per-unit figures divide by it). sync: waits for a result
    (default `jax.block_until_ready`; e.g. `torch.cuda.synchronize` for PyTorch).
    """
    _check_counts(repeats, units)
    t = Timing(units=units)
    state = _calibrate(call, state, t, min_seconds, max_calls, sync)
    for _ in range(repeats):
        state = _one_measurement(call, state, t, sync)
    return state, t.check()


def measure_interleaved(calls: dict, *, units: int = 1, repeats: int = 5, min_seconds: float = 0.2,
                        max_calls: int = 100_000, sync=_sync) -> dict:
    """Time several alternatives (`{name: call}`, each `state = call(state)` from None) for a
    comparison: each is compiled and calibrated as `measure` does, then the measurements
    alternate between them, in ABC CBA ... order, so a machine that speeds up or slows down
    during the run (another process, thermal or frequency drift) moves every alternative
    alike and their ratio stays honest. Returns {name: (state, Timing)}."""
    _check_counts(repeats, units)
    timings = {name: Timing(units=units) for name in calls}
    states = {}
    for name, call in calls.items():
        states[name] = _calibrate(call, None, timings[name], min_seconds, max_calls, sync)
    order = list(calls)
    for r in range(repeats):
        for name in (order if r % 2 == 0 else order[::-1]):
            states[name] = _one_measurement(calls[name], states[name], timings[name], sync)
    return {name: (states[name], timings[name].check()) for name in calls}


def release_compiled():
    """Free every compiled program (`jax.clear_caches`) and what only they held. Each compiled
    XLA CPU program keeps its own memory mappings, and a long run compiling many (models, shapes,
    batch sizes) reaches the kernel's vm.max_map_count (65,530 by default), which LLVM reports
    as "Cannot allocate memory" before a segfault. Call it between measurements that share no
    program."""
    jax.clear_caches()
    gc.collect()
    trim_host_memory()


def trim_host_memory(mmap_threshold: int | None = None) -> None:
    """Hand freed heap memory back to the OS (glibc `malloc_trim`; a no-op on other C
    libraries). XLA CPU frees and reallocates many buffers below glibc's dynamic mmap threshold
    (which grows to 32 MB), and glibc keeps those pages: a long run's resident memory ratchets
    up to several times what is live (measured: a 30-layer program's first call took a process
    from 2.8 to 8.1 GB resident with 2.0 GB live, and a long-context benchmark was killed by the
    kernel at 24 GB). mmap_threshold (bytes) also fixes glibc's threshold, so blocks of that
    size or more are mapped and unmapped on their own (returned when freed, at the cost of
    fresh pages on every allocation): for long runs where memory, not speed, is the limit."""
    libc = _glibc()
    if libc is None:
        return
    if mmap_threshold is not None:
        libc.mallopt(-3, int(mmap_threshold))          # M_MMAP_THRESHOLD (also stops its growth)
    libc.malloc_trim(0)


@functools.lru_cache(maxsize=1)
def _glibc():
    """The C library when it is glibc (has malloc_trim), else None; looked up once
    (find_library runs ldconfig)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc if libc is not None and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def timed_once(fn, *args, **kwargs):
    """(result, seconds, compile_watch) of one synchronised call: for one-off runs that say so."""
    with compile_watch() as w:
        out = fn(*args, **kwargs)
        jax.block_until_ready(out)
    return out, w.wall_s, w
