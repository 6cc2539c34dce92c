"""Model shapes for experiments: a preset name plus ModelConfig overrides.

Experiments that measure cost, not quality, run on random weights of a preset shape
(`preset: llama-tiny`, `model: {num_layers: 4}`); the top-level `dtype` sets the model
dtype. `model_config` is called while validating, so a bad preset or override is a
config error naming its key before anything is built.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import numpy as np

import kvjax

from .schema import ConfigError, option


@dataclass(frozen=True)
class ShapeConfig:
    """Fields shared by kinds that run a preset shape with random weights."""

    preset: str = option("llama-tiny", help="model shape: a kvjax.ModelConfig preset name")
    model: dict = option({}, help="ModelConfig field overrides, e.g. {num_layers: 4, max_position: 4096}")


def model_config(section: str, shape: ShapeConfig, dtype: str) -> kvjax.ModelConfig:
    """The ModelConfig for `shape` in `dtype`; ConfigError names `<section>.preset|model`."""
    try:
        cfg = kvjax.ModelConfig.preset(shape.preset)
    except ValueError as e:
        raise ConfigError(f"{section}.preset: {e}") from None
    if "dtype" in shape.model:
        raise ConfigError(f"{section}.model.dtype: set the model dtype with the top-level 'dtype' key")
    for key, value in shape.model.items():
        if not isinstance(value, (bool, int, float, str, type(None))):
            raise ConfigError(f"{section}.model.{key}: got {value!r}; allowed: a number, string, "
                              f"boolean or null")
    try:
        return cfg.replace(dtype=dtype, **shape.model)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{section}.model: {e}") from None


def random_params(cfg: kvjax.ModelConfig, seed: int, std: float = 0.02):
    """Random weights. std 0.02 is the usual init; kinds that compare tokens across two paths
    use a larger std (0.2), whose top logits are decisive, so a float near-tie cannot flip them."""
    return kvjax.init_params(cfg, jax.random.key(seed), std=std)


def random_tokens(cfg: kvjax.ModelConfig, seed: int, shape) -> np.ndarray:
    """Random token ids in [0, vocab_size), int32."""
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, shape, dtype=np.int32)
