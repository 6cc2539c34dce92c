"""Continuous batching: a paged KV cache, a scheduler and a prefix cache behind `Engine`.

  api.py       SamplingParams, TokenLogprob, Completion (shared with kvjax/serve)
  engine.py    Engine, RequestHandle: admission, chunked prefill, k-step decode, preemption
  pages.py     the page allocator and the prefix cache (host side)
  paged.py     paged pools, page tables and the reference paged attention (the kernel seam)
  programs.py  the compiled prefill-chunk and decode-steps programs
"""
from .api import Completion, SamplingParams, TokenLogprob
from .engine import Engine, RequestHandle

__all__ = ["Engine", "RequestHandle", "SamplingParams", "TokenLogprob", "Completion"]
