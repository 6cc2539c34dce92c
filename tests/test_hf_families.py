"""Parity with transformers for the model families of issue 13: Gemma 1/2/3, Qwen3, Phi-3,
OLMo 2 and a Qwen2 with windows on some layers only.

Each family is a tiny random transformers model (PyTorch CPU, eager attention) saved with
`save_pretrained` and loaded with `kvjax.load_hf`, with the options that matter set away
from their defaults:

  gemma         MQA, tied, (1 + w) norms, embed scale, GeGLU
  gemma2        sandwich norms, query_pre_attn_scalar 24 (not head_dim 16), attention softcap 20,
                final softcap 30, layer_types sliding/full/sliding with window 4
  gemma3        q/k norms, layer_types s/s/full/s (window 4), local rotary base 100 on sliding
                layers, global base 1e5 with linear scaling x4 (transformers 5 writes these as
                per-layer-type rope_parameters), untied head
  qwen3         q/k norms per head, head_dim 24 (not 64 / 4)
  phi3          fused qkv_proj / gate_up_proj, partial_rotary_factor 0.5, longrope with
                original_max_position_embeddings 16: generation crosses the switch
  olmo2         norms after attention and MLP, q/k norms over the projection width
  qwen2_hybrid  use_sliding_window with max_window_layers 1: layer 0 full, layers 1-2 window 4

Weights are redrawn with hf_fixtures.WEIGHT_STD so greedy argmaxes are decisive (see
test_hf_parity.py). Prompts (5, 9, 13) with 16 new tokens: every row runs more than 3
windows of 4 past the window, and Phi-3's rows pass position 16.

A multimodal Gemma 3 (Gemma3ForConditionalGeneration with a tiny SigLIP tower) checks the
text part: nested text_config, language-model weight prefix of both transformers versions,
vision tensors skipped with a warning.
"""
import json
import warnings

import numpy as np
import pytest

from conftest import require_module

torch = require_module("torch", "parity tests need PyTorch (CPU)")
transformers = require_module("transformers", "parity tests need the reference implementation")

import kvjax  # noqa: E402
from hf_fixtures import LOGIT_TOL, WEIGHT_STD, assert_logits_close, pad_rows  # noqa: E402
from kvjax.hf import CheckpointError, config_from_hf, config_to_hf  # noqa: E402

VOCAB = 320
NEW = 16
PROMPT_LENS = (5, 9, 13)
WIDTH = max(PROMPT_LENS)
_DIMS = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256)
LONGROPE_ORIGINAL = 16

FAMILIES = {
    "gemma": ("gemma", dict(_DIMS, num_hidden_layers=2, num_key_value_heads=1, head_dim=16)),
    "gemma2": ("gemma2", dict(_DIMS, num_hidden_layers=3, head_dim=16, query_pre_attn_scalar=24,
                              sliding_window=4, attn_logit_softcapping=20.0,
                              final_logit_softcapping=30.0)),
    "gemma3": ("gemma3_text", dict(_DIMS, num_hidden_layers=4, head_dim=16, query_pre_attn_scalar=32,
                                   sliding_window=4,
                                   layer_types=["sliding_attention", "sliding_attention",
                                                "full_attention", "sliding_attention"],
                                   rope_theta=1e5, rope_local_base_freq=100.0,
                                   rope_scaling={"rope_type": "linear", "factor": 4.0},
                                   tie_word_embeddings=False)),
    "qwen3": ("qwen3", dict(_DIMS, num_hidden_layers=2, head_dim=24, tie_word_embeddings=False)),
    "phi3": ("phi3", dict(_DIMS, num_hidden_layers=2, max_position_embeddings=64,
                          original_max_position_embeddings=LONGROPE_ORIGINAL,
                          partial_rotary_factor=0.5,
                          rope_scaling={"rope_type": "longrope", "short_factor": [1.0, 1.2, 1.5, 2.0],
                                        "long_factor": [2.0, 3.0, 5.0, 8.0]})),
    "olmo2": ("olmo2", dict(_DIMS, num_hidden_layers=2)),
    "qwen2_hybrid": ("qwen2", dict(_DIMS, num_hidden_layers=3, use_sliding_window=True,
                                   sliding_window=4, max_window_layers=1)),
}

# What each family must map to (a wrong mapping of any of these fails here first).
EXPECT = {
    "gemma": dict(norm="gemma_rmsnorm", mlp="geglu", embed_scale=True, tie_embeddings=True,
                  num_kv_heads=1, layer_types=None, sliding_window=None),
    "gemma2": dict(norm_placement="sandwich", query_pre_attn_scalar=24.0, attn_softcap=20.0,
                   final_softcap=30.0, sliding_window=4, layer_types=("sliding", "full", "sliding")),
    "gemma3": dict(qk_norm="head", attn_softcap=None, final_softcap=None, rope_theta=1e5, tie_embeddings=False,
                   rope_local_theta=100.0, layer_types=("sliding", "sliding", "full", "sliding")),
    "qwen3": dict(qk_norm="head", head_dim=24, qkv_bias=False, tie_embeddings=False),
    "phi3": dict(rotary_dim=8, max_position=64, sliding_window=None),
    "olmo2": dict(norm_placement="post", qk_norm="proj", norm="rmsnorm"),
    "qwen2_hybrid": dict(qkv_bias=True, sliding_window=4, layer_types=("full", "sliding", "sliding")),
}


def randomize(model, zero_centred_norms: bool, seed: int = 0):
    """Decisive random weights (hf_fixtures.hf_model's scheme); Gemma's norm weights are
    zero-centred (they scale by 1 + w)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim >= 2:
                # Gemma multiplies embeddings by sqrt(hidden) = 8: draw them 8x smaller, or the
                # scaled embedding outweighs every (normed) sublayer output and a tied head
                # just repeats the last token.
                small = zero_centred_norms and "embed_tokens" in name
                p.copy_(noise * WEIGHT_STD / (8.0 if small else 1.0))
            elif name.endswith("bias"):
                p.copy_(noise * 0.2)
            else:
                p.copy_((0.0 if zero_centred_norms else 1.0) + noise * 0.2)
    return model.eval()


def hf_family_model(name: str, seed: int = 0):
    model_type, kwargs = FAMILIES[name]
    config = transformers.AutoConfig.for_model(model_type, vocab_size=VOCAB, bos_token_id=None,
                                               eos_token_id=None, pad_token_id=None, **kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager",
                                                          dtype=torch.float32)
    return randomize(model, model_type.startswith("gemma"), seed)


class Loaded:
    def __init__(self, name, folder):
        self.name = name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # transformers' notes on tiny/unusual configs
            self.hf = hf_family_model(name, seed=len(name))
            self.hf.save_pretrained(folder)
        self.folder = folder
        self.cfg, self.params = kvjax.load_hf(folder, dtype="float32")
        rng = np.random.default_rng(1)
        self.prompts = [rng.integers(0, VOCAB, n).astype(np.int32) for n in PROMPT_LENS]
        self._ref = None

    def hf_logits(self, tokens):
        with torch.no_grad():
            return self.hf(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()

    def reference_generations(self):
        """transformers' greedy continuation of each prompt alone (no padding), with its cache."""
        if self._ref is None:
            self._ref = []
            for p in self.prompts:
                ids = torch.tensor(p[None], dtype=torch.long)
                with torch.no_grad():
                    out = self.hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                                           do_sample=False, pad_token_id=0)
                self._ref.append(out[0, len(p):].numpy())
                assert len(self._ref[-1]) == NEW
        return self._ref

    def cached_reference(self, p):
        """transformers' greedy loop with its cache kept throughout: model(...) per token,
        bypassing generate's Phi-3 override that drops the cache at the longrope switch."""
        cache = transformers.DynamicCache(config=self.hf.config)
        ids, out = torch.tensor(p[None], dtype=torch.long), []
        with torch.no_grad():
            for _ in range(NEW):
                logits = self.hf(input_ids=ids, cache=cache, use_cache=True).logits
                ids = logits[:, -1].argmax(-1, keepdim=True)
                out.append(int(ids[0, 0]))
        return np.array(out)

    def padded(self, rows):
        return pad_rows(self.prompts, rows, WIDTH)


_LOADED = {}


def _load(name, tmp_path_factory) -> Loaded:
    if name not in _LOADED:
        _LOADED[name] = Loaded(name, tmp_path_factory.mktemp(name))
    return _LOADED[name]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def fam(request, tmp_path_factory):
    return _load(request.param, tmp_path_factory)


def test_config_maps_the_family(fam):
    for field, want in EXPECT[fam.name].items():
        assert getattr(fam.cfg, field) == want, (fam.name, field)
    rs = fam.cfg.rope_scaling
    if fam.name == "gemma3":   # linear scaling on the global layer only
        assert rs.rope_type == "linear" and rs.factor == 4.0
        assert fam.cfg.layer_rope(2) == (1e5, rs) and fam.cfg.layer_rope(0) == (100.0, None)
    if fam.name == "phi3":
        assert (rs.rope_type, rs.original_max_position, rs.factor) == ("longrope", 16, 4.0)
        assert rs.short_factor == (1.0, 1.2, 1.5, 2.0) and rs.long_factor == (2.0, 3.0, 5.0, 8.0)


def test_forward_logits_match(fam):
    tokens = np.random.default_rng(2).integers(0, VOCAB, (2, 24)).astype(np.int32)
    assert_logits_close(np.asarray(kvjax.forward(fam.cfg, fam.params, tokens)), fam.hf_logits(tokens))


def _switch(n):
    """Tokens of a Phi-3 row with an n-token prompt predicted before the longrope switch."""
    return LONGROPE_ORIGINAL + 1 - n


def test_greedy_ragged_batch_matches_transformers(fam):
    """A right-padded ragged batch equals transformers' generate of each prompt alone.

    Phi-3: transformers' generate drops its cache when a sequence passes
    original_max_position_embeddings and recomputes every position with the long factors;
    a kvjax cache keeps what it holds (as transformers' own cache does when driven token by
    token). So the cached generation equals generate up to the switch and transformers'
    token-by-token cached loop throughout; the uncached one equals generate throughout
    (test_cached_and_uncached_agree)."""
    ref = fam.reference_generations()
    rows = [2, 0, 1]
    toks, lens = fam.padded(rows)
    out = kvjax.generate(fam.cfg, fam.params, toks, prompt_lengths=lens, max_new_tokens=NEW,
                         eos_token_id=None)
    got = np.asarray(out.tokens)
    for i, r in enumerate(rows):
        want = ref[r]
        if fam.name == "phi3":
            np.testing.assert_array_equal(got[i, :_switch(lens[i])], want[:_switch(lens[i])])
            want = fam.cached_reference(fam.prompts[r])
        np.testing.assert_array_equal(got[i], want, err_msg=f"{fam.name} batch row {i} (prompt {r})")
    assert all(len(np.unique(t)) > 4 for t in ref), "a model stuck on one token proves nothing"


@pytest.mark.parametrize("name", ["gemma3", "qwen2_hybrid", "phi3"])
def test_cached_and_uncached_agree(name, tmp_path_factory):
    """kvjax.generate with and without a cache (windowed families: the hybrid cache against
    the masked full recompute). Phi-3: the uncached run recomputes every step, which is
    what transformers' generate does past the longrope switch: it equals generate
    throughout, and the cached run up to the switch."""
    fam = _load(name, tmp_path_factory)
    toks, lens = fam.padded([0, 1, 2])
    kw = dict(prompt_lengths=lens, max_new_tokens=NEW, eos_token_id=None)
    cached = np.asarray(kvjax.generate(fam.cfg, fam.params, toks, **kw).tokens)
    uncached = np.asarray(kvjax.generate(fam.cfg, fam.params, toks, use_cache=False, **kw).tokens)
    if name != "phi3":
        np.testing.assert_array_equal(cached, uncached)
        return
    ref = fam.reference_generations()
    for i, n in enumerate(lens):
        np.testing.assert_array_equal(uncached[i], ref[i])
        np.testing.assert_array_equal(cached[i, :_switch(n)], uncached[i, :_switch(n)])
    assert any((cached[i] != uncached[i]).any() for i in range(3)), "the switch made no difference"


def test_transformers_loads_what_kvjax_saved(fam, tmp_path):
    kvjax.save_hf(fam.cfg, fam.params, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path, attn_implementation="eager", dtype=torch.float32).eval()
    assert type(again) is type(fam.hf)
    want, got = fam.hf.state_dict(), again.state_dict()
    assert set(got) == set(want)
    for name, x in want.items():
        torch.testing.assert_close(got[name], x, rtol=0, atol=0, msg=name)
    tokens = np.random.default_rng(3).integers(0, VOCAB, (1, 24))
    with torch.no_grad():
        np.testing.assert_array_equal(again(torch.tensor(tokens)).logits.numpy(), fam.hf_logits(tokens))
    assert kvjax.load_hf(tmp_path)[0] == fam.cfg


@pytest.mark.parametrize("name, wrong", [
    ("gemma3", dict(rope_local_theta=1e5)),                  # one rotary base for every layer
    ("gemma2", dict(attn_softcap=None)),                     # no attention soft-capping
    ("phi3", dict(rope_scaling=None)),                       # no longrope at all
])
def test_each_family_option_is_load_bearing(name, wrong, tmp_path_factory):
    """Proof by contrast: the same weights with one option dropped miss the tolerance by far."""
    fam = _load(name, tmp_path_factory)
    tokens = np.random.default_rng(4).integers(0, VOCAB, (1, 24)).astype(np.int32)
    ref = fam.hf_logits(tokens)
    got = np.asarray(kvjax.forward(fam.cfg.replace(**wrong), fam.params, tokens))
    assert np.abs(got - ref).max() > 100 * LOGIT_TOL * np.abs(ref).max()


def test_longrope_switches_per_row_at_the_original_length(tmp_path_factory):
    """A 16-token prompt stays on the short factors; 17 tokens switch the whole chunk to the
    long ones (transformers: max(position_ids) + 1 > original_max_position_embeddings)."""
    fam = _load("phi3", tmp_path_factory)
    rng = np.random.default_rng(5)
    tokens = rng.integers(0, VOCAB, (2, 17)).astype(np.int32)
    ref16, ref17 = fam.hf_logits(tokens[:1, :16]), fam.hf_logits(tokens[1:])
    got = np.asarray(kvjax.forward(fam.cfg, fam.params, tokens, lengths=np.array([16, 17])))
    assert_logits_close(got[:1, :16], ref16)   # rows of one batch choose independently
    assert_logits_close(got[1:], ref17)


# ----------------------------------------------------------------------------- multimodal gemma3

def _gemma3_multimodal():
    _, text = FAMILIES["gemma3"]
    vision = dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32,
                  num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)
    config = transformers.Gemma3Config(
        text_config=dict(text, model_type="gemma3_text", vocab_size=VOCAB, pad_token_id=None,
                         bos_token_id=None, eos_token_id=None),
        vision_config=vision, mm_tokens_per_image=4, image_token_index=VOCAB - 1,
        boi_token_index=VOCAB - 3, eoi_token_index=VOCAB - 2)
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(config).to(torch.float32)
    model.config._attn_implementation = "eager"
    for sub in (model.config.text_config, model.config.vision_config):
        sub._attn_implementation = "eager"
    return randomize(model, zero_centred_norms=True, seed=3)


def test_multimodal_gemma3_loads_its_language_model(tmp_path):
    from safetensors.numpy import load_file, save_file

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _gemma3_multimodal()
        model.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="images are not supported"):
        cfg, params = kvjax.load_hf(tmp_path)
    assert cfg.qk_norm == "head" and cfg.layer_types == EXPECT["gemma3"]["layer_types"]
    tokens = np.random.default_rng(6).integers(0, VOCAB - 3, (2, 20)).astype(np.int32)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()
    assert_logits_close(np.asarray(kvjax.forward(cfg, params, tokens)), ref)

    # Both layouts: the hub's (language_model.model.*, vision_tower.*), which save_pretrained
    # writes, and the module names of transformers 5 (model.language_model.*, model.vision_tower.*).
    tensors = load_file(tmp_path / "model.safetensors")
    assert "language_model.model.embed_tokens.weight" in tensors
    assert any(n.startswith("vision_tower.") for n in tensors)
    new = {("model.language_model." + n[len("language_model.model."):]
            if n.startswith("language_model.model.") else "model." + n): x for n, x in tensors.items()}
    save_file(new, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="vision tensors were not loaded"):
        _, params5 = kvjax.load_hf(tmp_path)
    for a, b in zip(*(jax_leaves(p) for p in (params, params5))):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(CheckpointError, match="gemma3_text"):
        kvjax.save_hf(cfg, params, tmp_path / "out", model_type="gemma3")


def jax_leaves(tree):
    import jax
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


# ----------------------------------------------------------------------------- config styles and errors

GEMMA3_V4 = dict(model_type="gemma3_text", vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                 num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 sliding_window=8, sliding_window_pattern=3, rope_theta=1e6, rope_local_base_freq=1e4,
                 rope_scaling={"rope_type": "linear", "factor": 8.0}, query_pre_attn_scalar=16)
PHI3 = dict(model_type="phi3", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=64, original_max_position_embeddings=16)
LONGROPE = {"short_factor": [1.0, 1.0, 1.5, 2.0], "long_factor": [2.0, 3.0, 4.0, 5.0]}


def test_both_config_styles_read_alike():
    """transformers 4.x keys (rope_theta, rope_scaling, rope_local_base_freq,
    sliding_window_pattern, partial_rotary_factor) and transformers 5's rope_parameters."""
    v4 = config_from_hf(GEMMA3_V4)[0]
    assert v4.layer_types == ("sliding", "sliding", "full") * 2      # pattern 3: every third full
    v5 = dict(GEMMA3_V4, layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
              rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                               "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    for k in ("rope_theta", "rope_local_base_freq", "rope_scaling", "sliding_window_pattern"):
        del v5[k]
    assert config_from_hf(v5)[0] == v4
    assert v4.layer_rope(0) == (1e4, None) and v4.layer_rope(2)[1].factor == 8.0

    p4 = config_from_hf(dict(PHI3, partial_rotary_factor=0.5, rope_theta=500.0,
                             rope_scaling=dict(LONGROPE, type="su")))[0]
    p5 = config_from_hf(dict(PHI3, rope_parameters=dict(LONGROPE, rope_type="longrope", rope_theta=500.0,
                                                        partial_rotary_factor=0.5)))[0]
    assert p4 == p5 and p4.rotary_dim == 8 and p4.rope_scaling.factor == 4.0
    # Qwen3/Qwen2 windows from layer_types or from max_window_layers.
    q = dict(model_type="qwen3", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
             num_attention_heads=4, use_sliding_window=True, sliding_window=8)
    a = config_from_hf(dict(q, max_window_layers=2))[0]
    b = config_from_hf(dict(q, layer_types=["full_attention"] * 2 + ["sliding_attention"]))[0]
    assert a == b and a.layer_types == ("full", "full", "sliding")
    assert config_from_hf(dict(q, use_sliding_window=False, max_window_layers=2))[0].sliding_window is None
    # Gemma 2 without layer_types: even layers slide (transformers' default).
    g2 = dict(model_type="gemma2", vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
              num_hidden_layers=3, num_attention_heads=4, head_dim=16, sliding_window=4)
    assert config_from_hf(g2)[0].layer_types == ("sliding", "full", "sliding")
    assert config_from_hf(dict(g2, attn_logit_softcapping=None))[0].attn_softcap is None
    for cfg in (v4, p4, a):   # and kvjax writes what it reads
        assert config_from_hf(config_to_hf(cfg))[0] == cfg.replace(name=config_to_hf(cfg)["model_type"])


@pytest.mark.parametrize("changes, message", [
    (dict(GEMMA3_V4, use_bidirectional_attention=True), "use_bidirectional_attention"),
    (dict(GEMMA3_V4, hidden_activation="gelu"), "hidden_activation='gelu'"),
    (dict(GEMMA3_V4, rope_scaling={"rope_type": "yarn", "factor": 2.0}), "'yarn'.*default, linear"),
    (dict(GEMMA3_V4, rope_parameters={"full_attention": {"rope_type": "default"},
                                      "sliding_attention": {"rope_type": "linear", "factor": 2.0}}),
     r"rope_parameters\['sliding_attention'\] rope_type 'linear'"),
    (dict(GEMMA3_V4, layer_types=["chunked_attention"] * 6), "chunked_attention"),
    (dict(PHI3, rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "'dynamic'.*default, longrope"),
    (dict(PHI3, rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 3, "long_factor": [1.0] * 3}),
     "short_factor has 3 entries"),
    (dict(PHI3, rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 8}), "'long_factor'"),
    (dict(PHI3, partial_rotary_factor=0.3125), "partial_rotary_factor=0.3125"),   # 5 dims: odd
    (dict(PHI3, hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(model_type="qwen3", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
          num_attention_heads=4, rope_scaling={"rope_type": "longrope"}), "'longrope'.*default, llama3"),
])
def test_unsupported_options_are_named(changes, message):
    with pytest.raises(CheckpointError, match=message):
        config_from_hf(changes)


def test_save_names_what_a_family_cannot_express(tmp_path):
    cfg = config_from_hf(GEMMA3_V4)[0]
    with pytest.raises(CheckpointError, match="qk_norm='head'"):
        config_to_hf(cfg.replace(rope_scaling=None), "gemma2")
    with pytest.raises(CheckpointError, match="gemma2 checkpoint.*'linear'"):
        config_to_hf(cfg, "gemma2")
    with pytest.raises(CheckpointError, match="attention_sinks=2"):
        config_to_hf(cfg.replace(attention_sinks=2))
    phi = config_from_hf(dict(PHI3, partial_rotary_factor=0.5))[0]
    with pytest.raises(CheckpointError, match="llama checkpoint.*partial_rotary_factor=0.5"):
        config_to_hf(phi, "llama")
    assert json.loads(json.dumps(config_to_hf(phi)))["partial_rotary_factor"] == 0.5


@pytest.mark.parametrize("preset", ["gemma-tiny", "gemma2-tiny", "gemma3-tiny", "qwen3-tiny", "phi3-tiny",
                                    "olmo2-tiny", "qwen2-hybrid-tiny"])
def test_presets_run_in_transformers(preset, tmp_path):
    """A model made in kvjax from each new preset (the training path) is written by save_hf
    as its family and runs in transformers with the same logits (70 tokens: past every
    window and past phi3-tiny's longrope switch at 64)."""
    from hf_fixtures import random_params

    cfg = kvjax.ModelConfig.preset(preset)
    params = random_params(cfg, seed=5)
    kvjax.save_hf(cfg, params, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path, attn_implementation="eager", dtype=torch.float32).eval()
    assert model.config.model_type == {"gemma-tiny": "gemma", "gemma2-tiny": "gemma2", "gemma3-tiny": "gemma3_text",
                                       "qwen3-tiny": "qwen3", "phi3-tiny": "phi3", "olmo2-tiny": "olmo2",
                                       "qwen2-hybrid-tiny": "qwen2"}[preset]
    tokens = np.random.default_rng(7).integers(0, cfg.vocab_size, (1, 70)).astype(np.int32)
    with torch.no_grad():
        ref = model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    assert_logits_close(np.asarray(kvjax.forward(cfg, params, tokens)), ref)


def test_expected_attention_rotation_with_partial_and_per_row_rotary():
    """ExpectedAttentionPress's averaged rotation for Phi-3-style tables (R < H rotated dims,
    per-row longrope frequencies) equals the mean of layers.rotate's own rotations."""
    import jax.numpy as jnp

    from kvjax.layers import rotate
    from kvjax.press.expected import averaged_rotation

    H, F = 12, 5
    start = jnp.array([3, 40], jnp.int32)
    per_row = jnp.array([[1.0, 0.3, 0.05, 0.01], [0.5, 0.2, 0.02, 0.001]], jnp.float32)  # [B, R/2], R = 8
    for inv in (per_row[0], per_row):
        got = np.asarray(averaged_rotation(start, F, inv, H))
        for b in range(2):
            row_inv = inv if inv.ndim == 1 else inv[b]
            mats = []
            for p in range(int(start[b]), int(start[b]) + F):
                ang = p * row_inv[None, :]
                mats.append(np.asarray(rotate(jnp.eye(H), jnp.cos(ang), jnp.sin(ang))).T)   # columns R e_i
            np.testing.assert_allclose(got[b], np.mean(mats, axis=0), atol=1e-6)
        np.testing.assert_array_equal(got[:, 8:, 8:], np.broadcast_to(np.eye(4), (2, 4, 4)))
