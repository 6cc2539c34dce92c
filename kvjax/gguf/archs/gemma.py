"""GGUF `gemma`, `gemma2`, `gemma3` -> Hugging Face model_type gemma, gemma2, gemma3_text.

What llama.cpp's converter (GemmaModel, Gemma2Model, Gemma3Model) changes, and kvjax undoes:
  * every norm weight is stored as 1 + w (GemmaRMSNorm's multiplier): 1 is subtracted;
  * no lm_head (tied embeddings); Gemma 3 drops embedding rows past the tokenizer's vocabulary
    (the vocabulary is the embedding's row count);
  * no rotary, permutation: Gemma rotates half-split heads in llama.cpp too.
What the metadata leaves out, llama.cpp hard-codes, and so does kvjax: rope theta 10000 for
gemma/gemma2 (not written); Gemma 2 every other layer sliding (window default 4096,
attention / final soft-capping defaults 50 / 30); Gemma 3 five sliding layers per global one
with local rope theta 10000 (rope.freq_base_swa where newer converters write it); attention
scaled by head_dim ** -0.5 except the 27B models (46 layers Gemma 2, 62 layers Gemma 3),
scaled by (hidden_size / heads) ** -0.5, which is their query_pre_attn_scalar. Gemma's
sqrt(hidden_size) embedding scale is kvjax's gemma family.
"""
from __future__ import annotations

from . import base

# Gemma 2 / 3: four norms per layer ("sandwich").
SANDWICH = {"post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
            "post_ffw_norm": "post_feedforward_layernorm"}
# llama.cpp's LLM_TYPE_27B (n_layer) per architecture: scaled by hidden_size / heads.
_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def _query_scalar(out: dict, arch: str) -> int:
    if out["num_hidden_layers"] == _27B_LAYERS[arch]:
        return out["hidden_size"] // out["num_attention_heads"]
    return out["head_dim"]


def _gemma(g, out: dict) -> dict:
    base.whole_heads(g, out["head_dim"])
    return dict(out, **base.rope(g), model_type="gemma", hidden_act="gelu_pytorch_tanh")


def _gemma2(g, out: dict) -> dict:
    a = g.arch
    base.whole_heads(g, out["head_dim"])
    return dict(out, **base.rope(g), model_type="gemma2", hidden_activation="gelu_pytorch_tanh",
                sliding_window=int(g.get(f"{a}.attention.sliding_window", 4096)),
                attn_logit_softcapping=base.f32(g.get(f"{a}.attn_logit_softcapping", 50.0)),
                final_logit_softcapping=base.f32(g.get(f"{a}.final_logit_softcapping", 30.0)),
                query_pre_attn_scalar=_query_scalar(out, a))


def _gemma3(g, out: dict) -> dict:
    a = g.arch
    base.whole_heads(g, out["head_dim"])
    window = g.get(f"{a}.attention.sliding_window", None)
    cap = g.get(f"{a}.final_logit_softcapping", None)
    return dict(out, **base.rope(g, ("none", "linear")), model_type="gemma3_text",
                hidden_activation="gelu_pytorch_tanh",
                sliding_window=None if window is None else int(window), sliding_window_pattern=6,
                query_pre_attn_scalar=_query_scalar(out, a),
                rope_local_base_freq=base.f32(g.get(f"{a}.rope.freq_base_swa", 10000.0)),
                final_logit_softcapping=None if cap is None else base.f32(cap))


GEMMA = base.Arch("gemma", _gemma, fix=base.minus_one_norms)
GEMMA2 = base.Arch("gemma2", _gemma2, layer=dict(base.LAYER, **SANDWICH), fix=base.minus_one_norms)
GEMMA3 = base.Arch("gemma3", _gemma3, layer=dict(base.LAYER, **SANDWICH), fix=base.minus_one_norms)
RULES = (GEMMA3, GEMMA, GEMMA2)
