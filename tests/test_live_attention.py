"""Length-aware attention: a step reads the live prefix of the cache, not all of max_len.

Oracle: the same tokens as the no-cache path and as reading every slot.
"""
import re

import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from conftest import model
from kvjax.decode import Plan, Segment, decode_program, generate_program, live_bucket, live_plan


def test_plan_covers_every_step_with_power_of_two_reads():
    cfg = kvjax.ModelConfig.preset("llama-tiny")
    cache = kvjax.init_cache(cfg, 1, 1000)
    prefill_live, segments = live_plan(70, 600, cache)
    assert prefill_live == 128 and sum(n for n, *_ in segments) == 600
    start, first = 128, 0                     # 70 rounds up to the 64-token band: 128
    for steps, live, compress, repeat in segments:
        assert not compress and repeat == 1
        last = first + steps - 1
        assert start + last + 1 <= live       # every token the segment writes is read
        assert live == 1000 or live & (live - 1) == 0
        first += steps
    assert [live for _, live, *_ in segments] == [256, 512, 1000]
    ring = kvjax.init_cache(cfg, 1, 64, kind="window")
    assert live_plan(70, 300, ring) == (None, ((300, None, False, 1),))   # rings read all their slots


@pytest.mark.parametrize("kind", ["dense", "int8"])
def test_segmented_generate_equals_no_cache(kind, rng):
    cfg, params = model("llama-tiny")
    prompts = rng.integers(0, cfg.vocab_size, (3, 12), dtype=np.int32)
    lens = np.array([12, 3, 8], np.int32)
    out = kvjax.generate(cfg, params, prompts, lens, max_new_tokens=150, max_len=1024, cache_kind=kind)
    # The same loop reading all 1024 slots at every step (one segment, live = max_len).
    from kvjax.sampling import Knobs
    knobs = Knobs.make(cfg.vocab_size, 3)
    full = generate_program(cfg, params, jnp.asarray(prompts), jnp.asarray(lens),
                            kvjax.init_cache(cfg, 3, 1024, kind=kind), Plan(1024, (Segment(150, 1024),)), knobs)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(full.tokens))
    if kind == "dense":
        ref = kvjax.generate(cfg, params, prompts, lens, max_new_tokens=150, use_cache=False)
        np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))


def test_prompts_within_a_length_band_share_one_program(rng):
    cfg, params = model("llama-tiny")
    prompts = rng.integers(0, cfg.vocab_size, (2, 48), dtype=np.int32)
    kvjax.generate(cfg, params, prompts, [48, 3], max_new_tokens=8, max_len=512)
    before = generate_program._cache_size()
    for lens in ([10, 2], [33, 47], [1, 1]):
        kvjax.generate(cfg, params, prompts, lens, max_new_tokens=8, max_len=512)
    assert generate_program._cache_size() == before


def test_decode_step_reads_only_the_live_prefix():
    cfg, params = model("llama-tiny")
    cache = kvjax.init_cache(cfg, 2, 4096)
    live = live_bucket(130, 4096)
    assert live == 256
    hlo = decode_program.lower(cfg, params, jnp.zeros((2,), jnp.int32), cache, live).compile().as_text()
    dots = [l for l in hlo.splitlines() if re.search(r"\b(dot|convolution)\(", l)]
    assert dots and all("4096" not in l.split("=")[1].split("(")[0] for l in dots)
    assert any(",256" in l or "256," in l for l in dots)
    # Reading all slots is a different program whose attention spans max_len.
    hlo_all = decode_program.lower(cfg, params, jnp.zeros((2,), jnp.int32), cache, None).compile().as_text()
    assert "4096" in "".join(l for l in hlo_all.splitlines() if "dot(" in l or "fusion(" in l)
