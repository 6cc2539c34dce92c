"""Presses on hybrid caches: the full layers pressed, the windowed layers' rings kept as they are.

Model: gemma3-tiny cut to three layers (sliding, full, sliding; window W = 8), so a ring layer
comes both before and after the pressed full layer. The context (24 and 19 tokens) wraps the
rings two to three times.

Oracles:
  (a) the kept positions of the full layer equal those of the same press on a cache with
      max_len slots on every layer (hybrid=False);
  (b) the tokens generated from the hybrid pressed cache (a question prefilled into it, then
      decode steps) equal those from a hybrid=False cache pressed by `GlobalOnly(press)`: the
      same press on the full layer, every token kept on the windowed layers (which then attend
      within their window: what the ring holds);
  (c) the rings hold what an unpressed hybrid prefill leaves;
  (d) bytes: predicted (kvjax.cache_bytes, press.cache_bytes) == KVCache.nbytes, and below
      the hybrid=False pressed cache's;
  (e) what is refused, with the message that says what to do.

Time: about 30 programs compile here (each press's prefill twice, one generate program per
layout); `jax_disable_most_optimizations` (this module only) makes each compile about twice
as fast on these tiny shapes, and the oracles compare programs compiled under the same flag.
"""
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import press as P
from kvjax.press.base import Keep
from kvjax.press.wrappers import Wrapper

from conftest import INIT_STD

W, B, T, MAX_LEN, N = 8, 2, 24, 40, 8
LENS = np.array([24, 19], np.int32)
Q_LENS = np.array([5, 3], np.int32)
TYPES = ("sliding", "full", "sliding")
GLOBAL = [i for i, t in enumerate(TYPES) if t == "full"]
LOCAL = [i for i, t in enumerate(TYPES) if t == "sliding"]

SNAP = dict(window_size=4, kernel_size=3)
PRESSES = {
    "Knorm": P.KnormPress(0.5),
    "KeyDiff": P.KeyDiffPress(0.5),
    "StreamingLLM": P.StreamingLLMPress(0.5, n_sink=2),
    "Random": P.RandomPress(0.5, seed=3),
    "SnapKV": P.SnapKVPress(0.5, **SNAP),
    "PyramidKV": P.PyramidKVPress(0.5, **SNAP, beta=2),
    "TOVA": P.TOVAPress(0.25),
    "ObservedAttention": P.ObservedAttentionPress(0.5),
    "ExpectedAttention": P.ExpectedAttentionPress(0.5, n_future_positions=16, n_sink=2),
    "CriticalKV": P.CriticalKVPress(P.SnapKVPress(0.5, **SNAP)),
    "ChunkKV": P.ChunkKVPress(P.KnormPress(0.5), chunk_length=4),
}
PLAIN = ("SnapKV", "ObservedAttention")   # also pressed on a hybrid=False cache as they are


@dataclass(frozen=True)
class GlobalOnly(Wrapper, P.Press):
    """Test-only: `press` on the full layers; the windowed layers keep every token (ratio,
    attention needs and length checks are the wrapped press's, as for every wrapper)."""
    press: P.Press = None

    def host_budgets(self, n, cfg):
        return self.press.host_budgets(n, cfg)

    def kept_bound(self, n, cfg):
        bound = np.array(self.press.kept_bound(n, cfg))
        bound[LOCAL] = np.asarray(n)
        return bound

    def keep(self, inp):
        if inp.layer in LOCAL:
            B_, T_, K = inp.k.shape[:3]
            return Keep(jnp.broadcast_to(inp.valid[:, None, :], (B_, K, T_)))
        return self.press.keep(inp)


@pytest.fixture(scope="module", autouse=True)
def _quick_compiles():
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", before)
    jax.clear_caches()          # no program compiled under the flag outlives this module


@pytest.fixture(scope="module")
def model():
    cfg = kvjax.ModelConfig.preset("gemma3-tiny").replace(num_layers=3, layer_types=TYPES, dtype="float32")
    assert cfg.sliding_window == W
    return cfg, kvjax.init_params(cfg, jax.random.key(5), std=INIT_STD)


@pytest.fixture(scope="module")
def tokens():
    rng = np.random.default_rng(7)
    return rng.integers(0, 320, (B, T), dtype=np.int32), rng.integers(0, 320, (B, 5), dtype=np.int32)


def _host(cache):
    return jax.tree.map(np.asarray, cache)


@pytest.fixture(scope="module")
def runs(model, tokens):
    """Per press: the hybrid pressed cache and the GlobalOnly hybrid=False one after the
    context, and the tokens each generates after the question (one generate program each
    for all presses: the caches' shapes do not depend on the press)."""
    cfg, params = model
    ctx, question = tokens
    out = {}
    for name, p in PRESSES.items():
        _, hybrid = kvjax.prefill(cfg, params, ctx, LENS, kvjax.init_cache(cfg, B, MAX_LEN), press=p)
        _, full = kvjax.prefill(cfg, params, ctx, LENS, kvjax.init_cache(cfg, B, MAX_LEN, hybrid=False),
                                press=GlobalOnly(p))
        h, f = _host(hybrid), _host(full)
        gen_h = kvjax.generate(cfg, params, question, Q_LENS, max_new_tokens=N, cache=hybrid)
        gen_f = kvjax.generate(cfg, params, question, Q_LENS, max_new_tokens=N, cache=full)
        out[name] = dict(hybrid=h, full=f, tokens=(np.asarray(gen_h.tokens), np.asarray(gen_f.tokens)),
                         after=(_host(gen_h.cache), _host(gen_f.cache)))
    return out


@pytest.mark.parametrize("name", list(PRESSES))
def test_full_layers_keep_what_the_press_keeps_on_a_full_cache_and_generation_matches(runs, name):
    r = runs[name]
    h, f = r["hybrid"], r["full"]
    assert h.rings == (W, 0, W) and h.pressed and not f.hybrid
    for layer in GLOBAL:                                                            # (a)
        np.testing.assert_array_equal(h.head_pos[layer], f.head_pos[layer])
        np.testing.assert_array_equal(h.head_fill[layer], f.head_fill[layer])
        np.testing.assert_allclose(h.keys[layer], f.keys[layer], rtol=1e-5, atol=1e-5)
    kept = h.head_fill[GLOBAL[0]]
    assert (kept < LENS[:, None]).all() and (kept > 0).all()     # the press did compact
    for layer in LOCAL:              # placeholders on the rings: no per-head positions
        assert h.head_pos[layer].shape == (B, 2, 0) and not h.head_fill[layer].any()
        assert h.keys[layer].shape[2] == W
    np.testing.assert_array_equal(h.lengths, LENS)
    np.testing.assert_array_equal(*r["tokens"])                                     # (b)
    after_h, after_f = r["after"]
    np.testing.assert_array_equal(after_h.head_pos[GLOBAL[0]], after_f.head_pos[GLOBAL[0]])
    np.testing.assert_array_equal(after_h.lengths, after_f.lengths)


@pytest.mark.parametrize("name", PLAIN)
def test_the_plain_press_on_a_full_cache_keeps_the_same_on_the_full_layer(model, tokens, runs, name):
    cfg, params = model
    _, plain = kvjax.prefill(cfg, params, tokens[0], LENS, kvjax.init_cache(cfg, B, MAX_LEN, hybrid=False),
                             press=PRESSES[name])
    for layer in GLOBAL:
        np.testing.assert_array_equal(np.asarray(plain.head_pos[layer]), runs[name]["hybrid"].head_pos[layer])
    for layer in LOCAL:              # there the windowed layers were pressed too
        assert (np.asarray(plain.head_fill[layer]) < LENS[:, None]).all()


def test_rings_hold_what_an_unpressed_hybrid_prefill_leaves(model, tokens, runs):
    cfg, params = model
    _, plain = kvjax.prefill(cfg, params, tokens[0], LENS, kvjax.init_cache(cfg, B, MAX_LEN))
    plain = _host(plain)
    for name in ("SnapKV", "ObservedAttention", "ChunkKV"):                            # (c)
        h = runs[name]["hybrid"]
        np.testing.assert_array_equal(h.slot_pos, plain.slot_pos)
        for layer in LOCAL:
            np.testing.assert_allclose(h.keys[layer], plain.keys[layer], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(h.values[layer], plain.values[layer], rtol=1e-5, atol=1e-5)
    # each ring holds the window's last W positions of its row
    np.testing.assert_array_equal(np.sort(plain.slot_pos, axis=1), [np.arange(n - W, n) for n in LENS])


def test_bytes_are_predicted_and_below_the_full_pressed_cache(model, runs):
    cfg, _ = model
    h, f = runs["SnapKV"]["hybrid"], runs["SnapKV"]["full"]                           # (d)
    assert h.nbytes == kvjax.cache_bytes(cfg, B, MAX_LEN, pressed=True)
    assert f.nbytes == kvjax.cache_bytes(cfg, B, MAX_LEN, pressed=True, hybrid=False)
    assert h.nbytes < f.nbytes
    # full layer: K/V + a position per slot and a fill per head; ring layers: W slots + a fill
    K, H = cfg.num_kv_heads, cfg.head_dim
    full_layer = B * K * MAX_LEN * (2 * H * 4 + 4) + B * K * 4
    ring_layer = B * K * W * 2 * H * 4 + B * K * 4
    assert h.nbytes == full_layer + 2 * ring_layer + B * W * 4 + B * 4
    for kind in ("dense", "int8"):
        sized = P.pressed_cache(cfg, B, [1, 20, 1], kind=kind, hybrid=True)
        assert sized.rings == (W, 0, W) and sized.max_len == 20
        assert sized.nbytes == P.cache_bytes(cfg, B, [1, 20, 1], kind=kind, hybrid=True)
    assert P.cache_bytes(cfg, B, [MAX_LEN] * 3, hybrid=True) == h.nbytes


def test_a_hybrid_pressed_cache_sized_to_the_budget_continues_a_conversation(model, tokens, runs):
    """press.pressed_cache(..., hybrid=True): the full layer sized to what SnapKV keeps plus
    room (20 slots for a 24-token context; the rings stay W): the same kept positions; then a
    second turn by prefill and two decode steps, whose logits equal those of the same steps on
    the max_len hybrid cache."""
    cfg, params = model
    p = PRESSES["SnapKV"]
    sized = P.pressed_cache(cfg, B, [1, 20, 1], hybrid=True)
    _, sized = kvjax.prefill(cfg, params, tokens[0], LENS, sized, press=p)
    ref = runs["SnapKV"]["hybrid"]
    pos = np.asarray(sized.head_pos[1])
    np.testing.assert_array_equal(pos, ref.head_pos[1][:, :, :20])
    assert (ref.head_pos[1][:, :, 20:] == -1).all()
    big = jax.tree.map(jnp.asarray, ref)
    outs = []
    for cache in (sized, big):
        lg, cache = kvjax.prefill(cfg, params, tokens[1], Q_LENS, cache)
        steps = [np.asarray(lg)]
        for _ in range(2):
            lg, cache = kvjax.decode_step(cfg, params, np.argmax(steps[-1], -1), cache)
            steps.append(np.asarray(lg))
        outs.append((steps, cache))
    for a, b in zip(outs[0][0], outs[1][0]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    cache = outs[0][1]
    assert cache.nbytes == P.cache_bytes(cfg, B, [1, 20, 1], hybrid=True)
    np.testing.assert_array_equal(np.asarray(cache.lengths), LENS + Q_LENS + 2)


def test_save_and_load_keep_a_hybrid_pressed_cache(model, runs, tmp_path):
    cfg, _ = model
    h = jax.tree.map(jnp.asarray, runs["Knorm"]["hybrid"])
    back = kvjax.load_cache(kvjax.save_cache(tmp_path / "c.npz", h, cfg), cfg)
    assert back.rings == h.rings and back.pressed
    for a, b in zip(jax.tree.leaves(h), jax.tree.leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_refusals_name_the_press_and_what_to_do(model, tokens):
    cfg, params = model
    ctx, question = tokens
    fresh = lambda: kvjax.init_cache(cfg, B, MAX_LEN)  # noqa: E731
    cases = [
        (P.AdaKVPress(P.SnapKVPress(0.5, **SNAP)), "AdaKVPress pools.*SnapKVPress.*hybrid=False"),
        (P.KeyRerotationPress(P.KnormPress(0.5)), "KeyRerotationPress moves the next position.*"
                                                   "KnormPress.*hybrid=False"),
        (P.KVzipPress(0.5, tokenizer=kvjax.ByteTokenizer()), "KVzipPress.*not done on hybrid.*hybrid=False"),
        (P.DecodingPress(P.KnormPress(), compression_interval=4, target_size=8),
         "DecodingPress cuts every layer.*hybrid=False"),
    ]
    for p, match in cases:
        with pytest.raises(ValueError, match=match):
            kvjax.prefill(cfg, params, ctx, LENS, fresh(), press=p)
    with pytest.raises(ValueError, match="DecodingPress cuts every layer.*hybrid=False"):
        kvjax.generate(cfg, params, question, Q_LENS, max_new_tokens=2, cache=fresh(),
                       press=P.DecodingPress(P.KnormPress(), compression_interval=4, target_size=8))
    # a budget the full layer cannot hold: named before anything runs (the cache is still usable)
    small = kvjax.init_cache(cfg, B, 16)
    assert small.rings == (W, 0, W)
    with pytest.raises(ValueError, match="row 0 needs 18 slots in layer 1.*16 slots.*full layer of this hybrid"):
        kvjax.prefill(cfg, params, ctx, LENS, small, press=P.KnormPress(0.25))
    assert not small.keys[0].is_deleted()
    # a model windowed on every layer has rings everywhere: nothing to press
    mistral = kvjax.ModelConfig.preset("mistral-tiny")
    rings = kvjax.init_cache(mistral, 1, 16)
    with pytest.raises(ValueError, match="rings of 8 slots on every layer.*no full layer.*hybrid=False"):
        kvjax.prefill(mistral, kvjax.init_params(mistral, jax.random.key(0)), ctx[:1, :10], [10], rings,
                      press=P.KnormPress(0.5))
    with pytest.raises(ValueError, match="full layers of a hybrid cache share one slot count"):
        P.pressed_cache(cfg.replace(num_layers=4, layer_types=TYPES + ("full",)), B, [1, 20, 1, 30], hybrid=True)
    with pytest.raises(ValueError, match="never hybrid"):
        kvjax.cache_bytes(cfg, B, MAX_LEN, pooled=True, hybrid=True)
