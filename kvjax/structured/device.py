"""The host's packed token masks applied to logits on the device.

The host sends int32 [B, W] bitmasks (W = ceil(V/32); bit t%32 of word t//32 allows token t;
kvjax.structured.matcher.batch_bitmask fills them, unconstrained rows all ones), 32 times
fewer bytes than bool [B, V]; the device unpacks them inside the sampling program and sets
the logits of disallowed tokens to -inf before temperature, top-k/top-p and sampling.
"""
from __future__ import annotations

import jax.numpy as jnp


def unpack_bitmask(bits, vocab_size: int):
    """int32 [..., W] -> bool [..., vocab_size]."""
    shifts = jnp.arange(32, dtype=jnp.int32).reshape((1,) * bits.ndim + (32,))
    b = (bits[..., None] >> shifts) & 1
    return b.reshape(*bits.shape[:-1], bits.shape[-1] * 32)[..., :vocab_size].astype(bool)


def mask_logits(logits, bits):
    """logits [..., V] with the tokens `bits` [..., W] does not allow set to -inf."""
    return jnp.where(unpack_bitmask(bits, logits.shape[-1]), logits, -jnp.inf)
