"""Decoding: the jit boundary between the host API and the model.

  api.py       forward, prefill, decode_step, generate (host checks, placement, one program)
  programs.py  the public jitted programs and their traced cores (also with mesh shardings)
  plans.py     static plans: live-prefix segments, DecodingPress schedules (NamedTuples)
  nocache.py   generate(use_cache=False): the honest O(n^2) baseline
  kvzip.py     KVzipPress's prefill (whole-model reconstruction passes)
"""
from .api import decode_step, forward, generate, prefill
from .plans import LIVE_BAND, MIN_LIVE, Plan, Segment, decoding_segments, live_bucket, live_plan
from .programs import (GenerateOutput, append_chunk, decode_all, decode_loop, decode_loop_program,
                       decode_program, decode_tokens, forward_logits, forward_program, generate_core,
                       generate_program, mesh_programs, prefill_program)

__all__ = ["forward", "prefill", "decode_step", "generate", "GenerateOutput", "Plan", "Segment",
           "live_bucket", "live_plan", "decoding_segments", "MIN_LIVE", "LIVE_BAND", "append_chunk",
           "decode_tokens", "decode_all", "decode_loop", "forward_logits", "generate_core",
           "forward_program", "prefill_program", "decode_program", "decode_loop_program",
           "generate_program", "mesh_programs"]
