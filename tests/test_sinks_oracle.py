"""The "sinks" cache kind (StreamingLLM) against an independent NumPy reference.

The other sinks tests compare the cache with `kvjax.forward` on a config with
`attention_sinks`, which scores through the same `_sink_scorer` as the cached path: a
wrong eviction count there moves both sides alike and nothing fails. This reference
shares no code with kvjax's model: it re-implements the llama-family layer stack from
the params pytree (embedding, RMSNorm, q/k/v/o with optional bias, half-split
"rotate_half" rotary written the Hugging Face way, SwiGLU, final norm, tied or separate
head) in float64 NumPy, and states the StreamingLLM rule directly:

    a query at stream position p of a cache with `slots` slots and `sinks` sink slots sees
    the first `sinks` tokens and the last `window = slots - sinks` tokens up to p itself;
    the visible keys get rotary positions by place in the cache (0, 1, ..., n-1 in stream
    order; the query sits at n-1, the last place), then plain softmax attention.

The cache is fed through the public entry points: token by token from an empty cache
(`kvjax.evaluate.stream_logits`), and as a ragged batch (rows of different lengths)
through `kvjax.prefill` chunks (one longer than the whole cache, one that crosses the
point where eviction starts) followed by `kvjax.decode_step`. Every stream runs several
times around the ring, and logits are compared at every step.

Weights: hf_fixtures.random_params (std 0.2 like the rest of the suite, and also norm
scales 1 + N(0, 0.2) and biases N(0, 0.2), so norm scales and q/k/v biases are not
trivially 1 and 0).
"""
import numpy as np
import pytest

import kvjax
from hf_fixtures import random_params
from kvjax.evaluate import stream_logits

# float32 kvjax against the float64 reference: measured max |error| 0.8e-5..1.1e-5 over
# every step of both drives and all three models, on logits of std ~1.6 and max |logit|
# ~7 (float32 rounding through two layers). The bound (1e-4 + 1e-5 |ref|, 1e-4..1.7e-4)
# is ~10x that. The rule errors it guards against move logits by O(1): an eviction count
# off by one moved them by up to 7.8, sink keys rotated one place too far by up to 6.7.
TOL = dict(atol=1e-4, rtol=1e-5)
T = 40                       # stream length: several times around every ring below

# (preset, slots, sinks): GQA 4/2 heads; MQA 4/1; Qwen2 (q/k/v bias, tied, theta 1e6, eps 1e-6)
CASES = [("llama-tiny", 10, 2), ("mqa-tiny", 7, 3), ("qwen2-tiny", 12, 4)]


# ----------------------------------------------------------------------------- reference

def _np(tree):
    return {k: _np(v) if isinstance(v, dict) else np.asarray(v, np.float64) for k, v in tree.items()}


def _rms(x, scale, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * scale


def _linear(x, p):
    return x @ p["kernel"] + (p["bias"] if "bias" in p else 0.0)


def _rope(x, pos, theta):
    """HF rotary: x * cos + rotate_half(x) * sin, rotate_half([a, b]) = [-b, a]; x [S, ..., H], pos [S]."""
    H = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, H, 2) / H)
    ang = np.asarray(pos, np.float64)[:, None] * inv[None, :]           # [S, H/2]
    ang = np.concatenate([ang, ang], -1).reshape((len(pos),) + (1,) * (x.ndim - 2) + (H,))
    half = H // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * np.cos(ang) + rotated * np.sin(ang)


def visible(p, slots, sinks):
    """Stream positions a query at p sees, in cache order (their rotary positions are 0..n-1)."""
    window = slots - sinks
    return sorted(set(range(min(sinks, p + 1))) | set(range(max(0, p - window + 1), p + 1)))


def reference_logits(cfg, params, tokens, slots, sinks):
    """Logits float64 [len(tokens), V] of one row read through a StreamingLLM cache."""
    assert (cfg.positions, cfg.norm, cfg.mlp, cfg.rope_scaling, cfg.sliding_window, cfg.out_bias) == (
        "rotary", "rmsnorm", "swiglu", None, None, False)
    P = _np(params)
    N, K, H, eps = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.norm_eps
    x = P["embed"]["embedding"][np.asarray(tokens)]                       # [T, D]
    for layer in range(cfg.num_layers):
        L = P[f"layers_{layer}"]
        h = _rms(x, L["attn_norm"]["scale"], eps)
        q = _linear(h, L["attn"]["q"]).reshape(len(tokens), N, H)
        k = _linear(h, L["attn"]["k"]).reshape(len(tokens), K, H)
        v = _linear(h, L["attn"]["v"]).reshape(len(tokens), K, H)
        out = np.zeros_like(q)
        for p in range(len(tokens)):
            seen = visible(p, slots, sinks)
            n = len(seen)
            kp = _rope(k[seen], np.arange(n), cfg.rope_theta)              # [n, K, H]
            qp = _rope(q[p][None], [n - 1], cfg.rope_theta)[0]              # [N, H]
            for head in range(N):
                kv = head // (N // K)
                s = kp[:, kv] @ qp[head] / np.sqrt(H)                      # [n]
                w = np.exp(s - s.max())
                out[p, head] = (w / w.sum()) @ v[seen, kv]
        x = x + _linear(out.reshape(len(tokens), N * H), L["attn"]["o"])
        h = _rms(x, L["mlp_norm"]["scale"], eps)
        gate, up = _linear(h, L["mlp"]["gate"]), _linear(h, L["mlp"]["up"])
        x = x + _linear(gate / (1 + np.exp(-gate)) * up, L["mlp"]["down"])
    x = _rms(x, P["final_norm"]["scale"], eps)
    return x @ (P["embed"]["embedding"].T if cfg.tie_embeddings else P["lm_head"]["kernel"])


def test_visible_states_the_rule():
    """The rule itself, on a cache of 6 slots with 2 sinks (window 4)."""
    assert visible(3, 6, 2) == [0, 1, 2, 3]             # nothing evicted yet
    assert visible(5, 6, 2) == [0, 1, 2, 3, 4, 5]       # cache exactly full
    assert visible(6, 6, 2) == [0, 1, 3, 4, 5, 6]       # token 2 evicted, query at place 5
    assert visible(20, 6, 2) == [0, 1, 17, 18, 19, 20]


# ----------------------------------------------------------------------------- the cache

@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def case(request):
    name, slots, sinks = request.param
    cfg = kvjax.ModelConfig.preset(name)
    params = random_params(cfg, seed=3)
    toks = np.random.default_rng(7).integers(0, cfg.vocab_size, (2, T), dtype=np.int32)
    ref = np.stack([reference_logits(cfg, params, row, slots, sinks) for row in toks])
    return cfg, params, slots, sinks, toks, ref


def test_token_by_token_stream_equals_reference(case):
    cfg, params, slots, sinks, toks, ref = case
    cache = kvjax.init_cache(cfg, 2, slots, kind="sinks", num_sinks=sinks)
    got, cache = stream_logits(cfg, params, toks, cache)
    np.testing.assert_allclose(np.asarray(got), ref, **TOL)
    assert int(cache.lengths[0]) == T >= sinks + 4 * (slots - sinks)     # wrapped 4+ times


def test_ragged_chunks_then_decode_equal_reference(case):
    """Rows of different lengths: a first chunk longer than the cache (row 0), a second one
    that starts before eviction and ends after it (row 1), then one token per step."""
    cfg, params, slots, sinks, toks, ref = case
    first, second = np.array([13, 6]), np.array([3, slots + 2 - 6])
    assert first[0] > slots and first[1] < slots < first[1] + second[1]
    cache = kvjax.init_cache(cfg, 2, slots, kind="sinks", num_sinks=sinks)
    rows = np.arange(2)
    start = np.zeros(2, int)
    for n in (first, second):
        chunk = np.zeros((2, n.max()), np.int32)
        for b in rows:
            chunk[b, : n[b]] = toks[b, start[b]: start[b] + n[b]]
        logits, cache = kvjax.prefill(cfg, params, chunk, n, cache)
        start = start + n
        np.testing.assert_allclose(np.asarray(logits), ref[rows, start - 1], **TOL)
    while start.max() < T:
        logits, cache = kvjax.decode_step(cfg, params, toks[rows, start], cache)
        np.testing.assert_allclose(np.asarray(logits), ref[rows, start], **TOL)
        start = start + 1
    np.testing.assert_array_equal(np.asarray(cache.lengths), start)
    assert start[0] != start[1] and start.min() >= sinks + 3 * (slots - sinks)
