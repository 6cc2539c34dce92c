"""What every family shares: the tensor mapping type, config.json field access, and the
safetensors files (reading, sharding, writing).

Layout conventions (kvjax Dense kernels are [in, out]):
  * HF `nn.Linear.weight` is [out, in]: transposed ("linear").
  * GPT-2's `Conv1D.weight` is already [in, out]: copied ("same"); its fused `c_attn`
    [D, 3D] is q | k | v concatenated on the output axis ("fused").
  * Phi-3's fused `qkv_proj` / `gate_up_proj` are Linear weights of the kvjax kernels
    concatenated on the output axis ("fused_linear").
  * Rotary is the half-split (`rotate_half`) layout in both, so q/k need no permutation.
  * Embeddings are [V, D] in both; an untied `lm_head.weight` [V, D] becomes lm_head/kernel [D, V].
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np

from ..atomic import atomic_write_text
from ..config import ModelConfig

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint folder or config that kvjax cannot load or write; the message says why."""


# ----------------------------------------------------------------------------- name mapping

@dataclass(frozen=True)
class Tensor:
    """One Hugging Face tensor and the kvjax parameter(s) it holds.

    layout: "same" (identical array), "linear" (HF [out, in] = kernel.T), "fused" (HF =
    kvjax arrays concatenated on the last axis, GPT-2's c_attn) or "fused_linear" (HF =
    the kernels concatenated on the output axis, transposed: Phi-3's qkv_proj, gate_up_proj).
    """

    hf: str
    kv: tuple  # tuple of kvjax parameter paths, each a tuple of keys
    layout: str = "same"

    def hf_shape(self, kv_shapes) -> tuple:
        if self.layout == "linear":
            return tuple(reversed(kv_shapes[0]))
        fused = tuple(kv_shapes[0][:-1]) + (sum(s[-1] for s in kv_shapes),)
        if self.layout == "fused":
            return fused
        if self.layout == "fused_linear":
            return tuple(reversed(fused))
        return tuple(kv_shapes[0])

    def to_hf(self, arrays) -> np.ndarray:
        if self.layout == "linear":
            return arrays[0].T
        if self.layout == "fused":
            return np.concatenate(arrays, axis=-1)
        if self.layout == "fused_linear":
            return np.concatenate(arrays, axis=-1).T
        return arrays[0]

    def from_hf(self, x: np.ndarray, kv_shapes) -> list:
        if self.layout == "linear":
            return [x.T]
        if self.layout in ("fused", "fused_linear"):
            x = x.T if self.layout == "fused_linear" else x
            cuts = np.cumsum([s[-1] for s in kv_shapes])[:-1]
            return np.split(x, cuts, axis=-1)
        return [x]


def linear(hf: str, *kv, bias: bool = False) -> list:
    """A Linear layer's weight (and bias) for kvjax Dense path `kv` (a tuple of keys)."""
    out = [Tensor(f"{hf}.weight", (kv + ("kernel",),), "linear")]
    if bias:
        out.append(Tensor(f"{hf}.bias", (kv + ("bias",),)))
    return out


def decoder_table(cfg: ModelConfig, norms: dict, prefix: str = "model.", fused: bool = False,
                  head: str = "lm_head.weight") -> list:
    """The tensors of a Llama-shaped decoder (every family but GPT-2).

    norms: HF per-layer norm name (e.g. "input_layernorm") -> kvjax norm name ("attn_norm");
    fused: Phi-3's qkv_proj and gate_up_proj instead of separate projections.
    q/k norms (cfg.qk_norm) are `self_attn.q_norm` / `k_norm` in every family that has them.
    """
    t = [Tensor(f"{prefix}embed_tokens.weight", (("embed", "embedding"),))]
    for i in range(cfg.num_layers):
        h, k = f"{prefix}layers.{i}.", f"layers_{i}"
        t += [Tensor(f"{h}{hf}.weight", ((k, kv, "scale"),)) for hf, kv in norms.items()]
        if fused:
            t.append(Tensor(f"{h}self_attn.qkv_proj.weight",
                            tuple((k, "attn", n, "kernel") for n in "qkv"), "fused_linear"))
            t += linear(f"{h}self_attn.o_proj", k, "attn", "o")
            t.append(Tensor(f"{h}mlp.gate_up_proj.weight",
                            tuple((k, "mlp", n, "kernel") for n in ("gate", "up")), "fused_linear"))
            t += linear(f"{h}mlp.down_proj", k, "mlp", "down")
            continue
        for n in "qkvo":
            t += linear(f"{h}self_attn.{n}_proj", k, "attn", n,
                        bias=cfg.out_bias if n == "o" else cfg.qkv_bias)
        if cfg.qk_norm is not None:
            t += [Tensor(f"{h}self_attn.{n}_norm.weight", ((k, "attn", f"{n}_norm", "scale"),))
                  for n in "qk"]
        for n in ("gate", "up", "down"):
            t += linear(f"{h}mlp.{n}_proj", k, "mlp", n)
    t.append(Tensor(f"{prefix}norm.weight", (("final_norm", "scale"),)))
    if not cfg.tie_embeddings:
        t.append(Tensor(head, (("lm_head", "kernel"),), "linear"))
    return t


# ----------------------------------------------------------------------------- config fields

class Fields:
    """Reads config.json values, naming the file and key in every error.

    defaults: values transformers' config class assumes for keys a file leaves out (given
    only where real checkpoints rely on them, e.g. a multimodal Gemma 3's text_config).
    """

    def __init__(self, hf: dict, source: str, defaults: dict | None = None):
        self.hf, self.source, self.defaults = hf, source, defaults or {}

    @property
    def model_type(self):
        return self.hf.get("model_type")

    def get(self, key, default=...):
        value = self.hf.get(key)
        if value is None:
            if key in self.defaults:
                return self.defaults[key]
            if default is ...:
                raise CheckpointError(f"{self.source} has no {key!r}, which a "
                                      f"{self.model_type} model needs")
            return default
        return value

    def fail(self, message):
        raise CheckpointError(f"{self.source}: {message}")


def common_dims(f: Fields, head_dim_key: str = "head_dim") -> dict:
    """The shape fields every Llama-shaped config.json holds."""
    d, heads = int(f.get("hidden_size")), int(f.get("num_attention_heads"))
    head_dim = f.get(head_dim_key, None)
    if head_dim is None:
        if d % heads:
            f.fail(f"hidden_size={d} is not a multiple of num_attention_heads={heads} and no head_dim is set")
        head_dim = d // heads
    return dict(vocab_size=int(f.get("vocab_size")), d_model=d,
                num_layers=int(f.get("num_hidden_layers")), num_heads=heads,
                num_kv_heads=int(f.get("num_key_value_heads", heads)), head_dim=int(head_dim),
                mlp_dim=int(f.get("intermediate_size")))


def common_out(cfg: ModelConfig) -> dict:
    """The shape fields of a Llama-shaped config.json."""
    return dict(hidden_size=cfg.d_model, intermediate_size=cfg.mlp_dim,
                num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                max_position_embeddings=cfg.max_position, rms_norm_eps=cfg.norm_eps)


_HF_LAYER = {"sliding_attention": "sliding", "full_attention": "full"}


def read_windows(f: Fields, window, default_types) -> dict:
    """sliding_window and layer_types fields from HF `layer_types` (or `default_types`, the list
    the family's config class builds when a file has none) and the window size.

    A window that covers every layer is `sliding_window` alone; a mix keeps `layer_types`.
    transformers masks a key when q_pos - k_pos >= sliding_window, the same rule as kvjax,
    so the value carries over unchanged.
    """
    n = int(f.get("num_hidden_layers"))
    types = f.get("layer_types", None)
    if types is None:
        types = default_types
    if not isinstance(types, (list, tuple)) or len(types) != n:
        f.fail(f"layer_types must list num_hidden_layers={n} entries, got {types!r}")
    bad = sorted({t for t in types if t not in _HF_LAYER})
    if bad:
        f.fail(f"layer_types entries {bad} are not supported; kvjax runs "
               f"{', '.join(_HF_LAYER)} layers")
    kinds = tuple(_HF_LAYER[t] for t in types)
    if window is None or "sliding" not in kinds:
        return dict(sliding_window=None, layer_types=None)
    window = int(window)
    if window < 1:
        f.fail(f"sliding_window={window} must be >= 1")
    return dict(sliding_window=window, layer_types=None if "full" not in kinds else kinds)


def hf_layer_types(cfg: ModelConfig) -> list:
    """Per layer "sliding_attention" or "full_attention", as transformers 5 writes them."""
    return ["sliding_attention" if cfg.layer_window(i) is not None else "full_attention"
            for i in range(cfg.num_layers)]


# ----------------------------------------------------------------------------- files

def folder_of(path) -> Path:
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


def read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file} must hold a JSON object, got {type(data).__name__}")
    return data


def write_json(file: Path, data: dict):
    atomic_write_text(file, json.dumps(data, indent=2) + "\n")


def open_safetensors(file: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(file), framework="numpy")
    except Exception as e:  # the Rust binding raises its own error types
        raise CheckpointError(f"{file} is not a readable safetensors file: {e}") from None


def weight_files(folder: Path) -> dict:
    """Tensor name -> (the safetensors file holding it, the name)."""
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no weight_map")
        shards = sorted(set(weight_map.values()))
        absent = [s for s in shards if not (folder / s).is_file()]
        if absent:
            raise CheckpointError(f"{index} refers to shard file(s) {absent} that are not in {folder}")
        files = {}
        for s in shards:
            keys = set(open_safetensors(folder / s).keys())
            listed = {n for n, f in weight_map.items() if f == s}
            if listed - keys:
                raise CheckpointError(f"{index} lists {some(sorted(listed - keys))} in {s}, "
                                      f"but that file does not hold it")
            files.update({n: (folder / s, n) for n in listed})
        return files
    if (folder / SINGLE_FILE).is_file():
        candidates = [folder / SINGLE_FILE]
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
        for n in open_safetensors(file).keys():
            if n in files:
                raise CheckpointError(f"tensor {n!r} appears in both {files[n][0].name} and {file.name}")
            files[n] = (file, n)
    return files


def param_shapes(cfg: ModelConfig) -> dict:
    """kvjax parameter path -> shape, taken from the model itself (no memory allocated)."""
    from ..model import init_params

    tree = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(k.key for k in path): tuple(x.shape) for path, x in leaves}


def check_table(table, shapes):
    """The mapping must cover the parameter tree exactly; a mismatch is a bug in kvjax/hf/."""
    mapped = [p for t in table for p in t.kv]
    if sorted(mapped) != sorted(shapes):
        raise RuntimeError(f"kvjax.hf mapping out of date with the model: unmapped "
                           f"{sorted(set(shapes) - set(mapped))}, "
                           f"unknown {sorted(set(mapped) - set(shapes))}")


def check_params(params, shapes):
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


def shard(tensors: dict, max_bytes: int | None) -> list[dict]:
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


def some(names, limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"tensor{'s' if len(names) > 1 else ''} {shown}{more}"


def set_path(tree: dict, path: tuple, value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def get_path(tree, path: tuple):
    for k in path:
        tree = tree[k]
    return tree


def to_device(x: np.ndarray) -> jax.Array:
    """x on the default device, the copy finished before returning. jnp.asarray's copy is
    asynchronous and keeps host buffers alive behind it: loading Gemma 3 with it peaked at
    2.48 GB RSS, with this at 1.71 GB (1.07 GB of float32 parameters; numpy alone 1.53 GB)."""
    return jax.device_put(x).block_until_ready()
