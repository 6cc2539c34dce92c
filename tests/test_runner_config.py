"""Experiment-config validation: every mistake is one error that names the key.

Validation is pure host work (no model, no folder), so these tests are fast. The
committed experiments/*.yaml must all validate: a config that ships broken fails here.
"""
import dataclasses
import glob
import os
from pathlib import Path
from typing import Optional

import pytest
import yaml

from kvjax.cli import main
from kvjax.runner import ConfigError, load_config, parse_config
from kvjax.runner.schema import apply_overrides, build, option

ROOT = Path(__file__).resolve().parents[1]

BASE = {"name": "t", "kind": "cache_vs_nocache",
        "cache_vs_nocache": {"seq_lens": [16, 32], "step_repeats": 2}}


def err(data, overrides=()) -> str:
    with pytest.raises(ConfigError) as e:
        parse_config(data, overrides)
    return str(e.value)


def test_valid_config_fills_defaults():
    cfg = parse_config(BASE)
    assert cfg.kind == "cache_vs_nocache" and cfg.device == "auto" and cfg.seed == 0
    assert cfg.settings.seq_lens == (16, 32) and cfg.settings.step_repeats == 2
    assert cfg.settings.batch_size == 1  # default filled in


def test_unknown_top_level_key_suggests_closest_and_lists_allowed():
    msg = err({**BASE, "devcie": "cpu"})
    assert "unknown key 'devcie'" in msg and "did you mean 'device'?" in msg
    for key in ("name", "kind", "seed", "device", "dtype", "out_dir", "cache_vs_nocache"):
        assert key in msg


def test_unknown_section_key_suggests_closest():
    msg = err({**BASE, "cache_vs_nocache": {"seq_len": [16]}})
    assert msg.startswith("cache_vs_nocache: unknown key 'seq_len'")
    assert "did you mean 'seq_lens'?" in msg and "step_repeats" in msg


@pytest.mark.parametrize("section, value, expect", [
    ({"batch_size": "two"}, "'two' (a string)", "an integer >= 1"),
    ({"batch_size": True}, "True (a boolean)", "an integer >= 1"),
    ({"batch_size": 1.5}, "1.5 (a number)", "an integer >= 1"),
    ({"seq_lens": 64}, "64 (an integer)", "a list with at least 1 item of: an integer >= 2"),
])
def test_wrong_type_names_key_value_and_allowed(section, value, expect):
    key = next(iter(section))
    msg = err({**BASE, "cache_vs_nocache": {**BASE["cache_vs_nocache"], **section}})
    assert msg.startswith(f"cache_vs_nocache.{key}: got {value}")
    assert msg.endswith(f"allowed: {expect}")


def test_out_of_range_names_key_value_and_limit():
    msg = err({**BASE, "cache_vs_nocache": {**BASE["cache_vs_nocache"], "batch_size": 0}})
    assert msg == "cache_vs_nocache.batch_size: 0 is out of range; allowed: an integer >= 1"
    msg = err({**BASE, "cache_vs_nocache": {"seq_lens": [16, 1]}})
    assert msg.startswith("cache_vs_nocache.seq_lens[1]: 1 is out of range")
    assert "an integer >= 2" in msg
    assert "seed: -1 is out of range" in err({**BASE, "seed": -1})


def test_bad_choice_suggests_closest():
    msg = err({**BASE, "device": "gpux"})
    assert msg.startswith("device: 'gpux' (a string) is not allowed (did you mean 'gpu'?)")
    assert "'auto', 'cpu', 'gpu', 'tpu'" in msg


def test_unknown_kind_lists_known_kinds():
    msg = err({"name": "t", "kind": "cache_vs_nocahce"})
    assert "unknown kind 'cache_vs_nocahce'" in msg and "did you mean 'cache_vs_nocache'?" in msg
    for k in ("quickstart", "cache_vs_nocache", "memory_scaling", "batch_throughput", "train"):
        assert k in msg
    assert err({"name": "t"}).startswith("kind: required key is missing")


def test_missing_name_and_bad_name():
    assert err({"kind": "memory_scaling"}).startswith("name: required key is missing")
    assert err({"name": "a/b", "kind": "memory_scaling"}).startswith("name: got 'a/b'")


def test_section_of_another_kind_is_named():
    msg = err({"name": "t", "kind": "memory_scaling", "batch_throughput": {}})
    assert "belongs to kind 'batch_throughput'" in msg and "'memory_scaling'" in msg


def test_cross_field_checks_name_the_key():
    msg = err({**BASE, "cache_vs_nocache": {"generate_lens": [64, 16], "prompt_len": 16}})
    assert msg.startswith("cache_vs_nocache.generate_lens[1]: 16 leaves no new tokens after prompt_len=16")
    msg = err({"name": "t", "kind": "memory_scaling", "memory_scaling": {"kv_heads": [32, 3]}})
    assert msg.startswith("memory_scaling.kv_heads[1]: 3 does not divide num_heads=32")
    msg = err({"name": "t", "kind": "memory_scaling", "memory_scaling": {"preset": "llama-1bb"}})
    assert msg.startswith("memory_scaling.preset: unknown preset 'llama-1bb'") and "llama-1b" in msg
    msg = err({"name": "t", "kind": "batch_throughput",
               "batch_throughput": {"model": {"num_layer": 3}}})
    assert msg.startswith("batch_throughput.model:") and "num_layer" in msg


def test_set_overrides_parse_values_as_yaml():
    cfg = parse_config(BASE, ["cache_vs_nocache.seq_lens=[32, 64]", "seed=7",
                              "cache_vs_nocache.model.num_layers=1", "device=cpu"])
    assert cfg.settings.seq_lens == (32, 64) and cfg.seed == 7 and cfg.device == "cpu"
    assert cfg.settings.model == {"num_layers": 1}
    # an override is validated like the file
    assert err(BASE, ["cache_vs_nocache.batch_size=0"]).startswith("cache_vs_nocache.batch_size: 0")
    assert "did you mean 'batch_size'" in err(BASE, ["cache_vs_nocache.batchsize=2"])


@pytest.mark.parametrize("bad", ["seed", "=3", "a..b=1", "name.x=1", "seed=[1"])
def test_bad_set_syntax_is_a_config_error(bad):
    with pytest.raises(ConfigError) as e:
        apply_overrides({"name": "t"}, [bad])
    assert str(e.value).startswith(f"--set {bad!r}")


def test_resolved_config_round_trips():
    cfg = parse_config(BASE, ["dtype=bfloat16"])
    again = parse_config(yaml.safe_load(yaml.safe_dump(cfg.to_dict())))
    assert again == cfg


def test_schema_is_generic_over_dataclasses():
    @dataclasses.dataclass(frozen=True)
    class Demo:
        rate: float = option(0.1, help="a rate", min=0.0, max=1.0)
        width: Optional[int] = None
        tags: tuple[str, ...] = ()

        def __post_init__(self):
            if self.width == 3:
                raise ValueError("Demo.width=3: must not be 3")

    assert build(Demo, {"rate": "1e-3"}).rate == 1e-3  # PyYAML reads 1e-3 as a string
    assert build(Demo, {"width": None, "tags": ["a"]}) == Demo(0.1, None, ("a",))
    assert "allowed: a number in [0.0, 1.0]" in str(pytest.raises(ConfigError, build, Demo, {"rate": 2}).value)
    msg = str(pytest.raises(ConfigError, build, Demo, {"width": "x"}, "demo").value)
    assert msg == "demo.width: got 'x' (a string); allowed: an integer or null"
    msg = str(pytest.raises(ConfigError, build, Demo, {"width": 3}, "demo").value)
    assert msg == "demo: Demo.width=3: must not be 3"


def test_train_section_maps_onto_train_config():
    train = pytest.importorskip("kvjax.train")
    cfg = parse_config({"name": "t", "kind": "train", "seed": 5,
                        "train": {"num_steps": 20, "warmup_steps": 2}})
    assert isinstance(cfg.settings, train.TrainConfig)
    assert cfg.settings.num_steps == 20 and cfg.settings.seed == 5  # seed inherited
    msg = err({"name": "t", "kind": "train", "train": {"learning_rat": 0.1}})
    assert "unknown key 'learning_rat'" in msg and "did you mean 'learning_rate'?" in msg
    msg = err({"name": "t", "kind": "train", "train": {"learning_rate": 5.0}})
    assert msg.startswith("train: ") and "learning_rate" in msg and "5.0" in msg
    assert err({"name": "t", "kind": "train", "dtype": "bfloat16"}).startswith("dtype: 'bfloat16'")


@pytest.mark.parametrize("path", sorted(glob.glob(str(ROOT / "experiments" / "*.yaml"))),
                         ids=os.path.basename)
def test_committed_experiment_configs_validate(path):
    cfg = load_config(path)
    assert cfg.name and cfg.kind


# ----------------------------------------------------------------------------- the command

def test_cli_missing_file_is_one_line_exit_2(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    err_text = capsys.readouterr().err
    assert err_text.count("\n") == 1 and "not found" in err_text and "Traceback" not in err_text


def test_cli_bad_key_is_one_line_and_creates_nothing(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**BASE, "cache_vs_nocache": {"sq_lens": [16]}}))
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out), "--set", f"out_dir={tmp_path / 'runs'}"]) == 2
    err_text = capsys.readouterr().err
    assert err_text.startswith("kvjax run: error: cache_vs_nocache: unknown key 'sq_lens'")
    assert err_text.count("\n") == 1
    assert not out.exists() and not (tmp_path / "runs").exists()  # validated before any folder


def test_cli_invalid_yaml_and_dry_run(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("name: [unclosed\n")
    assert main(["run", str(path)]) == 2
    assert "invalid YAML" in capsys.readouterr().err
    path.write_text(yaml.safe_dump(BASE))
    assert main(["run", str(path), "--dry-run", "--set", "seed=3"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["seed"] == 3 and printed["cache_vs_nocache"]["batch_size"] == 1


# ---------------------------------------------------------------- model names (kvjax.load_model)
def _tiny_gguf(path, vocab=260):
    """A 1-layer llama GGUF (F32, tied embeddings) whose vocabulary fits kvjax train (>= 259)."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    d, f = 64, 128
    for key, val in (("block_count", 1), ("embedding_length", d), ("feed_forward_length", f),
                     ("context_length", 128), ("attention.head_count", 2), ("attention.head_count_kv", 2)):
        w.add_uint32(f"llama.{key}", val)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([chr(0x21 + i) if i < 94 else f"t{i}" for i in range(vocab)])
    rng = np.random.default_rng(0)
    for name, shape in {"token_embd.weight": (vocab, d), "output_norm.weight": (d,),
                        "blk.0.attn_norm.weight": (d,), "blk.0.ffn_norm.weight": (d,),
                        "blk.0.attn_q.weight": (d, d), "blk.0.attn_k.weight": (d, d),
                        "blk.0.attn_v.weight": (d, d), "blk.0.attn_output.weight": (d, d),
                        "blk.0.ffn_gate.weight": (f, d), "blk.0.ffn_up.weight": (f, d),
                        "blk.0.ffn_down.weight": (d, f)}.items():
        x = rng.normal(size=shape) * 0.02 + (len(shape) == 1)     # norms near 1
        w.add_tensor(name, x.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_model_keys_take_any_load_model_name(tmp_path):
    gguf_file = str(_tiny_gguf(tmp_path / "tiny.gguf"))
    bench = lambda model: {"name": "t", "kind": "serving_bench", "serving_bench": {"model": model}}  # noqa: E731
    for ok in ("text", gguf_file, "smollm2-135m-instruct"):
        assert parse_config(bench(ok)).settings.model == ok
    assert "serving_bench.model: 'nope' is no such file or folder, and not a model name" in err(bench("nope"))
    assert "serving_bench.model" in err(bench(str(tmp_path)))       # a folder without config.json
    cq = lambda **kw: {"name": "t", "kind": "compression_quality", "compression_quality": kw}  # noqa: E731
    assert parse_config(cq(text_model=gguf_file, recall_model="")).settings.text_model == gguf_file
    assert "compression_quality.recall_model: " in err(cq(recall_model=gguf_file))
    assert "not a model trained by kvjax train" in err(cq(recall_model=gguf_file))
    assert "trained on task 'text', not 'recall'" in err(cq(recall_model="text"))
    assert "compression_quality.text_model: 'missing.gguf'" in err(cq(text_model="missing.gguf"))
    pb = {"name": "t", "kind": "press_benchmark", "press_benchmark": {"text_model": gguf_file, "presses": ["KVzip"]}}
    assert "press_benchmark.presses: KVzip" in err(pb)


def test_train_init_from_validation_names_the_key(tmp_path):
    gguf_file = str(_tiny_gguf(tmp_path / "tiny.gguf"))
    train = lambda **kw: {"name": "t", "kind": "train", "train": {"num_steps": 4, "warmup_steps": 1, **kw}}  # noqa: E731
    assert parse_config(train(init_from=gguf_file, d_model=64)).settings.init_from == gguf_file
    assert "train.d_model: 128 conflicts with init_from" in err(train(init_from=gguf_file, d_model=128))
    assert "train.init_from: 'nope' is no such file or folder" in err(train(init_from="nope"))
    parse_config(train(init_from="runs/written_by_an_earlier_run"))   # a run folder: checked at run time
    import jax

    import kvjax

    cfg = kvjax.ModelConfig.preset("gpt2-tiny")
    kvjax.save_hf(cfg, kvjax.init_params(cfg, jax.random.key(0)), tmp_path / "gpt2")
    assert "cannot express" in err(train(init_from=str(tmp_path / "gpt2")))


def test_train_init_from_a_gguf_file_starts_at_its_weights(tmp_path):
    """A few steps at a negligible learning rate from a GGUF file: the shape comes from the file
    and the trained weights are still the file's."""
    import jax
    import numpy as np

    import kvjax
    from kvjax.runner.experiment import run_experiment

    gguf_file = str(_tiny_gguf(tmp_path / "tiny.gguf"))
    cfg = parse_config({"name": "t", "kind": "train", "train": {
        "init_from": gguf_file, "num_steps": 2, "warmup_steps": 0, "batch_size": 2, "seq_len": 16,
        "learning_rate": 1e-9, "eval_every": 100, "eval_windows": 1, "log_every": 1,
        "save_dtype": "float32", "weight_decay": 0.0}})
    run_experiment(cfg, out=tmp_path / "run")
    folder = sorted((tmp_path / "run").rglob("train_state.msgpack"))[-1].parent
    trained_cfg, trained = kvjax.load_hf(folder)
    want_cfg, want, _ = kvjax.load_model(gguf_file)
    assert (trained_cfg.d_model, trained_cfg.num_layers, trained_cfg.vocab_size) == (64, 1, 260)
    for a, b in zip(jax.tree_util.tree_leaves(trained), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    assert (tmp_path / "run" / "init_from" / "config.json").is_file()
