"""GGUF `phi3` (Phi-3, Phi-3.5 mini, Phi-4 mini) -> Hugging Face model_type phi3.

llama.cpp's converter (Phi3MiniModel) keeps Phi-3's fused tensors as they are: qkv_proj
(q | k | v rows) is attn_qkv and gate_up_proj (gate | up rows) is ffn_up, exactly the
Hugging Face arrays kvjax's phi3 family splits. It writes:
  * rope.dimension_count = int(partial_rotary_factor * hidden_size) // heads (partial rotary);
  * attention.sliding_window, 0 for none (Phi-4 mini);
  * for longrope models, rope_scaling's long_factor / short_factor as the float32 tensors
    rope_factors_long / rope_factors_short, original_max_position_embeddings as
    rope.scaling.original_context_length and the cos/sin scale as rope.scaling.attn_factor.
kvjax turns those back into rope_scaling {rope_type: longrope, ...}; attention_factor is
kept only where it is not the default sqrt(1 + ln(s) / ln(original)), s = context /
original. The factors are float32 in the file (config.json's long_factor values usually are).
"""
from __future__ import annotations

import math

from ...hf.common import CheckpointError
from . import base

LONG, SHORT = "rope_factors_long.weight", "rope_factors_short.weight"


def _partial(g, out: dict) -> dict:
    rot = int(g.get(f"{g.arch}.rope.dimension_count", out["head_dim"]))
    if rot == out["head_dim"]:
        return {}
    prf = rot / out["head_dim"]
    if int(out["head_dim"] * prf) != rot:   # readers truncate head_dim * prf
        prf = (rot + 0.5) / out["head_dim"]
    return {"partial_rotary_factor": prf}


def _longrope(g, out: dict) -> dict | None:
    if LONG not in g.tensors and SHORT not in g.tensors:
        return None
    if LONG not in g.tensors or SHORT not in g.tensors:
        raise CheckpointError(f"{g.path}: longrope needs both {LONG!r} and {SHORT!r}")
    a, context = g.arch, out["max_position_embeddings"]
    original = int(g.get(f"{a}.rope.scaling.original_context_length"))
    scaling = {"rope_type": "longrope", "long_factor": [float(x) for x in base.small_tensor(g, LONG)],
               "short_factor": [float(x) for x in base.small_tensor(g, SHORT)]}
    s = context / original
    default = math.sqrt(1 + math.log(s) / math.log(original)) if s > 1 else 1.0
    attn = g.get(f"{a}.rope.scaling.attn_factor", default)
    if base.f32(attn) != base.f32(default):
        scaling["attention_factor"] = base.f32(attn)
    return scaling


def _config(g, out: dict) -> dict:
    a, heads = g.arch, out["num_attention_heads"]
    if out["head_dim"] != out["hidden_size"] // heads:
        raise CheckpointError(f"{g.path}: {a}.attention.key_length={out['head_dim']}; Phi-3's "
                              f"head_dim is hidden_size / heads = {out['hidden_size'] // heads}")
    window = int(g.get(f"{a}.attention.sliding_window", 0))
    rope = base.rope(g, ("none", "longrope"))
    rope["rope_scaling"] = _longrope(g, out)
    original = g.get(f"{a}.rope.scaling.original_context_length", None)
    if original is not None:
        rope["original_max_position_embeddings"] = int(original)
    cfg = dict(out, **rope, **_partial(g, out), model_type="phi3", hidden_act="silu",
               sliding_window=window or None)
    del cfg["head_dim"]   # Phi3Config has none
    return cfg


PHI3 = base.Arch("phi3", _config, layer=dict(base.LAYER, attn_qkv="self_attn.qkv_proj",
                                              ffn_up="mlp.gate_up_proj"),
                 config_tensors=(LONG, SHORT))
RULES = (PHI3,)
