"""Tiny Hugging Face models and tokenizers built locally for the checkpoint tests (no downloads).

Used by test_hf_parity.py, test_hf_checkpoints.py, test_tokenizer.py, test_generate_cli.py.

Each VARIANTS entry is one supported family with the layout it covers:
  gpt2     MHA (4/4 heads), tied embeddings, learned positions, fused c_attn (Conv1D)
  llama2   GQA (4 q / 2 kv heads), untied, head_dim 24 (not hidden/heads = 16), attention_bias
  llama3   MHA, tied, rope_theta 5e5 with llama3 rope scaling (original context 32)
  mistral  MQA (4 q / 1 kv head), untied, sliding_window 8, far shorter than the test sequences
  qwen2    GQA (4/2), q/k/v bias, tied, rope_theta 1e6
Every head_dim is 16 or 24, never 64.
"""
from __future__ import annotations

import json
from pathlib import Path

VOCAB = 320

VARIANTS = {
    "gpt2": ("gpt2", dict(n_embd=64, n_layer=2, n_head=4, n_positions=128)),
    "llama2": ("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                             attention_bias=True, tie_word_embeddings=False,
                             max_position_embeddings=256)),
    "llama3": ("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=4,
                             tie_word_embeddings=True, max_position_embeddings=256,
                             rope_theta=500000.0,
                             rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 32})),
    "mistral": ("mistral", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=1, sliding_window=8,
                                tie_word_embeddings=False, max_position_embeddings=256)),
    "qwen2": ("qwen2", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                            max_position_embeddings=256, rope_theta=1e6)),
}

# Random tiny models at the default initializer_range (0.02) have nearly flat logits, so a
# float32 rounding difference between two correct implementations can flip a greedy argmax.
# Weights are redrawn with this std (norm weights 1 + N(0, 0.2), biases N(0, 0.2)) so top
# logits are decisive and any mapping error shows up as a large difference.
WEIGHT_STD = 0.3


def random_params(cfg, seed: int = 0, std: float = 0.2):
    """Random kvjax parameters with the model's exact tree, drawn on the host.

    Norm scales are 1 + N(0, std); everything else N(0, std). Cheaper than init_params in
    tests that need many configs (no compilation).
    """
    import jax.numpy as jnp
    import numpy as np

    from kvjax.hf import _param_shapes

    rng = np.random.default_rng(seed)
    tree = {}
    for path, shape in _param_shapes(cfg).items():
        value = rng.normal(0.0, std, shape) + (1.0 if path[-1] == "scale" else 0.0)
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = jnp.asarray(value, cfg.dtype)
    return tree


def hf_model(variant: str, seed: int = 0, **overrides):
    """A transformers causal LM for VARIANTS[variant], float32, eval mode, random weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, kwargs = VARIANTS[variant]
    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, bos_token_id=None,
                                  eos_token_id=None, pad_token_id=None,
                                  **{**kwargs, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager",
                                             dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim >= 2:
                p.copy_(noise * WEIGHT_STD)
            elif name.endswith("bias"):
                p.copy_(noise * 0.2)
            else:  # norm weights
                p.copy_(1.0 + noise * 0.2)
    return model.eval()


CORPUS = [
    "The quick brown fox jumps over the lazy dog. ",
    "Key-value caches keep the keys and values of earlier tokens. ",
    "Grouped-query attention shares each key head among several query heads. ",
    "Sliding windows bound the cache; rotary positions rotate queries and keys. ",
    "Ünïcödé and emoji 🙂 are bytes too. ",
] * 20


def make_hf_tokenizer(folder, vocab_size: int = 300, bos: bool = True):
    """Train a byte-level BPE tokenizer.json (with <s>, </s>, <pad>) into `folder`.

    With `bos`, the post-processor prepends <s> (as Llama's does). Returns the folder.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
         "tokenizer_class": "PreTrainedTokenizerFast"}))
    return folder


LOGIT_TOL = 2e-5          # max abs logit error, relative to max |logit| (float32 parity)


def assert_logits_close(got, ref, tol: float = LOGIT_TOL) -> float:
    """Max |logit error| within tol x max |logit|; returns the relative error."""
    import numpy as np

    scale = float(np.abs(ref).max())
    err = float(np.abs(got - ref).max())
    assert err <= tol * scale, f"max |logit error| {err:.3g} > {tol} x logit scale {scale:.3g}"
    return err / scale


def pad_rows(prompts, rows, width: int):
    """The prompts of `rows`, right-padded to `width`: (tokens int32 [len(rows), width], lengths)."""
    import numpy as np

    toks = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        toks[i, : len(prompts[r])] = prompts[r]
    return toks, np.array([len(prompts[r]) for r in rows], np.int32)
