"""GGUF architectures -> the Hugging Face config and tensor names kvjax/hf already maps.

A GGUF file's `<arch>.*` metadata becomes the config.json dict of the matching Hugging Face
family (read by kvjax.hf.config_from_hf, so every family rule lives in one place), and each
GGUF tensor name becomes the Hugging Face name whose kvjax parameter(s) kvjax.hf's tensor
table knows. What llama.cpp's converter changed per architecture (Llama's Q/K rotary
permutation, Gemma's 1 + w norms, Phi-3's longrope factors, Llama 3.1's rope_freqs, ...) is
undone by that architecture's rules in archs/ (one module per family group); this module
only applies them:

  GGUF architecture   Hugging Face model_type     GGUF architecture   model_type
  llama               llama (Llama 2/3, Mistral)  qwen2, qwen3        qwen2, qwen3
  gemma, gemma2       gemma, gemma2               phi3                phi3
  gemma3              gemma3_text                 olmo2               olmo2
"""
from __future__ import annotations

import re

import numpy as np

from ..hf.common import CheckpointError
from .archs import ARCHS, TOP, Arch
from .archs.base import common_fields

SUPPORTED_ARCHS = tuple(ARCHS)


def check_arch(arch, path) -> Arch:
    """The rules of GGUF architecture `arch`; CheckpointError naming the supported ones."""
    if arch not in ARCHS:
        raise CheckpointError(f"{path}: general.architecture={arch!r} is not supported; kvjax reads "
                              f"GGUF architectures {', '.join(SUPPORTED_ARCHS)}")
    return ARCHS[arch]


def hf_config(g) -> dict:
    """The Hugging Face config.json dict this GGUF file's metadata describes. `g` offers
    `path`, `arch`, `get(key, default)`, `tensors` (and `tensor` for rotary factor tensors)."""
    rules = check_arch(g.arch, g.path)
    return rules.config(g, common_fields(g))


def hf_name(arch: str, name: str) -> str | None:
    """The Hugging Face tensor name of GGUF tensor `name` (None: not a tensor kvjax maps)."""
    if name in TOP:
        return TOP[name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if not m:
        return None
    i, part, kind = m.groups()
    hf = check_arch(arch, "?").layer.get(part)
    return None if hf is None else f"model.layers.{i}.{hf}.{kind}"


def is_config_tensor(arch: str, name: str) -> bool:
    """Whether GGUF tensor `name` is read into the config (rotary factors), not a parameter."""
    return name in check_arch(arch, "?").config_tensors


def fix(arch: str, name: str, x: np.ndarray, hf: dict) -> np.ndarray:
    """A dequantised GGUF tensor (float32) in Hugging Face's convention."""
    return check_arch(arch, "?").fix(name, x, hf)
