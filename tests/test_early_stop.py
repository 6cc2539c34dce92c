"""generate's decode loop stops once every row has emitted EOS (issue 20): the same tokens,
lengths and cache as running every planned step, for every cache kind and DecodingPress
segments, with fewer steps run (counted by the loop itself: `decode_loop_counted`)."""
import re
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from conftest import model
from kvjax.decode import Plan, Segment, generate_program
from kvjax.decode.programs import generate_counted
from kvjax.press import KnormPress
from kvjax.press.decoding import DecodingPress
from kvjax.sampling import Knobs

N, PAD = 20, 7
# generate_counted with stop_early static: True is what generate runs, False runs every step
counted = jax.jit(generate_counted, static_argnums=(0, 5, 8))


def _early_eos(ref):
    """An EOS id per row that the row emits early (and for the first time there)."""
    firsts = [next(t for t in range(1, ref.shape[1]) if ref[b, t] not in ref[b, :t]) for b in range(len(ref))]
    return sorted({int(ref[b, t]) for b, t in enumerate(firsts)})


@pytest.fixture(scope="module")
def setup():
    cfg, params = model("llama-tiny")
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, cfg.vocab_size, (3, 9), dtype=np.int32)
    lens = np.array([9, 4, 6], np.int32)
    ref = np.asarray(kvjax.generate(cfg, params, prompts, lens, max_new_tokens=N).tokens)   # no EOS
    return cfg, params, prompts, lens, ref, _early_eos(ref)


def _cut(ref, eos):
    """The reference tokens/lengths: every step run, then each row cut after its first EOS."""
    toks, lengths = ref.copy(), np.full(len(ref), ref.shape[1], np.int32)
    for b, row in enumerate(ref):
        hits = np.flatnonzero(np.isin(row, eos))
        if hits.size:
            toks[b, hits[0] + 1:] = PAD
            lengths[b] = hits[0] + 1
    return toks, lengths


def _eos_sets(ref, eos_all):
    some = [e for e in eos_all if not all(np.isin(e, row) for row in ref)][:1]
    return {"some": some, "all": eos_all}


@pytest.mark.parametrize("which", ["some", "all"])
def test_generate_equals_all_steps_cut_at_eos(setup, which):
    cfg, params, prompts, lens, ref, eos_all = setup
    eos = _eos_sets(ref, eos_all)[which]
    assert eos
    out = kvjax.generate(cfg, params, prompts, lens, max_new_tokens=N, eos_token_id=eos, pad_token_id=PAD)
    toks, lengths = _cut(ref, eos)
    np.testing.assert_array_equal(np.asarray(out.tokens), toks)
    np.testing.assert_array_equal(np.asarray(out.lengths), lengths)
    np.testing.assert_array_equal(np.asarray(out.cache.lengths), lens + lengths)
    assert (lengths < N).all() == (which == "all")


CASES = [("dense", {}, None), ("int8", dict(kind="int8"), None), ("window", dict(kind="window"), None),
         ("sinks", dict(kind="sinks", num_sinks=2), None), ("kivi", dict(kind="kivi"), None),
         ("knorm", {}, KnormPress(0.5)),
         ("decoding", {}, DecodingPress(base_press=KnormPress(), compression_interval=3, target_size=6))]


def _run(cfg, params, prompts, lens, name, kw, press, eos, stop_early):
    """(GenerateOutput, steps run) of generate's program, planned as generate plans it."""
    from kvjax.decode.plans import decoding_segments
    S = 128 if name == "kivi" else (16 if name in ("window", "sinks") else 32)
    cache = kvjax.init_cache(cfg, len(prompts), S, **kw)
    knobs = Knobs.make(cfg.vocab_size, len(prompts), 0.0, 0, 1.0, eos, None, PAD)
    budgets = None
    if isinstance(press, DecodingPress):
        plan = Plan(None, decoding_segments(N, press, prompts.shape[1]), None, press)
    elif press is not None:
        from kvjax.press import host
        budgets = host.prefill_budgets(press, cfg, cache, lens, "generate")
        plan = Plan(None, (Segment(N),), press.static())
    else:
        plan = Plan(None, (Segment(5, 32 if S >= 32 else None), Segment(N - 5)))   # two loops
    return counted(cfg, params, jnp.asarray(prompts), jnp.asarray(lens), cache, plan, knobs, budgets, stop_early)


@pytest.mark.parametrize("name, kw, press", CASES, ids=[c[0] for c in CASES])
def test_every_cache_kind_returns_the_all_steps_cache_with_fewer_steps(setup, name, kw, press):
    cfg, params, prompts, lens, _, _ = setup
    ref = np.asarray(_run(cfg, params, prompts, lens, name, kw, press, None, False)[0].tokens)
    sets = _eos_sets(ref, _early_eos(ref))
    assert sets["some"] and sets["all"]
    for which, eos in sets.items():
        full, full_steps = _run(cfg, params, prompts, lens, name, kw, press, eos, False)
        got, steps = _run(cfg, params, prompts, lens, name, kw, press, eos, True)
        np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(full.tokens))
        np.testing.assert_array_equal(np.asarray(got.lengths), np.asarray(full.lengths))
        assert got.cache.kind == full.cache.kind
        for a, b in zip(jax.tree_util.tree_leaves(got.cache), jax.tree_util.tree_leaves(full.cache), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        lengths = np.asarray(got.lengths)
        assert int(full_steps) == N
        # steps run: every step until the last row's EOS (all finish), else all of them
        assert int(steps) == (lengths.max() if which == "all" else N)
        assert (lengths < N).all() == (which == "all")


def test_steps_run_stop_at_the_last_rows_eos(setup):
    cfg, params, prompts, lens, ref, eos_all = setup
    eos = _eos_sets(ref, eos_all)["all"]
    got, steps = _run(cfg, params, prompts, lens, "dense", {}, None, eos, True)
    assert int(steps) == int(np.asarray(got.lengths).max()) < N


def test_compiled_generate_aliases_the_donated_cache_without_copies():
    """The while loops keep the cache in place: every cache leaf aliased, no whole-cache copy."""
    cfg, params = model("llama-tiny")
    B, S = 2, 64
    cache = kvjax.init_cache(cfg, B, S)
    knobs = Knobs.make(cfg.vocab_size, B, 0.0, 0, 1.0, 5, None, 0)
    plan = Plan(32, (Segment(4, 32), Segment(8)))
    hlo = generate_program.lower(cfg, params, jnp.zeros((B, 4), jnp.int32), jnp.full((B,), 4, jnp.int32),
                                 cache, plan, knobs).compile().as_text()
    header = next(line for line in hlo.splitlines() if "input_output_alias" in line)
    aliases = header.split("input_output_alias=")[1].split("entry_computation_layout")[0]
    assert len(re.findall(r"(may|must)-alias\)", aliases)) == 2 * cfg.num_layers + 1
    shape = f"f32[{B},{cfg.num_kv_heads},{S},{cfg.head_dim}]"
    assert [l for l in hlo.splitlines() if re.search(re.escape(shape) + r"\{[^}]*\} copy\(", l)] == []
