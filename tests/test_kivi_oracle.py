"""kvjax's KIVI cache against an independent plain-NumPy KIVI (issue 21, part 6).

The oracle below is written from the KIVI paper (Liu et al. 2024, "KIVI: A Tuning-Free
Asymmetric 2bit Quantization for KV Cache") and its reference code (github.com/jy-yuan/KIVI:
`quant/new_pack.py` `triton_quantize_and_pack_along_last_dim`, and the cache handling of
`LlamaAttention_KIVI.forward` in `models/llama_kivi.py`), not from kvjax/cache/kivi.py:

* asymmetric min/max quantisation, round to nearest (ties to even, as torch.round):
  scale = (max - min) / (2^bits - 1), q = clip(round((x - min) / scale), 0, 2^bits - 1),
  x' = q * scale + min; scale and min stored in the cache dtype (KIVI keeps them in the
  model's fp16);
* keys per CHANNEL, over groups of `group_size` consecutive tokens (the reference transposes
  keys to [.., H, T] and quantises along T in groups of G);
* values per TOKEN, over groups of `group_size` consecutive channels (the reference quantises
  values along the last axis, H, in groups of G; it requires G | H. kvjax also accepts
  G > H and then makes the whole head one group: the oracle's `value_group` = min(G, H));
* the streaming rule: keys stay in full precision until `residual_length` R of them have
  accumulated, then the R-block is quantised (prefill: the first L - L mod R keys are
  quantised at once, the last L mod R kept); values keep a SLIDING window of the newest R
  tokens in full precision (prefill: values [0, L - R) quantised; each decode step quantises
  the one value that leaves the window).

Deviations of kvjax from the reference, found here and reproduced by the oracle's three
parameters (the tests check kvjax EXACTLY against the oracle with kvjax's settings, and
against the reference settings within the quantisation error):

1. `value_flush="block"` (kvjax) vs `"sliding"` (reference): kvjax flushes values in the
   same R-blocks as keys, so after L tokens values [0, floor(L/R) R) are quantised and only
   L mod R (0..R-1) values are in full precision, where the reference keeps the newest
   min(L, R). The tokens in [max(L - R, 0), floor(L/R) R) are therefore quantised by kvjax
   but exact in KIVI; each is still within half a quantisation step of the exact value.
   (kvjax's layout relies on one flush point Q for keys and values: read, surgery's
   truncate/drop_newest and the residual buffer all assume it.)
2. `scale_rounding="directed"` (kvjax) vs `"nearest"` (reference): kvjax computes in
   float32 and stores min rounded DOWN and scale (from the stored min) rounded UP in the
   cache dtype, so every element stays within stored_scale / 2; the reference rounds both
   to nearest (its fp16 scale can fall short of the range, and the group's max is then
   clipped by up to (2^bits - 1) * |rounding of the scale|). In a float32 cache there is
   nothing to round: kvjax's keys (and the values both quantise) are the reference's
   numbers, up to deviation 3's ulp, which the tests check too.
3. `division="reciprocal"` (kvjax as compiled) vs `"true"`: XLA compiles kvjax's
   `range / (2^bits - 1)` and `(x - min) / scale` (scale broadcast over the group) into
   multiplications by float32 reciprocals. The results are within an ulp or so of the
   quotients, which matters only for exact ties of round-half-to-even: in a bfloat16 cache
   (coarse values, coarse scales) (x - min) / scale = 14.5 exactly happens, and kvjax gives
   code 15 (14.500001) where the reference gives 14. Either code is exactly half a step away,
   so the error bound is the same; it is not a bug, and the oracle does the same to compare
   exactly.

What is compared: kvjax's dequantised cache as attention reads it (`kivi.read` over
`kvjax.cache.layer_arrays`, every valid slot mapped to its position, each position once)
with the oracle fed the pre-quantisation keys/values, taken from a dense cache (same dtype)
filled with the same tokens. Layer 0's keys/values depend only on the tokens, so there the
oracle's input is exactly kvjax's, through the prefill, decode steps and a second turn:
compared exactly. Deeper layers' inputs come out of attention, which the dense and KIVI runs
sum in a different order (a fresh KIVI prefill attends to its own block beside an empty
store), so they differ by float rounding (a bf16 ulp in a bf16 cache) and can shift a code:
there kvjax is checked within half the oracle's step of the dense keys/values (prefill only;
after decode steps they attend over quantised tokens and differ by more). "Exactly" means
within 2 float32 ulps of the operands of q * step + min (XLA may fuse them into an FMA); a
different code or scale moves an element by thousands of times that.
"""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import kvjax
from kvjax.cache import kivi
from kvjax.cache import layer_arrays

F32 = np.float32
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


# ============================================================================ the oracle

def _store(x32, dtype, mode):
    """x (float32) stored in `dtype`: round to nearest, or directed ("down" / "up"); as float32."""
    y = x32.astype(dtype)
    if mode == "down":
        y = np.where(y.astype(F32) > x32, np.nextafter(y, np.array(-np.inf, dtype)), y)
    elif mode == "up":
        y = np.where(y.astype(F32) < x32, np.nextafter(y, np.array(np.inf, dtype)), y)
    return np.asarray(y).astype(F32)


def _div(a, b, division):
    """a / b in float32: "true" (IEEE division, as the reference) or "reciprocal"
    (a * float32(1 / b), what XLA compiles kvjax's divisions by a constant or by a broadcast
    scale into; at most an ulp or so apart, but it can break an exact tie the other way)."""
    return a / b if division == "true" else a * (F32(1) / b)


def minmax_fake_quant(x, axis, bits, dtype, scale_rounding, division="true"):
    """Asymmetric min/max quantise-dequantise of x over `axis` (reduced).

    scale_rounding: "nearest" (the reference: min and scale rounded to nearest in `dtype`)
    or "directed" (kvjax: min rounded down, the scale computed from the stored min and
    rounded up, so the stored range covers the group). Returns (x' float32, stored scale,
    float32 scale before storing), the scales broadcast to x's shape (for error bounds)."""
    levels = F32((1 << bits) - 1)
    x = x.astype(F32)
    lo = x.min(axis=axis, keepdims=True)
    hi = x.max(axis=axis, keepdims=True)
    if scale_rounding == "directed":
        mn = _store(lo, dtype, "down")
        exact = _div(hi - mn, levels, division)
        scale = _store(exact, dtype, "up")
    else:
        mn = _store(lo, dtype, "nearest")
        exact = _div(hi - lo, levels, division)
        scale = _store(exact, dtype, "nearest")
    safe = np.where(scale > 0, scale, F32(1))                # a constant group: scale 0, code 0
    q = np.clip(np.rint(_div(x - mn, safe, division)), 0, levels)   # rint: ties to even
    out = (q * scale + mn).astype(F32)
    return out, np.broadcast_to(scale, x.shape), np.broadcast_to(exact, x.shape)


def value_group(H, group_size):
    return min(group_size, H)


class KiviOracle:
    """KIVI's cache for ONE row of ONE layer, fed tokens in order (a prefill chunk, decode
    tokens one at a time, further chunks). Keys/values arrive as [n, K, H] arrays of values
    already representable in `dtype`. `value_flush`: "sliding" (reference) or "block" (kvjax);
    `scale_rounding`, `division`: see `minmax_fake_quant`. REFERENCE and KVJAX below."""

    def __init__(self, bits, group_size, residual_length, dtype, value_flush="sliding",
                 scale_rounding="nearest", division="true"):
        assert residual_length % group_size == 0
        self.bits, self.G, self.R = bits, group_size, residual_length
        self.dtype, self.value_flush = dtype, value_flush
        self.quant = dict(scale_rounding=scale_rounding, division=division)
        self.k = self.v = None                        # every token, full precision
        self.kq, self.vq = [], []                     # quantised (dequantised) blocks / tokens
        self.ks, self.vs = [], []                     # their (stored step, float32 step)
        self.nk = self.nv = 0                         # tokens quantised so far

    def _keys(self, block):                           # [R, K, H] -> per channel over G tokens
        R, K, H = block.shape
        g = block.reshape(R // self.G, self.G, K, H)
        y, s, e = minmax_fake_quant(g, 1, self.bits, self.dtype, **self.quant)
        return y.reshape(R, K, H), np.stack([s.reshape(R, K, H), e.reshape(R, K, H)])

    def _value(self, tok):                            # [K, H] -> per token over C channels
        K, H = tok.shape
        C = value_group(H, self.G)
        y, s, e = minmax_fake_quant(tok.reshape(K, H // C, C), 2, self.bits, self.dtype,
                                    **self.quant)
        return y.reshape(1, K, H), np.stack([s.reshape(1, K, H), e.reshape(1, K, H)])

    def append(self, k, v):
        k, v = np.asarray(k, F32), np.asarray(v, F32)
        self.k = k if self.k is None else np.concatenate([self.k, k])
        self.v = v if self.v is None else np.concatenate([self.v, v])
        L = len(self.k)
        # Keys: "if key_states_full.shape[-2] == residual_length: quantise it" (prefill: all
        # whole R-blocks at once; the G-groups inside never straddle a block since G | R).
        while self.nk + self.R <= L:
            y, s = self._keys(self.k[self.nk:self.nk + self.R])
            self.kq.append(y)
            self.ks.append(s)
            self.nk += self.R
        # Values: the reference keeps the newest R exact (prefill quantises [0, L - R), each
        # decode step the one value that falls out); kvjax flushes with the keys.
        upto = self.nk if self.value_flush == "block" else max(L - self.R, 0)
        while self.nv < upto:
            y, s = self._value(self.v[self.nv])
            self.vq.append(y)
            self.vs.append(s)
            self.nv += 1

    def dequantized(self):
        """(k, v) float32 [L, K, H] as attention sees them: quantised part then residual."""
        return (np.concatenate(self.kq + [self.k[self.nk:]]),
                np.concatenate(self.vq + [self.v[self.nv:]]))

    def steps(self):
        """((key stored step, key float32 step), (value ...)), each [L, K, H]; 0 where exact."""
        z = np.zeros((2,) + self.k.shape, F32)
        return (np.concatenate(self.ks + [z[:, self.nk:]], axis=1),
                np.concatenate(self.vs + [z[:, self.nv:]], axis=1))


REFERENCE = dict(value_flush="sliding", scale_rounding="nearest", division="true")
KVJAX = dict(value_flush="block", scale_rounding="directed", division="reciprocal")


class RowsOracle:
    """One KiviOracle per (row, layer)."""

    def __init__(self, B, L, *args, **kw):
        self.o = [[KiviOracle(*args, **kw) for _ in range(L)] for _ in range(B)]

    def append(self, dense, starts, lengths):
        """Feed each row's tokens [starts, starts + lengths) of every layer, read from a dense
        cache (keys[l] [B, K, S, H], slot = position)."""
        keys = [np.asarray(k, F32) for k in dense.keys]
        values = [np.asarray(v, F32) for v in dense.values]
        for b, row in enumerate(self.o):
            s, n = int(starts[b]), int(lengths[b])
            if n == 0:
                continue
            for l, o in enumerate(row):
                o.append(keys[l][b, :, s:s + n].transpose(1, 0, 2),
                         values[l][b, :, s:s + n].transpose(1, 0, 2))


# ============================================================================ kvjax side

_read = jax.jit(kivi.read, static_argnums=(2, 3, 4, 5))   # one compile, not one per op


def kvjax_rows(cache, layer):
    """Per row: kvjax's dequantised (k, v) float32 [L, K, H] ordered by position, from the
    read attention uses; checks every position 0..L-1 is held exactly once."""
    k, v, pos, valid = map(np.asarray, _read(layer_arrays(cache, layer), cache.lengths,
                                             jnp.float32, *cache.quant))
    lengths = np.asarray(cache.lengths)
    out = []
    for b in range(k.shape[0]):
        idx = np.flatnonzero(valid[b])
        order = np.argsort(pos[b, idx], kind="stable")
        idx = idx[order]
        np.testing.assert_array_equal(pos[b, idx], np.arange(lengths[b]))
        out.append((k[b][:, idx].transpose(1, 0, 2), v[b][:, idx].transpose(1, 0, 2)))
    return out


def _ulps(x):
    return 2 * np.finfo(F32).eps * np.maximum(np.abs(x), np.finfo(F32).tiny)


def assert_same(got, want, what, step=0.0, bits=4):
    """Equal to float32 rounding: 2 ulps of the operands of q * step + min (an FMA or
    another float32 rounding of the step moves the result by less; a different code moves
    it by a whole step, which is thousands of times more)."""
    diff = np.abs(got - want)
    bad = diff > _ulps(np.abs(want) + 2 * ((1 << bits) - 1) * step)
    assert not bad.any(), (f"{what}: {bad.sum()} of {bad.size} elements differ beyond float32 "
                           f"rounding, max |diff| {diff.max():.3g}, first at {np.argwhere(bad)[0]}")


def assert_within(got, exact, step, what, slack=None):
    """|got - exact| <= step / 2 (+ float32 rounding and `slack`)."""
    bound = step / 2 * (1 + 1e-6) + _ulps(exact) + (0 if slack is None else slack)
    err = np.abs(got - exact)
    assert (err <= bound).all(), f"{what}: max excess {np.max(err - bound):.3g}"


def check_layer(cache, oracles, layer, what, exact=True):
    """kvjax == the oracle with kvjax's settings, for every row of one layer.

    exact=False (layers past the first, whose dense-run inputs differ from the KIVI run's
    by the float rounding of the attention before them): kvjax within half the oracle's
    step of the dense keys/values, plus that input difference (float32: 1e-5 relative;
    bfloat16: 2 bf16 ulps of the row's largest magnitude)."""
    for b, (k, v) in enumerate(kvjax_rows(cache, layer)):
        o = oracles.o[b][layer]
        ok, ov = o.dequantized()
        (sk, _), (sv, _) = o.steps()
        if exact:
            assert_same(k, ok, f"{what} row {b} layer {layer} keys", sk, o.bits)
            assert_same(v, ov, f"{what} row {b} layer {layer} values", sv, o.bits)
        else:
            rel = 1e-5 if o.dtype == np.float32 else 2 ** -6
            for got, x, st, name in ((k, o.k, sk, "keys"), (v, o.v, sv, "values")):
                assert_within(got, x, st * (1 + rel), f"{what} row {b} layer {layer} {name}",
                              slack=rel * np.abs(x).max())


def check_against_reference(cache, ours, ref, layer, R, bits, dtype, what):
    """kvjax vs the oracle with the reference's settings (deviations 1 to 3).

    Both are within their error bound of the exact keys/values: kvjax half its stored step
    (directed rounding), the reference half its step or, for a clipped group maximum,
    (2^bits - 1) * |stored - exact step|. In float32 kvjax's keys and the values both
    quantise are the reference's numbers. Values at positions [max(L - R, 0), floor(L/R) R)
    are exact in the reference and quantised by kvjax; from floor(L/R) R on both are exact."""
    levels = (1 << bits) - 1
    for b, (k, v) in enumerate(kvjax_rows(cache, layer)):
        o, r = ours.o[b][layer], ref.o[b][layer]
        (osk, _), (osv, _) = o.steps()
        (rsk, rek), (rsv, rev) = r.steps()
        rk, rv = r.dequantized()
        assert_within(k, r.k, osk, f"{what} row {b} layer {layer} kvjax keys")
        assert_within(v, r.v, osv, f"{what} row {b} layer {layer} kvjax values")
        assert_within(rk, r.k, rsk, f"{what} row {b} reference keys",
                      slack=levels * np.abs(rsk - rek))
        assert_within(rv, r.v, rsv, f"{what} row {b} reference values",
                      slack=levels * np.abs(rsv - rev))
        L = len(rk)
        lo, Q = max(L - R, 0), (L // R) * R
        assert r.nk == o.nk == Q and r.nv == lo and o.nv == Q
        if dtype == np.float32:
            assert_same(k, rk, f"{what} row {b} layer {layer} keys vs reference", rsk, bits)
            assert_same(v[:lo], rv[:lo], f"{what} row {b} layer {layer} values vs reference",
                        rsv[:lo], bits)
        np.testing.assert_array_equal(rv[lo:], r.v[lo:])     # the reference's exact window
        np.testing.assert_array_equal(v[Q:], r.v[Q:])        # kvjax's residual
        if Q > lo:                                           # deviation 1: really quantised
            assert (osv[lo:Q] > 0).all() and (v[lo:Q] != r.v[lo:Q]).any()


# ============================================================================ the oracle alone

def test_oracle_hand_examples():
    # 2 bits, range 0..3: scale 1, codes 0 0 1 3 (0.6 -> 1, 0.4 -> 0); ties go to even.
    x = np.array([0.0, 0.4, 0.6, 3.0], F32)
    y, s, _ = minmax_fake_quant(x, 0, 2, DTYPES["float32"], "nearest")
    np.testing.assert_array_equal(y, [0, 0, 1, 3])
    x = np.array([0.0, 0.5, 1.5, 3.0], F32)
    y, _, _ = minmax_fake_quant(x, 0, 2, DTYPES["float32"], "nearest")
    np.testing.assert_array_equal(y, [0, 0, 2, 3])
    # A constant group: scale 0, exact.
    y, s, _ = minmax_fake_quant(np.full(4, 2.5, F32), 0, 4, DTYPES["bfloat16"], "directed")
    np.testing.assert_array_equal(y, 2.5)
    np.testing.assert_array_equal(s, 0)
    # bf16, 2 bits, range 0..5: 5/3 rounds to nearest 1.6640625 (below: the reference's
    # group max comes back clipped to 3 x 1.6640625 = 4.9921875); kvjax's directed scale is
    # 1.671875 (one bf16 ulp up), its top code 3 gives 5.015625, within half a step.
    x = np.array([0.0, 1.0, 2.0, 5.0], F32)
    near, sn, _ = minmax_fake_quant(x, 0, 2, DTYPES["bfloat16"], "nearest")
    up, su, _ = minmax_fake_quant(x, 0, 2, DTYPES["bfloat16"], "directed")
    assert sn[0] == 1.6640625 and near[3] == 4.9921875
    assert su[0] == 1.671875 and up[3] == 5.015625
    np.testing.assert_array_equal(near, [0.0, 1.6640625, 1.6640625, 4.9921875])
    np.testing.assert_array_equal(up, [0.0, 1.671875, 1.671875, 5.015625])
    # Keys per channel: an outlier channel does not coarsen the others.
    rng = np.random.default_rng(0)
    k = rng.normal(size=(8, 1, 4)).astype(F32)
    k[:, 0, 2] *= 100
    o = KiviOracle(2, 4, 8, DTYPES["float32"])
    o.append(k, k)
    (sk, _), _ = o.steps()
    assert sk[:, 0, 2].min() > 10 * np.delete(sk[:, 0], 2, axis=1).max()


@pytest.mark.parametrize("value_flush", ["sliding", "block"])
def test_oracle_streaming_is_chunking_independent(value_flush):
    """Prefill-then-decode and one big prefill quantise the same blocks (the reference's
    prefill and decode rules agree); the residual sizes follow the rule."""
    rng = np.random.default_rng(1)
    k, v = rng.normal(size=(2, 45, 2, 8)).astype(F32)
    args = (2, 4, 8, DTYPES["float32"], value_flush)
    one = KiviOracle(*args)
    one.append(k, v)
    step = KiviOracle(*args)
    step.append(k[:13], v[:13])
    for t in range(13, 45):
        step.append(k[t:t + 1], v[t:t + 1])
        assert step.nk == (t + 1) // 8 * 8
        assert step.nv == (step.nk if value_flush == "block" else max(t + 1 - 8, 0))
    for a, b in zip(one.dequantized(), step.dequantized()):
        np.testing.assert_array_equal(a, b)


# ============================================================================ kvjax vs the oracle

@pytest.fixture(scope="module")
def tiny():
    cfg = kvjax.ModelConfig.preset("llama-tiny")           # 2 layers, 2 kv heads, head_dim 16
    return cfg, kvjax.init_params(cfg, jax.random.key(0), std=0.2)


# (bits, group_size, residual_length, dtype, max_len, prompt lengths; the prompt is padded
# to WIDTH[dtype], so the runs of one dtype share compiled programs). Rows of different
# lengths, nearly all ending mid-group; the decode steps then complete a block in some row,
# and the second turn starts mid-block.
CASES = [
    (2, 4, 8, "float32", 64, [39, 6, 17]),
    (4, 8, 16, "bfloat16", 48, [21, 13, 24]),
    (2, 32, 32, "float32", 64, [38, 27, 6]),  # G 32 > head_dim 16: one value group per head
]
WIDTH = {"float32": 40, "bfloat16": 24}
PREFILL_ONLY = {32}                           # group sizes tested on the prefill alone (time)
DECODE_STEPS = 6


def _caches(cfg, max_len, bits, G, R, dtype):
    q = dict(bits=bits, group_size=G, residual_length=R)
    return (kvjax.init_cache(cfg, 3, max_len, kind="kivi", dtype=dtype, **q),
            kvjax.init_cache(cfg, 3, max_len, dtype=dtype))


@pytest.mark.parametrize("bits,G,R,dtype,max_len,lens", CASES,
                         ids=[f"{c[0]}bit-G{c[1]}-R{c[2]}-{c[3]}" for c in CASES])
def test_prefill_decode_and_second_turn_match_oracle(tiny, bits, G, R, dtype, max_len, lens):
    cfg, params = tiny
    dt = DTYPES[dtype]
    rng = np.random.default_rng(bits * 100 + G)
    lens = np.array(lens)
    width = WIDTH[dtype]                        # the ragged test's shapes: compiled once
    toks = rng.integers(0, cfg.vocab_size, (3, width)).astype(np.int32)
    cache, dense = _caches(cfg, max_len, bits, G, R, dtype)
    _, cache = kvjax.prefill(cfg, params, toks, lens, cache)
    _, dense = kvjax.prefill(cfg, params, toks, lens, dense)
    L = cfg.num_layers
    ours = RowsOracle(3, L, bits, G, R, dt, **KVJAX)
    ref = RowsOracle(3, L, bits, G, R, dt, **REFERENCE)
    for o in (ours, ref):
        o.append(dense, np.zeros(3), lens)
    for layer in range(L):
        check_layer(cache, ours, layer, "prefill", exact=layer == 0)
    check_against_reference(cache, ours, ref, 0, R, bits, dt, "prefill")
    assert any(o.nk for o in (r[0] for r in ours.o))          # something really quantised

    if G in PREFILL_ONLY:
        return
    crossed = np.zeros(3, bool)
    for step in range(DECODE_STEPS):            # fixed tokens, so layer 0 stays exact
        starts = np.asarray(cache.lengths)
        tok = rng.integers(0, cfg.vocab_size, 3).astype(np.int32)
        _, cache = kvjax.decode_step(cfg, params, tok, cache)
        _, dense = kvjax.decode_step(cfg, params, tok, dense)
        for o in (ours, ref):
            o.append(dense, starts, np.ones(3))
        crossed |= (starts + 1) % R == 0
        check_layer(cache, ours, 0, f"decode step {step}")
        check_against_reference(cache, ours, ref, 0, R, bits, dt, f"decode step {step}")
    assert crossed.any(), "the decode steps should complete a block in some row"

    # A second turn: a chunk joining the residual, mid-group, rows of different lengths.
    starts = np.asarray(cache.lengths)
    more = np.minimum([9, 3, 17], max_len - starts)
    chunk = rng.integers(0, cfg.vocab_size, toks.shape).astype(np.int32)   # same width
    _, cache = kvjax.prefill(cfg, params, chunk, more, cache)
    _, dense = kvjax.prefill(cfg, params, chunk, more, dense)
    ours.append(dense, starts, more)
    check_layer(cache, ours, 0, "second turn")


@pytest.mark.parametrize("bits,G,R,dtype,max_len", [(2, 4, 8, "float32", 64),
                                                   (4, 8, 16, "bfloat16", 48)])
def test_ragged_rows_property(tiny, bits, G, R, dtype, max_len):
    """Random row lengths inside one padded [3, WIDTH] prompt: layer 0 equals the oracle
    exactly and deeper layers are within its bound, for each draw (plus rows of 1 and WIDTH)."""
    cfg, params = tiny
    dt = DTYPES[dtype]
    width = WIDTH[dtype]
    rng = np.random.default_rng(7 + bits)
    toks = rng.integers(0, cfg.vocab_size, (3, width)).astype(np.int32)
    draws = [np.array([1, width, G + 1])] + [rng.integers(1, width + 1, 3) for _ in range(5)]
    for lens in draws:
        cache, dense = _caches(cfg, max_len, bits, G, R, dtype)
        _, cache = kvjax.prefill(cfg, params, toks, lens, cache)
        _, dense = kvjax.prefill(cfg, params, toks, lens, dense)
        ours = RowsOracle(3, cfg.num_layers, bits, G, R, dt, **KVJAX)
        ours.append(dense, np.zeros(3), lens)
        for layer in range(cfg.num_layers):
            check_layer(cache, ours, layer, f"lengths {lens.tolist()}", exact=layer == 0)
