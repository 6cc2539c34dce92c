"""Hugging Face checkpoints: config.json + safetensors <-> (ModelConfig, params).

One small module per family holds its config mapping and tensor names (the name mapping
between Hugging Face tensors and kvjax's parameter tree lives only in this package):

  gpt2.py   gpt2
  llama.py  llama (2 and 3, llama3 rope scaling), mistral (window), qwen2 (q/k/v bias,
            windows on some layers)
  gemma.py  gemma, gemma2, gemma3_text, and the text part of multimodal gemma3
  qwen3.py  qwen3          phi3.py  phi3          olmo2.py  olmo2
  rope.py   both rotary config styles (transformers 4.x and 5)
  common.py the Tensor mapping type, config field access, safetensors files

A family module defines MODEL_TYPES, ARCHITECTURES, read(fields, model_type) -> ModelConfig,
write(cfg, model_type) -> config.json keys, table(cfg, model_type) -> [Tensor], and
optionally rename(files, model_type) and ignorable(name, cfg, model_type).

Tensors are read with the `safetensors` library as numpy arrays (no torch needed) and
converted to `dtype` on the host, one tensor at a time.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from ..atomic import atomic_write
from ..config import DTYPES, ModelConfig
from . import gemma, gpt2, llama, olmo2, phi3, qwen3
from .common import (INDEX_FILE, SINGLE_FILE, CheckpointError, Fields, Tensor, check_params,
                     check_table, folder_of, get_path, open_safetensors, param_shapes, read_json,
                     set_path, shard, some, to_device, weight_files, write_json)

_FAMILIES = (gpt2, llama, gemma, qwen3, phi3, olmo2)
FAMILY = {t: fam for fam in _FAMILIES for t in fam.MODEL_TYPES}
SUPPORTED_MODEL_TYPES = tuple(FAMILY)
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear", "longrope")

# Kept under their old private names for callers (tests) of the single-module hf.py.
_param_shapes = param_shapes

__all__ = ["CheckpointError", "SUPPORTED_MODEL_TYPES", "Tensor", "config_from_hf", "config_to_hf",
           "hf_model_type", "load_hf", "save_hf", "tensor_table"]


def _unsupported(model_type) -> str:
    return (f"model_type {model_type!r} is not supported; kvjax loads "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}")


def _family(model_type):
    if model_type not in FAMILY:
        raise CheckpointError(_unsupported(model_type))
    return FAMILY[model_type]


def tensor_table(cfg: ModelConfig, model_type: str) -> list[Tensor]:
    """Every Hugging Face tensor of `model_type` for this config, with its kvjax parameter(s)."""
    return _family(model_type).table(cfg, model_type)


def config_from_hf(hf: dict, dtype: str = "float32", source: str = "config.json"
                   ) -> tuple[ModelConfig, str]:
    """A Hugging Face config.json (as a dict) -> (ModelConfig, model_type)."""
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype={dtype!r} is not one of {list(DTYPES)}")
    model_type = hf.get("model_type")
    if model_type not in FAMILY:
        raise CheckpointError(f"{source}: {_unsupported(model_type)}")
    try:
        cfg = FAMILY[model_type].read(Fields(hf, source), model_type)
        cfg = cfg.replace(dtype=dtype, name=str(hf.get("_name_or_path") or model_type))
    except (TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{source}: {e}") from None
    return cfg, model_type


def hf_model_type(cfg: ModelConfig) -> str:
    """The Hugging Face family a ModelConfig is written as by `save_hf`."""
    if cfg.positions == "learned":
        return "gpt2"
    if cfg.norm == "gemma_rmsnorm":
        if cfg.norm_placement == "pre":
            return "gemma"
        return "gemma3_text" if cfg.qk_norm is not None or cfg.rope_local_theta is not None else "gemma2"
    if cfg.norm_placement == "post" or cfg.qk_norm == "proj":
        return "olmo2"
    if cfg.qk_norm == "head":
        return "qwen3"
    rs = cfg.rope_scaling
    if cfg.rotary_dim not in (None, cfg.head_dim) or (rs is not None and rs.rope_type == "longrope"):
        return "phi3"
    if cfg.qkv_bias and not cfg.out_bias:
        return "qwen2"
    if cfg.sliding_window is not None and not cfg.qkv_bias and not cfg.out_bias:
        return "mistral"
    return "llama"


def config_to_hf(cfg: ModelConfig, model_type: str | None = None) -> dict:
    """ModelConfig -> a config.json dict transformers (4.45+ and 5) loads as `model_type`.

    The dict is read back with `config_from_hf`; any field that would not survive (something
    the family cannot express) is named in the CheckpointError.
    """
    model_type = model_type or hf_model_type(cfg)
    family = _family(model_type)
    if model_type == "gemma3":
        raise CheckpointError("kvjax writes Gemma 3 language models as model_type 'gemma3_text' "
                              "(no vision tower); pass model_type='gemma3_text'")
    out = {"architectures": [family.ARCHITECTURES[model_type]], "model_type": model_type,
           "_name_or_path": cfg.name, "vocab_size": cfg.vocab_size,
           "tie_word_embeddings": cfg.tie_embeddings,
           # transformers 5 reads `dtype`, earlier versions `torch_dtype`.
           "dtype": cfg.dtype, "torch_dtype": cfg.dtype, **family.write(cfg, model_type)}
    try:
        back = family.read(Fields(out, "config"), model_type).replace(name=cfg.name, dtype=cfg.dtype)
    except (TypeError, ValueError) as e:
        back, why = None, str(e)
    if back != cfg:
        wrong = ([why] if back is None else
                 [f"{k}={getattr(cfg, k)!r} (a {model_type} config.json gives {getattr(back, k)!r})"
                  for k in cfg.__dataclass_fields__ if getattr(cfg, k) != getattr(back, k)])
        raise CheckpointError(f"ModelConfig {cfg.name!r} cannot be written as a {model_type} "
                              f"checkpoint: {', '.join(wrong)}")
    return out


# ----------------------------------------------------------------------------- loading

def load_hf(path, dtype: str = "float32"):
    """Load a local Hugging Face checkpoint folder: returns (ModelConfig, params).

    path: a folder with config.json and model.safetensors, or sharded
    model-*.safetensors with model.safetensors.index.json.
    dtype: parameter and activation dtype ("float32", "bfloat16" or "float16"); every
    tensor is converted to it whatever the checkpoint stores. Softmax and norms run in
    float32 regardless.
    A multimodal Gemma 3 folder loads its language model only (a warning says so).
    Raises CheckpointError (a ValueError) or FileNotFoundError naming what is wrong.
    """
    folder = folder_of(path)
    cfg, model_type = config_from_hf(read_json(folder / "config.json"), dtype,
                                     source=str(folder / "config.json"))
    family = FAMILY[model_type]
    files = weight_files(folder)  # name in kvjax's table -> (file, name stored in the file)
    if hasattr(family, "rename"):
        files = family.rename(files, model_type)
    table = tensor_table(cfg, model_type)
    shapes = param_shapes(cfg)
    check_table(table, shapes)
    names = {t.hf for t in table}
    skipped = [n for n in files if n not in names and _ignorable(n, family, model_type, cfg)]
    missing = [t.hf for t in table if t.hf not in files]
    unexpected = [n for n in files if n not in names and n not in skipped]
    if missing:
        raise CheckpointError(f"checkpoint {folder} is missing {some(missing)} that a {model_type} "
                              f"model with this config.json needs")
    if unexpected:
        raise CheckpointError(f"checkpoint {folder} has unexpected {some(unexpected)}, which a "
                              f"{model_type} model with this config.json does not use")
    if model_type == "gemma3":
        vision = sum(n.startswith(gemma.VISION_PREFIXES) for n in skipped)
        warnings.warn(f"{folder} is a multimodal Gemma 3 checkpoint: kvjax loads its language model "
                      f"only (text in, text out); images are not supported and its {vision} vision "
                      f"tensors were not loaded", stacklevel=2)
    target = jnp.dtype(dtype)
    params: dict = {}
    readers: dict = {}
    for t in table:
        file, stored = files[t.hf]
        if file not in readers:
            readers[file] = open_safetensors(file)
        x = readers[file].get_tensor(stored)
        kv_shapes = [shapes[p] for p in t.kv]
        want = t.hf_shape(kv_shapes)
        if tuple(x.shape) != want:
            raise CheckpointError(f"tensor {t.hf!r} in {file.name} has shape {tuple(x.shape)}, but "
                                  f"config.json implies {want}")
        for p, arr in zip(t.kv, t.from_hf(x, kv_shapes)):
            set_path(params, p, to_device(np.ascontiguousarray(arr).astype(target)))
    return cfg, params


def _ignorable(name: str, family, model_type: str, cfg: ModelConfig) -> bool:
    """Tensors a checkpoint may hold that carry no parameters kvjax needs."""
    if re.search(r"\.rotary_emb\.(\w+_)?inv_freq$", name):
        return True  # recomputed from the rope settings
    if hasattr(family, "ignorable") and family.ignorable(name, cfg, model_type):
        return True
    # Tied models sometimes store the (identical) output matrix too; HF ignores it as well.
    return cfg.tie_embeddings and name == "lm_head.weight"


# ----------------------------------------------------------------------------- saving

def save_hf(cfg: ModelConfig, params, path, *, tokenizer=None, model_type: str | None = None,
            bos_token_id: int | None = None, eos_token_id=None,
            pad_token_id: int | None = None, max_shard_bytes: int | None = None) -> Path:
    """Write (cfg, params) as a Hugging Face checkpoint folder that transformers and load_hf read.

    Tensors are written in `cfg.dtype` (bfloat16 models stay bfloat16 on disk) with
    config.json (`dtype`/`torch_dtype` set), generation_config.json when a bos/eos/pad id
    is known, and the tokenizer if given (a ByteTokenizer writes kvjax_tokenizer.json).
    Special ids default to the tokenizer's. `eos_token_id` may be a list (every id that ends a
    turn, e.g. Llama 3's <|eot_id|> too): generation_config.json gets the list, config.json the
    first. `model_type` defaults to `hf_model_type(cfg)`.
    `max_shard_bytes`: split into model-0000i-of-0000n.safetensors plus an index.
    Earlier model*.safetensors / index files in the folder are replaced.
    """
    model_type = model_type or hf_model_type(cfg)
    hf_cfg = config_to_hf(cfg, model_type)
    table = tensor_table(cfg, model_type)
    shapes = param_shapes(cfg)
    check_table(table, shapes)
    check_params(params, shapes)
    special = _special_ids(cfg, tokenizer, bos_token_id, eos_token_id, pad_token_id)
    hf_cfg.update({k: (v[0] if isinstance(v, list) else v) for k, v in special.items()})

    target = jnp.dtype(cfg.dtype)
    tensors = {t.hf: np.ascontiguousarray(
        t.to_hf([np.asarray(get_path(params, p)).astype(target) for p in t.kv])) for t in table}
    folder = Path(path)
    _write_weights(folder, tensors, max_shard_bytes)
    write_json(folder / "config.json", hf_cfg)
    if special:
        write_json(folder / "generation_config.json", {**special, "_from_model_config": True})
    if tokenizer is not None:
        tokenizer.save(folder)
    return folder


def _special_ids(cfg: ModelConfig, tokenizer, bos_token_id, eos_token_id, pad_token_id) -> dict:
    """{bos/eos/pad_token_id: id} of the ids known (the tokenizer's by default); eos may be a
    list of several ids. CheckpointError for an empty eos list or an id outside the vocabulary."""
    if tokenizer is not None:
        bos_token_id = tokenizer.bos_id if bos_token_id is None else bos_token_id
        if eos_token_id is None:
            eos_token_id = list(tokenizer.eos_ids) if len(tokenizer.eos_ids) > 1 else tokenizer.eos_id
        pad_token_id = tokenizer.pad_id if pad_token_id is None else pad_token_id
    if eos_token_id is not None and not isinstance(eos_token_id, (int, np.integer)):
        eos_list = [int(e) for e in eos_token_id]
        if not eos_list:
            raise CheckpointError("eos_token_id is an empty list; pass None for no EOS id")
        eos_token_id = eos_list[0] if len(eos_list) == 1 else eos_list
    special = {k: v for k, v in (("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id),
                                 ("pad_token_id", pad_token_id)) if v is not None}
    for k, v in special.items():
        for one in (v if isinstance(v, list) else [v]):
            if not 0 <= int(one) < cfg.vocab_size:
                raise CheckpointError(f"{k}={one} is outside the vocabulary [0, {cfg.vocab_size})")
    return {k: (v if isinstance(v, list) else int(v)) for k, v in special.items()}


def _write_weights(folder: Path, tensors: dict, max_shard_bytes: int | None) -> None:
    """The tensors as model.safetensors, or as shards plus an index; earlier weight files go."""
    from safetensors.numpy import save_file

    shards = shard(tensors, max_shard_bytes)
    folder.mkdir(parents=True, exist_ok=True)
    for old in [*folder.glob("model*.safetensors"), folder / INDEX_FILE]:
        if old.is_file():
            old.unlink()
    meta = {"format": "pt"}  # transformers refuses safetensors files without it
    if len(shards) == 1:
        atomic_write(folder / SINGLE_FILE, lambda p: save_file(shards[0], str(p), metadata=meta))
        return
    weight_map = {}
    for i, s in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        atomic_write(folder / name, lambda p, s=s: save_file(s, str(p), metadata=meta))
        weight_map.update({n: name for n in s})
    index = {"metadata": {"total_size": sum(int(x.nbytes) for x in tensors.values())},
             "weight_map": dict(sorted(weight_map.items()))}
    write_json(folder / INDEX_FILE, index)
