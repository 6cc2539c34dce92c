"""Models trained by kvjax.train and shipped inside the package (no download).

Each lives in `kvjax/assets/models/<name>/` as a Hugging Face folder (config.json,
bfloat16 model.safetensors, generation_config.json), the byte tokenizer
(kvjax_tokenizer.json), the `TrainConfig` that produced it (train_config.json) and the
training summary with its held-out figures (train_summary.json).

  text    byte-level model of CPython's pydoc documentation (kvjax.data text task)
  recall  key-value recall model (kvjax.data.RecallTask; see train_config.json for its shape)
  text-draft  a one-layer model of the same bytes: the text model's draft for speculative
              decoding (experiments/train_text_draft.yaml)
"""
from __future__ import annotations

import json
from pathlib import Path

from .config import ModelConfig
from .hf import load_hf
from .tokenizer import load_tokenizer


def models_dir() -> Path:
    """The folder holding the bundled models (inside the installed package)."""
    return Path(__file__).resolve().parent / "assets" / "models"


def bundled_names() -> list[str]:
    """Names of the bundled models, sorted."""
    root = models_dir()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "config.json").is_file())


def bundled_path(name: str) -> Path:
    """The folder of one bundled model; ValueError naming the available ones otherwise."""
    names = bundled_names()
    if name not in names:
        raise ValueError(f"no bundled model {name!r}; bundled models are {names}")
    return models_dir() / name


def model_folder(source: str | Path) -> Path:
    """A bundled model's folder for its name, else `source` itself as a folder path."""
    return bundled_path(source) if str(source) in bundled_names() else Path(source)


def load_bundled(name: str, dtype: str = "float32"):
    """Load a bundled model: returns (ModelConfig, params, tokenizer).

    dtype: parameter and activation dtype; the files hold bfloat16, and "float32"
    (the default) computes in float32 on the exact bfloat16 values.
    """
    path = bundled_path(name)
    cfg, params = load_hf(path, dtype=dtype)
    return cfg, params, load_tokenizer(path)


def bundled_info(name: str) -> dict:
    """The training record of a bundled model: {"train_config": {...}, "summary": {...}}."""
    path = bundled_path(name)
    read = lambda f: json.loads((path / f).read_text()) if (path / f).is_file() else {}  # noqa: E731
    return {"train_config": read("train_config.json"), "summary": read("train_summary.json")}


def bundled_config(name: str) -> ModelConfig:
    """The model shape of a bundled model, without loading its weights."""
    from .hf import config_from_hf

    path = bundled_path(name)
    cfg, _ = config_from_hf(json.loads((path / "config.json").read_text()), "float32",
                            source=str(path / "config.json"))
    return cfg
