"""Continuous batching: a paged KV cache, a scheduler and a prefix cache behind `Engine`.

  api.py        SamplingParams, TokenLogprob, Completion (shared with kvjax/serve)
  engine.py     Engine, RequestHandle: request checking, the loop thread, streaming, stats
  scheduler.py  Scheduler (host only, no JAX): admission, chunked prefill, decode steps,
                preemption; `schedule_*` return plain steps, `update_from_output` closes the loop
  runner.py     Runner: a step in, device calls out (parameters, pools, mesh placement,
                compile counting)
  pages.py      PagePool: the page allocator and the prefix cache (host only, no JAX)
  programs.py   the compiled prefill-chunk and decode-steps programs

The paged pools, page tables and reference paged attention are kvjax/cache/paged.py.
"""
from .api import Completion, SamplingParams, TokenLogprob
from .engine import Engine, RequestHandle

__all__ = ["Engine", "RequestHandle", "SamplingParams", "TokenLogprob", "Completion"]
