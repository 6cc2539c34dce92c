"""The bundled trained model loads from the package and writes documentation-like text."""
import numpy as np
import pytest

import kvjax
from kvjax import bundled, data
from kvjax.train import TrainConfig


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


def _recall_setup():
    cfg, params, _ = bundled.load_bundled("recall")
    info = bundled.bundled_info("recall")
    return cfg, params, info, TrainConfig.from_dict(info["train_config"]).recall_task()


def test_recall_model_is_bundled_with_its_training_record():
    _, _, info, task = _recall_setup()
    assert info["train_config"]["task"] == "recall" and task.num_pairs == 32
    assert info["summary"]["eval_accuracy"] >= 0.95   # measured 1.00 (BUILD_NOTES.md)
    by_distance = info["summary"]["accuracy_by_distance"]
    assert list(by_distance) == [str(d) for d in task.distances()]


def test_recall_model_answers_through_the_cache_and_a_window_forgets_far_pairs():
    """Greedy generation of the value after `?key`: the dense cache holds every pair; a
    16-slot window cache cannot see a pair ~90 tokens back, so it drops to guessing."""
    cfg, params, _, task = _recall_setup()
    near, far = task.distances()[1], task.distances()[-2]
    correct = {}
    for name, d in (("near", near), ("far", far)):
        prompts, answers = data.recall_prompts(data.recall_batch(task, np.random.default_rng(d), 16,
                                                                 distance=d))
        for kind in ("dense", "window"):
            out = kvjax.generate(cfg, params, prompts, max_new_tokens=task.value_len, cache_kind=kind,
                                 max_len=prompts.shape[1] + task.value_len if kind == "dense" else 16)
            correct[name, kind] = int((np.asarray(out.tokens) == answers).all(1).sum())
    assert correct["near", "dense"] >= 15 and correct["far", "dense"] >= 15, correct
    assert correct["near", "window"] >= 15, correct     # 7 tokens back: inside the window
    assert correct["far", "window"] <= 8, correct       # chance is about 1 in 10


@pytest.mark.parametrize("name, config", [("recall", "train_recall_long.yaml"),
                                          ("text", "train_tiny.yaml"),
                                          ("text-draft", "train_text_draft.yaml")])
def test_bundled_model_was_trained_by_its_committed_config(name, config):
    """The recorded TrainConfig equals the one the committed YAML resolves to (fields that
    do not change the trajectory, and recall fields of the text task, aside)."""
    from pathlib import Path

    from kvjax.runner import load_config
    from kvjax.train import _RESUME_FREE

    yaml_path = Path(__file__).resolve().parents[1] / "experiments" / config
    resolved = load_config(yaml_path).settings.to_dict()
    recorded = bundled.bundled_info(name)["train_config"]
    skip = set(_RESUME_FREE) | ({k for k in resolved if k.startswith("recall_")} if name != "recall" else set())
    differ = {k: (recorded.get(k), resolved[k]) for k in resolved
              if k not in skip and k in recorded and recorded[k] != resolved[k]}
    assert not differ
    missing = set(resolved) - set(recorded) - skip
    assert missing <= {"init_from"} and not (name == "recall" and missing), missing
