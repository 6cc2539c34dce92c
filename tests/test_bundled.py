"""The bundled trained model loads from the package and writes documentation-like text."""
import numpy as np
import pytest

import kvjax
from kvjax import bundled


def test_text_model_is_bundled_with_its_training_record():
    assert "text" in bundled.bundled_names()
    info = bundled.bundled_info("text")
    assert info["train_config"]["task"] == "text"
    assert 0 < info["summary"]["eval_bits_per_byte"] < 2.5      # measured 1.77 (BUILD_NOTES.md)
    with pytest.raises(ValueError, match="no bundled model 'nope'"):
        bundled.bundled_path("nope")


def test_text_model_generates_words_with_and_without_cache():
    cfg, params, tok = bundled.load_bundled("text")
    prompt = np.array([[tok.bos_id] + tok.encode("The with statement")], np.int32)
    out = kvjax.generate(cfg, params, prompt, max_new_tokens=48)
    ref = kvjax.generate(cfg, params, prompt, max_new_tokens=48, use_cache=False)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    text = tok.decode(np.asarray(out.tokens)[0].tolist())
    words = [w for w in text.split() if w.strip('".,:()').isalpha()]
    assert sum(c.isprintable() or c == "\n" for c in text) == len(text)
    assert len(words) >= 5, text       # prose, not byte noise
