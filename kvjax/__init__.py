"""kvjax: fast autoregressive decoding in JAX, built around an explicit KV cache."""
from .cache import KVCache, cache_bytes, init_cache
from .config import PRESETS, ModelConfig, RopeScaling
from .decode import GenerateOutput, decode_step, forward, generate, prefill
from .model import Transformer, init_params, param_bytes, param_count
from .sampling import filter_logits, greedy, sample
from .sharding import init_distributed, make_mesh, shard_params
from .persist import load_cache, save_cache
from .hf import CheckpointError, load_hf, save_hf
from .tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer
from .models import load_model
from .engine import Completion, Engine, RequestHandle, SamplingParams, TokenLogprob
from .decode.speculative import DraftModel, PromptLookup

__version__ = "0.1.0"

__all__ = [
    "KVCache", "cache_bytes", "init_cache", "PRESETS", "ModelConfig", "RopeScaling",
    "GenerateOutput", "decode_step", "forward", "generate", "prefill", "Transformer",
    "init_params", "param_bytes", "param_count", "filter_logits", "greedy", "sample",
    "init_distributed", "make_mesh", "shard_params", "load_cache", "save_cache",
    "CheckpointError", "load_hf", "save_hf", "ByteTokenizer", "HFTokenizer", "Tokenizer",
    "load_tokenizer", "load_model", "Engine", "RequestHandle", "SamplingParams", "TokenLogprob", "Completion",
    "PromptLookup", "DraftModel",
]
