"""Model configuration: one frozen, hashable dataclass that switches between families.

`ModelConfig` is a value: it is hashed by `jax.jit` as a static argument, so every
field is an immutable scalar, string or tuple. It holds no logic beyond validation.

Families (see `PRESETS`):
  GPT-2:   learned positions, LayerNorm with bias, GELU (tanh) MLP, biases everywhere,
           tied embeddings, multi-head attention.
  Llama:   rotary positions (optionally Llama-3 scaled), RMSNorm, SwiGLU, GQA/MQA via
           `num_kv_heads`, no biases; Mistral adds `sliding_window`, Qwen2 adds q/k/v bias.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass

_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency-dependent rope scaling (HF `rope_scaling.rope_type == "llama3"`)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    max_position: int = 2048          # learned-position table size; rotary models: advertised context
    norm: str = "rmsnorm"             # "rmsnorm" | "layernorm"
    norm_eps: float = 1e-5
    positions: str = "rotary"         # "rotary" | "learned"
    mlp: str = "swiglu"               # "swiglu" | "gelu" (tanh approximation, GPT-2's gelu_new)
    qkv_bias: bool = False            # GPT-2 and Qwen2
    out_bias: bool = False            # attention output and MLP biases (GPT-2)
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    sliding_window: int | None = None  # Mistral: a query sees keys with q_pos - k_pos < window
    attention_sinks: int = 0          # StreamingLLM pattern: positions < this stay visible past the
                                      # window, with rotary positions assigned by place in the cache
    tie_embeddings: bool = False
    dtype: str = "float32"            # parameter and activation dtype; softmax/norms run in float32
    name: str = "custom"

    def __post_init__(self):
        for f in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                  "mlp_dim", "max_position"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"ModelConfig.{f} must be a positive int, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"ModelConfig.num_heads={self.num_heads} must be a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        _check_choice("norm", self.norm, ("rmsnorm", "layernorm"))
        _check_choice("positions", self.positions, ("rotary", "learned"))
        _check_choice("mlp", self.mlp, ("swiglu", "gelu"))
        _check_choice("dtype", self.dtype, _DTYPES)
        if self.positions == "rotary" and self.head_dim % 2:
            raise ValueError(f"rotary positions need an even head_dim, got {self.head_dim}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"ModelConfig.sliding_window must be >= 1 or None, got {self.sliding_window}")
        if self.attention_sinks < 0 or (self.attention_sinks and self.sliding_window is None):
            raise ValueError(f"ModelConfig.attention_sinks={self.attention_sinks} needs a sliding_window "
                             f"(sinks only matter where a window hides old tokens) and must be >= 0")

    @property
    def num_groups(self) -> int:
        """Query heads per kv head (G)."""
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes) -> "ModelConfig":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s) {sorted(unknown)}; "
                             f"fields are {[f.name for f in dataclasses.fields(self)]}")
        return dataclasses.replace(self, **changes)

    @staticmethod
    def presets() -> list[str]:
        return sorted(PRESETS)

    @staticmethod
    def preset(name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            close = difflib.get_close_matches(name, PRESETS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown preset {name!r}{hint}; presets are {sorted(PRESETS)}")
        return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]


def _check_choice(field: str, value, allowed):
    if value not in allowed:
        raise ValueError(f"ModelConfig.{field}={value!r} is not one of {list(allowed)}")


def _gpt2(name, d, layers, heads, vocab=50257, max_position=1024):
    return ModelConfig(vocab_size=vocab, d_model=d, num_layers=layers, num_heads=heads,
                       num_kv_heads=heads, head_dim=d // heads, mlp_dim=4 * d,
                       max_position=max_position, norm="layernorm", positions="learned",
                       mlp="gelu", qkv_bias=True, out_bias=True, tie_embeddings=True, name=name)


def _llama(name, d, layers, heads, kv_heads, mlp, vocab=32000, head_dim=None, **kw):
    return ModelConfig(vocab_size=vocab, d_model=d, num_layers=layers, num_heads=heads,
                       num_kv_heads=kv_heads, head_dim=head_dim or d // heads, mlp_dim=mlp,
                       name=name, **kw)


PRESETS: dict[str, ModelConfig] = {
    # Tiny shapes for tests and CPU demos. Vocab 256+ covers byte-level tokenizers.
    "gpt2-tiny": _gpt2("gpt2-tiny", 64, 2, 4, vocab=320, max_position=256),
    "llama-tiny": _llama("llama-tiny", 64, 2, 4, 2, 128, vocab=320, max_position=1024),
    "mistral-tiny": _llama("mistral-tiny", 64, 2, 4, 2, 128, vocab=320, max_position=1024,
                           sliding_window=8),
    "qwen2-tiny": _llama("qwen2-tiny", 64, 2, 4, 2, 128, vocab=320, max_position=1024,
                         qkv_bias=True, rope_theta=1e6, norm_eps=1e-6, tie_embeddings=True),
    "mqa-tiny": _llama("mqa-tiny", 64, 2, 4, 1, 128, vocab=320, max_position=1024),
    "llama3-tiny": _llama("llama3-tiny", 64, 2, 4, 2, 128, vocab=320, max_position=1024,
                          rope_theta=500000.0,
                          rope_scaling=RopeScaling(factor=8.0, original_max_position=64)),
    # Full-size shapes for benchmarks (random weights).
    "gpt2-small": _gpt2("gpt2-small", 768, 12, 12),
    "llama-1b": _llama("llama-1b", 2048, 22, 32, 4, 5632, max_position=2048),  # TinyLlama-1.1B
    "llama-7b": _llama("llama-7b", 4096, 32, 32, 32, 11008, max_position=4096),  # Llama-2-7B
}
