"""Gemma 1, 2 and 3 (text), and the language model of multimodal Gemma 3 checkpoints.

Every Gemma: RMSNorm as x * (1 + w) in float32 ("gemma_rmsnorm"), embeddings times
sqrt(hidden_size) rounded to the weight dtype, GeGLU with the tanh GELU, explicit
head_dim, tied embeddings by default.
Gemma 2 adds four norms per layer ("sandwich": input, post-attention, pre- and
post-feedforward), attention scaled by query_pre_attn_scalar ** -0.5, tanh soft-capping of
attention scores (attn_logit_softcapping) and final logits (final_logit_softcapping), and
sliding/full layers (layer_types; older configs: every even layer slides).
Gemma 3 adds per-head q/k norms (1 + w), five local layers per global one
(sliding_window_pattern 6 in older configs), a local rotary base for sliding layers
(rope_local_base_freq, or rope_parameters["sliding_attention"]) and linear scaling on the
global ones only. transformers' Gemma 3 attention ignores attn_logit_softcapping, and so
does kvjax.

A multimodal `gemma3` checkpoint (Gemma3ForConditionalGeneration) nests the text model's
config in `text_config` and stores its weights under `model.language_model.` (transformers
5) or `language_model.model.` (4.x); kvjax loads that language model (text in, text out).
Images are not supported: the vision tower and projector tensors are skipped with a warning.
"""
from __future__ import annotations

from ..config import ModelConfig
from .common import Fields, common_dims, common_out, decoder_table, hf_layer_types, read_windows
from .rope import read_rope, write_rope

MODEL_TYPES = ("gemma", "gemma2", "gemma3_text", "gemma3")
ARCHITECTURES = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
                 "gemma3_text": "Gemma3ForCausalLM", "gemma3": "Gemma3ForConditionalGeneration"}
SANDWICH = {"input_layernorm": "attn_norm", "post_attention_layernorm": "post_attn_norm",
            "pre_feedforward_layernorm": "mlp_norm", "post_feedforward_layernorm": "post_mlp_norm"}
PRE = {"input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm"}
_TANH = ("gelu_pytorch_tanh", "gelu_new")

# Gemma3TextConfig's defaults: a multimodal checkpoint's text_config lists only some keys.
GEMMA3_TEXT_DEFAULTS = dict(
    vocab_size=262_208, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
    hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131_072, rms_norm_eps=1e-6,
    query_pre_attn_scalar=256, sliding_window=4096, tie_word_embeddings=True)
# The weight prefixes of a multimodal Gemma 3's language model, and of its vision parts.
TEXT_PREFIXES = (("model.language_model.", "lm_head.weight"),                   # transformers 5
                 ("language_model.model.", "language_model.lm_head.weight"))    # transformers 4.x
VISION_PREFIXES = ("model.vision_tower.", "model.multi_modal_projector.", "vision_tower.",
                   "multi_modal_projector.")


def text_fields(f: Fields, model_type: str) -> Fields:
    """The Fields of the language model: the nested text_config of a multimodal gemma3."""
    if model_type != "gemma3":
        return f
    text = f.get("text_config", {})
    if not isinstance(text, dict):
        f.fail(f"text_config must be an object, got {text!r}")
    tie = f.hf.get("tie_word_embeddings", text.get("tie_word_embeddings", True))
    return Fields({**text, "model_type": "gemma3_text", "tie_word_embeddings": tie},
                  f"{f.source} (text_config)", GEMMA3_TEXT_DEFAULTS)


def read(f: Fields, model_type: str) -> ModelConfig:
    f = text_fields(f, model_type)
    text = "gemma" if model_type == "gemma" else "gemma2" if model_type == "gemma2" else "gemma3_text"
    act_key = "hidden_act" if text == "gemma" else "hidden_activation"
    act = f.get(act_key, f.get("hidden_act", "gelu_pytorch_tanh"))
    if act not in _TANH + (("gelu",) if text == "gemma" else ()):  # Gemma 1's "gelu" means tanh
        f.fail(f"{act_key}={act!r} is not supported; kvjax's GeGLU uses the tanh GELU "
               f"('gelu_pytorch_tanh')")
    if f.get("use_bidirectional_attention", False):
        f.fail("use_bidirectional_attention=true (an embedding model) is not supported; kvjax "
               "decodes causally")
    bias = bool(f.get("attention_bias", False))
    dims = common_dims(f)
    n = dims["num_layers"]
    out = dict(**dims, max_position=int(f.get("max_position_embeddings", 8192)),
               norm="gemma_rmsnorm", norm_eps=float(f.get("rms_norm_eps", 1e-6)), mlp="geglu",
               embed_scale=True, qkv_bias=bias, out_bias=bias,
               tie_embeddings=bool(f.get("tie_word_embeddings", True)))
    if text == "gemma":
        return ModelConfig(**out, **read_rope(f, dims["head_dim"], ("default",)))
    pattern = int(f.get("sliding_window_pattern", 2 if text == "gemma2" else 6))
    default = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    out.update(norm_placement="sandwich", **read_windows(f, _explicit(f, "sliding_window", 4096), default),
               query_pre_attn_scalar=float(f.get("query_pre_attn_scalar", 256)))
    if text == "gemma2":
        for key, field in (("attn_logit_softcapping", "attn_softcap"),
                           ("final_logit_softcapping", "final_softcap")):
            value = _explicit(f, key, 50.0 if field == "attn_softcap" else 30.0)
            out[field] = None if value is None else float(value)
        return ModelConfig(**out, **read_rope(f, dims["head_dim"], ("default",)))
    if model_type == "gemma3_text":   # Gemma3ForConditionalGeneration's head has no softcap
        cap = f.get("final_logit_softcapping", None)
        out["final_softcap"] = None if cap is None else float(cap)
    return ModelConfig(**out, qk_norm="head",
                       **read_rope(f, dims["head_dim"], ("default", "linear"),
                                   default_theta=1_000_000.0, default_local=10_000.0))


def _explicit(f: Fields, key, default):
    """config[key] where an explicit null means None (no cap, no window); the class default
    when the key is absent."""
    return f.hf[key] if key in f.hf else f.defaults.get(key, default)


def write(cfg: ModelConfig, model_type: str) -> dict:
    out = dict(common_out(cfg), attention_bias=cfg.qkv_bias, **write_rope(cfg))
    if model_type == "gemma":
        return dict(out, hidden_act="gelu_pytorch_tanh")
    scalar = cfg.query_pre_attn_scalar
    if scalar is not None and float(scalar).is_integer():
        scalar = int(scalar)   # transformers 5's config class requires an int
    out.update(hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=scalar,
               sliding_window=cfg.sliding_window, layer_types=hf_layer_types(cfg),
               final_logit_softcapping=cfg.final_softcap)
    if model_type == "gemma2":
        out.update(attn_logit_softcapping=cfg.attn_softcap)
    else:
        out.update(attn_logit_softcapping=None, use_bidirectional_attention=False)
    return out


def table(cfg: ModelConfig, model_type: str) -> list:
    norms = PRE if model_type == "gemma" else SANDWICH
    if model_type == "gemma3":
        return decoder_table(cfg, norms, prefix=TEXT_PREFIXES[0][0], head=TEXT_PREFIXES[0][1])
    return decoder_table(cfg, norms)


def rename(files: dict, model_type: str) -> dict:
    """A transformers 4.x multimodal Gemma 3 stores its language model under
    `language_model.model.`: read it under transformers 5's names."""
    if model_type != "gemma3":
        return files
    (new, new_head), (old, old_head) = TEXT_PREFIXES
    out = {}
    for n, v in files.items():
        if n.startswith(old):
            n = new + n[len(old):]
        elif n == old_head:
            n = new_head
        out[n] = v
    return out


def ignorable(name: str, cfg: ModelConfig, model_type: str) -> bool:
    return model_type == "gemma3" and name.startswith(VISION_PREFIXES)
