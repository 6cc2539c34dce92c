"""Rotary settings from both config styles, and back.

transformers < 5 writes top-level `rope_theta`, `rope_scaling` ({"rope_type" or "type", ...}),
`partial_rotary_factor` and, for Gemma 3, `rope_local_base_freq`. transformers 5 writes one
`rope_parameters` dict (holding rope_theta, rope_type, partial_rotary_factor and the
scaling keys) or, for models with several layer types (Gemma 3), one such dict per type:
{"full_attention": {...}, "sliding_attention": {...}}. Both read to the same ModelConfig
fields: rope_theta, rope_scaling, rope_local_theta (sliding layers, unscaled) and rotary_dim.
kvjax writes the transformers 4.x style, which transformers 5 still reads.
"""
from __future__ import annotations

from ..config import ModelConfig, RopeScaling
from .common import Fields

_NESTED = ("full_attention", "sliding_attention")


def read_rope(f: Fields, head_dim: int, allowed: tuple, default_theta: float = 10000.0,
              default_local: float | None = None, partial: bool = False) -> dict:
    """ModelConfig rotary fields from config.json. allowed: the rope types this family runs
    (a subset of default, linear, llama3, longrope); default_local: set for families with a
    local rotary base on sliding layers (Gemma 3), which then always get rope_local_theta;
    partial: the family's attention honours partial_rotary_factor (Phi-3)."""
    params = f.get("rope_parameters", {})
    if not isinstance(params, dict):
        f.fail(f"rope_parameters must be an object, got {params!r}")
    prf = f.get("partial_rotary_factor", None)
    local_theta = None
    if any(k in params for k in _NESTED):
        unknown = sorted(set(params) - set(_NESTED))
        if unknown:
            f.fail(f"rope_parameters mixes per-layer-type entries with {unknown}")
        full = dict(params.get("full_attention") or {})
        sliding = dict(params.get("sliding_attention") or {})
        theta = float(full.get("rope_theta", f.get("rope_theta", default_theta)))
        scaling = {**full, **(f.get("rope_scaling", {}) or {})}
        kind = sliding.get("rope_type", sliding.get("type", "default"))
        if kind != "default":
            f.fail(f"rope_parameters['sliding_attention'] rope_type {kind!r} is not supported: "
                   f"kvjax scales the rotary table of full-attention layers only")
        if sliding:
            local_theta = float(sliding.get("rope_theta", f.get("rope_local_base_freq",
                                                                  default_local or theta)))
        prf = full.get("partial_rotary_factor", prf)
        if sliding.get("partial_rotary_factor", prf) != prf:
            f.fail("rope_parameters gives sliding and full layers different partial_rotary_factor")
    else:
        theta = float(params.get("rope_theta", f.get("rope_theta", default_theta)))
        scaling = f.get("rope_scaling", {}) or params
        prf = params.get("partial_rotary_factor", prf)
    if default_local is None and local_theta == theta and \
            scaling.get("rope_type", scaling.get("type", "default")) == "default":
        local_theta = None   # one table for every layer
    if default_local is not None and local_theta is None:
        local_theta = float(f.get("rope_local_base_freq", default_local))
    rotary_dim = None
    if prf is not None and float(prf) != 1.0:
        prf = float(prf)
        if not partial:
            f.fail(f"partial_rotary_factor={prf} is not supported for {f.model_type} (its attention "
                   f"rotates whole heads)")
        rotary_dim = int(head_dim * prf)   # transformers: int(head_dim * partial_rotary_factor)
        if not 0 < prf < 1 or rotary_dim % 2:
            f.fail(f"partial_rotary_factor={prf} gives {rotary_dim} rotated dims of head_dim={head_dim}; "
                   f"kvjax needs an even count in (0, head_dim]")
    out = dict(rope_theta=theta, rope_scaling=_scaling(f, scaling, allowed, rotary_dim or head_dim),
               rotary_dim=rotary_dim)
    if local_theta is not None:
        out["rope_local_theta"] = local_theta
    return out


def _scaling(f: Fields, scaling: dict, allowed: tuple, R: int) -> RopeScaling | None:
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if f.model_type == "phi3" and kind in ("su", "yarn"):
        kind = "longrope"   # transformers' Phi3Config renames both
    if kind not in allowed:
        f.fail(f"rope scaling type {kind!r} is not supported for {f.model_type}; "
               f"supported: {', '.join(allowed)}")
    try:
        if kind == "default":
            return None
        if kind == "linear":
            return RopeScaling(rope_type="linear", factor=float(scaling["factor"]))
        if kind == "llama3":
            return RopeScaling(factor=float(scaling["factor"]),
                               low_freq_factor=float(scaling["low_freq_factor"]),
                               high_freq_factor=float(scaling["high_freq_factor"]),
                               original_max_position=int(scaling["original_max_position_embeddings"]))
        # longrope: Phi-3's top-level original_max_position_embeddings wins, as in transformers.
        original = int(f.get("original_max_position_embeddings",
                             scaling.get("original_max_position_embeddings",
                                         f.get("max_position_embeddings"))))
        factor = scaling.get("factor")
        if factor is None:  # transformers: the context extension ratio
            factor = f.get("max_position_embeddings") / original
        attention = scaling.get("attention_factor")
        short, long = tuple(map(float, scaling["short_factor"])), tuple(map(float, scaling["long_factor"]))
    except KeyError as e:
        f.fail(f"{kind} rope scaling needs {e.args[0]!r}; got {scaling}")
    for name, factors in (("short_factor", short), ("long_factor", long)):
        if len(factors) != R // 2:
            f.fail(f"longrope {name} has {len(factors)} entries; the {R} rotated dims need {R // 2}")
    return RopeScaling(rope_type="longrope", factor=float(factor), original_max_position=original,
                       short_factor=short, long_factor=long,
                       attention_factor=None if attention is None else float(attention))


def write_rope(cfg: ModelConfig) -> dict:
    """config.json rotary keys, transformers 4.x style (read by transformers 5 too)."""
    out = {"rope_theta": cfg.rope_theta, "rope_scaling": None}
    rs = cfg.rope_scaling
    if rs is not None and rs.rope_type == "linear":
        out["rope_scaling"] = {"rope_type": "linear", "factor": rs.factor}
    elif rs is not None and rs.rope_type == "llama3":
        out["rope_scaling"] = {"rope_type": "llama3", "factor": rs.factor,
                               "low_freq_factor": rs.low_freq_factor,
                               "high_freq_factor": rs.high_freq_factor,
                               "original_max_position_embeddings": rs.original_max_position}
    elif rs is not None:
        out["rope_scaling"] = {"rope_type": "longrope", "factor": rs.factor,
                               "short_factor": list(rs.short_factor), "long_factor": list(rs.long_factor),
                               "original_max_position_embeddings": rs.original_max_position}
        if rs.attention_factor is not None:
            out["rope_scaling"]["attention_factor"] = rs.attention_factor
        out["original_max_position_embeddings"] = rs.original_max_position
    if cfg.rotary_dim is not None and cfg.rotary_dim != cfg.head_dim:
        prf = cfg.rotary_dim / cfg.head_dim
        if int(cfg.head_dim * prf) != cfg.rotary_dim:   # readers truncate head_dim * prf
            prf = (cfg.rotary_dim + 0.5) / cfg.head_dim
        out["partial_rotary_factor"] = prf
    if cfg.rope_local_theta is not None:
        out["rope_local_base_freq"] = cfg.rope_local_theta
    return out
