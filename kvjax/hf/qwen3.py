"""Qwen3: as Qwen2 without the q/k/v bias (attention_bias covers q, k, v and o), plus
per-head q/k RMSNorm over head_dim before rotary, and an explicit head_dim."""
from __future__ import annotations

from ..config import ModelConfig
from .common import Fields, common_dims, common_out, decoder_table
from .llama import NORMS, ROPE_TYPES, qwen_windows, silu_act, write_qwen_windows
from .rope import read_rope, write_rope

MODEL_TYPES = ("qwen3",)
ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM"}


def read(f: Fields, model_type: str) -> ModelConfig:
    silu_act(f)
    bias = bool(f.get("attention_bias", False))
    dims = common_dims(f)
    return ModelConfig(
        **dims, max_position=int(f.get("max_position_embeddings", 32768)),
        norm="rmsnorm", norm_eps=float(f.get("rms_norm_eps", 1e-6)), mlp="swiglu", qk_norm="head",
        qkv_bias=bias, out_bias=bias, **qwen_windows(f), **read_rope(f, dims["head_dim"], ROPE_TYPES),
        tie_embeddings=bool(f.get("tie_word_embeddings", False)))


def write(cfg: ModelConfig, model_type: str) -> dict:
    return dict(common_out(cfg), hidden_act="silu", attention_bias=cfg.qkv_bias, **write_rope(cfg),
                **write_qwen_windows(cfg))


def table(cfg: ModelConfig, model_type: str) -> list:
    return decoder_table(cfg, NORMS)
