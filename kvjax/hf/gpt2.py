"""GPT-2: learned positions, LayerNorm with bias, fused c_attn (Conv1D, [in, out])."""
from __future__ import annotations

import re

from ..config import ModelConfig
from .common import Fields, Tensor

MODEL_TYPES = ("gpt2",)
ARCHITECTURES = {"gpt2": "GPT2LMHeadModel"}


def read(f: Fields, model_type: str) -> ModelConfig:
    act = f.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        f.fail(f"activation_function={act!r}; kvjax's GPT-2 MLP is the tanh GELU "
               "('gelu_new' or 'gelu_pytorch_tanh')")
    if not f.get("scale_attn_weights", True) or f.get("scale_attn_by_inverse_layer_idx", False):
        f.fail("scale_attn_weights=false / scale_attn_by_inverse_layer_idx=true are not supported "
               "(kvjax scales attention by 1/sqrt(head_dim) in every layer)")
    if f.get("add_cross_attention", False):
        f.fail("add_cross_attention=true (an encoder-decoder GPT-2) is not supported")
    d, heads = int(f.get("n_embd")), int(f.get("n_head"))
    if d % heads:
        f.fail(f"n_embd={d} is not a multiple of n_head={heads}")
    return ModelConfig(
        vocab_size=int(f.get("vocab_size")), d_model=d, num_layers=int(f.get("n_layer")),
        num_heads=heads, num_kv_heads=heads, head_dim=d // heads,
        mlp_dim=int(f.get("n_inner", 4 * d)), max_position=int(f.get("n_positions")),
        norm="layernorm", norm_eps=float(f.get("layer_norm_epsilon", 1e-5)), positions="learned",
        mlp="gelu", qkv_bias=True, out_bias=True,
        tie_embeddings=bool(f.get("tie_word_embeddings", True)))


def write(cfg: ModelConfig, model_type: str) -> dict:
    return dict(n_embd=cfg.d_model, n_layer=cfg.num_layers, n_head=cfg.num_heads,
                n_inner=cfg.mlp_dim, n_positions=cfg.max_position, n_ctx=cfg.max_position,
                activation_function="gelu_new", layer_norm_epsilon=cfg.norm_eps,
                scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
                reorder_and_upcast_attn=False)


def table(cfg: ModelConfig, model_type: str) -> list:
    t = [Tensor("transformer.wte.weight", (("embed", "embedding"),)),
         Tensor("transformer.wpe.weight", (("pos_embed", "embedding"),))]
    for i in range(cfg.num_layers):
        h, k = f"transformer.h.{i}.", f"layers_{i}"
        for hf_norm, kv_norm in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
            t += [Tensor(f"{h}{hf_norm}.weight", ((k, kv_norm, "scale"),)),
                  Tensor(f"{h}{hf_norm}.bias", ((k, kv_norm, "bias"),))]
        for kind in ("weight", "bias"):
            leaf = "kernel" if kind == "weight" else "bias"
            t += [Tensor(f"{h}attn.c_attn.{kind}", tuple((k, "attn", n, leaf) for n in "qkv"), "fused"),
                  Tensor(f"{h}attn.c_proj.{kind}", ((k, "attn", "o", leaf),)),
                  Tensor(f"{h}mlp.c_fc.{kind}", ((k, "mlp", "fc", leaf),)),
                  Tensor(f"{h}mlp.c_proj.{kind}", ((k, "mlp", "proj", leaf),))]
    t += [Tensor("transformer.ln_f.weight", (("final_norm", "scale"),)),
          Tensor("transformer.ln_f.bias", (("final_norm", "bias"),))]
    if not cfg.tie_embeddings:
        t.append(Tensor("lm_head.weight", (("lm_head", "kernel"),), "linear"))
    return t


def rename(files: dict, model_type: str) -> dict:
    """Original GPT-2 uploads were saved from GPT2Model: names lack "transformer."."""
    if "transformer.wte.weight" not in files and "wte.weight" in files:
        return {(n if n.startswith("lm_head.") else "transformer." + n): v for n, v in files.items()}
    return files


def ignorable(name: str, cfg: ModelConfig, model_type: str) -> bool:
    return bool(re.search(r"(^|\.)h\.\d+\.attn\.(masked_)?bias$", name))  # old causal-mask buffers
