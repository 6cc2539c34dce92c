"""Shared test setup: float32 on CPU, strict broadcasting, small seeded models.

Tests run under `jax_numpy_rank_promotion="raise"`, so an implicit rank-broadcast
bug (e.g. [B] + [B, T]) fails loudly instead of silently computing something else.
"""
import jax
import numpy as np
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")

# The core families every model-level test covers.
FAMILIES = ["gpt2-tiny", "llama-tiny", "mistral-tiny", "qwen2-tiny", "mqa-tiny", "llama3-tiny"]

# Weights drawn with std 0.2 instead of 0.02: random tiny models at 0.02 have nearly flat
# logits, where float32 reduction-order noise could flip a greedy argmax between two
# mathematically equal paths. At 0.2 the top logit is decisive.
INIT_STD = 0.2

_PARAMS = {}


def model(name: str):
    """(cfg, params) for a preset, built once per test session."""
    import kvjax

    if name not in _PARAMS:
        cfg = kvjax.ModelConfig.preset(name)
        _PARAMS[name] = (cfg, kvjax.init_params(cfg, jax.random.key(0), std=INIT_STD))
    return _PARAMS[name]


@pytest.fixture
def rng():
    return np.random.default_rng(0)
