"""Training: config validation, loss goes down, exact resume, checkpoints readable by load_hf.

Models are tiny (d_model 32) so every run compiles and trains in seconds on CPU. The
resume test compares parameters exactly: the same compiled step on the same batches
must give bit-identical floats on one machine.
"""
import json

import jax
import numpy as np
import pytest

import kvjax
from kvjax import train as T

TINY = dict(d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, mlp_dim=64, seq_len=32,
            batch_size=8, learning_rate=3e-3, warmup_steps=2, log_every=2, eval_windows=8,
            recall_eval_per_distance=8)


def tiny(**kw) -> T.TrainConfig:
    return T.TrainConfig(**{**TINY, **kw})


@pytest.mark.parametrize("field,value,message", [
    ("task", "vision", "one of"),
    ("num_steps", 0, "int >= 1"),
    ("batch_size", 2.5, "int >= 1"),
    ("learning_rate", 0.0, r"in \(0.0, 1.0\]"),
    ("beta2", 1.5, r"in \[0.0, 1.0\]"),
    ("warmup_steps", 50, "< num_steps"),
    ("num_kv_heads", 3, "divisor of num_heads"),
    ("vocab_size", 100, ">= 259"),
    ("save_dtype", "int8", "one of"),
    ("head_dim", 7, "even int"),
])
def test_config_validation_names_field_and_range(field, value, message):
    with pytest.raises(ValueError, match=f"TrainConfig.{field}=.*{message}"):
        tiny(**{"num_steps": 20, field: value})


def test_recall_config_checks_sequence_fits():
    with pytest.raises(ValueError, match="TrainConfig.seq_len=32.*>= "):
        tiny(task="recall", num_steps=10, recall_pairs=20, recall_queries=4)
    with pytest.raises(ValueError, match="recall_min_pairs"):
        tiny(task="recall", num_steps=10, recall_pairs=2, recall_min_pairs=3, recall_queries=2)
    with pytest.raises(ValueError, match="unknown TrainConfig field"):
        T.TrainConfig.from_dict({"nonsense": 1})
    assert T.TrainConfig.from_dict(tiny(num_steps=10).to_dict()) == tiny(num_steps=10)


def test_recall_curriculum_ramps_the_number_of_pairs():
    c = tiny(task="recall", seq_len=128, num_steps=100, recall_pairs=20, recall_key_len=1,
             recall_value_len=1, recall_min_pairs=2, recall_ramp_start=5, recall_ramp_steps=60)
    assert [T.recall_max_pairs(c, s) for s in (0, 30, 59, 60, 99)] == [5, 12, 19, 20, 20]
    task = T._Task(c)
    P = c.recall_task().pair_len
    for step in (0, 80):
        tokens, weights = task.train_batch(step)
        assert tokens.shape == (8, 129) and weights.shape == (8, 128)
        real = (tokens != kvjax.ByteTokenizer.PAD).sum(1)
        # recall_queries=0: queries fill the context up to less than one query's length.
        assert (real > 128 - (P + 1)).all() and (real <= 129).all()
        text = kvjax.ByteTokenizer().decode(tokens[0])
        pairs = text.split("?")[0].count(";")
        assert c.recall_min_pairs <= pairs <= T.recall_max_pairs(c, step)


def test_schedule_warms_up_then_decays_to_end_value():
    c = tiny(num_steps=100, warmup_steps=10, learning_rate=1e-3, end_lr_ratio=0.1)
    _, schedule = T.make_optimizer(c)
    assert float(schedule(0)) == 0.0
    assert float(schedule(10)) == pytest.approx(1e-3, rel=1e-6)
    assert float(schedule(100)) == pytest.approx(1e-4, rel=1e-6)
    assert float(schedule(5)) == pytest.approx(5e-4, rel=1e-6)


def test_text_training_reduces_loss_and_writes_hf_checkpoint(tmp_path):
    log = []
    c = tiny(num_steps=30, eval_every=30, checkpoint_every=100)
    summary = T.train(c, tmp_path, progress=log.append)
    assert [r["step"] for r in log] == list(range(2, 31, 2))
    assert all({"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(r) for r in log)
    assert "eval_loss" in log[-1] and "eval_loss" not in log[0]
    # Uniform over 259 ids is ln(259) = 5.56 nats; 30 steps learn the byte statistics.
    assert log[0]["loss"] > 4.5
    assert log[-1]["loss"] < log[0]["loss"] - 1.0
    assert summary["eval_loss"] < 4.5
    assert summary["eval_bits_per_byte"] == pytest.approx(summary["eval_loss"] / np.log(2))

    ckpt = T.latest_checkpoint(tmp_path)
    assert ckpt.name == "step_00000030" and summary["checkpoint"] == str(ckpt)
    cfg, params = kvjax.load_hf(ckpt, dtype="bfloat16")
    assert cfg.d_model == 32 and cfg.max_position == 32 and cfg.vocab_size == 259
    assert jax.tree_util.tree_leaves(params)[0].dtype == np.dtype("bfloat16")
    assert isinstance(kvjax.load_tokenizer(ckpt), kvjax.ByteTokenizer)
    assert T.TrainConfig.from_dict(json.loads((ckpt / "train_config.json").read_text())) == c
    out = kvjax.generate(cfg, params, np.array([[257, 84, 104, 101]]), max_new_tokens=4)
    assert out.tokens.shape == (1, 4)


class _Interrupt(Exception):
    pass


def _stop_at(step):
    def progress(record):
        if record["step"] == step:
            raise _Interrupt

    return progress


def _state(ckpt):
    return (ckpt / "train_state.msgpack").read_bytes()


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path):
    c = tiny(num_steps=12, eval_every=100, checkpoint_every=4, keep_checkpoints=5)
    full = T.train(c, tmp_path / "full")

    run = tmp_path / "interrupted"
    with pytest.raises(_Interrupt):
        T.train(c, run, progress=_stop_at(6))  # dies after step 6; last checkpoint: step 4
    assert [p.name for p in T._checkpoint_dirs(run)] == ["step_00000004"]
    # A save that died half-way (a temp folder) is never taken for a checkpoint.
    (run / "checkpoints" / ".tmp-step_00000008-1").mkdir()
    assert T.latest_checkpoint(run).name == "step_00000004"

    resumed = T.train(c, run)
    assert resumed["resumed_from_step"] == 4
    assert resumed["final_train_loss"] == full["final_train_loss"]
    # Identical optimizer state, params and step, byte for byte.
    assert _state(T.latest_checkpoint(run)) == _state(T.latest_checkpoint(tmp_path / "full"))
    # Both step-4 checkpoints agree too.
    assert _state(run / "checkpoints" / "step_00000004") == \
        _state(tmp_path / "full" / "checkpoints" / "step_00000004")


def test_resume_refuses_a_different_config_and_keeps_few_checkpoints(tmp_path):
    c = tiny(num_steps=6, eval_every=100, checkpoint_every=2, keep_checkpoints=2)
    T.train(c, tmp_path)
    assert [p.name for p in T._checkpoint_dirs(tmp_path)] == ["step_00000004", "step_00000006"]
    with pytest.raises(ValueError, match=r"differs in \['learning_rate'\]"):
        T.train(tiny(num_steps=6, eval_every=100, checkpoint_every=2, learning_rate=1e-3), tmp_path)
    with pytest.raises(ValueError, match="resume_from"):
        T.train(tiny(num_steps=6, resume_from=str(tmp_path / "nowhere")), tmp_path / "new")
    # resume_from a finished run: nothing left to train, same final state re-saved elsewhere.
    again = T.train(tiny(num_steps=6, eval_every=100, checkpoint_every=2, keep_checkpoints=2,
                         resume_from=str(tmp_path)), tmp_path / "copy")
    assert again["resumed_from_step"] == 6
    assert _state(T.latest_checkpoint(tmp_path / "copy")) == _state(T.latest_checkpoint(tmp_path))


def test_recall_training_reduces_loss_and_reports_accuracy_by_distance(tmp_path):
    log = []
    c = tiny(task="recall", seq_len=64, num_steps=20, eval_every=20, checkpoint_every=100,
             recall_pairs=8, recall_key_len=1, recall_value_len=1, recall_queries=6)
    summary = T.train(c, tmp_path, progress=log.append)
    # Only answer tokens count: they start near ln(259) = 5.56 and fall as the value alphabet
    # is learnt (measured 5.57 -> 4.31 in these 20 steps, 2026-11-28).
    assert log[0]["loss"] > 4.5 and log[-1]["loss"] < log[0]["loss"] - 0.8
    dist = c.recall_task().distances()
    assert list(summary["accuracy_by_distance"]) == [str(d) for d in dist]
    assert all(0.0 <= a <= 1.0 for a in summary["accuracy_by_distance"].values())
    assert 0.0 <= summary["eval_accuracy"] <= 1.0


def test_init_from_starts_at_given_weights_with_a_fresh_optimizer(tmp_path):
    first = tiny(num_steps=30, eval_every=100, checkpoint_every=100)
    done = T.train(first, tmp_path / "first")
    # A longer context on the same shape: weights carry over (rotary positions have no
    # parameters); step and optimizer start afresh.
    log = []
    second = tiny(seq_len=64, num_steps=4, log_every=1, eval_every=100, checkpoint_every=100,
                  init_from=str(tmp_path / "first"))
    summary = T.train(second, tmp_path / "second", progress=log.append)
    assert summary["resumed_from_step"] == 0 and [r["step"] for r in log] == [1, 2, 3, 4]
    # From scratch the first loss is ln(259) = 5.56; from the trained weights it is where
    # the first run ended (different windows, so only roughly).
    assert log[0]["loss"] < done["final_train_loss"] + 0.5 < 5.0
    _, trained = kvjax.load_hf(T.latest_checkpoint(tmp_path / "first"))
    start = T._initial_weights(str(tmp_path / "first"),
                               kvjax.init_params(second.model_config(), jax.random.key(1)))
    for a, b in zip(jax.tree_util.tree_leaves(start), jax.tree_util.tree_leaves(trained)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="init_from=.*do not fit"):
        T.train(tiny(num_steps=4, d_model=64, init_from=str(tmp_path / "first")), tmp_path / "bad")
    # Resuming restores the run's own checkpoint: the init_from weights are not needed then.
    import shutil
    shutil.rmtree(tmp_path / "first")
    assert T.train(second, tmp_path / "second")["resumed_from_step"] == 4
    with pytest.raises(ValueError, match="init_from='nowhere'.*bundled"):
        T.train(tiny(num_steps=4, init_from="nowhere"), tmp_path / "bad2")
