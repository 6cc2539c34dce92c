"""KVzipPress equals kvpress 0.5.5's KVzipPress on committed fixtures (two tiny Llama
checkpoints, GQA and MQA: kept (head, position) pairs and the greedy answer after them), in a
ragged batch inside one jit; a cache smaller than every layer's share caps layers as
documented; bad inputs raise before anything runs.

Fixtures: tests/fixtures/press/make_kvpress_fixtures.py (make_kvzip), kvzip_*.npz, kvzip_index.json.
"""
import json
from pathlib import Path

import numpy as np
import pytest

import kvjax
from kvjax import press

HERE = Path(__file__).resolve().parent / "fixtures" / "press"
INDEX = json.loads((HERE / "kvzip_index.json").read_text())
# CI runs these fixture variants (each static variant compiles its own program): one
# reconstruction chunk, layerwise budgets, and KVzip+ normalisation over three chunks (the
# later ones prompted with the previous chunk's tail, the last one partial). The fixtures also
# hold ratio 0.25 with chunk_size 32 and every variant on both checkpoints.
VARIANTS = {"llama_gqa": ["kvzip_r0.5", "kvzip_r0.75_layerwise"],
            "llama_mqa": ["kvzip_r0.5_plus_chunk40"]}
SHORT = 61          # the second row: the first 61 context tokens (ragged batch)


@pytest.fixture(scope="module")
def tok():
    return kvjax.load_tokenizer(HERE / INDEX["tokenizer"])


@pytest.fixture(scope="module")
def models():
    out = {}
    for name in VARIANTS:
        cfg, params = kvjax.load_hf(HERE / name)
        out[name] = (cfg, params, np.load(HERE / f"kvzip_{name}.npz"))
    return out


def _batch(ctx, first_full=True):
    n = len(ctx)
    toks = np.zeros((2, n), np.int32)
    rows = [ctx, ctx[:SHORT]] if first_full else [ctx[:SHORT], ctx]
    for b, r in enumerate(rows):
        toks[b, :len(r)] = r
    return toks, np.array([len(r) for r in rows], np.int32)


def _kept_masks(cache, n):
    """Per layer bool [B, K, n] from press.kept_positions."""
    out = []
    for pos in press.kept_positions(cache):
        pos = np.asarray(pos)
        m = np.zeros(pos.shape[:2] + (n,), bool)
        b, k, s = np.nonzero(pos >= 0)
        m[b, k, pos[b, k, s]] = True
        assert (m.sum(-1) == (pos >= 0).sum(-1)).all()          # no position held twice
        out.append(m)
    return out


def test_press_reads_the_chat_template(tok):
    p = press.KVzipPress(compression_ratio=0.5, tokenizer=tok)
    ctx = INDEX["context_ids"]
    assert ctx[:p.prefix_length] == tok.encode("<|user|>\n", add_special_tokens=False)
    assert p.suffix_ids == tuple(tok.encode("\n<|assistant|>\n", add_special_tokens=False))
    assert p.repeat_ids == tuple(tok.encode("\n\nRepeat the previous context exactly.", add_special_tokens=False))
    byte = press.KVzipPress(compression_ratio=0.5, tokenizer=kvjax.ByteTokenizer())
    ids, suffix = press.chat_context(kvjax.ByteTokenizer(), "abc")
    assert byte.prefix_length == 10 and ids == [257] + list(b"<|user|>\nabc") and suffix == "\n<|assistant|>\n"
    # the static part (what the program depends on) does not hold the ratio
    assert byte.static() == press.KVzipPress(compression_ratio=0.9, tokenizer=kvjax.ByteTokenizer()).static()


@pytest.mark.parametrize("name,pid", [(n, p) for n, ps in VARIANTS.items() for p in ps])
def test_matches_kvpress(models, tok, name, pid):
    cfg, params, ref = models[name]
    info = INDEX["checkpoints"][name]["presses"][pid]
    assert not info["boundary_tie"]
    p = press.KVzipPress(**info["args"], tokenizer=tok)
    ctx = INDEX["context_ids"]
    n, L, K = len(ctx), cfg.num_layers, cfg.num_kv_heads
    first_full = name == "llama_gqa"                    # on MQA the full row comes second
    full = 0 if first_full else 1
    toks, lens = _batch(ctx, first_full)
    logits, cache = kvjax.prefill(cfg, params, toks, lens, kvjax.init_cache(cfg, 2, n), press=p)
    assert cache.pooled and np.asarray(cache.lengths).tolist() == lens.tolist()
    masks = _kept_masks(cache, n)
    for layer in range(L):
        np.testing.assert_array_equal(masks[layer][full], ref[f"{pid}/layer{layer}/kept_mask"],
                                      err_msg=f"{pid} layer {layer}")
    # the short row keeps its budget (kvpress's rule on its own length), sinks included
    m = lens[1 - full]
    kept = np.array([mk[1 - full].sum() for mk in masks])
    r = info["args"]["compression_ratio"]
    if info["args"].get("layerwise"):
        assert (kept == K * m - int(K * m * r)).all()
    else:
        assert kept.sum() == L * K * m - int(L * K * m * r)
    assert all(mk[1 - full][:, :4].all() and not mk[1 - full][:, m:].any() for mk in masks)
    if pid == "kvzip_r0.5":        # the prefill's logits are the full context's
        plain, _ = kvjax.prefill(cfg, params, toks, lens, kvjax.init_cache(cfg, 2, n))
        np.testing.assert_allclose(np.asarray(logits), np.asarray(plain), atol=2e-5)
        from kvjax.decode.kvzip import kvzip_program   # a new ratio is data, not a new program
        programs = kvzip_program._cache_size()
        other = press.KVzipPress(**{**info["args"], "compression_ratio": 0.3}, tokenizer=tok)
        kvjax.prefill(cfg, params, toks, lens, kvjax.init_cache(cfg, 2, n), press=other)
        assert kvzip_program._cache_size() == programs
    # the answer after the pressed context: kvpress's (question at the uncompressed position n)
    q = np.asarray(ref["question_ids"])[None].repeat(2, 0)
    out = kvjax.generate(cfg, params, q, max_new_tokens=len(ref[f"{pid}/tokens_reference"]), cache=cache)
    np.testing.assert_array_equal(np.asarray(out.tokens)[full], ref[f"{pid}/tokens_reference"])


def test_small_cache_caps_layers(models, tok):
    """A pool smaller than a layer's share: each layer keeps at most its pool, the row keeps its
    budget; the selection is the best pairs among each layer's top-pool (kvpress's scores)."""
    cfg, params, ref = models["llama_gqa"]
    pid = "kvzip_r0.5"
    ctx = INDEX["context_ids"]
    n, L, K = len(ctx), cfg.num_layers, cfg.num_kv_heads
    budget = L * K * n - int(L * K * n * 0.5)
    share = [int(ref[f"{pid}/layer{l}/kept_mask"].sum()) for l in range(L)]
    slots = (max(share) - 6) // K                     # the larger layer does not fit
    assert K * slots < max(share) and L * K * slots >= budget
    p = press.KVzipPress(compression_ratio=0.5, tokenizer=tok)
    toks = np.asarray(ctx, np.int32)[None]
    _, cache = kvjax.prefill(cfg, params, toks, np.array([n], np.int32), kvjax.init_cache(cfg, 1, slots), press=p)
    got = np.stack([m[0] for m in _kept_masks(cache, n)])                       # [L, K, n]
    scores = ref[f"{pid}/scores"].astype(np.float64).copy()
    scores[..., :4] = scores.max() + 1
    flat = scores.reshape(L, K * n)
    ok = np.zeros_like(flat, bool)
    for l in range(L):
        ok[l, np.argsort(-flat[l], kind="stable")[:K * slots]] = True
    order = np.argsort(-np.where(ok, flat, -np.inf).reshape(-1), kind="stable")[:budget]
    want = np.zeros(L * K * n, bool)
    want[order] = True
    np.testing.assert_array_equal(got, want.reshape(L, K, n))
    assert got.sum() == budget and (got.reshape(L, -1).sum(1) <= K * slots).all()


def test_errors(models, tok):
    cfg, params, _ = models["llama_mqa"]
    ctx = np.asarray(INDEX["context_ids"], np.int32)[None]
    n = np.array([ctx.shape[1]], np.int32)
    p = press.KVzipPress(compression_ratio=0.5, tokenizer=tok)
    with pytest.raises(ValueError, match="needs the reconstruction prompt"):
        press.KVzipPress(compression_ratio=0.5)
    with pytest.raises(ValueError, match="chunk_size must be an int >= 1, got 0"):
        press.KVzipPress(chunk_size=0, tokenizer=tok)
    with pytest.raises(ValueError, match=r"compression_ratio must be a number in \[0, 1\), got 1.0"):
        press.KVzipPress(compression_ratio=1.0, tokenizer=tok)
    with pytest.raises(ValueError, match="row 0 keeps 98 .* use max_len >= 49"):
        kvjax.prefill(cfg, params, ctx, n, kvjax.init_cache(cfg, 1, 40), press=p)
    with pytest.raises(ValueError, match=r"row 0 has 2 tokens but .* prefix_length=2"):
        kvjax.prefill(cfg, params, ctx[:, :2], np.array([2], np.int32), kvjax.init_cache(cfg, 1, 8), press=p)
    used = kvjax.init_cache(cfg, 1, 128)
    used = used.replace(lengths=used.lengths + 3)          # as after a 3-token prefill
    with pytest.raises(ValueError, match="EMPTY cache"):
        kvjax.prefill(cfg, params, ctx, n, used, press=p)
    with pytest.raises(ValueError, match="runs its own reconstruction passes in kvjax.prefill"):
        kvjax.generate(cfg, params, ctx, n, max_new_tokens=2, press=p)
    with pytest.raises(ValueError, match="kind 'window'"):
        kvjax.prefill(cfg, params, ctx, n, kvjax.init_cache(cfg, 1, 128, kind="window"), press=p)
