"""kvjax.cache.surgery: truncate, drop_newest, empty_rows and cut_slots on every layout.

Oracle: a cache built directly with fewer tokens. Prefilling n + m tokens and then dropping m
(or truncating to n) must give what prefilling the first n tokens gives: the same lengths,
the same positions per slot (`slot_pos`, `head_pos`, `head_fill`, `head_owner`), the same
keys and values in every valid slot, and the same logits from a following chunk. For a
pressed or pooled cache the oracle is the pressed cache itself before m more tokens were fed
without a press (a press decides differently on a shorter context). Refusals are checked to
name the row, the value and the limit.

Both caches of a comparison go through the same compiled prefill (same shapes; only the
lengths differ) and masked slots carry exactly zero weight, so the two should agree to the
last bit; the tolerance 1e-6 allows only for a reduction order that differs.

Tiny float32 model: llama-tiny (two layers; for the hybrid cache the first one sliding with a
window of 8), conftest's shared weights, batch 2 with ragged rows.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import press as P
from kvjax.cache import kivi, layer_arrays, read_layer
from kvjax.cache.surgery import cut_slots, drop_newest, empty_rows, truncate

from conftest import model

T = 16                                            # chunk width of every prefill (one program per kind)
TOL = 1e-6
KIVI = dict(bits=4, group_size=4, residual_length=8)
_kivi_read = jax.jit(kivi.read, static_argnums=(2, 3, 4, 5))     # one program, not ~50 eager ones


@pytest.fixture(scope="module")
def tiny():
    return model("llama-tiny")


@pytest.fixture(scope="module", params=["pressed", "pooled"])
def pressed(request, tiny):
    """(press, cache after a pressed prefill of rows of 12 and 10 tokens, with room for 8 more)."""
    cfg, params = tiny
    press = P.KnormPress(0.5) if request.param == "pressed" else P.AdaKVPress(P.KnormPress(0.5))
    cache = P.init_cache(cfg, 2, T, press, room=8)
    _, cache = kvjax.prefill(cfg, params, TOKENS, np.array([12, 10]), cache, press=press)
    assert cache.pressed and cache.pooled == (request.param == "pooled")
    return press, cache


def copy(cache):
    """A copy whose buffers the next donating call may consume."""
    return jax.tree_util.tree_map(jnp.copy, cache)


@pytest.fixture(scope="module")
def hybrid(tiny):
    """The same weights with layer 0 sliding (window 8): a hybrid cache rings that layer."""
    cfg, params = tiny
    return cfg.replace(sliding_window=8, layer_types=("sliding", "full")), params


TOKENS = (np.arange(2 * T).reshape(2, T) * 37 + 5) % 300          # [B, T]
NEXT = (np.arange(2 * T).reshape(2, T) * 11 + 3) % 300             # the following chunk


def filled(cfg, params, lengths, kind="dense", max_len=16, **kw):
    cache = kvjax.init_cache(cfg, 2, max_len, kind=kind, **kw)
    return kvjax.prefill(cfg, params, TOKENS, np.array(lengths), cache)[1]


def valid_kv(cache):
    """Per layer (keys, values) float32 with every slot that holds no token zeroed."""
    out = []
    for layer in range(len(cache.keys)):
        if cache.kind == "kivi":
            k, v, _, valid = _kivi_read(layer_arrays(cache, layer), cache.lengths, jnp.float32, *cache.quant)
            mask = valid[:, None, :, None]
        else:
            k, v = read_layer(cache.kind, layer_arrays(cache, layer), jnp.float32)
            S = k.shape[2]
            if cache.pressed:
                mask = (cache.head_pos[layer] >= 0)[..., None]
            elif cache.slot_pos is not None and (not cache.rings or cache.rings[layer]):
                mask = (cache.slot_pos >= 0)[:, None, :, None]
            else:
                mask = (jnp.arange(S)[None, :] < cache.lengths[:, None])[:, None, :, None]
        out.append((np.where(mask, k, 0), np.where(mask, v, 0)))
    return out


def assert_same_cache(got, want):
    for name in ("lengths", "slot_pos", "head_pos", "head_fill", "head_owner"):
        np.testing.assert_array_equal(*(jax.tree_util.tree_map(np.asarray, getattr(c, name))
                                        for c in (got, want)), err_msg=name)
    for (kg, vg), (kw, vw) in zip(valid_kv(got), valid_kv(want)):
        np.testing.assert_allclose(kg, kw, atol=TOL)
        np.testing.assert_allclose(vg, vw, atol=TOL)


def assert_same_next(cfg, params, got, want, lengths=(3, 2)):
    """The logits of the following chunk read through either cache (both are donated)."""
    lg, _ = kvjax.prefill(cfg, params, NEXT, np.array(lengths), got)
    lw, _ = kvjax.prefill(cfg, params, NEXT, np.array(lengths), want)
    np.testing.assert_allclose(np.asarray(lg), np.asarray(lw), atol=TOL)


# ----------------------------------------------------------------------------- oracle per layout

@pytest.mark.parametrize("kind, kw, held, keep", [
    ("dense", {}, (10, 7), (4, 7)),
    ("int8", {}, (10, 7), (6, 1)),
    ("window", {"max_len": 8}, (8, 6), (5, 6)),          # has seen no more than its 8 slots
    ("sinks", {"max_len": 8, "num_sinks": 2}, (7, 8), (4, 8)),
    ("sinks", {"max_len": 8, "num_sinks": 2}, (11, 12), (2, 1)),   # wrapped, cut into the sinks
    ("kivi", KIVI, (13, 11), (10, 8)),                   # Q = 8: within the residual, or a block end
], ids=["dense", "int8", "window", "sinks", "sinks-wrapped", "kivi"])
def test_truncate_equals_a_shorter_prefill(tiny, kind, kw, held, keep):
    cfg, params = tiny
    full = filled(cfg, params, held, kind, **kw)
    want = filled(cfg, params, keep, kind, **kw)
    got = truncate(full, keep)
    assert_same_cache(got, want)
    assert_same_cache(drop_newest(full, np.subtract(held, keep)), want)
    assert_same_next(cfg, params, got, want)          # last: the prefills donate both caches


def test_hybrid_cache_truncates_ring_and_full_layers(hybrid):
    cfg, params = hybrid
    full = filled(cfg, params, (8, 6), max_len=16)
    assert full.rings == (8, 0)
    want = filled(cfg, params, (3, 6), max_len=16)
    got = truncate(full, (3, 6))
    assert_same_cache(got, want)
    assert_same_next(cfg, params, got, want)


def test_drop_newest_then_decode_step_equals_a_shorter_prefill(tiny):
    """Speculative decoding's case: rejected draft tokens dropped, the next token decoded."""
    cfg, params = tiny
    got = drop_newest(filled(cfg, params, (10, 9)), 3)
    want = filled(cfg, params, (7, 6))
    tok = np.array([17, 4], np.int32)
    lg, _ = kvjax.decode_step(cfg, params, tok, got)
    lw, _ = kvjax.decode_step(cfg, params, tok, want)
    np.testing.assert_allclose(np.asarray(lg), np.asarray(lw), atol=TOL)


def test_pressed_cache_drops_tokens_fed_after_the_press(tiny, pressed):
    cfg, params = tiny
    press, cache = pressed
    want = copy(cache)
    _, more = kvjax.prefill(cfg, params, NEXT, np.array([3, 1]), copy(cache))
    got = drop_newest(more, np.array([3, 1]))
    assert_same_cache(got, want)
    assert_same_cache(truncate(got, (12, 10)), want)          # keeping everything changes nothing
    assert_same_next(cfg, params, got, want)


def test_unchecked_surgery_runs_inside_jit(pressed):
    """check=False is traceable: a jitted program may drop a draft's tokens itself."""
    _, cache = pressed
    counts = np.array([2, 1])
    jitted = jax.jit(lambda c, m: drop_newest(c, m, check=False))(cache, counts)
    assert_same_cache(jitted, drop_newest(cache, counts))
    assert_same_cache(jax.jit(lambda c: empty_rows(c, check=False))(cache), empty_rows(cache))


# ----------------------------------------------------------------------------- empty_rows, cut_slots

def test_empty_row_takes_a_new_sequence(tiny):
    """Row 1 emptied reads a new chunk as a fresh cache does; row 0 is untouched."""
    cfg, params = tiny
    got = empty_rows(filled(cfg, params, (10, 7)), [1])
    assert np.asarray(got.lengths).tolist() == [10, 0]
    lengths = np.array([2, 5])
    lg = np.asarray(kvjax.prefill(cfg, params, NEXT, lengths, got)[0])
    kept = kvjax.prefill(cfg, params, NEXT, lengths, filled(cfg, params, (10, 7)))[0]
    fresh = kvjax.prefill(cfg, params, NEXT, lengths, kvjax.init_cache(cfg, 2, 16))[0]
    np.testing.assert_allclose(lg[0], np.asarray(kept)[0], atol=TOL)
    np.testing.assert_allclose(lg[1], np.asarray(fresh)[1], atol=TOL)
    assert np.asarray(empty_rows(filled(cfg, params, (10, 7)), np.array([True, False])).lengths).tolist() == [0, 7]


def test_emptied_pressed_cache_equals_a_fresh_one(pressed):
    _, cache = pressed
    empty = empty_rows(cache)
    assert (np.asarray(empty.lengths) == 0).all()
    assert all((np.asarray(p) == -1).all() for p in empty.head_pos + empty.head_owner)
    assert all((np.asarray(f) == 0).all() for f in empty.head_fill)
    assert empty.pooled == cache.pooled and empty.keys[0] is cache.keys[0]    # buffers shared


def test_emptied_ring_holds_nothing(tiny):
    cfg, params = tiny
    empty = empty_rows(filled(cfg, params, (11, 3), "window", max_len=8))
    assert (np.asarray(empty.slot_pos) == -1).all() and (np.asarray(empty.lengths) == 0).all()
    wrapped = filled(cfg, params, (11, 3), "window", max_len=8)
    assert np.asarray(truncate(wrapped, (11, 0)).lengths).tolist() == [11, 0]   # whole, or nothing


def test_cut_slots_keeps_the_used_front_in_new_arrays(tiny):
    cfg, params = tiny
    full = filled(cfg, params, (10, 7), "int8")
    cut = cut_slots(full, [10, 12])
    assert cut.keys[0].shape[2] == cut.key_scales[0].shape[2] == 10 and cut.layer_slots(1) == 12
    np.testing.assert_array_equal(np.asarray(cut.keys[0]), np.asarray(full.keys[0])[:, :, :10])
    same = cut_slots(full, [16, 16])                             # a full-size cut still copies
    for a, b in zip(jax.tree_util.tree_leaves(same), jax.tree_util.tree_leaves(full)):
        assert a.unsafe_buffer_pointer() != b.unsafe_buffer_pointer()
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_cut_slots_of_a_pressed_cache(tiny, pressed):
    cfg, _ = tiny
    press, cache = pressed
    budgets = P.layer_budgets(press, cfg, 12)
    cut = cut_slots(cache, budgets)
    for layer, n in enumerate(budgets):
        np.testing.assert_array_equal(np.asarray(cut.head_pos[layer]), np.asarray(cache.head_pos[layer])[:, :, :n])
        if cache.pooled:
            np.testing.assert_array_equal(np.asarray(cut.head_owner[layer]),
                                          np.asarray(cache.head_owner[layer])[:, :n])
    if not cache.pooled:
        assert cut.nbytes == P.cache_bytes(cfg, 2, budgets)
    with pytest.raises(ValueError, match=rf"row 0 uses {budgets[1]} slots of layer 1; it cannot be cut"):
        cut_slots(cache, [budgets[0], budgets[1] - 1])


# ----------------------------------------------------------------------------- refusals

def test_truncate_refusals_name_row_value_and_limit(tiny):
    cfg, params = tiny
    dense = filled(cfg, params, (10, 7))
    with pytest.raises(ValueError, match=r"truncate: row 1 holds 7 tokens; it can keep 0..7, not 8"):
        truncate(dense, (4, 8))
    with pytest.raises(ValueError, match=r"drop_newest: row 0 holds 10 tokens; it can drop 0..10, not 11"):
        drop_newest(dense, (11, 0))
    with pytest.raises(ValueError, match=r"lengths must be an int or 2 ints"):
        truncate(dense, (1, 2, 3))
    with pytest.raises(ValueError, match=r"counts must be an int or 2 ints"):
        drop_newest(dense, 1.5)


@pytest.mark.parametrize("kind, kw, held, keep, msg", [
    ("window", {"max_len": 8}, (11, 3), (7, 3), r"row 0 has seen 11 tokens, more than its 8-slot ring"),
    ("sinks", {"max_len": 8, "num_sinks": 2}, (3, 12), (3, 5),
     r"row 1 has seen 12 tokens, more than its 8-slot ring \(2 of them sinks\).*or to <= 2 tokens"),
    ("kivi", KIVI, (13, 11), (5, 11), r"row 0 of this KIVI cache has positions 0..7 quantised in blocks "
                                      r"of residual_length=8; keeping 5 tokens.*keep 8..13 tokens"),
], ids=["window", "sinks", "kivi"])
def test_what_cannot_come_back_is_refused(tiny, kind, kw, held, keep, msg):
    cfg, params = tiny
    with pytest.raises(ValueError, match=msg):
        truncate(filled(cfg, params, held, kind, **kw), keep)


def test_hybrid_ring_past_its_window_is_refused(hybrid):
    cfg, params = hybrid
    with pytest.raises(ValueError, match=r"row 0 has seen 10 tokens, more than its 8-slot ring"):
        truncate(filled(cfg, params, (10, 6), max_len=16), (9, 6))


def test_cut_slots_refusals(tiny):
    cfg, params = tiny
    dense = filled(cfg, params, (10, 7))
    with pytest.raises(ValueError, match=r"row 0 uses 10 slots of layer 0; it cannot be cut to 9 slots"):
        cut_slots(dense, [9, 12])
    with pytest.raises(ValueError, match=r"layer_slots must give 2 slot counts.*\[16, 16\]; got \[17, 4\]"):
        cut_slots(dense, [17, 4])
    with pytest.raises(ValueError, match=r"layer_slots must give 2 slot counts"):
        cut_slots(dense, [12])
    with pytest.raises(ValueError, match=r"cut_slots: a 'window' cache place a position by the slot count"):
        cut_slots(filled(cfg, params, (3, 3), "window", max_len=8), [4, 4])


def test_paged_cache_is_refused():
    from kvjax.cache.paged import paged_cache

    cache = paged_cache((), (), jnp.zeros((2,), jnp.int32), jnp.zeros((2, 1), jnp.int32))
    for call in (lambda: truncate(cache, 0), lambda: drop_newest(cache, 0), lambda: empty_rows(cache)):
        with pytest.raises(ValueError, match=r"paged cache's pages belong to the engine's allocator"):
            call()
