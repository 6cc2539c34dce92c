"""Llama 2/3, Mistral and Qwen2: RMSNorm, SwiGLU, rotary (default or llama3 scaling).

Mistral's window covers every layer. Qwen2 puts its window (with use_sliding_window) on the
layers `layer_types` marks "sliding_attention", or, in configs without layer_types, on the
layers at index >= max_window_layers; a mix of windowed and full layers is a ModelConfig
with `layer_types`.
"""
from __future__ import annotations

from ..config import ModelConfig
from .common import Fields, common_dims, common_out, decoder_table, hf_layer_types, read_windows
from .rope import read_rope, write_rope

MODEL_TYPES = ("llama", "mistral", "qwen2")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM"}
ROPE_TYPES = ("default", "llama3")
NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm"}


def silu_act(f: Fields, key: str = "hidden_act"):
    act = f.get(key, "silu")
    if act not in ("silu", "swish"):
        f.fail(f"{key}={act!r}; kvjax's SwiGLU MLP uses 'silu'")


def qwen_windows(f: Fields) -> dict:
    """Qwen2/Qwen3: the window applies only with use_sliding_window, on the layers layer_types
    (or max_window_layers: index >= it) marks sliding."""
    n = int(f.get("num_hidden_layers"))
    window = f.get("sliding_window", None) if f.get("use_sliding_window", False) else None
    first = int(f.get("max_window_layers", n))
    default = ["sliding_attention" if window is not None and i >= first else "full_attention"
               for i in range(n)]
    return read_windows(f, window, default)


def write_qwen_windows(cfg: ModelConfig) -> dict:
    types = hf_layer_types(cfg)
    sliding = [t == "sliding_attention" for t in types]
    # transformers 4.x reads max_window_layers (window on layers >= it); 5 reads layer_types.
    first = sliding.index(True) if any(sliding) else cfg.num_layers
    return dict(use_sliding_window=any(sliding), sliding_window=cfg.sliding_window if any(sliding) else None,
                max_window_layers=first, layer_types=types)


def read(f: Fields, model_type: str) -> ModelConfig:
    silu_act(f)
    qkv_bias = out_bias = False
    if model_type == "qwen2":
        qkv_bias = True
        windows = qwen_windows(f)
    else:
        if model_type == "llama":
            if f.get("mlp_bias", False):
                f.fail("mlp_bias=true is not supported (kvjax's SwiGLU has no biases)")
            qkv_bias = out_bias = bool(f.get("attention_bias", False))
            window = None
        else:
            window = f.get("sliding_window", None)
        n = int(f.get("num_hidden_layers"))
        windows = read_windows(f, window, ["sliding_attention"] * n)
    dims = common_dims(f)
    return ModelConfig(
        **dims, max_position=int(f.get("max_position_embeddings", 2048)),
        norm="rmsnorm", norm_eps=float(f.get("rms_norm_eps", 1e-6)), positions="rotary",
        mlp="swiglu", qkv_bias=qkv_bias, out_bias=out_bias, **windows,
        **read_rope(f, dims["head_dim"], ROPE_TYPES),
        tie_embeddings=bool(f.get("tie_word_embeddings", False)))


def write(cfg: ModelConfig, model_type: str) -> dict:
    out = dict(common_out(cfg), hidden_act="silu", **write_rope(cfg))
    if model_type == "llama":
        out.update(attention_bias=cfg.qkv_bias, mlp_bias=False)
    elif model_type == "mistral":
        out.update(sliding_window=cfg.sliding_window)
    else:
        out.update(write_qwen_windows(cfg))
    return out


def table(cfg: ModelConfig, model_type: str) -> list:
    return decoder_table(cfg, NORMS)
