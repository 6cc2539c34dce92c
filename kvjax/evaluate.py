"""Scoring text through a cache: the logits a model produces when it reads a stream token
by token, as it would while generating. This is how a cache kind's quality is measured
(perplexity, recall accuracy): the int8, window or sinks cache is exactly what the model
sees at every position.

Axis letters: B batch, T stream length, V vocab.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from . import validate
from .cache import KVCache
from .config import ModelConfig
from .decode import decode_tokens
from .press import host


@partial(jax.jit, static_argnums=0, donate_argnums=3)
def stream_program(cfg, params, tokens, cache):
    """The jitted scan behind `stream_logits` (no host checks): tokens int32 [B, T] -> (logits
    [B, T, V], cache); the cache is donated."""
    def step(cache, tok):
        logits, cache = decode_tokens(cfg, params, tok, cache, jnp.ones(tok.shape, bool))
        return cache, logits

    cache, logits = jax.lax.scan(step, cache, tokens.T)        # logits [T, B, V]
    return logits.transpose(1, 0, 2), cache


def stream_logits(cfg: ModelConfig, params, tokens, cache: KVCache):
    """Feed tokens [B, T] one at a time through `cache` (donated); logits float32 [B, T, V].

    logits[:, t] is the prediction for token t + 1 after reading tokens 0..t. Returns
    (logits, cache). Dense and int8 caches must have room for T more tokens; window and
    sinks caches take streams of any length.
    """
    tok = validate.as_tokens(tokens)
    validate.check_cache(cfg, cache, tok.shape[0])
    full = np.full((tok.shape[0],), tok.shape[1], np.int32)
    validate.check_token_ids(cfg, tok, full)
    if cache.pressed:                      # slots, not positions, are what runs out
        host.check_room(cache, full * host.per_token(cfg, cache), "stream_logits")
        validate.check_room(cfg, np.asarray(cache.lengths), full, cache.max_len, "stream_logits", False)
    else:
        validate.check_room(cfg, np.asarray(cache.lengths), full, cache.max_len, "stream_logits",
                            cache.bounded)
    return stream_program(cfg, params, jnp.asarray(tok, jnp.int32), cache)


def token_nll(logits, tokens) -> np.ndarray:
    """Negative log-likelihood (nats) of tokens[:, t+1] under logits[:, t]: [B, T-1]."""
    logp = jax.nn.log_softmax(jnp.asarray(logits[:, :-1], jnp.float32), axis=-1)
    nxt = jnp.asarray(tokens)[:, 1:, None]
    return -np.asarray(jnp.take_along_axis(logp, nxt, axis=-1)[..., 0])
