"""KIVI storage core: 2/4-bit asymmetric KV quantisation with a full-precision residual.

KIVI ("A Tuning-Free Asymmetric 2bit Quantization for KV Cache", Liu et al. 2024) stores
keys quantised PER CHANNEL and values quantised PER TOKEN, and keeps the most recent tokens
in full precision until a whole block of them can be quantised. This module is that storage
for one layer, as pure, jittable functions on fixed shapes; the int config arguments
(bits, group_size, residual_length) are static Python ints.

Axis letters: B batch, K kv heads, S quantised slots, H head dim, T chunk length,
R residual_length, G group_size, P = 8 // bits codes per byte, C = value channel group
(C = G when G <= H, else C = H: a head dim smaller than the group is ONE group).

Layout of one layer (a dict of arrays; every array starts with [B, K, ...], so a mesh
shards rows over `data` and kv heads over `model` exactly like the dense cache):

    k_codes  uint8  [B, K, S, H/P]   key codes, P per byte, packed along H
    k_scale  dtype  [B, K, S/G, H]   per CHANNEL, per group of G consecutive tokens
    k_min    dtype  [B, K, S/G, H]
    v_codes  uint8  [B, K, S, H/P]   value codes, packed along H
    v_scale  dtype  [B, K, S, H/C]   per TOKEN, per group of C consecutive channels
    v_min    dtype  [B, K, S, H/C]
    k_res    dtype  [B, K, R, H]     the residual: recent tokens in full precision
    v_res    dtype  [B, K, R, H]

Quantised slot s holds token position s. Packing: code i (0 <= i < P) of a byte sits in
bits [bits*i, bits*(i+1)), i.e. byte = sum_i code_i << (bits * i) (little-end first).

Quantisation (asymmetric min/max, round to nearest, computed in float32):
    scale = (max - min) / (2^bits - 1),  q = clip(round((x - min) / scale), 0, 2^bits - 1),
    x' = q * scale + min.
Scale and min are STORED IN THE CACHE DTYPE (`dtype`: as KIVI stores fp16), with directed
rounding so the stored range still covers the group: the stored min is rounded down
(<= the true min) and the scale, recomputed from the stored min, is rounded up. So every
element is within stored_scale / 2 of its dequantised value (plus float32 rounding), in
any dtype; with dtype float32 this is exactly the textbook bound. A group whose values are
all equal gets scale 0 and dequantises to its min exactly. (Compiled, XLA turns the divisions
by 2^bits - 1 and by a broadcast scale into multiplications by float32 reciprocals: within an
ulp of the quotients, so an exact rounding tie may go either way; the bound is unchanged.)

Flush rule (KIVI's streaming rule, in whole residual blocks). For a row holding L tokens:
    positions [0, Q) are quantised, Q = floor(L / R) * R   (`quantized_tokens`),
    positions [Q, L) are in the residual, position p in residual slot p - Q = p mod R.
So the residual holds L mod R tokens (0..R-1): the moment a block of R tokens is complete it
is quantised (keys over its R/G token groups, values token by token) into quantised slots
[Q - R, Q) and the residual restarts (this is KIVI's code for KEYS: quantise when the
full-precision part reaches R). For VALUES the reference code (jy-yuan/KIVI) differs: it keeps
a sliding window of the newest min(L, R) values exact and quantises one value per decode step;
kvjax flushes values with the keys, so only L mod R values are exact (one flush point Q for
both, which read, surgery and the residual buffer rely on; tests/test_kivi_oracle.py checks
both against a NumPy KIVI). A chunk may complete several blocks at once; they are quantised
from the old residual and the chunk together, so writing a sequence token by token or in any chunks
stores bit-identical arrays. Blocks are aligned to multiples of R in position, never to
where a chunk started.

Capacity: a row may hold up to `capacity(S, R)` = S + R - 1 tokens (S quantised + R - 1 in
the residual). The caller validates this on the host; past it, blocks that do not fit in S
are dropped by the scatter (never wrapped onto stored tokens), and tokens are lost.

Costs. A one-token write (decode) scatters the token into the residual and quantises one
R-block (the old residual + the token) into the store with a scatter that only lands when
that block just completed (otherwise every index is out of range and dropped): O(R x H)
work per row and kv head, and the store is updated in place under donation (no O(S)
recompute, no copy of the store). A T-token chunk stages and quantises
floor((R - 1 + T) / R) blocks (the most it can complete), O((R + T) x H).
`read` dequantises the whole store (O(S x H), like the int8 kind's read).

Byte accounting per layer (exact; `layer_bytes` == sum of `init_layer`'s nbytes), with
it = dtype itemsize:
    codes      2 * B*K*S*H / P                      (uint8)
    key scale  2 * B*K*(S/G)*H * it                 (scale and min)
    value scale 2 * B*K*S*(H/C) * it
    residual   2 * B*K*R*H * it
Per token and kv head, bits=2, G=32, H=128, bf16: 32 + 32 code bytes + 16 key scale/min +
16 value scale/min = 96 bytes, + the residual amortised over S (R=128, S=4096: 16) = 112
bytes, vs 512 for dense bf16 (0.22x; 0.1875x without the residual).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

BITS = (2, 4)
NAMES = ("k_codes", "k_scale", "k_min", "v_codes", "v_scale", "v_min", "k_res", "v_res")


# ----------------------------------------------------------------------------- config

def _pos_int(name, v):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"KIVI: {name} must be a positive int, got {v!r}")


def check_config(S: int, H: int, bits: int, group_size: int, residual_length: int, dtype=None):
    """Raise ValueError, naming the values, unless this is a valid KIVI layer configuration."""
    if bits not in BITS:
        raise ValueError(f"KIVI: bits must be 2 or 4, got bits={bits!r}")
    for name, v in (("max tokens S", S), ("head_dim", H), ("group_size", group_size),
                    ("residual_length", residual_length)):
        _pos_int(name, v)
    if residual_length % group_size:
        raise ValueError(f"KIVI: group_size={group_size} must divide residual_length={residual_length}")
    if S % residual_length:
        raise ValueError(f"KIVI: S={S} slots must be a multiple of residual_length={residual_length}")
    if H >= group_size and H % group_size:
        raise ValueError(f"KIVI: group_size={group_size} must divide head_dim={H} "
                         f"(or exceed it: then the whole head_dim is one value group)")
    per = 8 // bits
    if H % per:
        raise ValueError(f"KIVI: head_dim={H} must be a multiple of {per} to pack {bits}-bit codes "
                         f"{per} per byte")
    if dtype is not None and not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
        raise ValueError(f"KIVI: dtype must be a floating dtype (residual, scales), got {dtype!r}")


def value_group(H: int, group_size: int) -> int:
    """Channels per value group C: group_size, or the whole head_dim when it is smaller."""
    return min(group_size, H)


def capacity(S: int, residual_length: int) -> int:
    """Most tokens a row can hold: S quantised slots plus a residual of up to R - 1."""
    return S + residual_length - 1


def quantized_tokens(lengths, residual_length: int):
    """Q = floor(L / R) * R: positions [0, Q) are quantised, [Q, L) in the residual."""
    return (lengths // residual_length) * residual_length


# ----------------------------------------------------------------------------- layer arrays

def layer_shapes(B, K, S, H, bits, group_size, residual_length, dtype) -> dict:
    """{name: (shape, dtype)} of one layer's arrays (see the module docstring)."""
    check_config(S, H, bits, group_size, residual_length, dtype)
    _pos_int("batch size B", B)
    _pos_int("kv heads K", K)
    dt = jnp.dtype(dtype)
    P, G, C, R = 8 // bits, group_size, value_group(H, group_size), residual_length
    u8 = jnp.dtype(jnp.uint8)
    return {
        "k_codes": ((B, K, S, H // P), u8),
        "k_scale": ((B, K, S // G, H), dt),
        "k_min": ((B, K, S // G, H), dt),
        "v_codes": ((B, K, S, H // P), u8),
        "v_scale": ((B, K, S, H // C), dt),
        "v_min": ((B, K, S, H // C), dt),
        "k_res": ((B, K, R, H), dt),
        "v_res": ((B, K, R, H), dt),
    }


def init_layer(B, K, S, H, bits, group_size, residual_length, dtype) -> dict:
    """One empty layer: every array zero (an unwritten slot dequantises to 0, never NaN)."""
    return {n: jnp.zeros(shape, dt) for n, (shape, dt) in
            layer_shapes(B, K, S, H, bits, group_size, residual_length, dtype).items()}


def layer_bytes(B, K, S, H, bits, group_size, residual_length, dtype) -> int:
    """Exact bytes of `init_layer`'s arrays, without allocating."""
    return sum(int(np.prod(shape)) * dt.itemsize for shape, dt in
               layer_shapes(B, K, S, H, bits, group_size, residual_length, dtype).values())


# ----------------------------------------------------------------------------- pack / quantise

def _shifts(bits: int, ndim: int):
    P = 8 // bits
    return (jnp.arange(P, dtype=jnp.uint8) * bits).reshape((1,) * ndim + (P,))


def pack(codes: jax.Array, bits: int) -> jax.Array:
    """codes [..., H] (integers in [0, 2^bits)) -> uint8 [..., H/P], code i of a byte at bits*i."""
    P = 8 // bits
    q = codes.astype(jnp.uint8).reshape(codes.shape[:-1] + (codes.shape[-1] // P, P))
    # The fields do not overlap, so the sum is a bitwise or (uint8 sum cannot overflow).
    return jnp.sum(q << _shifts(bits, q.ndim - 1), axis=-1, dtype=jnp.uint8)


def unpack(packed: jax.Array, bits: int) -> jax.Array:
    """uint8 [..., H/P] -> uint8 codes [..., H]; the inverse of `pack`."""
    P = 8 // bits
    q = (packed[..., None] >> _shifts(bits, packed.ndim)) & jnp.uint8((1 << bits) - 1)
    return q.reshape(packed.shape[:-1] + (packed.shape[-1] * P,))


def _round_down(x32, dtype):
    y = x32.astype(dtype)
    return jnp.where(y.astype(jnp.float32) > x32, jnp.nextafter(y, jnp.full_like(y, -jnp.inf)), y)


def _round_up(x32, dtype):
    y = x32.astype(dtype)
    return jnp.where(y.astype(jnp.float32) < x32, jnp.nextafter(y, jnp.full_like(y, jnp.inf)), y)


def minmax_quantize(x: jax.Array, axis: int, bits: int, dtype):
    """Asymmetric min/max quantisation of x over `axis` (reduced).

    Returns (codes uint8 shaped like x, scale dtype, min dtype), scale and min without `axis`.
    Stored min is rounded down and scale up in `dtype`, so [min, min + (2^bits-1) scale]
    covers the group and |x - dequant| <= scale / 2 up to float32 rounding.
    """
    levels = (1 << bits) - 1
    xf = x.astype(jnp.float32)
    mn = _round_down(jnp.min(xf, axis=axis), dtype)
    mn32 = mn.astype(jnp.float32)
    scale = _round_up((jnp.max(xf, axis=axis) - mn32) / levels, dtype)
    s32 = jnp.expand_dims(scale.astype(jnp.float32), axis)
    safe = jnp.where(s32 > 0, s32, 1.0)
    q = jnp.round((xf - jnp.expand_dims(mn32, axis)) / safe)
    codes = jnp.clip(q, 0, levels).astype(jnp.uint8)
    return codes, scale, mn


def quantize_keys(k: jax.Array, bits: int, group_size: int, dtype):
    """Keys per channel: k [..., N, H] (N tokens, a multiple of G) ->
    (packed uint8 [..., N, H/P], scale [..., N/G, H], min [..., N/G, H])."""
    *lead, N, H = k.shape
    g = k.reshape(tuple(lead) + (N // group_size, group_size, H))
    codes, scale, mn = minmax_quantize(g, g.ndim - 2, bits, dtype)
    return pack(codes.reshape(k.shape), bits), scale, mn


def dequantize_keys(packed, scale, mn, bits: int, group_size: int) -> jax.Array:
    """float32 [..., N, H] from `quantize_keys`' output."""
    q = unpack(packed, bits).astype(jnp.float32)
    *lead, N, H = q.shape
    q = q.reshape(tuple(lead) + (N // group_size, group_size, H))
    x = q * jnp.expand_dims(scale.astype(jnp.float32), -2) + jnp.expand_dims(mn.astype(jnp.float32), -2)
    return x.reshape(tuple(lead) + (N, H))


def quantize_values(v: jax.Array, bits: int, group_size: int, dtype):
    """Values per token: v [..., N, H] -> (packed uint8 [..., N, H/P], scale [..., N, H/C],
    min [..., N, H/C]), C = value_group(H, group_size)."""
    H = v.shape[-1]
    C = value_group(H, group_size)
    g = v.reshape(v.shape[:-1] + (H // C, C))
    codes, scale, mn = minmax_quantize(g, g.ndim - 1, bits, dtype)
    return pack(codes.reshape(v.shape), bits), scale, mn


def dequantize_values(packed, scale, mn, bits: int, group_size: int) -> jax.Array:
    """float32 [..., N, H] from `quantize_values`' output."""
    q = unpack(packed, bits).astype(jnp.float32)
    H = q.shape[-1]
    C = value_group(H, group_size)
    q = q.reshape(q.shape[:-1] + (H // C, C))
    x = q * scale.astype(jnp.float32)[..., None] + mn.astype(jnp.float32)[..., None]
    return x.reshape(x.shape[:-2] + (H,))


# ----------------------------------------------------------------------------- write / read

def _layer_dims(arrays: dict, bits: int):
    B, K, S, HP = arrays["k_codes"].shape
    return B, K, S, HP * (8 // bits)


def _check_chunk(arrays: dict, k_new, v_new, bits: int, group_size: int, residual_length: int) -> tuple:
    """(B, K, S, H) of a layer, after checking its settings and the chunk's shapes."""
    B, K, S, H = _layer_dims(arrays, bits)
    check_config(S, H, bits, group_size, residual_length)
    T = k_new.shape[1]
    if k_new.shape != (B, T, K, H) or v_new.shape != (B, T, K, H):
        raise ValueError(f"KIVI write: k_new {k_new.shape} and v_new {v_new.shape} must both be "
                         f"[B, T, K, H] = [{B}, T, {K}, {H}]")
    return B, K, S, H


def write(arrays: dict, k_new, v_new, starts, lengths, bits: int, group_size: int,
          residual_length: int) -> dict:
    """One layer's arrays after appending a right-padded chunk.

    k_new, v_new [B, T, K, H]; starts int32 [B] (row length before the chunk); lengths
    int32 [B] real tokens of the chunk (0: the row is untouched). Padding is never written.
    Afterwards positions [0, Q) of each row are quantised and [Q, starts + lengths) are in
    the residual, Q = quantized_tokens(starts + lengths, R).
    """
    B, K, S, H = _check_chunk(arrays, k_new, v_new, bits, group_size, residual_length)
    T = k_new.shape[1]
    if T == 0:
        return dict(arrays)
    R, G = residual_length, group_size
    W = ((R - 1 + T) // R) * R           # staging: every block this chunk can complete
    dtype = arrays["k_res"].dtype
    t = jnp.arange(T, dtype=jnp.int32)
    i = jnp.arange(W, dtype=jnp.int32)
    ig = jnp.arange(W // G, dtype=jnp.int32) * G

    def row(a, kn, vn, s, n):             # a: this row's arrays [K, ...]; kn, vn [T, K, H]
        kn = jnp.swapaxes(kn, 0, 1).astype(dtype)      # [K, T, H]
        vn = jnp.swapaxes(vn, 0, 1).astype(dtype)
        real = t < n
        end = s + n
        base0 = (s // R) * R              # first position of the block `s` falls in
        base1 = (end // R) * R            # = Q after the write

        # Residual: the chunk's tokens at positions >= Q go to slot p mod R (distinct slots,
        # since Q <= p < end < Q + R); the others are dropped (index R).
        res_slot = jnp.where(real & (s + t >= base1), (s + t) % R, R)
        out = dict(a)
        out["k_res"] = a["k_res"].at[:, res_slot].set(kn, mode="drop")
        out["v_res"] = a["v_res"].at[:, res_slot].set(vn, mode="drop")

        # Staging [K, W, H] = positions [base0, base0 + W): the OLD residual's [base0, s)
        # (its slots [0, s - base0)) followed by the chunk. Slots past `end` hold junk and
        # belong to blocks that are not complete, which are never stored.
        def stage(res, new):
            pad = jnp.zeros((K, W - R, H), dtype)
            buf = jnp.concatenate([res, pad], axis=1)
            return buf.at[:, jnp.where(real, s - base0 + t, W)].set(new, mode="drop")

        kst, vst = stage(a["k_res"], kn), stage(a["v_res"], vn)
        kc, ks, km = quantize_keys(kst, bits, G, dtype)      # [K, W, H/P], [K, W/G, H] x2
        vc, vs, vm = quantize_values(vst, bits, G, dtype)    # [K, W, H/P], [K, W, H/C] x2

        # Only completed blocks (positions < Q) land; S (or S/G) is out of range: dropped.
        slot = jnp.where(base0 + i < base1, base0 + i, S)
        grp = jnp.where(base0 + ig < base1, (base0 + ig) // G, S // G)
        for name, new, idx in (("k_codes", kc, slot), ("k_scale", ks, grp), ("k_min", km, grp),
                               ("v_codes", vc, slot), ("v_scale", vs, slot), ("v_min", vm, slot)):
            out[name] = a[name].at[:, idx].set(new, mode="drop")
        return out

    return jax.vmap(row)(dict(arrays), k_new, v_new, starts.astype(jnp.int32),
                         lengths.astype(jnp.int32))


def read(arrays: dict, lengths, dtype, bits: int, group_size: int, residual_length: int):
    """Dequantised (k, v) [B, K, S + R, H] in `dtype`, pos int32 [B, S + R], valid bool [B, S + R].

    Slots [0, S) are the quantised store (slot s holds position s, valid when s < Q), slots
    [S, S + R) the residual (slot S + r holds position Q + r, valid when r < L - Q), with
    L = lengths (tokens stored per row) and Q = quantized_tokens(L, R). Invalid residual
    slots read as 0 (never stale tokens), so the result is a function of the stored tokens.
    """
    B, K, S, H = _layer_dims(arrays, bits)
    check_config(S, H, bits, group_size, residual_length)
    R = residual_length
    lengths = lengths.astype(jnp.int32)
    k = dequantize_keys(arrays["k_codes"], arrays["k_scale"], arrays["k_min"], bits, group_size)
    v = dequantize_values(arrays["v_codes"], arrays["v_scale"], arrays["v_min"], bits, group_size)

    q = quantized_tokens(lengths, R)                                     # [B]
    s_idx = jnp.arange(S, dtype=jnp.int32)[None, :]
    r_idx = jnp.arange(R, dtype=jnp.int32)[None, :]
    res_valid = r_idx < (lengths - q)[:, None]                           # [B, R]
    keep = res_valid[:, None, :, None]
    k_res = jnp.where(keep, arrays["k_res"], jnp.zeros((), arrays["k_res"].dtype))
    v_res = jnp.where(keep, arrays["v_res"], jnp.zeros((), arrays["v_res"].dtype))

    k = jnp.concatenate([k.astype(dtype), k_res.astype(dtype)], axis=2)
    v = jnp.concatenate([v.astype(dtype), v_res.astype(dtype)], axis=2)
    pos = jnp.concatenate([jnp.broadcast_to(s_idx, (B, S)), q[:, None] + r_idx], axis=1)
    valid = jnp.concatenate([s_idx < q[:, None], res_valid], axis=1)
    return k, v, pos, valid


def attend_blocks(arrays: dict, quant: tuple, k, v, starts, lengths, own_block) -> tuple[list, dict]:
    """(key blocks, new arrays) of one KIVI layer for a chunk's k, v [B, T, K, H].

    One token is written, then read back with the store (as the dense path); a chunk
    attends over the stored tokens plus its own exact keys and values (`own_block`), then
    is written (its queries see full precision, as KIVI's prefill does)."""
    new_layer = write(arrays, k, v, starts, lengths, *quant)
    if k.shape[1] == 1:
        return [read(new_layer, starts + lengths, k.dtype, *quant)], new_layer
    return [read(arrays, starts, k.dtype, *quant), own_block], new_layer
