"""GGUF checkpoints (llama.cpp's single-file format) -> (ModelConfig, params, tokenizer).

  reader.py     GGUFFile: metadata and tensors (ggml-org's `gguf` package), dequantised
                tensor by tensor
  arch.py       GGUF architectures -> Hugging Face config / tensor names (kvjax/hf maps those)
  archs/        the per-architecture rules arch.py applies (one module per family group)
  tokenizer.py  GGUFTokenizer: tokenizer.ggml.* metadata -> a `tokenizers` tokenizer

The config goes through kvjax.hf.config_from_hf and the tensors through the same family
tensor table as Hugging Face folders, so a GGUF model and its Hugging Face folder load to
the same parameters (up to the file's quantisation). No torch.
Axis letters: D d_model, V vocabulary.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ..config import DTYPES
from ..hf import config_from_hf, tensor_table
from ..hf.common import CheckpointError, check_table, param_shapes, set_path, some, to_device
from .arch import SUPPORTED_ARCHS, fix, hf_config, hf_name, is_config_tensor
from .reader import GGUFFile, supported_types
from .tokenizer import GGUFTokenizer

__all__ = ["GGUFFile", "GGUFTokenizer", "SUPPORTED_ARCHS", "load_gguf", "load_gguf_config",
           "supported_types"]


def load_gguf_config(path, dtype: str = "float32"):
    """(ModelConfig, hf config dict, GGUFFile) of a GGUF file, reading no tensor data."""
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype={dtype!r} is not one of {list(DTYPES)}")
    g = path if isinstance(path, GGUFFile) else GGUFFile(path)
    hf = hf_config(g)
    cfg, _ = config_from_hf(hf, dtype, source=f"{g.path} (GGUF metadata)")
    return cfg, hf, g


def _tensor_names(g, arch: str, table) -> dict:
    """Hugging Face name -> GGUF name, checked against the table before any tensor is read."""
    names = {}
    for n in g.tensors:
        if is_config_tensor(arch, n):
            continue    # rotary factors: already in the config
        hf = hf_name(arch, n)
        if hf is None:
            raise CheckpointError(f"{g.path}: tensor {n!r} is not one a {arch} model uses")
        names[hf] = n
    wanted = {t.hf for t in table}
    missing = sorted(wanted - set(names))
    extra = sorted(set(names) - wanted)
    if missing or extra:
        raise CheckpointError(f"{g.path}: a {arch} model with this metadata needs tensors it lacks "
                              f"({some(missing)}) or does not use some it has ({some(extra)})")
    return names


def load_gguf(path, dtype: str = "float32", with_tokenizer: bool = True):
    """Load a GGUF file: returns (ModelConfig, params, tokenizer or None).

    Every tensor is dequantised (whatever its type: F16, Q4_K, Q8_0, ...) straight to `dtype`,
    one tensor at a time (block types 4096 rows at a time), so peak host memory is about the
    final parameter bytes plus a copy or two of the largest tensor in `dtype`. Raises CheckpointError (a ValueError) naming the
    metadata key or tensor that is wrong, before any tensor is read.
    """
    cfg, hf, g = load_gguf_config(path, dtype)
    table = tensor_table(cfg, hf["model_type"])
    shapes = param_shapes(cfg)
    check_table(table, shapes)
    names = _tensor_names(g, g.arch, table)
    tok = GGUFTokenizer(g) if with_tokenizer else None
    target = jnp.dtype(dtype)
    params: dict = {}
    for t in table:
        kv_shapes = [shapes[p] for p in t.kv]
        small = len(g.tensors[names[t.hf]].shape) == 1     # norms and biases: fixed in float32
        x = fix(g.arch, names[t.hf], g.tensor(names[t.hf], np.float32 if small else target), hf)
        if tuple(x.shape) != t.hf_shape(kv_shapes):
            raise CheckpointError(f"{g.path}: tensor {names[t.hf]!r} has shape {tuple(x.shape)}, but "
                                  f"the metadata implies {t.hf_shape(kv_shapes)}")
        for p, arr in zip(t.kv, t.from_hf(x, kv_shapes)):
            set_path(params, p, to_device(np.ascontiguousarray(arr).astype(target, copy=False)))
        del x
    return cfg, params, tok
