"""OLMo 2: norms after attention and after the MLP instead of before ("post":
post_attention_layernorm, post_feedforward_layernorm), and q/k RMSNorm over the whole q / k
projection width (before the head split). OLMo 2's norm multiplies by the weight in
float32 and casts last; kvjax's RMSNorm casts first (Llama's order), which differs only in
the last bit of half-precision activations."""
from __future__ import annotations

from ..config import ModelConfig
from .common import Fields, common_dims, common_out, decoder_table
from .llama import ROPE_TYPES, silu_act
from .rope import read_rope, write_rope

MODEL_TYPES = ("olmo2",)
ARCHITECTURES = {"olmo2": "Olmo2ForCausalLM"}
NORMS = {"post_attention_layernorm": "post_attn_norm", "post_feedforward_layernorm": "post_mlp_norm"}


def read(f: Fields, model_type: str) -> ModelConfig:
    silu_act(f)
    bias = bool(f.get("attention_bias", False))
    dims = common_dims(f)
    return ModelConfig(
        **dims, max_position=int(f.get("max_position_embeddings", 2048)),
        norm="rmsnorm", norm_eps=float(f.get("rms_norm_eps", 1e-5)), norm_placement="post",
        mlp="swiglu", qk_norm="proj", qkv_bias=bias, out_bias=bias,
        **read_rope(f, dims["head_dim"], ROPE_TYPES),
        tie_embeddings=bool(f.get("tie_word_embeddings", False)))


def write(cfg: ModelConfig, model_type: str) -> dict:
    out = dict(common_out(cfg), hidden_act="silu", attention_bias=cfg.qkv_bias, **write_rope(cfg))
    del out["head_dim"]   # Olmo2Config has none: head_dim is hidden_size // num_attention_heads
    return out


def table(cfg: ModelConfig, model_type: str) -> list:
    return decoder_table(cfg, NORMS)
