"""KIVI storage core (kvjax/kivi.py): packing, per-channel / per-token quantisation bounds,
the streaming flush rule (token by token == irregular chunks, bit for bit), exact bytes,
one compilation and an in-place store under jit, and configuration errors.

Tiny float32 shapes and fixed seeds. Tolerances: round-to-nearest puts every element within
scale / 2 of its dequantised value; on top of that float32 rounds (x - min) / scale and
q * scale + min, a few ulps of the magnitudes involved, so bounds are
scale / 2 * (1 + 1e-5) + 1e-6 * (|x| + 1) (values here are O(10), ulp ~1e-6).
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.cache import kivi

B, K, S, H, G, R = 3, 2, 48, 8, 4, 8     # capacity S + R - 1 = 55 tokens per row
LENS = np.array([50, 13, 29])            # ragged rows; 50 > 48 ends partly in the residual


def _bound(scale, x):
    return scale / 2 * (1 + 1e-5) + 1e-6 * (np.abs(x) + 1)


def _data(rng, n, outlier=True):
    """[B, n, K, H] float32 keys/values; channel 1 is an outlier channel (x20, offset 5),
    as in KIVI's observation that keys have a few large channels."""
    x = rng.normal(size=(B, n, K, H)).astype(np.float32)
    if outlier:
        x[..., 1] = x[..., 1] * 20 + 5
    return x


# ----------------------------------------------------------------------------- packing

@pytest.mark.parametrize("bits", [2, 4])
def test_pack_unpack_round_trip_exact(bits):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 1 << bits, size=(3, 5, 16)).astype(np.uint8)
    packed = kivi.pack(jnp.asarray(codes), bits)
    assert packed.dtype == jnp.uint8 and packed.shape == (3, 5, 16 * bits // 8)
    np.testing.assert_array_equal(np.asarray(kivi.unpack(packed, bits)), codes)
    # Documented bit order: code i of a byte sits at bits [bits*i, bits*(i+1)).
    first = [1, 2, 3, 0] if bits == 2 else [9, 4]
    expect = sum(c << (bits * i) for i, c in enumerate(first))
    assert int(kivi.pack(jnp.asarray(first, jnp.uint8), bits)[0]) == expect


# ----------------------------------------------------------------------------- quantisation

@pytest.mark.parametrize("bits", [2, 4])
def test_keys_per_channel_within_half_scale(bits):
    rng = np.random.default_rng(10 + bits)
    x = rng.normal(size=(K, 16, H)).astype(np.float32)
    x[:, :, 3] *= 100.0                                      # one outlier channel
    packed, scale, mn = kivi.quantize_keys(jnp.asarray(x), bits, G, jnp.float32)
    assert packed.shape == (K, 16, H * bits // 8) and scale.shape == mn.shape == (K, 16 // G, H)
    y = np.asarray(kivi.dequantize_keys(packed, scale, mn, bits, G))
    s = np.repeat(np.asarray(scale), G, axis=1)              # [K, 16, H] per (group, channel)
    assert (np.abs(y - x) <= _bound(s, x)).all()
    # Per channel: the outlier channel's scale does not touch the others' (100x smaller).
    sc = np.asarray(scale)
    assert sc[:, :, 3].min() > 10 * np.delete(sc, 3, axis=2).max()
    np.testing.assert_allclose(np.asarray(mn), x.reshape(K, 4, G, H).min(axis=2), rtol=0, atol=0)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("h,group", [(8, 4), (4, 8)])   # (4, 8): head_dim < group -> one group
def test_values_per_token_within_half_scale(bits, h, group):
    rng = np.random.default_rng(20 + bits + h)
    x = rng.normal(size=(K, 16, h)).astype(np.float32)
    x[:, 5, :] *= 100.0                                      # one outlier token
    packed, scale, mn = kivi.quantize_values(jnp.asarray(x), bits, group, jnp.float32)
    C = min(h, group)
    assert scale.shape == mn.shape == (K, 16, h // C)
    y = np.asarray(kivi.dequantize_values(packed, scale, mn, bits, group))
    s = np.repeat(np.asarray(scale), C, axis=2)              # [K, 16, h] per (token, group)
    assert (np.abs(y - x) <= _bound(s, x)).all()
    sc = np.asarray(scale)                                   # per token: only token 5 is coarse
    assert sc[:, 5].min() > 10 * np.delete(sc, 5, axis=1).max()


def test_constant_group_is_exact():
    x = jnp.full((1, G, H), 3.25, jnp.float32)
    packed, scale, mn = kivi.quantize_keys(x, 2, G, jnp.float32)
    assert float(jnp.max(scale)) == 0.0
    np.testing.assert_array_equal(np.asarray(kivi.dequantize_keys(packed, scale, mn, 2, G)), np.asarray(x))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_scales_cover_the_group(dtype):
    """Scale/min stored in the cache dtype: min rounded down, scale up, so the bound holds
    against the stored scale (no clipping from rounding the range inward)."""
    rng = np.random.default_rng(3)
    x = (rng.normal(size=(K, 16, H)) * 0.1 + 7.3).astype(np.float32)   # small range, large offset
    for bits in (2, 4):
        packed, scale, mn = kivi.quantize_keys(jnp.asarray(x), bits, G, dtype)
        assert scale.dtype == mn.dtype == jnp.dtype(dtype)
        mn32, s32 = np.asarray(mn, np.float32), np.asarray(scale, np.float32)
        groups = x.reshape(K, 4, G, H)
        assert (mn32 <= groups.min(axis=2)).all()
        assert (mn32 + ((1 << bits) - 1) * s32 >= groups.max(axis=2) * (1 - 1e-6)).all()
        y = np.asarray(kivi.dequantize_keys(packed, scale, mn, bits, G))
        assert (np.abs(y - x) <= _bound(np.repeat(s32, G, axis=1), x)).all()


# ----------------------------------------------------------------------------- streaming

def _write_jit():
    """A fresh jitted write (jit wrappers of the same function share one compilation cache,
    so `_cache_size` of a fresh wrapper counts only this test's compilations)."""
    def write(arrays, k_new, v_new, starts, lengths, bits, group_size, residual_length):
        return kivi.write(arrays, k_new, v_new, starts, lengths, bits, group_size, residual_length)
    return jax.jit(write, static_argnums=(5, 6, 7), donate_argnums=0)


def _stream_tokens(bits, k, v, dtype=jnp.float32):
    write = _write_jit()
    a = kivi.init_layer(B, K, S, H, bits, G, R, dtype)
    for t in range(int(LENS.max())):
        starts = np.minimum(t, LENS).astype(np.int32)
        n = (t < LENS).astype(np.int32)
        a = write(a, k[:, t:t + 1], v[:, t:t + 1], starts, n, bits, G, R)
    assert write._cache_size() == 1
    return a


# Per call: chunk lengths per row (0 = row untouched); T = the call's padded width.
# Row 0: 5 + 37 + 1 + 7 = 50 (the 37 crosses 5 blocks from an unaligned start),
# row 1: 0 + 12 + 1 + 0 = 13, row 2: 3 + 20 + 0 + 6 = 29. The last call pads to T = 13.
CHUNKS = [(5, [5, 0, 3]), (37, [37, 12, 20]), (1, [1, 1, 0]), (13, [7, 0, 6])]


def _stream_chunks(bits, k, v, dtype=jnp.float32):
    write = _write_jit()
    a = kivi.init_layer(B, K, S, H, bits, G, R, dtype)
    starts = np.zeros(B, np.int32)
    for T, n in CHUNKS:
        n = np.asarray(n, np.int32)
        kc = np.full((B, T, K, H), np.nan, np.float32)     # padding is NaN: it must never land
        vc = np.full((B, T, K, H), np.nan, np.float32)
        for b in range(B):
            kc[b, :n[b]] = k[b, starts[b]:starts[b] + n[b]]
            vc[b, :n[b]] = v[b, starts[b]:starts[b] + n[b]]
        a = write(a, kc, vc, starts, n, bits, G, R)
        starts = starts + n
    np.testing.assert_array_equal(starts, LENS)
    return a


@pytest.mark.parametrize("bits,dtype", [(2, "float32"), (4, "float32"), (2, "bfloat16")])
def test_streaming_tokens_equals_chunks_and_matches_input(bits, dtype):
    """bfloat16: the residual and scales are bf16; the stored tokens are the inputs cast to
    bf16, and `read` into float32 adds no rounding, so the same bounds hold against them."""
    rng = np.random.default_rng(bits)
    n = int(LENS.max())
    k, v = _data(rng, n), _data(rng, n)
    a1, a2 = _stream_tokens(bits, k, v, dtype), _stream_chunks(bits, k, v, dtype)
    k = np.asarray(jnp.asarray(k).astype(dtype).astype(jnp.float32))
    v = np.asarray(jnp.asarray(v).astype(dtype).astype(jnp.float32))
    lens = jnp.asarray(LENS, jnp.int32)
    read = jax.jit(kivi.read, static_argnums=(2, 3, 4, 5))
    r1 = [np.asarray(x) for x in read(a1, lens, jnp.float32, bits, G, R)]
    r2 = [np.asarray(x) for x in read(a2, lens, jnp.float32, bits, G, R)]
    for x1, x2 in zip(r1, r2):                                # same blocks quantised: bit-identical
        np.testing.assert_array_equal(x1, x2)
    for name in ("k_codes", "k_scale", "k_min", "v_codes", "v_scale", "v_min"):
        np.testing.assert_array_equal(np.asarray(a1[name]), np.asarray(a2[name]))

    kr, vr, pos, valid = r1
    assert kr.shape == vr.shape == (B, K, S + R, H) and pos.shape == valid.shape == (B, S + R)
    assert pos.dtype == np.int32 and valid.dtype == np.bool_
    ks = np.repeat(np.asarray(a1["k_scale"], np.float32), G, axis=2)          # [B, K, S, H]
    vs = np.repeat(np.asarray(a1["v_scale"], np.float32), min(H, G), axis=3)  # [B, K, S, H]
    for b in range(B):
        L, Q = int(LENS[b]), int(LENS[b]) // R * R
        # Flush rule: positions [0, Q) quantised in slots [0, Q), [Q, L) in residual slots.
        np.testing.assert_array_equal(np.flatnonzero(valid[b]), list(range(Q)) + [S + r for r in range(L - Q)])
        np.testing.assert_array_equal(pos[b, :Q], np.arange(Q))
        np.testing.assert_array_equal(pos[b, S:S + L - Q], np.arange(Q, L))
        want_k, want_v = np.swapaxes(k[b, :L], 0, 1), np.swapaxes(v[b, :L], 0, 1)   # [K, L, H]
        # Residual tokens: full precision, exact.
        np.testing.assert_array_equal(kr[b, :, S:S + L - Q], want_k[:, Q:])
        np.testing.assert_array_equal(vr[b, :, S:S + L - Q], want_v[:, Q:])
        # Quantised tokens: keys per channel, values per token, within half a step.
        assert (np.abs(kr[b, :, :Q] - want_k[:, :Q]) <= _bound(ks[b, :, :Q], want_k[:, :Q])).all()
        assert (np.abs(vr[b, :, :Q] - want_v[:, :Q]) <= _bound(vs[b, :, :Q], want_v[:, :Q])).all()
        # Invalid slots read as zero (no stale or padding values, no NaN).
        assert not np.isnan(kr[b]).any() and (kr[b][:, ~valid[b]] == 0).all()
        assert (vr[b][:, ~valid[b]] == 0).all()


def test_zero_length_write_changes_nothing():
    rng = np.random.default_rng(5)
    write = jax.jit(kivi.write, static_argnums=(5, 6, 7))     # eager vmap is slow; no donation
    a = write(kivi.init_layer(B, K, S, H, 2, G, R, jnp.float32), _data(rng, 11), _data(rng, 11),
                   jnp.zeros(B, jnp.int32), jnp.asarray([11, 7, 3], jnp.int32), 2, G, R)
    b = write(a, np.full((B, 4, K, H), np.nan, np.float32), np.full((B, 4, K, H), np.nan, np.float32),
                   jnp.asarray([11, 7, 3], jnp.int32), jnp.zeros(B, jnp.int32), 2, G, R)
    for name in kivi.NAMES:
        np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]))


# ----------------------------------------------------------------------------- bytes

@pytest.mark.parametrize("cfg", [(3, 2, 48, 8, 2, 4, 8, "float32"), (1, 4, 64, 4, 4, 8, 16, "bfloat16"),
                                 (2, 1, 32, 16, 2, 16, 32, "float16")])
def test_layer_bytes_equals_allocation(cfg):
    a = kivi.init_layer(*cfg)
    assert kivi.layer_bytes(*cfg) == sum(int(x.nbytes) for x in a.values())
    assert set(a) == set(kivi.NAMES)


def test_bytes_per_token_llama_shape():
    """bits 2, group 32, head_dim 128, S 4096, residual 128, bfloat16, per kv head and layer:
    codes 32 + 32, key scale/min 2*2*128/32 = 16, value scale/min 2*2*4 = 16, residual
    2*128*128*2/4096 = 16 -> 112 bytes/token vs 2*128*2 = 512 dense (0.219x)."""
    args = (1, 1, 4096, 128, 2, 32, 128, jnp.bfloat16)
    assert kivi.layer_bytes(*args) == 112 * 4096
    assert sum(int(np.prod(s.shape)) * s.dtype.itemsize
               for s in jax.eval_shape(lambda: kivi.init_layer(*args)).values()) == 112 * 4096
    assert kivi.layer_bytes(*args) / 4096 / (2 * 128 * 2) == pytest.approx(0.21875)
    assert kivi.layer_bytes(1, 1, 4096, 128, 4, 32, 128, jnp.bfloat16) == (64 + 64 + 48) * 4096


# ----------------------------------------------------------------------------- jit

def test_jit_compiles_once_and_updates_the_store_in_place():
    write = _write_jit()
    Bj, Sj = 2, 64
    a = kivi.init_layer(Bj, K, Sj, H, 2, G, R, jnp.float32)
    one = jnp.ones((Bj, 1, K, H), jnp.float32)
    hlo = write.lower(a, one, one, jnp.zeros(Bj, jnp.int32), jnp.ones(Bj, jnp.int32),
                      2, G, R).compile().as_text()
    header = next(line for line in hlo.splitlines() if "input_output_alias" in line)
    aliases = header.split("input_output_alias=")[1].split("entry_computation_layout")[0]
    assert len(re.findall(r"(may|must)-alias\)", aliases)) == len(kivi.NAMES)
    # No instruction copies a store-sized buffer (codes, key scales, value scales).
    for shape in (f"u8[{Bj},{K},{Sj},{H // 4}]", f"f32[{Bj},{K},{Sj // G},{H}]", f"f32[{Bj},{K},{Sj},{H // G}]"):
        copies = [l for l in hlo.splitlines() if re.search(re.escape(shape) + r"\{[^}]*\} copy\(", l)]
        assert copies == [], copies
        # ... and each is updated by a scatter into its (donated) buffer: the check is not vacuous.
        assert re.search(re.escape(shape) + r"\{[^}]*\} scatter\(", hlo), shape
    # (The residual [B, K, R, H] is copied: the staging reads the old one while the new one
    # is written. That is O(R x H) per step, allowed; the store is never copied.)

    for starts, n in (([0, 0], [1, 1]), ([1, 1], [1, 0]), ([2, 1], [0, 1]), ([2, 2], [1, 1])):
        old = a
        a = write(a, one, one, jnp.asarray(starts, jnp.int32), jnp.asarray(n, jnp.int32), 2, G, R)
        assert old["k_codes"].is_deleted() and not a["k_codes"].is_deleted()
    assert write._cache_size() == 1


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("args,match", [
    ((1, 1, 32, 8, 3, 4, 8, "float32"), "bits=3"),
    ((1, 1, 32, 8, 8, 4, 8, "float32"), "bits=8"),
    ((1, 1, 32, 12, 2, 8, 8, "float32"), "group_size=8 must divide head_dim=12"),
    ((1, 1, 36, 8, 2, 3, 9, "float32"), "group_size=3 must divide head_dim=8"),
    ((1, 1, 32, 8, 2, 3, 8, "float32"), "group_size=3 must divide residual_length=8"),
    ((1, 1, 40, 8, 2, 4, 16, "float32"), "S=40 slots must be a multiple of residual_length=16"),
    ((1, 1, 32, 6, 2, 8, 8, "float32"), "head_dim=6 must be a multiple of 4"),
    ((1, 1, 32, 8, 2, 4, 8, "int8"), "floating dtype"),
    ((0, 1, 32, 8, 2, 4, 8, "float32"), "batch size B"),
])
def test_bad_config_raises_naming_the_value(args, match):
    with pytest.raises(ValueError, match=match):
        kivi.layer_shapes(*args)
    with pytest.raises(ValueError, match=match):
        kivi.layer_bytes(*args)


def test_write_checks_config_and_shapes():
    a = kivi.init_layer(1, 1, 32, 8, 2, 4, 8, jnp.float32)
    x = jnp.zeros((1, 1, 1, 8), jnp.float32)
    one = jnp.ones(1, jnp.int32)
    with pytest.raises(ValueError, match="residual_length=12"):
        kivi.write(a, x, x, one, one, 2, 4, 12)
    with pytest.raises(ValueError, match=r"\[B, T, K, H\]"):
        kivi.write(a, jnp.zeros((1, 1, 2, 8)), x, one, one, 2, 4, 8)
