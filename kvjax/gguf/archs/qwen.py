"""GGUF `qwen2`, `qwen3` -> Hugging Face model_type qwen2, qwen3.

llama.cpp runs both with half-split ("neox") rotary, so its converter (Qwen2Model,
Qwen3Model) writes the tensors as they are: no Q/K permutation to undo, Qwen2's q/k/v
biases as attn_{q,k,v}.bias, Qwen3's per-head q/k norms as attn_{q,k}_norm. The converter
stores no sliding window for these and llama.cpp uses none, so neither does kvjax
(use_sliding_window false). Rope scaling (yarn on some Qwen2.5) is not supported.
"""
from __future__ import annotations

from . import base


def _config(g, out: dict) -> dict:
    base.whole_heads(g, out["head_dim"])
    extra = {} if g.arch == "qwen2" else {"attention_bias": base.has_bias(g)}
    return dict(out, **base.rope(g), **extra, model_type=g.arch, hidden_act="silu",
                use_sliding_window=False)


QWEN2 = base.Arch("qwen2", _config)
QWEN3 = base.Arch("qwen3", _config)
RULES = (QWEN2, QWEN3)
