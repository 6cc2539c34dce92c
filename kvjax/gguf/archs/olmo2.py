"""GGUF `olmo2` -> Hugging Face model_type olmo2.

llama.cpp's converter (Olmo2Model) changes no tensor: OLMo 2's norms after attention and
after the MLP are `post_attention_norm` and `post_ffw_norm` (there is no attn_norm or
ffn_norm), and its q/k RMSNorm over the whole q / k projection is attn_q_norm / attn_k_norm
of width heads * head_dim. Rotary is half-split in llama.cpp too: no permutation.
"""
from __future__ import annotations

from . import base

POST = {"post_attention_norm": "post_attention_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}


def _config(g, out: dict) -> dict:
    base.whole_heads(g, out["head_dim"])
    return dict(out, **base.rope(g), model_type="olmo2", hidden_act="silu",
                attention_bias=base.has_bias(g))


OLMO2 = base.Arch("olmo2", _config, layer=dict(
    {k: v for k, v in base.LAYER.items() if k not in ("attn_norm", "ffn_norm")}, **POST))
RULES = (OLMO2,)
