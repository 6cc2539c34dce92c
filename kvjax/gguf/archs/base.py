"""What every GGUF architecture shares: the rule type, the common metadata -> config.json
fields, the common tensor names, and small helpers the per-family modules use.

A GGUF file's `<arch>.*` metadata and tensor names are llama.cpp's, written by its converter
(convert_hf_to_gguf.py); each family module says what that converter changed for its
architectures and how kvjax undoes it (see `Arch`).

Axis letters: H heads, K kv heads, E head_dim, D d_model, V vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ...hf.common import CheckpointError

# GGUF per-layer tensor part -> Hugging Face module, as llama.cpp's tensor map names them for
# Llama-shaped decoders; a family overrides or adds parts in its Arch.layer.
LAYER = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
         "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
         "ffn_down": "mlp.down_proj", "attn_q_norm": "self_attn.q_norm",
         "attn_k_norm": "self_attn.k_norm", "attn_norm": "input_layernorm",
         "ffn_norm": "post_attention_layernorm"}
TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
       "output.weight": "lm_head.weight"}


def _same(name: str, x: np.ndarray, hf: dict) -> np.ndarray:
    return x


@dataclass(frozen=True)
class Arch:
    """The rules of one GGUF architecture (general.architecture).

    config(g, common) -> the Hugging Face config.json dict (with model_type), given the fields
    every architecture shares (`common_fields`); layer: GGUF per-layer tensor part -> Hugging
    Face module (LAYER plus the family's own); fix(gguf_name, x, hf) -> the tensor in Hugging
    Face's convention (undoing the converter); config_tensors: tensors that are read into the
    config (rotary factors), not parameters.
    """

    name: str
    config: Callable
    layer: dict = field(default_factory=lambda: dict(LAYER))
    fix: Callable = _same
    config_tensors: tuple = ()


def f32(value) -> float:
    """A float the converter stored as float32, as the shortest decimal that rounds to it
    (1e-05 rather than 9.99999974738e-06): the same float32 number, and the value the
    Hugging Face config.json most likely spelled."""
    return float(str(np.float32(value)))


def common_fields(g) -> dict:
    """config.json fields every architecture writes the same way."""
    a = g.arch
    heads = int(g.get(f"{a}.attention.head_count"))
    d = int(g.get(f"{a}.embedding_length"))
    vocab = g.get(f"{a}.vocab_size", None)
    if vocab is None:   # most converters write none: the embedding's row count
        vocab = int(g.tensors["token_embd.weight"].shape[-1])
    return dict(vocab_size=int(vocab), hidden_size=d, num_hidden_layers=int(g.get(f"{a}.block_count")),
                num_attention_heads=heads,
                num_key_value_heads=int(g.get(f"{a}.attention.head_count_kv", heads)),
                head_dim=int(g.get(f"{a}.attention.key_length", d // heads)),
                intermediate_size=int(g.get(f"{a}.feed_forward_length")),
                max_position_embeddings=int(g.get(f"{a}.context_length")),
                rms_norm_eps=f32(g.get(f"{a}.attention.layer_norm_rms_epsilon")),
                tie_word_embeddings="output.weight" not in g.tensors,
                _name_or_path=str(g.get("general.name", a)))


def rope(g, allowed: tuple = ("none",)) -> dict:
    """rope_theta and, for `linear`, rope_scaling from {arch}.rope.* metadata; CheckpointError
    for a scaling type outside `allowed` (kvjax's family for this architecture runs those)."""
    a = g.arch
    kind = g.get(f"{a}.rope.scaling.type", "none")
    if kind not in allowed:
        raise CheckpointError(f"{g.path}: {a}.rope.scaling.type={kind!r} is not supported for GGUF "
                              f"architecture {a}; kvjax reads {', '.join(map(repr, allowed))}")
    out = {"rope_theta": f32(g.get(f"{a}.rope.freq_base", 10000.0))}
    if kind == "linear":
        out["rope_scaling"] = {"rope_type": "linear", "factor": f32(g.get(f"{a}.rope.scaling.factor"))}
    return out


def whole_heads(g, head_dim: int) -> None:
    """CheckpointError unless {arch}.rope.dimension_count (when written) rotates whole heads."""
    a = g.arch
    rot = g.get(f"{a}.rope.dimension_count", head_dim)
    if int(rot) != head_dim:
        raise CheckpointError(f"{g.path}: {a}.rope.dimension_count={rot} differs from head_dim="
                              f"{head_dim}; kvjax's {a} family rotates whole heads")


def has_bias(g) -> bool:
    """Whether the attention projections carry biases (llama-style attention_bias)."""
    return "blk.0.attn_q.bias" in g.tensors


def small_tensor(g, name: str) -> np.ndarray:
    """A small float32 tensor (rotary factors) for the config. A header-only reader (one
    without `.tensor`, e.g. `kvjax models`) opens the file with GGUFFile for it."""
    if not hasattr(g, "tensor"):
        from ..reader import GGUFFile

        g = GGUFFile(g.path)
    return np.asarray(g.tensor(name, np.float32), np.float32).reshape(-1)


def minus_one_norms(name: str, x: np.ndarray, hf: dict) -> np.ndarray:
    """Gemma's norms: the converter stores 1 + w (the multiplier itself); Hugging Face stores
    w and computes x * (1 + w)."""
    return x - 1.0 if name.endswith("norm.weight") else x
