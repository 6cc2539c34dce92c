"""Model shapes for experiments: a preset name plus ModelConfig overrides.

Experiments that measure cost, not quality, run on random weights of a preset shape
(`preset: llama-tiny`, `model: {num_layers: 4}`); the top-level `dtype` sets the model
dtype. `model_config` is called while validating, so a bad preset or override is a
config error naming its key before anything is built.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import numpy as np

import kvjax

from .schema import ConfigError, option


@dataclass(frozen=True)
class ShapeConfig:
    """Fields shared by kinds that run a preset shape with random weights."""

    preset: str = option("llama-tiny", help="model shape: a kvjax.ModelConfig preset name")
    model: dict = option({}, help="ModelConfig field overrides, e.g. {num_layers: 4, max_position: 4096}")


def model_config(section: str, shape: ShapeConfig, dtype: str) -> kvjax.ModelConfig:
    """The ModelConfig for `shape` in `dtype`; ConfigError names `<section>.preset|model`."""
    try:
        cfg = kvjax.ModelConfig.preset(shape.preset)
    except ValueError as e:
        raise ConfigError(f"{section}.preset: {e}") from None
    if "dtype" in shape.model:
        raise ConfigError(f"{section}.model.dtype: set the model dtype with the top-level 'dtype' key")
    for key, value in shape.model.items():
        if not isinstance(value, (bool, int, float, str, type(None))):
            raise ConfigError(f"{section}.model.{key}: got {value!r}; allowed: a number, string, "
                              f"boolean or null")
    try:
        return cfg.replace(dtype=dtype, **shape.model)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{section}.model: {e}") from None


def random_params(cfg: kvjax.ModelConfig, seed: int, std: float = 0.02):
    """Random weights. std 0.02 is the usual init; kinds that compare tokens across two paths
    use a larger std (0.2), whose top logits are decisive, so a float near-tie cannot flip them."""
    return kvjax.init_params(cfg, jax.random.key(seed), std=std)


def random_tokens(cfg: kvjax.ModelConfig, seed: int, shape) -> np.ndarray:
    """Random token ids in [0, vocab_size), int32."""
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, shape, dtype=np.int32)


# ---------------------------------------------------------------- named models (kvjax.load_model)
def check_model(key: str, name: str) -> None:
    """ConfigError naming `key` unless kvjax.load_model can resolve `name`: a bundled or an
    installed packaged name, a .gguf file or a checkpoint folder with config.json. Reads
    nothing heavy (called by the kinds' `validate`)."""
    from pathlib import Path

    from kvjax.models import model_names

    names = model_names()
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{key}: give a model name ({', '.join(names)}), a .gguf file or a folder")
    if name in names:
        if names[name].startswith("packaged (not installed"):
            raise ConfigError(f"{key}: model {name!r} is {names[name]}")
        return
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return
    if path.is_dir() and (path / "config.json").is_file():
        return
    what = ("a folder without config.json (not a Hugging Face checkpoint)" if path.is_dir() else
            "a file that is not .gguf" if path.exists() else "no such file or folder")
    raise ConfigError(f"{key}: {name!r} is {what}, and not a model name ({', '.join(names)}; "
                      f"see kvjax models)")


def load_named(key: str, name: str, dtype: str = "float32"):
    """kvjax.load_model(name, dtype) -> (cfg, params, tokenizer); ConfigError naming `key` when
    the model cannot be loaded."""
    try:
        return kvjax.load_model(name, dtype=dtype)
    except (ValueError, FileNotFoundError, ImportError) as e:    # CheckpointError is a ValueError
        raise ConfigError(f"{key}: {e}") from None


def trained_folder(key: str, name: str):
    """The folder of a model trained by `kvjax train` (a bundled name or a folder holding
    train_config.json): its task layout is read from there. ConfigError naming `key` otherwise."""
    from pathlib import Path

    from kvjax.bundled import bundled_names, bundled_path

    folder = bundled_path(name) if name in bundled_names() else Path(name).expanduser()
    if not (folder / "train_config.json").is_file():
        raise ConfigError(f"{key}: {name!r} is not a model trained by kvjax train (no "
                          f"train_config.json in a bundled model or folder); the recall task's layout "
                          f"(pairs, key and value lengths) is read from there: use 'recall' or a "
                          f"kvjax train checkpoint folder")
    return folder


def recall_task(key: str, name: str):
    """The kvjax.data.RecallTask a kvjax-trained recall model was trained on."""
    import json

    from kvjax.train import TrainConfig

    record = json.loads((trained_folder(key, name) / "train_config.json").read_text())
    if record.get("task") != "recall":
        raise ConfigError(f"{key}: {name!r} was trained on task {record.get('task')!r}, not 'recall'")
    return TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in record.items()}).recall_task()


def heldout_stream(tok) -> np.ndarray:
    """The held-out text task's documents as the model's token ids, int32 [N]: the byte
    tokenizer's stream for byte-level models, else each document encoded by `tok` (its
    special tokens, e.g. BOS, included) followed by its EOS when it has one."""
    from kvjax import data

    if isinstance(tok, kvjax.ByteTokenizer):
        return data.text_stream("heldout")
    topics = data.pydoc_topics()
    eos = [tok.eos_id] if tok.eos_id is not None else []
    ids = [tok.encode(topics[n]) + eos for n in data.split_topics()[1]]
    return np.concatenate([np.asarray(i, np.int32) for i in ids])
