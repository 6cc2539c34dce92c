"""Parity with Hugging Face transformers on tiny random checkpoints of every supported family.

Each variant (see hf_fixtures.VARIANTS: GQA, MQA and MHA, head_dim 16 and 24, tied and
untied embeddings, llama3 rope scaling, a Mistral window of 8 shorter than every test
sequence, q/k/v and o biases) is built with transformers (PyTorch CPU, eager attention),
saved with `save_pretrained` into a temporary folder and loaded with `kvjax.load_hf`.

Tolerance: float32 logits agree to within LOGIT_TOL x max|logit| (max abs error / logit
scale <= 2e-5). Both sides compute the same float32 math in a different order (XLA vs
PyTorch kernels, rotary angles, softmax); measured errors are 1.6e-6 (gpt2) to 4.7e-6
(llama2) of the logit scale (<= 5e-5 absolute on logits of magnitude ~10). A wrong
mapping, mask or rope moves logits by O(1).

Greedy decoding must match token for token. Tiny random models at HF's default init
(0.02) have nearly flat logits, where that float32 noise could flip an argmax; the
fixtures redraw weights with std 0.3 (hf_fixtures.WEIGHT_STD), which makes the top logit
decisive: the smallest top-2 gap over 240 random positions per variant is ~1e-3, 20x
the largest error, and typical gaps are far larger.
"""
import numpy as np
import pytest

from conftest import require_module

torch = require_module("torch", "parity tests need PyTorch (CPU)")
transformers = require_module("transformers", "parity tests need the reference implementation")

import kvjax  # noqa: E402
from hf_fixtures import (LOGIT_TOL, VARIANTS, VOCAB, assert_logits_close, hf_model, pad_rows,  # noqa: E402
                         random_params)

NEW = 32                  # greedy tokens compared per prompt
PROMPT_LENS = (5, 9, 13)  # different lengths: ragged batch; every prompt + NEW > window 8
WIDTH = max(PROMPT_LENS)


class Loaded:
    """One variant: the transformers model, the folder it saved, kvjax's load of it."""

    def __init__(self, variant, folder):
        self.variant = variant
        self.hf = hf_model(variant, seed=len(variant))
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
        """transformers' greedy continuation of each prompt, run alone (no padding)."""
        if self._ref is None:
            ref = []
            for p in self.prompts:
                ids = torch.tensor(p[None], dtype=torch.long)
                with torch.no_grad():
                    out = self.hf.generate(ids, attention_mask=torch.ones_like(ids),
                                           max_new_tokens=NEW, do_sample=False, pad_token_id=0)
                ref.append(out[0, len(p):].numpy())
                assert len(ref[-1]) == NEW, "transformers stopped early (an EOS id is set?)"
            self._ref = ref
        return self._ref

    def padded(self, rows):
        return pad_rows(self.prompts, rows, WIDTH)


_LOADED = {}


def _load(variant, tmp_path_factory) -> Loaded:
    """One saved checkpoint per variant for the whole module."""
    if variant not in _LOADED:
        _LOADED[variant] = Loaded(variant, tmp_path_factory.mktemp(variant))
    return _LOADED[variant]


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def loaded(request, tmp_path_factory):
    return _load(request.param, tmp_path_factory)


def test_config_maps_the_intended_layout(loaded):
    cfg, hf_cfg = loaded.cfg, loaded.hf.config
    heads = {"gpt2": (4, 4, 16), "llama2": (4, 2, 24), "llama3": (4, 4, 16),
             "mistral": (4, 1, 16), "qwen2": (4, 2, 16)}[loaded.variant]
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == heads
    assert cfg.tie_embeddings == bool(hf_cfg.tie_word_embeddings)
    assert cfg.sliding_window == (8 if loaded.variant == "mistral" else None)
    assert (cfg.rope_scaling is not None) == (loaded.variant == "llama3")


def test_forward_logits_match(loaded):
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, VOCAB, (2, 40)).astype(np.int32)  # 40 > window 8, > llama3 original 32
    assert_logits_close(np.asarray(kvjax.forward(loaded.cfg, loaded.params, tokens)),
                         loaded.hf_logits(tokens))


def test_greedy_single_prompts_match(loaded):
    ref = loaded.reference_generations()
    for r in range(len(PROMPT_LENS)):
        toks, lens = loaded.padded([r])
        out = kvjax.generate(loaded.cfg, loaded.params, toks, prompt_lengths=lens,
                             max_new_tokens=NEW, eos_token_id=None)
        np.testing.assert_array_equal(np.asarray(out.tokens)[0], ref[r],
                                      err_msg=f"{loaded.variant} prompt {r}")
    # A model stuck on one token would make agreement meaningless.
    assert all(len(np.unique(t)) > 4 for t in ref)


def test_greedy_ragged_batch_matches_each_row_alone(loaded):
    ref = loaded.reference_generations()
    rows = [2, 0, 1]  # lengths 13, 5, 9 in one right-padded batch
    toks, lens = loaded.padded(rows)
    out = kvjax.generate(loaded.cfg, loaded.params, toks, prompt_lengths=lens, max_new_tokens=NEW,
                         eos_token_id=None)
    got = np.asarray(out.tokens)
    for i, r in enumerate(rows):
        np.testing.assert_array_equal(got[i], ref[r], err_msg=f"{loaded.variant} batch row {i}")
    np.testing.assert_array_equal(np.asarray(out.lengths), [NEW] * len(rows))


def test_cached_and_uncached_agree_on_loaded_model(loaded):
    toks, lens = loaded.padded([0, 1, 2])
    kw = dict(prompt_lengths=lens, max_new_tokens=NEW, eos_token_id=None)
    cached = kvjax.generate(loaded.cfg, loaded.params, toks, **kw)
    uncached = kvjax.generate(loaded.cfg, loaded.params, toks, use_cache=False, **kw)
    np.testing.assert_array_equal(np.asarray(cached.tokens), np.asarray(uncached.tokens))


def test_transformers_loads_what_kvjax_saved(loaded, tmp_path):
    """save_hf of the loaded model: transformers reads back the same tensors and logits."""
    kvjax.save_hf(loaded.cfg, loaded.params, tmp_path)
    again = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager", dtype=torch.float32).eval()
    assert type(again) is type(loaded.hf)
    want = loaded.hf.state_dict()
    got = again.state_dict()
    assert set(got) == set(want)
    for name, x in want.items():
        torch.testing.assert_close(got[name], x, rtol=0, atol=0, msg=name)
    tokens = np.random.default_rng(3).integers(0, VOCAB, (1, 24))
    with torch.no_grad():
        np.testing.assert_array_equal(again(torch.tensor(tokens)).logits.numpy(),
                                      loaded.hf_logits(tokens))


def test_sliding_window_off_by_one_would_fail(tmp_path_factory):
    """The window maps unchanged (HF masks q - k >= sliding_window, as kvjax does).

    Proof by contrast: the same weights with window 7 or 9 miss the tolerance by far, so
    the exact-match tests above really pin the window down.
    """
    loaded = _load("mistral", tmp_path_factory)
    assert loaded.cfg.sliding_window == 8
    tokens = np.random.default_rng(4).integers(0, VOCAB, (1, 24)).astype(np.int32)
    ref = loaded.hf_logits(tokens)
    w = loaded.cfg.sliding_window
    for wrong in (w - 1, w + 1):
        got = np.asarray(kvjax.forward(loaded.cfg.replace(sliding_window=wrong), loaded.params, tokens))
        assert np.abs(got - ref).max() > 100 * LOGIT_TOL * np.abs(ref).max(), f"window {wrong}"


@pytest.mark.parametrize("preset, changes", [("llama-tiny", {}), ("gpt2-tiny", {}),
                                             ("qwen2-tiny", {"sliding_window": 8})])
def test_kvjax_models_saved_for_transformers(preset, changes, tmp_path):
    """A model made in kvjax (the training path) runs in transformers with the same logits.

    The Qwen2 case checks how save_hf writes a window (use_sliding_window on every layer).
    """
    cfg = kvjax.ModelConfig.preset(preset, **changes)
    params = random_params(cfg, seed=5)
    kvjax.save_hf(cfg, params, tmp_path, tokenizer=kvjax.ByteTokenizer())
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager", dtype=torch.float32).eval()
    tokens = np.random.default_rng(5).integers(0, cfg.vocab_size, (2, 20)).astype(np.int32)
    with torch.no_grad():
        ref = model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    assert_logits_close(np.asarray(kvjax.forward(cfg, params, tokens)), ref)
    assert model.generation_config.eos_token_id == kvjax.ByteTokenizer.EOS


def test_bf16_checkpoint_from_transformers(tmp_path):
    """A bf16 checkpoint (as most hub models are) loads in both dtypes and decodes sanely."""
    model = hf_model("llama2", seed=7).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    cfg16, p16 = kvjax.load_hf(tmp_path, dtype="bfloat16")
    cfg32, p32 = kvjax.load_hf(tmp_path, dtype="float32")
    assert cfg16.dtype == "bfloat16" and p16["embed"]["embedding"].dtype == np.dtype("bfloat16")
    sd = model.state_dict()
    np.testing.assert_array_equal(np.asarray(p32["embed"]["embedding"]),
                                  sd["model.embed_tokens.weight"].float().numpy())
    tokens = np.random.default_rng(6).integers(0, VOCAB, (1, 16)).astype(np.int32)
    l16 = np.asarray(kvjax.forward(cfg16, p16, tokens))
    l32 = np.asarray(kvjax.forward(cfg32, p32, tokens))
    # bf16 activations keep ~3 significant digits: compare loosely, and the argmax mostly.
    assert np.abs(l16 - l32).max() < 0.1 * np.abs(l32).max()
    assert (l16.argmax(-1) == l32.argmax(-1)).mean() >= 0.8
