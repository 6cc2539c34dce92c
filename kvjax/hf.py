"""Hugging Face checkpoints: config.json + safetensors <-> (ModelConfig, params).

The name mapping between Hugging Face tensors and kvjax's parameter tree lives only here
(`tensor_table`). Supported `model_type`s: gpt2, llama (2 and 3, incl. llama3 rope
scaling), mistral (sliding window) and qwen2 (q/k/v bias).

Layout conventions (kvjax Dense kernels are [in, out]):
  * HF `nn.Linear.weight` is [out, in]: transposed ("linear").
  * GPT-2's `Conv1D.weight` is already [in, out]: copied ("same"); its fused `c_attn`
    [D, 3D] is q | k | v concatenated on the output axis ("fused").
  * Rotary is the half-split (`rotate_half`) layout in both, so q/k need no permutation.
  * Embeddings are [V, D] in both; an untied `lm_head.weight` [V, D] becomes lm_head/kernel [D, V].

Tensors are read with the `safetensors` library as numpy arrays (no torch needed) and
converted to `dtype` on the host, one tensor at a time.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from .atomic import atomic_write, atomic_write_text
from .config import _DTYPES, ModelConfig, RopeScaling

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "llama3")
_ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM",
                  "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_INDEX_FILE = "model.safetensors.index.json"
_SINGLE_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint folder or config that kvjax cannot load or write; the message says why."""


# ----------------------------------------------------------------------------- name mapping

@dataclass(frozen=True)
class Tensor:
    """One Hugging Face tensor and the kvjax parameter(s) it holds.

    layout: "same" (identical array), "linear" (HF [out, in] = kernel.T) or
    "fused" (HF = kvjax arrays concatenated on the last axis, GPT-2's c_attn).
    """

    hf: str
    kv: tuple  # tuple of kvjax parameter paths, each a tuple of keys
    layout: str = "same"

    def hf_shape(self, kv_shapes) -> tuple:
        if self.layout == "linear":
            return tuple(reversed(kv_shapes[0]))
        if self.layout == "fused":
            return tuple(kv_shapes[0][:-1]) + (sum(s[-1] for s in kv_shapes),)
        return tuple(kv_shapes[0])

    def to_hf(self, arrays) -> np.ndarray:
        if self.layout == "linear":
            return arrays[0].T
        if self.layout == "fused":
            return np.concatenate(arrays, axis=-1)
        return arrays[0]

    def from_hf(self, x: np.ndarray, kv_shapes) -> list:
        if self.layout == "linear":
            return [x.T]
        if self.layout == "fused":
            cuts = np.cumsum([s[-1] for s in kv_shapes])[:-1]
            return np.split(x, cuts, axis=-1)
        return [x]


def tensor_table(cfg: ModelConfig, model_type: str) -> list[Tensor]:
    """Every Hugging Face tensor of `model_type` for this config, with its kvjax parameter(s)."""
    if model_type == "gpt2":
        return _gpt2_table(cfg)
    if model_type in ("llama", "mistral", "qwen2"):
        return _llama_table(cfg)
    raise CheckpointError(_unsupported(model_type))


def _gpt2_table(cfg):
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


def _llama_table(cfg):
    t = [Tensor("model.embed_tokens.weight", (("embed", "embedding"),))]
    for i in range(cfg.num_layers):
        h, k = f"model.layers.{i}.", f"layers_{i}"
        t += [Tensor(f"{h}input_layernorm.weight", ((k, "attn_norm", "scale"),)),
              Tensor(f"{h}post_attention_layernorm.weight", ((k, "mlp_norm", "scale"),))]
        for n in "qkvo":
            t.append(Tensor(f"{h}self_attn.{n}_proj.weight", ((k, "attn", n, "kernel"),), "linear"))
            if (cfg.out_bias if n == "o" else cfg.qkv_bias):
                t.append(Tensor(f"{h}self_attn.{n}_proj.bias", ((k, "attn", n, "bias"),)))
        for n in ("gate", "up", "down"):
            t.append(Tensor(f"{h}mlp.{n}_proj.weight", ((k, "mlp", n, "kernel"),), "linear"))
    t.append(Tensor("model.norm.weight", (("final_norm", "scale"),)))
    if not cfg.tie_embeddings:
        t.append(Tensor("lm_head.weight", (("lm_head", "kernel"),), "linear"))
    return t


def _ignorable(name: str, model_type: str, cfg: ModelConfig) -> bool:
    """Tensors a checkpoint may hold that carry no parameters kvjax needs."""
    if model_type == "gpt2" and re.search(r"(^|\.)h\.\d+\.attn\.(masked_)?bias$", name):
        return True  # old GPT-2 files store the causal-mask buffers
    if re.search(r"\.rotary_emb\.inv_freq$", name):
        return True  # recomputed from rope_theta / rope_scaling
    # Tied models sometimes store the (identical) output matrix too; HF ignores it as well.
    return cfg.tie_embeddings and name == "lm_head.weight"


# ----------------------------------------------------------------------------- config mapping

def _unsupported(model_type) -> str:
    return (f"model_type {model_type!r} is not supported; kvjax loads "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}")


class _Fields:
    """Reads config.json values, naming the file and key in every error."""

    def __init__(self, hf: dict, source: str):
        self.hf, self.source = hf, source

    def get(self, key, default=...):
        value = self.hf.get(key)
        if value is None:
            if default is ...:
                raise CheckpointError(f"{self.source} has no {key!r}, which a "
                                      f"{self.hf.get('model_type')} model needs")
            return default
        return value

    def fail(self, message):
        raise CheckpointError(f"{self.source}: {message}")


def config_from_hf(hf: dict, dtype: str = "float32", source: str = "config.json"
                   ) -> tuple[ModelConfig, str]:
    """A Hugging Face config.json (as a dict) -> (ModelConfig, model_type)."""
    if dtype not in _DTYPES:
        raise CheckpointError(f"dtype={dtype!r} is not one of {list(_DTYPES)}")
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(f"{source}: {_unsupported(model_type)}")
    f = _Fields(hf, source)
    try:
        if model_type == "gpt2":
            cfg = _gpt2_config(f)
        else:
            cfg = _llama_config(f, model_type)
        cfg = cfg.replace(dtype=dtype, name=str(hf.get("_name_or_path") or model_type))
    except (TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{source}: {e}") from None
    return cfg, model_type


def _gpt2_config(f: _Fields) -> ModelConfig:
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


def _llama_config(f: _Fields, model_type: str) -> ModelConfig:
    act = f.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        f.fail(f"hidden_act={act!r}; kvjax's SwiGLU MLP uses 'silu'")
    d, heads = int(f.get("hidden_size")), int(f.get("num_attention_heads"))
    qkv_bias = out_bias = False
    if model_type == "qwen2":
        qkv_bias = True
    elif model_type == "llama":
        if f.get("mlp_bias", False):
            f.fail("mlp_bias=true is not supported (kvjax's SwiGLU has no biases)")
        qkv_bias = out_bias = bool(f.get("attention_bias", False))
    head_dim = f.get("head_dim", None)
    if head_dim is None:
        if d % heads:
            f.fail(f"hidden_size={d} is not a multiple of num_attention_heads={heads} and no head_dim is set")
        head_dim = d // heads
    return ModelConfig(
        vocab_size=int(f.get("vocab_size")), d_model=d, num_layers=int(f.get("num_hidden_layers")),
        num_heads=heads, num_kv_heads=int(f.get("num_key_value_heads", heads)),
        head_dim=int(head_dim), mlp_dim=int(f.get("intermediate_size")),
        max_position=int(f.get("max_position_embeddings", 2048)),
        norm="rmsnorm", norm_eps=float(f.get("rms_norm_eps", 1e-6)), positions="rotary",
        mlp="swiglu", qkv_bias=qkv_bias, out_bias=out_bias, **_rope(f),
        sliding_window=_window(f, model_type),
        tie_embeddings=bool(f.get("tie_word_embeddings", False)))


def _rope(f: _Fields) -> dict:
    """rope_theta and rope_scaling from either config style.

    transformers < 5 writes top-level `rope_theta` and `rope_scaling`; transformers 5 writes
    one `rope_parameters` dict (holding rope_theta and rope_type).
    """
    params = f.get("rope_parameters", {})
    if not isinstance(params, dict):
        f.fail(f"rope_parameters must be an object, got {params!r}")
    scaling = f.get("rope_scaling", {}) or params
    theta = float(params.get("rope_theta", f.get("rope_theta", 10000.0)))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return {"rope_theta": theta, "rope_scaling": None}
    if kind != "llama3":
        f.fail(f"rope scaling type {kind!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    try:
        rs = RopeScaling(factor=float(scaling["factor"]),
                         low_freq_factor=float(scaling["low_freq_factor"]),
                         high_freq_factor=float(scaling["high_freq_factor"]),
                         original_max_position=int(scaling["original_max_position_embeddings"]))
    except KeyError as e:
        f.fail(f"llama3 rope scaling needs {e.args[0]!r}; got {scaling}")
    return {"rope_theta": theta, "rope_scaling": rs}


def _window(f: _Fields, model_type: str) -> int | None:
    """The attention window kvjax applies to every layer (None: full attention).

    transformers masks a key when q_pos - k_pos >= sliding_window, the same rule as kvjax,
    so the value carries over unchanged (tests/test_hf_parity.py checks it with a window
    shorter than the sequence). Mistral applies its window to every layer; Qwen2 only to
    layers at index >= max_window_layers when use_sliding_window is set, and kvjax has one
    pattern for all layers, so a Qwen2 config that mixes the two is rejected.
    """
    if model_type == "llama":
        return None
    window = f.get("sliding_window", None)
    if model_type == "mistral":
        return int(window) if window is not None else None
    use = bool(f.get("use_sliding_window", False))
    if not use or window is None:
        window = None
    n = int(f.get("num_hidden_layers"))
    types = f.get("layer_types", None)
    if types is None:
        first = int(f.get("max_window_layers", n))
        types = ["sliding_attention" if window is not None and i >= first else "full_attention"
                 for i in range(n)]
    kinds = set(types)
    if kinds <= {"full_attention"}:
        return None
    if kinds == {"sliding_attention"} and window is not None:
        return int(window)
    if window is None:
        f.fail("layer_types lists sliding_attention layers but sliding_window/use_sliding_window "
               "is not set")
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
    f.fail(f"layers {sliding} use a sliding window of {window} while the others use full "
           f"attention (max_window_layers={f.get('max_window_layers', None)}); kvjax applies one "
           f"attention pattern to every layer")


def hf_model_type(cfg: ModelConfig) -> str:
    """The Hugging Face family a ModelConfig is written as by `save_hf`."""
    if cfg.positions == "learned":
        return "gpt2"
    if cfg.qkv_bias and not cfg.out_bias:
        return "qwen2"
    if cfg.sliding_window is not None and not cfg.qkv_bias and not cfg.out_bias:
        return "mistral"
    return "llama"


def config_to_hf(cfg: ModelConfig, model_type: str | None = None) -> dict:
    """ModelConfig -> a config.json dict transformers (4.45+ and 5) loads as `model_type`."""
    model_type = model_type or hf_model_type(cfg)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(_unsupported(model_type))
    need = {"gpt2": dict(positions="learned", norm="layernorm", mlp="gelu", qkv_bias=True,
                         out_bias=True, num_kv_heads=cfg.num_heads, sliding_window=None,
                         head_dim=cfg.d_model // cfg.num_heads, rope_scaling=None)}.get(
        model_type, dict(positions="rotary", norm="rmsnorm", mlp="swiglu"))
    if model_type == "llama":
        need.update(out_bias=cfg.qkv_bias, sliding_window=None)
    elif model_type == "mistral":
        need.update(qkv_bias=False, out_bias=False)
    elif model_type == "qwen2":
        need.update(qkv_bias=True, out_bias=False)
    wrong = [f"{k}={getattr(cfg, k)!r} (needs {v!r})" for k, v in need.items() if getattr(cfg, k) != v]
    if model_type == "gpt2" and cfg.head_dim * cfg.num_heads != cfg.d_model:
        wrong.append(f"head_dim * num_heads = {cfg.head_dim * cfg.num_heads} (needs d_model={cfg.d_model})")
    if wrong:
        raise CheckpointError(f"ModelConfig {cfg.name!r} cannot be written as a {model_type} "
                              f"checkpoint: {', '.join(wrong)}")
    out = {"architectures": [_ARCHITECTURES[model_type]], "model_type": model_type,
           "_name_or_path": cfg.name, "vocab_size": cfg.vocab_size,
           "tie_word_embeddings": cfg.tie_embeddings,
           # transformers 5 reads `dtype`, earlier versions `torch_dtype`.
           "dtype": cfg.dtype, "torch_dtype": cfg.dtype}
    if model_type == "gpt2":
        out.update(n_embd=cfg.d_model, n_layer=cfg.num_layers, n_head=cfg.num_heads,
                   n_inner=cfg.mlp_dim, n_positions=cfg.max_position, n_ctx=cfg.max_position,
                   activation_function="gelu_new", layer_norm_epsilon=cfg.norm_eps,
                   scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
                   reorder_and_upcast_attn=False)
        return out
    rs = cfg.rope_scaling
    out.update(hidden_size=cfg.d_model, intermediate_size=cfg.mlp_dim,
               num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
               num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, hidden_act="silu",
               max_position_embeddings=cfg.max_position, rms_norm_eps=cfg.norm_eps,
               rope_theta=cfg.rope_theta,
               rope_scaling=None if rs is None else {
                   "rope_type": "llama3", "factor": rs.factor,
                   "low_freq_factor": rs.low_freq_factor, "high_freq_factor": rs.high_freq_factor,
                   "original_max_position_embeddings": rs.original_max_position})
    if model_type == "llama":
        out.update(attention_bias=cfg.qkv_bias, mlp_bias=False)
    elif model_type == "mistral":
        out.update(sliding_window=cfg.sliding_window)
    else:  # qwen2: a window, if any, on every layer
        out.update(use_sliding_window=cfg.sliding_window is not None,
                   sliding_window=cfg.sliding_window, max_window_layers=0,
                   layer_types=["sliding_attention" if cfg.sliding_window else "full_attention"]
                   * cfg.num_layers)
    return out


# ----------------------------------------------------------------------------- loading

def load_hf(path, dtype: str = "float32"):
    """Load a local Hugging Face checkpoint folder: returns (ModelConfig, params).

    path: a folder with config.json and model.safetensors, or sharded
    model-*.safetensors with model.safetensors.index.json.
    dtype: parameter and activation dtype ("float32", "bfloat16" or "float16"); every
    tensor is converted to it whatever the checkpoint stores. Softmax and norms run in
    float32 regardless.
    Raises CheckpointError (a ValueError) or FileNotFoundError naming what is wrong.
    """
    folder = _folder(path)
    cfg, model_type = config_from_hf(_read_json(folder / "config.json"), dtype,
                                     source=str(folder / "config.json"))
    files = _weight_files(folder)  # name in kvjax's table -> (file, name stored in the file)
    if model_type == "gpt2" and "transformer.wte.weight" not in files and "wte.weight" in files:
        # Original GPT-2 uploads were saved from GPT2Model: names lack "transformer.".
        files = {(n if n.startswith("lm_head.") else "transformer." + n): (f, n)
                 for n, (f, _) in files.items()}
    table = tensor_table(cfg, model_type)
    shapes = _param_shapes(cfg)
    _check_table(table, shapes)
    names = {t.hf for t in table}
    missing = [t.hf for t in table if t.hf not in files]
    unexpected = [n for n in files if n not in names and not _ignorable(n, model_type, cfg)]
    if missing:
        raise CheckpointError(f"checkpoint {folder} is missing {_some(missing)} that a {model_type} "
                              f"model with this config.json needs")
    if unexpected:
        raise CheckpointError(f"checkpoint {folder} has unexpected {_some(unexpected)}, which a "
                              f"{model_type} model with this config.json does not use")
    target = jnp.dtype(dtype)
    params: dict = {}
    readers: dict = {}
    for t in table:
        file, stored = files[t.hf]
        if file not in readers:
            readers[file] = _open(file)
        x = readers[file].get_tensor(stored)
        kv_shapes = [shapes[p] for p in t.kv]
        want = t.hf_shape(kv_shapes)
        if tuple(x.shape) != want:
            raise CheckpointError(f"tensor {t.hf!r} in {file.name} has shape {tuple(x.shape)}, but "
                                  f"config.json implies {want}")
        for p, arr in zip(t.kv, t.from_hf(x, kv_shapes)):
            _set(params, p, jnp.asarray(np.ascontiguousarray(arr).astype(target)))
    return cfg, params


def _folder(path) -> Path:
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is a file; pass the checkpoint folder that holds config.json")
    if not (folder / "config.json").is_file():
        found = sorted(p.name for p in folder.iterdir())
        raise CheckpointError(f"{folder} has no config.json (found: {', '.join(found) or 'nothing'}); "
                              f"a Hugging Face checkpoint folder holds config.json and *.safetensors")
    return folder


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file} must hold a JSON object, got {type(data).__name__}")
    return data


def _open(file: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(file), framework="numpy")
    except Exception as e:  # the Rust binding raises its own error types
        raise CheckpointError(f"{file} is not a readable safetensors file: {e}") from None


def _weight_files(folder: Path) -> dict:
    """Tensor name -> (the safetensors file holding it, the name)."""
    index = folder / _INDEX_FILE
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no weight_map")
        shards = sorted(set(weight_map.values()))
        absent = [s for s in shards if not (folder / s).is_file()]
        if absent:
            raise CheckpointError(f"{index} refers to shard file(s) {absent} that are not in {folder}")
        files = {}
        for s in shards:
            keys = set(_open(folder / s).keys())
            listed = {n for n, f in weight_map.items() if f == s}
            if listed - keys:
                raise CheckpointError(f"{index} lists {_some(sorted(listed - keys))} in {s}, "
                                      f"but that file does not hold it")
            files.update({n: (folder / s, n) for n in listed})
        return files
    if (folder / _SINGLE_FILE).is_file():
        candidates = [folder / _SINGLE_FILE]
    else:
        candidates = sorted(folder.glob("*.safetensors"))
    if not candidates:
        bins = sorted(p.name for p in folder.iterdir()
                      if p.suffix == ".bin" or p.name.endswith(".bin.index.json"))
        if bins:
            raise CheckpointError(
                f"{folder} holds only PyTorch .bin weights ({', '.join(bins)}); kvjax reads "
                f"safetensors. Convert once with transformers: python -c \"from transformers import "
                f"AutoModelForCausalLM as M; M.from_pretrained('{folder}').save_pretrained('{folder}', "
                f"safe_serialization=True)\"")
        raise CheckpointError(f"{folder} has config.json but no weights (*.safetensors)")
    files = {}
    for file in candidates:
        for n in _open(file).keys():
            if n in files:
                raise CheckpointError(f"tensor {n!r} appears in both {files[n][0].name} and {file.name}")
            files[n] = (file, n)
    return files


def _param_shapes(cfg: ModelConfig) -> dict:
    """kvjax parameter path -> shape, taken from the model itself (no memory allocated)."""
    from .model import init_params

    tree = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(k.key for k in path): tuple(x.shape) for path, x in leaves}


def _check_table(table, shapes):
    """The mapping must cover the parameter tree exactly; a mismatch is a bug in this file."""
    mapped = [p for t in table for p in t.kv]
    if sorted(mapped) != sorted(shapes):
        raise RuntimeError(f"kvjax.hf mapping out of date with the model: unmapped "
                           f"{sorted(set(shapes) - set(mapped))}, "
                           f"unknown {sorted(set(mapped) - set(shapes))}")


def _some(names, limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"tensor{'s' if len(names) > 1 else ''} {shown}{more}"


def _set(tree: dict, path: tuple, value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _get(tree, path: tuple):
    for k in path:
        tree = tree[k]
    return tree


# ----------------------------------------------------------------------------- saving

def save_hf(cfg: ModelConfig, params, path, *, tokenizer=None, model_type: str | None = None,
            bos_token_id: int | None = None, eos_token_id: int | None = None,
            pad_token_id: int | None = None, max_shard_bytes: int | None = None) -> Path:
    """Write (cfg, params) as a Hugging Face checkpoint folder that transformers and load_hf read.

    Tensors are written in `cfg.dtype` (bfloat16 models stay bfloat16 on disk) with
    config.json (`dtype`/`torch_dtype` set), generation_config.json when a bos/eos/pad id
    is known, and the tokenizer if given (a ByteTokenizer writes kvjax_tokenizer.json).
    Special ids default to the tokenizer's. `model_type` defaults to `hf_model_type(cfg)`.
    `max_shard_bytes`: split into model-0000i-of-0000n.safetensors plus an index.
    Earlier model*.safetensors / index files in the folder are replaced.
    """
    from safetensors.numpy import save_file

    model_type = model_type or hf_model_type(cfg)
    hf_cfg = config_to_hf(cfg, model_type)
    table = tensor_table(cfg, model_type)
    shapes = _param_shapes(cfg)
    _check_table(table, shapes)
    _check_params(params, shapes)
    if tokenizer is not None:
        bos_token_id = tokenizer.bos_id if bos_token_id is None else bos_token_id
        eos_token_id = tokenizer.eos_id if eos_token_id is None else eos_token_id
        pad_token_id = tokenizer.pad_id if pad_token_id is None else pad_token_id
    special = {k: v for k, v in (("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id),
                                 ("pad_token_id", pad_token_id)) if v is not None}
    for k, v in special.items():
        if not 0 <= int(v) < cfg.vocab_size:
            raise CheckpointError(f"{k}={v} is outside the vocabulary [0, {cfg.vocab_size})")
    hf_cfg.update({k: int(v) for k, v in special.items()})

    target = jnp.dtype(cfg.dtype)
    tensors = {t.hf: np.ascontiguousarray(
        t.to_hf([np.asarray(_get(params, p)).astype(target) for p in t.kv])) for t in table}
    shards = _shard(tensors, max_shard_bytes)

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    for old in [*folder.glob("model*.safetensors"), folder / _INDEX_FILE]:
        if old.is_file():
            old.unlink()
    meta = {"format": "pt"}  # transformers refuses safetensors files without it
    if len(shards) == 1:
        atomic_write(folder / _SINGLE_FILE, lambda p: save_file(shards[0], str(p), metadata=meta))
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            atomic_write(folder / name, lambda p, s=shard: save_file(s, str(p), metadata=meta))
            weight_map.update({n: name for n in shard})
        index = {"metadata": {"total_size": sum(int(x.nbytes) for x in tensors.values())},
                 "weight_map": dict(sorted(weight_map.items()))}
        _write_json(folder / _INDEX_FILE, index)
    _write_json(folder / "config.json", hf_cfg)
    if special:
        _write_json(folder / "generation_config.json", {**special, "_from_model_config": True})
    if tokenizer is not None:
        tokenizer.save(folder)
    return folder


def _check_params(params, shapes):
    try:
        leaves = jax.tree_util.tree_flatten_with_path(params)[0]
        got = {tuple(k.key for k in path): tuple(np.shape(x)) for path, x in leaves}
    except AttributeError:
        raise CheckpointError("params must be the nested dict init_params/load_hf return") from None
    missing = sorted(set(shapes) - set(got))
    extra = sorted(set(got) - set(shapes))
    if missing or extra:
        raise CheckpointError(f"params do not match the config: missing {['/'.join(p) for p in missing]}, "
                              f"unexpected {['/'.join(p) for p in extra]}")
    for p, s in shapes.items():
        if got[p] != s:
            raise CheckpointError(f"param {'/'.join(p)} has shape {got[p]}, but the config needs {s}")


def _shard(tensors: dict, max_bytes: int | None) -> list[dict]:
    if max_bytes is None:
        return [tensors]
    if max_bytes < 1:
        raise CheckpointError(f"max_shard_bytes must be positive, got {max_bytes}")
    shards, current, size = [], {}, 0
    for name, x in tensors.items():
        if current and size + x.nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = x
        size += x.nbytes
    shards.append(current)
    return shards


def _write_json(file: Path, data: dict):
    atomic_write_text(file, json.dumps(data, indent=2) + "\n")
