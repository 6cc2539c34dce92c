"""Checkpoint files without transformers: save_hf/load_hf round trips, sharding, dtypes, errors.

Round trips must be bit-exact (the same numbers written and read back, any dtype). Error
tests check that each message names the offending thing (tensor, key, file, value).
Parity with transformers itself is in test_hf_parity.py.
"""
import json
import shutil

import jax
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import kvjax
from hf_fixtures import random_params
from kvjax.hf import CheckpointError, config_from_hf, hf_model_type, tensor_table

ROUND_TRIP = ["gpt2-tiny", "llama-tiny", "mistral-tiny", "qwen2-tiny", "mqa-tiny", "llama3-tiny"]


def _params(cfg, seed=0):
    return random_params(cfg, seed)


def _assert_same_params(a, b):
    flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
    flat_b = dict(jax.tree_util.tree_flatten_with_path(b)[0])
    assert [p for p, _ in flat_a] == list(flat_b), "parameter trees differ"
    for path, x in flat_a:
        y = flat_b[path]
        assert x.dtype == y.dtype, f"{jax.tree_util.keystr(path)}: dtype {x.dtype} vs {y.dtype}"
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


@pytest.fixture
def llama_dir(tmp_path):
    cfg = kvjax.ModelConfig.preset("llama-tiny")
    kvjax.save_hf(cfg, _params(cfg), tmp_path / "ckpt")
    return tmp_path / "ckpt"


@pytest.mark.parametrize("name", ROUND_TRIP)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_is_lossless(tmp_path, name, dtype):
    cfg = kvjax.ModelConfig.preset(name, dtype=dtype)
    params = _params(cfg)
    kvjax.save_hf(cfg, params, tmp_path)
    cfg2, params2 = kvjax.load_hf(tmp_path, dtype=dtype)
    assert cfg2 == cfg
    _assert_same_params(params, params2)
    # The file stores the model dtype (bf16 models stay half the size on disk).
    with safe_open(str(tmp_path / "model.safetensors"), "numpy") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {dtype}
    hf_cfg = json.loads((tmp_path / "config.json").read_text())
    assert hf_cfg["torch_dtype"] == hf_cfg["dtype"] == dtype
    assert hf_cfg["model_type"] == hf_model_type(cfg)


def test_tied_checkpoint_has_no_lm_head_and_untied_has_one(tmp_path):
    for name, tied in (("qwen2-tiny", True), ("llama-tiny", False)):
        cfg = kvjax.ModelConfig.preset(name)
        assert cfg.tie_embeddings is tied
        kvjax.save_hf(cfg, _params(cfg), tmp_path / name)
        names = set(load_file(str(tmp_path / name / "model.safetensors")))
        assert ("lm_head.weight" in names) is (not tied)


def test_bf16_checkpoint_loads_as_float32_exactly(tmp_path):
    cfg = kvjax.ModelConfig.preset("llama-tiny", dtype="bfloat16")
    params = _params(cfg)
    kvjax.save_hf(cfg, params, tmp_path)
    cfg32, params32 = kvjax.load_hf(tmp_path, dtype="float32")
    assert cfg32.dtype == "float32"
    up = jax.tree_util.tree_map(lambda x: x.astype("float32"), params)
    _assert_same_params(up, params32)


def test_sharded_round_trip_and_index(tmp_path):
    cfg = kvjax.ModelConfig.preset("gpt2-tiny")
    params = _params(cfg)
    kvjax.save_hf(cfg, params, tmp_path, max_shard_bytes=60_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
    assert index["metadata"]["total_size"] == kvjax.param_bytes(params)
    _assert_same_params(params, kvjax.load_hf(tmp_path)[1])
    # Saving again unsharded replaces the shards instead of leaving stale files behind.
    kvjax.save_hf(cfg, params, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()


def test_index_pointing_at_a_missing_shard(tmp_path):
    cfg = kvjax.ModelConfig.preset("llama-tiny")
    kvjax.save_hf(cfg, _params(cfg), tmp_path, max_shard_bytes=60_000)
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        kvjax.load_hf(tmp_path)


def test_gpt2_original_names_with_mask_buffers_load(tmp_path):
    """The original GPT-2 uploads name tensors without "transformer." and store attn.bias buffers."""
    cfg = kvjax.ModelConfig.preset("gpt2-tiny")
    params = _params(cfg)
    kvjax.save_hf(cfg, params, tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    old = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    for i in range(cfg.num_layers):
        old[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 8, 8), np.float32))
    save_file(old, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    _assert_same_params(params, kvjax.load_hf(tmp_path)[1])


def test_generation_config_and_byte_tokenizer_saved_alongside(tmp_path):
    cfg = kvjax.ModelConfig.preset("llama-tiny")
    kvjax.save_hf(cfg, _params(cfg), tmp_path, tokenizer=kvjax.ByteTokenizer())
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (257, 258, 256)
    hf_cfg = json.loads((tmp_path / "config.json").read_text())
    assert hf_cfg["eos_token_id"] == 258
    tok = kvjax.load_tokenizer(tmp_path)
    assert isinstance(tok, kvjax.ByteTokenizer) and tok.eos_id == 258


def test_no_generation_config_without_special_ids(llama_dir):
    assert not (llama_dir / "generation_config.json").exists()


def test_mapping_covers_every_parameter_once():
    """The table against the real parameter tree of init_params (the model's own names)."""
    for name in ["gpt2-tiny", "llama-tiny", "qwen2-tiny"]:  # learned / untied / q,k,v bias + tied
        cfg = kvjax.ModelConfig.preset(name)
        mapped = [p for t in tensor_table(cfg, hf_model_type(cfg)) for p in t.kv]
        tree = jax.eval_shape(lambda: kvjax.init_params(cfg, jax.random.key(0)))
        leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        assert sorted(mapped) == sorted(tuple(k.key for k in p) for p, _ in leaves)
        assert len(mapped) == len(set(mapped))


# ----------------------------------------------------------------------------- errors

def _rewrite_tensors(folder, edit):
    file = folder / "model.safetensors"
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def _rewrite_config(folder, **changes):
    file = folder / "config.json"
    cfg = json.loads(file.read_text())
    cfg.update(changes)
    file.write_text(json.dumps(cfg))


def test_missing_tensor_is_named(llama_dir):
    _rewrite_tensors(llama_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        kvjax.load_hf(llama_dir)


def test_unexpected_tensor_is_named(llama_dir):
    _rewrite_tensors(llama_dir, lambda t: t.update({"model.layers.0.extra.weight": np.ones(3, np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.extra\.weight'"):
        kvjax.load_hf(llama_dir)


def test_shape_mismatch_names_tensor_expected_and_found(llama_dir):
    _rewrite_config(llama_dir, intermediate_size=96)
    with pytest.raises(CheckpointError) as e:
        kvjax.load_hf(llama_dir)
    msg = str(e.value)
    assert "model.layers.0.mlp" in msg and "(128, 64)" in msg and "(96, 64)" in msg, msg


def test_unsupported_model_type_lists_supported(llama_dir):
    _rewrite_config(llama_dir, model_type="bert")
    with pytest.raises(CheckpointError, match="'bert'.*gpt2, llama, mistral, qwen2"):
        kvjax.load_hf(llama_dir)


def test_missing_folder_config_and_weights(tmp_path, llama_dir):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        kvjax.load_hf(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="is a file"):
        kvjax.load_hf(llama_dir / "config.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        kvjax.load_hf(tmp_path / "empty")
    (llama_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        kvjax.load_hf(llama_dir)


def test_bin_only_checkpoint_says_how_to_convert(llama_dir):
    (llama_dir / "model.safetensors").unlink()
    (llama_dir / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*save_pretrained"):
        kvjax.load_hf(llama_dir)


def test_corrupt_files_are_reported(llama_dir):
    (llama_dir / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        kvjax.load_hf(llama_dir)
    (llama_dir / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        kvjax.load_hf(llama_dir)


def test_missing_config_key_is_named(llama_dir):
    cfg = json.loads((llama_dir / "config.json").read_text())
    del cfg["hidden_size"]
    (llama_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="'hidden_size'"):
        kvjax.load_hf(llama_dir)


def test_bad_dtype(llama_dir):
    with pytest.raises(CheckpointError, match="dtype='int8'"):
        kvjax.load_hf(llama_dir, dtype="int8")


LLAMA = dict(model_type="llama", vocab_size=320, hidden_size=64, intermediate_size=128,
             num_hidden_layers=4, num_attention_heads=4)


@pytest.mark.parametrize("changes, message", [
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "'linear'.*default, llama3"),
    (dict(rope_scaling={"type": "yarn", "factor": 2.0}), "'yarn'"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "low_freq_factor"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(model_type="qwen2", use_sliding_window=True, sliding_window=16,
          layer_types=["full_attention"] * 2 + ["chunked_attention"] * 2), "chunked_attention"),
    (dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=64,
          activation_function="relu"), "activation_function='relu'"),
    (dict(num_key_value_heads=3), "num_kv_heads=3"),
])
def test_unsupported_config_values_are_named(changes, message):
    with pytest.raises(CheckpointError, match=message):
        config_from_hf({**LLAMA, **changes})


def test_config_variants_map_as_transformers_reads_them():
    # transformers 5 style rope_parameters and 4.x style rope_theta/rope_scaling agree.
    v5 = config_from_hf({**LLAMA, "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}})[0]
    v4 = config_from_hf({**LLAMA, "rope_theta": 5e5, "rope_scaling": {
        "type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}})[0]
    assert v4 == v5 and v5.rope_theta == 5e5 and v5.rope_scaling.original_max_position == 64
    # Qwen2: the window applies only with use_sliding_window, and to all layers here.
    q = dict(LLAMA, model_type="qwen2", sliding_window=16)
    assert config_from_hf(q)[0].sliding_window is None
    assert config_from_hf({**q, "use_sliding_window": True, "max_window_layers": 0})[0].sliding_window == 16
    assert config_from_hf({**q, "use_sliding_window": True, "max_window_layers": 4})[0].sliding_window is None
    mixed = config_from_hf({**q, "use_sliding_window": True, "max_window_layers": 2})[0]
    assert mixed.layer_types == ("full", "full", "sliding", "sliding") and mixed.sliding_window == 16
    # Mistral's window carries over unchanged (same masking rule; see test_hf_parity).
    assert config_from_hf(dict(LLAMA, model_type="mistral", sliding_window=8))[0].sliding_window == 8
    # Llama's attention_bias covers q, k, v and o.
    b = config_from_hf({**LLAMA, "attention_bias": True})[0]
    assert b.qkv_bias and b.out_bias


def test_save_rejects_configs_a_family_cannot_express(tmp_path):
    cfg = kvjax.ModelConfig.preset("llama-tiny")
    with pytest.raises(CheckpointError, match="positions='rotary'"):
        kvjax.save_hf(cfg, _params(cfg), tmp_path, model_type="gpt2")
    with pytest.raises(CheckpointError, match="sliding_window=8"):
        m = kvjax.ModelConfig.preset("mistral-tiny")
        kvjax.save_hf(m, _params(m), tmp_path, model_type="llama")
    with pytest.raises(CheckpointError, match="eos_token_id=999"):
        kvjax.save_hf(cfg, _params(cfg), tmp_path, eos_token_id=999)
    assert not list(tmp_path.iterdir()), "a rejected save must not write anything"


def test_save_rejects_params_of_another_shape(tmp_path):
    cfg = kvjax.ModelConfig.preset("llama-tiny")
    other = _params(kvjax.ModelConfig.preset("llama-tiny", mlp_dim=96))
    with pytest.raises(CheckpointError, match="layers_0/mlp/down/kernel has shape"):
        kvjax.save_hf(cfg, other, tmp_path)
    with pytest.raises(CheckpointError, match="missing.*lm_head/kernel"):
        kvjax.save_hf(cfg, _params(cfg.replace(tie_embeddings=True)), tmp_path)


def test_save_over_existing_checkpoint_replaces_it(tmp_path):
    a = kvjax.ModelConfig.preset("llama-tiny")
    b = kvjax.ModelConfig.preset("gpt2-tiny")
    kvjax.save_hf(a, _params(a), tmp_path, max_shard_bytes=60_000)
    kvjax.save_hf(b, _params(b, 1), tmp_path)
    cfg, params = kvjax.load_hf(tmp_path)
    assert cfg == b
    _assert_same_params(_params(b, 1), params)
    shutil.rmtree(tmp_path)


def test_save_hf_writes_a_list_of_eos_ids(tmp_path):
    """Several ids that end a turn: generation_config.json keeps the list, config.json the first."""
    import json

    cfg = kvjax.ModelConfig.preset("llama-tiny")
    params = kvjax.init_params(cfg, jax.random.key(0))
    folder = kvjax.save_hf(cfg, params, tmp_path / "m", eos_token_id=[2, 5], bos_token_id=1)
    gen = json.loads((folder / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [2, 5] and gen["bos_token_id"] == 1
    assert json.loads((folder / "config.json").read_text())["eos_token_id"] == 2
    with pytest.raises(CheckpointError, match="eos_token_id=400 is outside the vocabulary"):
        kvjax.save_hf(cfg, params, tmp_path / "bad", eos_token_id=[2, 400])
