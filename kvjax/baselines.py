"""transformers (PyTorch) on kvjax's model shapes: the baseline benchmarks compare against.

Optional: everything returns None when torch or transformers is not installed. Weights
are random; only the speed of `generate` is compared, on the same shapes and dtype.
"""
from __future__ import annotations

import statistics
import time

from .config import ModelConfig


def hf_model_like(cfg: ModelConfig):
    """A transformers causal LM with `cfg`'s shape and dtype (on CUDA when available), or None."""
    try:
        import torch
        import transformers
    except ImportError:
        return None
    if cfg.positions == "learned":
        hf_cfg = transformers.GPT2Config(n_embd=cfg.d_model, n_layer=cfg.num_layers, n_head=cfg.num_heads,
                                         n_positions=cfg.max_position, vocab_size=cfg.vocab_size)
    else:
        hf_cfg = transformers.LlamaConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.mlp_dim,
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
            max_position_embeddings=cfg.max_position, rope_theta=cfg.rope_theta,
            tie_word_embeddings=cfg.tie_embeddings)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype).eval()
    return model.to("cuda") if torch.cuda.is_available() else model


def hf_step_ms(model, vocab_size: int, batch: int, prompt_len: int, new_tokens: int, repeats: int,
               cache_implementation: str | None = None) -> float:
    """Median ms per decode step of transformers' greedy `generate`.

    (time for 2N new tokens - time for N) / N, so prefill and setup cancel out.
    cache_implementation: None for the default dynamic cache, or e.g. "static".
    """
    import torch

    ids = torch.randint(0, vocab_size, (batch, prompt_len), device=model.device)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    extra = {"cache_implementation": cache_implementation} if cache_implementation else {}

    def run(n):
        with torch.inference_mode():
            model.generate(ids, do_sample=False, min_new_tokens=n, max_new_tokens=n, pad_token_id=0,
                           **extra)
        sync()

    def median_s(n):
        run(n)  # warm-up (and, for the static cache, its allocation and compilation)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run(n)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    return 1e3 * max(median_s(2 * new_tokens) - median_s(new_tokens), 0.0) / new_tokens
