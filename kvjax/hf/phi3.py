"""Phi-3: fused `qkv_proj` (q | k | v rows) and `gate_up_proj` (gate | up rows), SwiGLU,
rotary default or `longrope` (also spelled "su"; transformers maps "yarn" here too), with
`partial_rotary_factor` rotating only the first dims of each head and an optional window on
every layer (sliding_window, e.g. 2047 on Phi-3-mini-4k).

longrope: inverse frequencies 1 / (factor_i * theta ** (2i / R)) with the short factors, or
the long ones once a forward call reaches past original_max_position_embeddings; cos and sin
are multiplied by attention_factor (default sqrt(1 + ln(factor) / ln(original)), factor
defaulting to max_position_embeddings / original_max_position_embeddings).
"""
from __future__ import annotations

from ..config import ModelConfig
from .common import Fields, common_dims, common_out, decoder_table
from .llama import silu_act
from .rope import read_rope, write_rope

MODEL_TYPES = ("phi3",)
ARCHITECTURES = {"phi3": "Phi3ForCausalLM"}
NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm"}


def read(f: Fields, model_type: str) -> ModelConfig:
    silu_act(f)
    dims = common_dims(f)
    window = f.get("sliding_window", None)
    return ModelConfig(
        **dims, max_position=int(f.get("max_position_embeddings", 4096)),
        norm="rmsnorm", norm_eps=float(f.get("rms_norm_eps", 1e-5)), mlp="swiglu",
        sliding_window=None if window is None else int(window),
        **read_rope(f, dims["head_dim"], ("default", "longrope"), partial=True),
        tie_embeddings=bool(f.get("tie_word_embeddings", False)))


def write(cfg: ModelConfig, model_type: str) -> dict:
    out = dict(common_out(cfg), hidden_act="silu", sliding_window=cfg.sliding_window, **write_rope(cfg))
    del out["head_dim"]   # Phi3Config has none: head_dim is hidden_size // num_attention_heads
    # Phi3Config's defaults (pad/eos 32000) would fall outside a small vocabulary; save_hf
    # fills in the ids it knows.
    out.update(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return out


def table(cfg: ModelConfig, model_type: str) -> list:
    return decoder_table(cfg, NORMS, fused=True)
