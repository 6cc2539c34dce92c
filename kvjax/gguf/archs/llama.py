"""GGUF `llama`: Llama 2/3/3.1+, Mistral and other LlamaForCausalLM-shaped files ->
Hugging Face model_type `llama`.

llama.cpp runs `llama` with interleaved rotary pairs, so its converter (LlamaModel.permute)
reorders Q and K rows (weights and biases) within each head from Hugging Face's half-split
layout; `unpermute` restores it. Llama 3.1-style rope scaling is not in the metadata but a
`rope_freqs.weight` tensor of per-frequency factors (llama3_rope.py turns it back into
rope_scaling). Mistral files are `llama` files too: the converter stores no sliding window,
and llama.cpp runs them without one, so kvjax does too (Mistral 7B v0.1's 4096 window matters
only past 4096 tokens).

Axis letters: H heads, E head_dim, D d_model.
"""
from __future__ import annotations

import numpy as np

from . import base
from .llama3_rope import ROPE_FREQS, llama3_scaling


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's rotary permutation of a q/k weight [heads*E, D] (or bias [heads*E])."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _fix(name: str, x: np.ndarray, hf: dict) -> np.ndarray:
    if name.endswith(("attn_q.weight", "attn_q.bias")):
        return unpermute(x, hf["num_attention_heads"])
    if name.endswith(("attn_k.weight", "attn_k.bias")):
        return unpermute(x, hf["num_key_value_heads"])
    return x


def _config(g, out: dict) -> dict:
    base.whole_heads(g, out["head_dim"])
    rope = base.rope(g, ("none",))   # kvjax's llama family runs default and llama3 rotary
    if ROPE_FREQS in g.tensors:
        rope["rope_scaling"] = llama3_scaling(g, rope["rope_theta"], out["head_dim"])
    bias = base.has_bias(g)
    return dict(out, **rope, model_type="llama", hidden_act="silu", attention_bias=bias, mlp_bias=False)


LLAMA = base.Arch("llama", _config, fix=_fix, config_tensors=(ROPE_FREQS,))
RULES = (LLAMA,)
