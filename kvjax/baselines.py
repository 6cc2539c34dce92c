"""transformers (PyTorch) as the baseline benchmarks compare against.

Optional: the model builders return None when torch or transformers is not installed.
`hf_model_like(cfg)`: random weights of a kvjax shape (only speed is compared, same shape
and dtype). `hf_pretrained(name_or_path)`: the same checkpoint `kvjax.load_model` reads
(a packaged GGUF name, a .gguf path, a Hugging Face folder or a bundled name), loaded by
transformers itself, so both libraries run the same weights. `hf_step_timing` times
either (any loaded transformers causal LM).
"""
from __future__ import annotations

from pathlib import Path

from .bundled import bundled_names, bundled_path
from .config import ModelConfig
from .models import PACKAGED, packaged_path

_TORCH_DTYPES = ("float32", "bfloat16", "float16")


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
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=getattr(torch, cfg.dtype)).eval()
    return model.to("cuda") if torch.cuda.is_available() else model


def checkpoint_path(name_or_path) -> Path:
    """The file or folder `kvjax.load_model(name_or_path)` reads: a packaged name's .gguf,
    a bundled model's folder, or the path itself. FileNotFoundError when there is none;
    ModelNotInstalled (an ImportError with the pip command) for a missing package."""
    spec = str(name_or_path)
    if spec in PACKAGED:
        return packaged_path(spec)
    path = Path(spec).expanduser()
    if spec in bundled_names() and not path.exists():
        return bundled_path(spec)
    if not path.exists():
        raise FileNotFoundError(f"model {spec!r}: no such file or folder, and not a packaged "
                                f"({', '.join(PACKAGED)}) or bundled ({', '.join(bundled_names())}) name")
    return path


def hf_pretrained(name_or_path, dtype: str = "float32"):
    """transformers' causal LM on the checkpoint `kvjax.load_model(name_or_path)` reads (the
    same weights: a .gguf file through transformers' own GGUF loader, which dequantises it
    to `dtype`; a folder through from_pretrained), in eval mode, on CUDA when available;
    None when torch or transformers is not installed."""
    if dtype not in _TORCH_DTYPES:
        raise ValueError(f"hf_pretrained: dtype must be one of {_TORCH_DTYPES}, got {dtype!r}")
    try:
        import torch
        import transformers
    except ImportError:
        return None
    path = checkpoint_path(name_or_path)
    gguf = path.is_file() and path.suffix == ".gguf"
    folder, kw = (path.parent, {"gguf_file": path.name}) if gguf else (path, {})
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=getattr(torch, dtype), **kw).eval()
    return model.to("cuda") if torch.cuda.is_available() else model


def hf_step_timing(model, vocab_size: int, batch: int, prompt_len: int, new_tokens: int,
                   cache_implementation: str | None = None, seed: int = 0, **measure_kw):
    """Per-step Timing of transformers' greedy decode loop on its own cache, prefill excluded.

    `model`: any loaded transformers causal LM (`hf_model_like`, `hf_pretrained`, or one the
    caller loaded itself); `vocab_size` bounds the random prompt ids.

    The prompt is prefilled once, untimed. A timed call runs `new_tokens` steps of the loop
    `generate` runs (the model's forward on one token per row with its cache, then argmax),
    after rewinding the cache to the prompt (`crop`; with transformers 4.x a StaticCache
    is simply overwritten from the prompt's end, its positions given explicitly), so every call does the same work at the same
    context. Measured with `kvjax.timing.measure` (warm, calibrated, repeated), synchronising
    CUDA when the model is on a GPU. cache_implementation: None (DynamicCache) or "static".
    """
    import torch
    from transformers import DynamicCache, StaticCache

    from .timing import measure

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch, prompt_len), generator=gen).to(model.device)
    cuda = model.device.type == "cuda"
    sync = (lambda _: torch.cuda.synchronize()) if cuda else (lambda _: None)
    if cache_implementation == "static":
        cache = StaticCache(config=model.config, max_cache_len=prompt_len + new_tokens)
    elif cache_implementation is None:
        cache = DynamicCache()
    else:
        raise ValueError(f"cache_implementation must be None or 'static', got {cache_implementation!r}")
    positions = [torch.tensor([prompt_len + i], device=model.device) for i in range(new_tokens)]
    import inspect   # transformers 5.2x: forward takes `cache` (not past_key_values), no cache_position
    accepts = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in accepts else "past_key_values"
    by_position = "cache_position" in accepts   # 4.x: positions given; 5.x: from the cache's length
    where = (lambda pos: {"cache_position": pos}) if by_position else (lambda pos: {})  # noqa: E731
    with torch.inference_mode():
        out = model(ids, **{cache_kw: cache}, use_cache=True,
                    **where(torch.arange(prompt_len, device=model.device)))
        first = out.logits[:, -1].argmax(-1, keepdim=True)

        def call(_):
            extra = cache.get_seq_length() - prompt_len
            if extra and (cache_implementation is None or not by_position):
                cache.crop(-extra)   # negative: drop that many (the same meaning in 4.x and 5.x)
            tok = first
            for pos in positions:
                logits = model(tok, **{cache_kw: cache}, use_cache=True, **where(pos)).logits
                tok = logits[:, -1].argmax(-1, keepdim=True)
            return tok

        _, t = measure(call, None, units=new_tokens, sync=sync, **measure_kw)
    return t
