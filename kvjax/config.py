"""Model configuration: one frozen, hashable dataclass that switches between families.

`ModelConfig` is a value: it is hashed by `jax.jit` as a static argument, so every
field is an immutable scalar, string or tuple. It holds no logic beyond validation.

Families (see `PRESETS`):
  GPT-2:   learned positions, LayerNorm with bias, GELU (tanh) MLP, biases everywhere,
           tied embeddings, multi-head attention.
  Llama:   rotary positions (optionally Llama-3 scaled), RMSNorm, SwiGLU, GQA/MQA via
           `num_kv_heads`, no biases; Mistral adds `sliding_window`, Qwen2 adds q/k/v bias.
  Gemma:   RMSNorm as x * (1 + w) in float32 ("gemma_rmsnorm"), embeddings scaled by
           sqrt(d_model), GeGLU; Gemma 2/3 add sandwich norms, soft-capping,
           `query_pre_attn_scalar` and sliding/full layers (`layer_types`); Gemma 3 adds
           per-head q/k norms and a second rotary base for its local layers.
  Qwen3:   per-head q/k RMSNorm; Phi-3: partial rotary and longrope; OLMo 2: norms after
           attention and MLP ("post") and q/k norms over the whole projection width.

Per-layer attention: `layer_types` names each layer "full" or "sliding" (window
`sliding_window`); `layer_window(i)` and `layer_rope(i)` are what the model reads.

Presets: "*-tiny" shapes (vocab 320) for tests and CPU demos, one per family (gemma-tiny,
gemma2-tiny, gemma3-tiny, qwen3-tiny, phi3-tiny, olmo2-tiny, qwen2-hybrid-tiny with windows
on its last two layers only, ...), and full-size shapes as published (llama-1b, gemma-2b,
gemma2-2b, gemma3-1b, qwen3-0.6b, phi3-mini, olmo2-1b, ...) for benchmarks with random
weights; `kvjax.load_hf` reads the real checkpoints.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass

DTYPES = ("float32", "bfloat16", "float16")


ROPE_TYPES = ("llama3", "linear", "longrope")
LAYER_TYPES = ("full", "sliding")


@dataclass(frozen=True)
class RopeScaling:
    """Rotary frequency scaling (HF `rope_scaling` / `rope_parameters`).

    rope_type "llama3": frequency-dependent (factor, low/high_freq_factor, original_max_position);
    "linear": every inverse frequency divided by `factor` (Gemma 3's global layers);
    "longrope" (Phi-3): per-frequency `short_factor` / `long_factor` tuples, the long one used
    once a chunk reaches past `original_max_position`; cos/sin times `attention_factor`
    (None: sqrt(1 + ln(factor) / ln(original_max_position)), 1 when factor <= 1).
    """

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192
    rope_type: str = "llama3"
    short_factor: tuple = ()
    long_factor: tuple = ()
    attention_factor: float | None = None

    def __post_init__(self):
        _check_choice("rope_scaling.rope_type", self.rope_type, ROPE_TYPES)


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
    norm: str = "rmsnorm"             # "rmsnorm" | "layernorm" | "gemma_rmsnorm" (x * (1 + w), float32)
    norm_eps: float = 1e-5
    norm_placement: str = "pre"       # "pre" (Llama) | "sandwich" (Gemma 2/3: pre and post) | "post" (OLMo 2)
    positions: str = "rotary"         # "rotary" | "learned"
    mlp: str = "swiglu"               # "swiglu" | "gelu" (tanh approximation, GPT-2's gelu_new)
                                      # | "geglu" (Gemma: down(gelu_tanh(gate x) * up x))
    qk_norm: str | None = None        # None | "head" (Qwen3, Gemma 3: per head over head_dim)
                                      # | "proj" (OLMo 2: over the whole q / k projection width)
    embed_scale: bool = False         # Gemma: embeddings times sqrt(d_model), cast to the dtype
    query_pre_attn_scalar: float | None = None  # Gemma 2/3: scores scaled by this ** -0.5
    attn_softcap: float | None = None  # Gemma 2: scores -> cap * tanh(scores / cap)
    final_softcap: float | None = None  # Gemma 2: logits -> cap * tanh(logits / cap)
    rotary_dim: int | None = None     # partial rotary (Phi-3): rotate the first rotary_dim dims
    qkv_bias: bool = False            # GPT-2 and Qwen2
    out_bias: bool = False            # attention output and MLP biases (GPT-2)
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rope_local_theta: float | None = None  # Gemma 3: rotary base of sliding layers (which then
                                            # ignore rope_scaling); None: as the full layers
    sliding_window: int | None = None  # Mistral: a query sees keys with q_pos - k_pos < window
    layer_types: tuple | None = None  # per layer "full" | "sliding"; None: every layer sliding
                                      # when sliding_window is set, else every layer full
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
        _check_choice("norm", self.norm, ("rmsnorm", "layernorm", "gemma_rmsnorm"))
        _check_choice("norm_placement", self.norm_placement, ("pre", "sandwich", "post"))
        _check_choice("positions", self.positions, ("rotary", "learned"))
        _check_choice("mlp", self.mlp, ("swiglu", "gelu", "geglu"))
        _check_choice("qk_norm", self.qk_norm, (None, "head", "proj"))
        _check_choice("dtype", self.dtype, DTYPES)
        if self.positions == "rotary" and self.head_dim % 2:
            raise ValueError(f"rotary positions need an even head_dim, got {self.head_dim}")
        if self.rotary_dim is not None and not (0 < self.rotary_dim <= self.head_dim
                                                and self.rotary_dim % 2 == 0):
            raise ValueError(f"ModelConfig.rotary_dim={self.rotary_dim} must be even and in "
                             f"(0, head_dim={self.head_dim}]")
        for f in ("query_pre_attn_scalar", "attn_softcap", "final_softcap", "rope_local_theta"):
            v = getattr(self, f)
            if v is not None and not v > 0:
                raise ValueError(f"ModelConfig.{f} must be > 0 or None, got {v!r}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"ModelConfig.sliding_window must be >= 1 or None, got {self.sliding_window}")
        if self.layer_types is not None:
            if not isinstance(self.layer_types, tuple) or len(self.layer_types) != self.num_layers:
                raise ValueError(f"ModelConfig.layer_types must be a tuple of num_layers={self.num_layers} "
                                 f"entries, got {self.layer_types!r}")
            for i, t in enumerate(self.layer_types):
                _check_choice(f"layer_types[{i}]", t, LAYER_TYPES)
            if "sliding" in self.layer_types and self.sliding_window is None:
                raise ValueError("ModelConfig.layer_types has sliding layers but sliding_window is None")
        if self.attention_sinks < 0 or (self.attention_sinks and self.sliding_window is None):
            raise ValueError(f"ModelConfig.attention_sinks={self.attention_sinks} needs a sliding_window "
                             f"(sinks only matter where a window hides old tokens) and must be >= 0")

    @property
    def num_groups(self) -> int:
        """Query heads per kv head (G)."""
        return self.num_heads // self.num_kv_heads

    def layer_window(self, layer: int) -> int | None:
        """The attention window of `layer` (None: full attention)."""
        if self.layer_types is None or self.layer_types[layer] == "sliding":
            return self.sliding_window
        return None

    @property
    def sliding_layers(self) -> tuple:
        """Indices of the layers with a window."""
        return tuple(i for i in range(self.num_layers) if self.layer_window(i) is not None)

    def layer_rope(self, layer: int) -> tuple:
        """(rope_theta, rope_scaling) of `layer`: sliding layers use `rope_local_theta` unscaled
        when it is set (Gemma 3), every other layer `rope_theta` with `rope_scaling`."""
        if self.rope_local_theta is not None and self.layer_window(layer) is not None:
            return self.rope_local_theta, None
        return self.rope_theta, self.rope_scaling

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


def _gemma(name, d, layers, heads, kv_heads, mlp, head_dim, vocab=256000, generation=1, **kw):
    """Gemma 1/2/3: (1 + w) norms, scaled embeddings, GeGLU, tied; 2 and 3 add sandwich norms
    and query_pre_attn_scalar; 2 soft-capping; 3 per-head q/k norms."""
    if generation > 1:
        kw = dict(norm_placement="sandwich", query_pre_attn_scalar=float(head_dim), **kw)
    if generation == 2:
        kw = dict(attn_softcap=50.0, final_softcap=30.0, **kw)
    if generation == 3:
        kw = dict(qk_norm="head", rope_theta=1e6, rope_local_theta=1e4, **kw)
    return ModelConfig(vocab_size=vocab, d_model=d, num_layers=layers, num_heads=heads,
                       num_kv_heads=kv_heads, head_dim=head_dim, mlp_dim=mlp, name=name,
                       norm="gemma_rmsnorm", norm_eps=1e-6, mlp="geglu", embed_scale=True,
                       tie_embeddings=True, **kw)


def _pattern(layers: int, every: int) -> tuple:
    """Gemma's layer pattern: every `every`-th layer full, the others sliding."""
    return tuple("full" if (i + 1) % every == 0 else "sliding" for i in range(layers))


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
    "gemma-tiny": _gemma("gemma-tiny", 64, 2, 4, 1, 128, 16, vocab=320, max_position=1024),
    "gemma2-tiny": _gemma("gemma2-tiny", 64, 4, 4, 2, 128, 16, vocab=320, max_position=1024,
                          generation=2, sliding_window=8, layer_types=_pattern(4, 2)),
    "gemma3-tiny": _gemma("gemma3-tiny", 64, 6, 4, 2, 128, 16, vocab=320, max_position=1024,
                          generation=3, sliding_window=8, layer_types=_pattern(6, 6),
                          rope_scaling=RopeScaling(rope_type="linear", factor=8.0)),
    "qwen3-tiny": _llama("qwen3-tiny", 64, 2, 4, 2, 128, vocab=320, head_dim=32, max_position=1024,
                         qk_norm="head", rope_theta=1e6, norm_eps=1e-6),
    "phi3-tiny": _llama("phi3-tiny", 64, 2, 4, 4, 128, vocab=320, max_position=256, rotary_dim=8,
                        rope_scaling=RopeScaling(rope_type="longrope", factor=4.0, original_max_position=64,
                                                 short_factor=(1.0, 1.0, 1.2, 1.5),
                                                 long_factor=(1.0, 2.0, 4.0, 8.0))),
    "olmo2-tiny": _llama("olmo2-tiny", 64, 2, 4, 4, 128, vocab=320, max_position=1024,
                         norm_placement="post", qk_norm="proj", rope_theta=500000.0, norm_eps=1e-6),
    "qwen2-hybrid-tiny": _llama("qwen2-hybrid-tiny", 64, 4, 4, 2, 128, vocab=320, max_position=1024,
                                qkv_bias=True, rope_theta=1e6, norm_eps=1e-6, tie_embeddings=True,
                                sliding_window=8, layer_types=("full", "full", "sliding", "sliding")),
    # Full-size shapes for benchmarks (random weights), as published on the Hugging Face hub.
    "gpt2-small": _gpt2("gpt2-small", 768, 12, 12),
    "llama-1b": _llama("llama-1b", 2048, 22, 32, 4, 5632, max_position=2048),  # TinyLlama-1.1B
    "llama-7b": _llama("llama-7b", 4096, 32, 32, 32, 11008, max_position=4096),  # Llama-2-7B
    "gemma-2b": _gemma("gemma-2b", 2048, 18, 8, 1, 16384, 256, max_position=8192),  # google/gemma-2b
    "gemma2-2b": _gemma("gemma2-2b", 2304, 26, 8, 4, 9216, 256, max_position=8192,  # google/gemma-2-2b
                        generation=2, sliding_window=4096, layer_types=_pattern(26, 2)),
    "gemma3-1b": _gemma("gemma3-1b", 1152, 26, 4, 1, 6912, 256, vocab=262144,  # google/gemma-3-1b-pt
                        max_position=32768, generation=3, sliding_window=512,
                        layer_types=_pattern(26, 6)),
    "qwen3-0.6b": _llama("qwen3-0.6b", 1024, 28, 16, 8, 3072, vocab=151936, head_dim=128,  # Qwen/Qwen3-0.6B
                         max_position=40960, qk_norm="head", rope_theta=1e6, norm_eps=1e-6,
                         tie_embeddings=True),
    "phi3-mini": _llama("phi3-mini", 3072, 32, 32, 32, 8192, vocab=32064,  # Phi-3-mini-4k-instruct
                        max_position=4096, sliding_window=2047),
    "olmo2-1b": _llama("olmo2-1b", 2048, 16, 16, 16, 8192, vocab=100352,  # allenai/OLMo-2-0425-1B
                       max_position=4096, norm_placement="post", qk_norm="proj",
                       rope_theta=500000.0, norm_eps=1e-6),
}
