"""Bad input is refused on the host with a message naming the value and the limit,
before anything is traced or any cache is donated."""
import numpy as np
import pytest

import kvjax
from conftest import model


@pytest.fixture(scope="module")
def llama():
    return model("llama-tiny")


def test_prompt_plus_new_tokens_beyond_max_len(llama):
    cfg, params = llama
    with pytest.raises(ValueError, match=r"needs 26 cache slots .* max_len is 20"):
        kvjax.generate(cfg, params, np.ones((1, 10), np.int32), max_new_tokens=16, max_len=20)


def test_learned_positions_limit():
    cfg, params = model("gpt2-tiny")
    with pytest.raises(ValueError, match=rf"position 300 .* max_position={cfg.max_position}"):
        kvjax.generate(cfg, params, np.ones((1, 44), np.int32), max_new_tokens=256)


@pytest.mark.parametrize("bad", [-1, 320, 10_000])
def test_token_outside_vocab(llama, bad):
    cfg, params = llama
    toks = np.ones((2, 5), np.int32)
    toks[1, 3] = bad
    with pytest.raises(ValueError, match=rf"\[1, 3\]={bad} is outside the vocabulary \[0, 320\)"):
        kvjax.generate(cfg, params, toks, max_new_tokens=2)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        kvjax.forward(cfg, params, toks)


def test_padding_beyond_lengths_is_not_checked(llama):
    cfg, params = llama
    toks = np.array([[5, 6, -1, -1]], np.int32)       # -1 padding after 2 real tokens is fine
    out = kvjax.generate(cfg, params, toks, prompt_lengths=[2], max_new_tokens=2)
    ref = kvjax.generate(cfg, params, toks[:, :2], max_new_tokens=2)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))


def test_row_with_zero_prompt_tokens(llama):
    cfg, params = llama
    with pytest.raises(ValueError, match=r"prompt_lengths\[1\]=0: every row needs at least one token"):
        kvjax.generate(cfg, params, np.ones((2, 4), np.int32), prompt_lengths=[4, 0])


def test_lengths_larger_than_padded_width(llama):
    cfg, params = llama
    with pytest.raises(ValueError, match=r"prompt_lengths\[0\]=5 is larger than the padded width 4"):
        kvjax.generate(cfg, params, np.ones((2, 4), np.int32), prompt_lengths=[5, 1])


def test_shape_mismatches(llama):
    cfg, params = llama
    with pytest.raises(ValueError, match=r"must have shape \[2\]"):
        kvjax.generate(cfg, params, np.ones((2, 4), np.int32), prompt_lengths=[4, 4, 4])
    with pytest.raises(ValueError, match=r"shape \[batch, seq\]"):
        kvjax.forward(cfg, params, np.ones((4,), np.int32))
    cache = kvjax.init_cache(cfg, 3, 16)
    with pytest.raises(ValueError, match="cache batch size 3 does not match the tokens' batch size 2"):
        kvjax.prefill(cfg, params, np.ones((2, 4), np.int32), [4, 4], cache)
    with pytest.raises(ValueError, match="cache batch size 3 does not match"):
        kvjax.decode_step(cfg, params, np.ones((2,), np.int32), cache)
    other = kvjax.ModelConfig.preset("mqa-tiny")
    with pytest.raises(ValueError, match=r"cache buffers of layer 0 have shape"):
        kvjax.prefill(other, params, np.ones((3, 4), np.int32), [4, 4, 4], cache)
    with pytest.raises(ValueError, match=r"temperature must be a scalar or have shape \[2\]"):
        kvjax.generate(cfg, params, np.ones((2, 4), np.int32), temperature=[1.0, 1.0, 1.0])


def test_prefill_that_would_overflow_the_cache_leaves_the_cache_intact(llama):
    cfg, params = llama
    cache = kvjax.init_cache(cfg, 2, 8)
    _, cache = kvjax.prefill(cfg, params, np.ones((2, 6), np.int32), [6, 2], cache)
    with pytest.raises(ValueError, match=r"prefill: row 0 needs 9 cache slots \(6 already used \+ 3 new\) but max_len is 8"):
        kvjax.prefill(cfg, params, np.ones((2, 3), np.int32), [3, 3], cache)
    # Refused before donation: the cache is still usable.
    np.testing.assert_array_equal(np.asarray(cache.lengths), [6, 2])
    _, cache = kvjax.prefill(cfg, params, np.ones((2, 2), np.int32), [2, 2], cache)


def test_decode_on_a_full_cache_raises_not_wraps(llama):
    cfg, params = llama
    cache = kvjax.init_cache(cfg, 1, 4)
    _, cache = kvjax.prefill(cfg, params, np.ones((1, 4), np.int32), [4], cache)
    with pytest.raises(ValueError, match=r"decode_step: row 0 needs 5 cache slots .* max_len is 4"):
        kvjax.decode_step(cfg, params, np.array([1]), cache)


def test_reusing_a_donated_cache_is_a_clear_error(llama):
    cfg, params = llama
    cache = kvjax.init_cache(cfg, 1, 8)
    kvjax.prefill(cfg, params, np.ones((1, 2), np.int32), [2], cache)
    with pytest.raises(ValueError, match="donated to an earlier"):
        kvjax.decode_step(cfg, params, np.array([1]), cache)


@pytest.mark.parametrize("kw, msg", [
    (dict(temperature=-1.0), r"temperature must be 0 \(greedy\) or in \[1e-05, 100000\]"),
    (dict(temperature=1e-30), r"temperature must be 0 \(greedy\) or in"),   # logits / t would overflow float32
    (dict(top_k=-2), r"top_k must be an int in \[0, 2147483647\]"),
    (dict(top_k=2**31), r"top_k must be an int in \[0, 2147483647\]"),      # past the device's int32
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(eos_token_id=999), r"eos_token_id=999 is outside the vocabulary \[0, 320\)"),
    (dict(max_new_tokens=0), "max_new_tokens must be a positive int"),
])
def test_bad_generation_arguments(llama, kw, msg):
    cfg, params = llama
    with pytest.raises(ValueError, match=msg):
        kvjax.generate(cfg, params, np.ones((1, 4), np.int32), **kw)


def test_bad_config_values():
    with pytest.raises(ValueError, match="num_heads=6 must be a multiple of num_kv_heads=4"):
        kvjax.ModelConfig.preset("llama-tiny", num_heads=6, num_kv_heads=4)
    with pytest.raises(ValueError, match=r"unknown preset 'lama-tiny' \(did you mean 'llama-tiny'\?\)"):
        kvjax.ModelConfig.preset("lama-tiny")
    with pytest.raises(ValueError, match=r"unknown ModelConfig field\(s\) \['layers'\]"):
        kvjax.ModelConfig.preset("llama-tiny", layers=3)
    with pytest.raises(ValueError, match=r"ModelConfig.norm='batchnorm' is not one of"):
        kvjax.ModelConfig.preset("llama-tiny", norm="batchnorm")
