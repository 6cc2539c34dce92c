"""GGUF architectures -> the Hugging Face config and tensor names kvjax/hf already maps.

A GGUF file's `<arch>.*` metadata becomes the config.json dict of the matching Hugging Face
family (read by kvjax.hf.config_from_hf, so every family rule lives in one place), and each
GGUF tensor name becomes the Hugging Face name whose kvjax parameter(s) kvjax.hf's tensor
table knows. Two conversions llama.cpp's converter applies are undone here:

  * llama: Q and K rows are permuted from the half-split rotary layout to interleaved pairs
    (convert_hf_to_gguf.py LlamaModel.permute); `unpermute` restores Hugging Face's order.
  * gemma*: norm weights are stored as 1 + w (the multiplier itself); kvjax's gemma_rmsnorm,
    like transformers, computes x * (1 + w), so 1 is subtracted.

Axis letters: H heads, K kv heads, E head_dim, D d_model.
"""
from __future__ import annotations

import re

import numpy as np

from ..hf.common import CheckpointError

SUPPORTED_ARCHS = ("llama", "gemma3")

_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
_LAYER = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj", "attn_q_norm": "self_attn.q_norm",
          "attn_k_norm": "self_attn.k_norm", "attn_norm": "input_layernorm"}
_NORMS = {"llama": {"ffn_norm": "post_attention_layernorm"},
          "gemma3": {"post_attention_norm": "post_attention_layernorm",
                     "ffn_norm": "pre_feedforward_layernorm",
                     "post_ffw_norm": "post_feedforward_layernorm"}}


def check_arch(arch, path) -> None:
    if arch not in SUPPORTED_ARCHS:
        raise CheckpointError(f"{path}: general.architecture={arch!r} is not supported; kvjax reads "
                              f"GGUF architectures {', '.join(SUPPORTED_ARCHS)}")


def _dims(g, a: str) -> dict:
    heads = int(g.get(f"{a}.attention.head_count"))
    d = int(g.get(f"{a}.embedding_length"))
    vocab = g.get(f"{a}.vocab_size", None)
    if vocab is None:   # older files: the embedding's row count
        vocab = int(g.tensors["token_embd.weight"].shape[-1])
    return dict(vocab_size=int(vocab), hidden_size=d, num_hidden_layers=int(g.get(f"{a}.block_count")),
                num_attention_heads=heads,
                num_key_value_heads=int(g.get(f"{a}.attention.head_count_kv", heads)),
                head_dim=int(g.get(f"{a}.attention.key_length", d // heads)),
                intermediate_size=int(g.get(f"{a}.feed_forward_length")),
                max_position_embeddings=int(g.get(f"{a}.context_length")),
                rms_norm_eps=float(g.get(f"{a}.attention.layer_norm_rms_epsilon")),
                tie_word_embeddings="output.weight" not in g.tensors)


def _rope(g, a: str) -> dict:
    kind = g.get(f"{a}.rope.scaling.type", "none")
    out = {"rope_theta": float(g.get(f"{a}.rope.freq_base", 10000.0))}
    if kind == "linear":
        out["rope_scaling"] = {"rope_type": "linear", "factor": float(g.get(f"{a}.rope.scaling.factor"))}
    elif kind != "none":
        raise CheckpointError(f"{g.path}: {a}.rope.scaling.type={kind!r} is not supported; kvjax "
                              f"reads GGUF rope scaling 'none' and 'linear'")
    if "rope_freqs.weight" in g.tensors:
        raise CheckpointError(f"{g.path}: tensor 'rope_freqs.weight' (llama3 rope scaling factors) "
                              f"is not supported; kvjax reads GGUF files without it")
    return out


def hf_config(g) -> dict:
    """The Hugging Face config.json dict this GGUF file's metadata describes."""
    a = g.arch
    check_arch(a, g.path)
    out = dict(_dims(g, a), **_rope(g, a), _name_or_path=str(g.get("general.name", a)))
    if a == "llama":
        rot = g.get(f"{a}.rope.dimension_count", out["head_dim"])
        if int(rot) != out["head_dim"]:
            raise CheckpointError(f"{g.path}: {a}.rope.dimension_count={rot} differs from head_dim="
                                  f"{out['head_dim']}; kvjax's llama rotates whole heads")
        return dict(out, model_type="llama", hidden_act="silu")
    window = g.get(f"{a}.attention.sliding_window", None)
    return dict(out, model_type="gemma3_text", hidden_activation="gelu_pytorch_tanh",
                sliding_window=None if window is None else int(window), sliding_window_pattern=6,
                query_pre_attn_scalar=out["head_dim"], rope_local_base_freq=10000.0,
                final_logit_softcapping=None)


def hf_name(arch: str, name: str) -> str | None:
    """The Hugging Face tensor name of GGUF tensor `name` (None: not a tensor kvjax maps)."""
    if name in _TOP:
        return _TOP[name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if not m:
        return None
    i, part, kind = m.groups()
    hf = _NORMS[arch].get(part) or _LAYER.get(part)
    return None if hf is None else f"model.layers.{i}.{hf}.{kind}"


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's rotary permutation of a q/k weight [heads*E, D] (or bias [heads*E])."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def fix(arch: str, name: str, x: np.ndarray, hf: dict) -> np.ndarray:
    """A dequantised GGUF tensor (float32) in Hugging Face's convention."""
    if arch == "llama":
        if name.endswith(("attn_q.weight", "attn_q.bias")):
            return unpermute(x, hf["num_attention_heads"])
        if name.endswith(("attn_k.weight", "attn_k.bias")):
            return unpermute(x, hf["num_key_value_heads"])
    elif name.endswith("norm.weight"):
        return x - 1.0
    return x
