"""The cache as data: exact bytes, layout, in-place (donated) updates, hashable configs."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from conftest import FAMILIES, model


@pytest.mark.parametrize("name", FAMILIES + ["llama-1b", "llama-7b", "gpt2-small"])
@pytest.mark.parametrize("dtype", [None, "bfloat16", "float32"])
def test_cache_bytes_predicts_allocation(name, dtype):
    cfg = kvjax.ModelConfig.preset(name)
    B, S = 3, 17
    # eval_shape allocates nothing, so full-size presets are checked too.
    cache = jax.eval_shape(lambda: kvjax.init_cache(cfg, B, S, dtype))
    allocated = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(cache))
    assert kvjax.cache_bytes(cfg, B, S, dtype) == allocated
    if name in FAMILIES:
        assert kvjax.init_cache(cfg, B, S, dtype).nbytes == allocated


def test_cache_bytes_formula_for_llama_7b():
    cfg = kvjax.ModelConfig.preset("llama-7b")
    # 2 (K and V) x 32 layers x 32 kv heads x 128 head dim x 2 bytes = 512 KiB per token.
    assert kvjax.cache_bytes(cfg, 1, 4096, "bfloat16") == 2 * 32 * 32 * 128 * 2 * 4096 + 4


def test_cache_layout_and_pytree():
    cfg = kvjax.ModelConfig.preset("llama-tiny")
    cache = kvjax.init_cache(cfg, 2, 10)
    assert len(cache.keys) == len(cache.values) == cfg.num_layers
    assert cache.keys[0].shape == (2, cfg.num_kv_heads, 10, cfg.head_dim)   # [B, K, S, H]
    assert cache.lengths.dtype == jnp.int32 and cache.max_len == 10 and cache.batch_size == 2
    leaves, tree = jax.tree_util.tree_flatten(cache)
    assert len(leaves) == 2 * cfg.num_layers + 1
    assert jax.tree_util.tree_unflatten(tree, leaves).kind == "dense"


def test_configs_are_hashable_values():
    a = kvjax.ModelConfig.preset("llama3-tiny")
    b = kvjax.ModelConfig.preset("llama3-tiny")
    assert a == b and hash(a) == hash(b)
    assert a.replace(num_layers=3) != a
    assert set(kvjax.ModelConfig.presets()) >= {"gpt2-tiny", "llama-tiny", "mistral-tiny", "qwen2-tiny",
                                                "mqa-tiny", "gpt2-small", "llama-1b", "llama-7b"}


def test_compiled_decode_step_aliases_the_donated_cache():
    from kvjax.decode import decode_program

    cfg, params = model("llama-tiny")
    B, S = 2, 64
    cache = kvjax.init_cache(cfg, B, S)
    hlo = decode_program.lower(cfg, params, jnp.zeros((B,), jnp.int32), cache).compile().as_text()
    header = next(line for line in hlo.splitlines() if "input_output_alias" in line)
    aliases = header.split("input_output_alias=")[1].split("entry_computation_layout")[0]
    # Every cache leaf (L keys, L values, lengths) is written back into its own input buffer.
    assert len(re.findall(r"(may|must)-alias\)", aliases)) == 2 * cfg.num_layers + 1
    # And no instruction copies a whole cache buffer.
    shape = f"f32[{B},{cfg.num_kv_heads},{S},{cfg.head_dim}]"
    copies = [l for l in hlo.splitlines() if re.search(re.escape(shape) + r"\{[^}]*\} copy\(", l)]
    assert copies == []

    # At run time the old buffers are consumed and the new cache lives in their place.
    logits, new = kvjax.decode_step(cfg, params, np.array([1, 2]), cache)
    assert cache.keys[0].is_deleted() and not new.keys[0].is_deleted()


def test_dense_cache_never_wraps():
    """Padding past the buffer end is dropped, never clamped onto real slots."""
    from kvjax.cache import chunk_slots, scatter_rows

    cfg = kvjax.ModelConfig.preset("llama-tiny", num_kv_heads=1, num_heads=1, head_dim=2, num_layers=1)
    cache = kvjax.init_cache(cfg, 1, 4).replace(lengths=jnp.array([2], jnp.int32))
    slots = chunk_slots(cache, cache.lengths, jnp.array([2]), 4)    # 4-token chunk, 2 real
    np.testing.assert_array_equal(np.asarray(slots), [[2, 3, 4, 4]])  # 4 = dropped
    new = jnp.arange(1.0, 5.0).reshape(1, 4, 1, 1)
    out = scatter_rows(jnp.zeros((1, 1, 4, 1)), new, slots)
    np.testing.assert_array_equal(np.asarray(out)[0, 0, :, 0], [0, 0, 1, 2])
