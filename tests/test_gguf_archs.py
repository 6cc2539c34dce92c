"""GGUF architectures (kvjax.gguf archs/) against Hugging Face folders and transformers.

Oracle: for each architecture a tiny random transformers model is saved as a Hugging Face
folder, and the same folder is written as a GGUF file the way llama.cpp's
convert_hf_to_gguf.py does (tensor names from the gguf package's own tensor map; the
converter's per-architecture changes written out below: llama's Q/K permutation and
rope_freqs, Gemma's 1 + w norms and dropped lm_head, Phi-3's rotary metadata and longrope
factor tensors). Then
  (a) kvjax loads the same config and parameters from the GGUF file and from the folder
      (parameters to 1e-6: Gemma's norms go through + 1 and - 1 in float32);
  (b) kvjax.forward on the GGUF file matches the transformers model's logits, and, where
      transformers' own GGUF loader knows the architecture (llama, qwen2, qwen3, phi3,
      gemma2, gemma3 in transformers 5), its logits from the GGUF file too; within 1e-4 of
      the largest logit (float32 reductions in different orders).
Shapes are tiny (d_model 64, 2 layers, vocabulary 256), tensors F32.
"""
from __future__ import annotations

import math

import jax
import numpy as np
import pytest

import kvjax
from conftest import require_module
from kvjax.gguf import load_gguf
from kvjax.gguf.archs.llama3_rope import converter_factors
from kvjax.hf import CheckpointError, load_hf

gguf = require_module("gguf", "GGUF files are written with ggml-org's gguf package")
torch = require_module("torch", "the reference models run in PyTorch")
tf = require_module("transformers", "tiny reference models are transformers models")

V, D, F, L = 256, 64, 128, 2
IDS = np.random.default_rng(0).integers(0, V, size=(1, 12))
TOL = 1e-4

LLAMA31 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# Not the defaults: the original length and band edges must come from the factors themselves.
LLAMA3_ODD = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 16.0, "low_freq_factor": 1.0,
              "high_freq_factor": 8.0, "original_max_position_embeddings": 1024}
SHORT = [float(np.float32(1 + 0.05 * i)) for i in range(6)]     # float32 values, as in the file
LONG = [float(np.float32(2 + 0.5 * i)) for i in range(6)]


def _config(arch: str, **extra):
    """A tiny transformers config of `arch` (the GGUF architecture name)."""
    dims = dict(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                rms_norm_eps=1e-5, tie_word_embeddings=False)
    kinds = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "qwen3": tf.Qwen3Config,
             "gemma": tf.GemmaConfig, "gemma2": tf.Gemma2Config, "gemma3": tf.Gemma3TextConfig,
             "phi3": tf.Phi3Config, "olmo2": tf.Olmo2Config}
    if arch == "qwen3":        # transformers' GGUF loader reads no key_length for qwen3: its default
        dims.update(num_attention_heads=2, num_key_value_heads=1, head_dim=128)
    if arch.startswith("gemma"):
        dims.update(tie_word_embeddings=True, head_dim=16, hidden_act="gelu_pytorch_tanh",
                    hidden_activation="gelu_pytorch_tanh")
    if arch in ("gemma2", "gemma3"):   # query_pre_attn_scalar: transformers' GGUF default 256
        dims.update(num_attention_heads=2, num_key_value_heads=1, head_dim=256,
                    query_pre_attn_scalar=256, sliding_window=4)
    if arch == "gemma3":
        dims.update(num_hidden_layers=6)       # five sliding layers, one global
    if arch == "phi3":
        dims.update(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return kinds[arch](**{**dims, **extra})


def _model(cfg, seed: int = 0):
    """A random float32 transformers model; norms near their identity (1, or 0 for Gemma)."""
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg).float().eval()
    one = 0.0 if cfg.model_type.startswith("gemma") else 1.0
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.1 if "norm" in name else 0.2) + (one if "norm" in name else 0))
    return model


# ----------------------------------------------------------------------------- the converter

def _permute(w, n_head, n_head_kv):
    """convert_hf_to_gguf.py LlamaModel.permute."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def _rope_freqs(p: dict, dim: int):
    """convert_hf_to_gguf.py LlamaModel.generate_extra_tensors, in torch as there."""
    freqs = 1.0 / (p["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old = p["original_max_position_embeddings"]
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32).numpy()


def _metadata(w, arch: str, h: dict) -> None:
    """set_gguf_parameters of the converter's model class for `arch` (h: config.to_dict())."""
    rope = h.get("rope_parameters") or {}
    full = rope.get("full_attention", rope)
    heads, kv = h["num_attention_heads"], h["num_key_value_heads"]
    w.add_block_count(h["num_hidden_layers"])
    w.add_context_length(h["max_position_embeddings"])
    w.add_embedding_length(h["hidden_size"])
    w.add_feed_forward_length(h["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(h["rms_norm_eps"])
    if arch in ("gemma", "gemma2", "phi3"):    # their classes write no rope_theta / head_dim of TextModel
        if arch == "phi3":
            _phi3_metadata(w, h, full)
        else:
            w.add_key_length(h["head_dim"])
            w.add_value_length(h["head_dim"])
        if arch == "gemma2":
            w.add_attn_logit_softcapping(h["attn_logit_softcapping"])
            w.add_final_logit_softcapping(h["final_logit_softcapping"])
            w.add_sliding_window(h["sliding_window"])
        return
    w.add_rope_freq_base(full["rope_theta"])
    if h.get("head_dim") is not None:
        w.add_key_length(h["head_dim"])
        w.add_value_length(h["head_dim"])
    if arch == "llama":
        w.add_vocab_size(h["vocab_size"])
        w.add_rope_dimension_count(h.get("head_dim") or h["hidden_size"] // heads)
    if arch == "gemma3":
        w.add_rope_freq_base_swa(rope["sliding_attention"]["rope_theta"])
        w.add_sliding_window(h["sliding_window"])


def _phi3_metadata(w, h: dict, rope: dict) -> None:
    """Phi3MiniModel.set_gguf_parameters / generate_extra_tensors (the metadata part)."""
    n_embd, n_head = h["hidden_size"], h["num_attention_heads"]
    rot = h.get("partial_rotary_factor") or 1.0
    w.add_rope_scaling_orig_ctx_len(h["original_max_position_embeddings"])
    w.add_rope_dimension_count(int(rot * n_embd) // n_head)
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_sliding_window(h.get("sliding_window") or 0)
    if rope.get("rope_type") == "longrope":
        scale = h["max_position_embeddings"] / h["original_max_position_embeddings"]
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) /
                                                  math.log(h["original_max_position_embeddings"])))
        w.add_tensor("rope_factors_long.weight", np.asarray(rope["long_factor"], np.float32))
        w.add_tensor("rope_factors_short.weight", np.asarray(rope["short_factor"], np.float32))


def _tensors(arch: str, h: dict, folder) -> dict:
    """GGUF name -> float32 array: the folder's safetensors through the converter's
    modify_tensors for `arch`."""
    from safetensors.numpy import load_file

    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], h["num_hidden_layers"])
    out = {}
    for name, x in load_file(str(folder / "model.safetensors")).items():
        x = x.astype(np.float32)
        if arch.startswith("gemma"):
            if name == "lm_head.weight" and arch != "gemma3":
                continue
            if name.endswith("norm.weight"):
                x = x + 1
        if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            x = _permute(x, h["num_attention_heads"], h["num_attention_heads"])
        if arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            x = _permute(x, h["num_attention_heads"], h["num_key_value_heads"])
        out[tmap.get_name(name, try_suffixes=(".weight", ".bias"))] = x
    rope = h.get("rope_parameters") or {}
    if arch == "llama" and rope.get("rope_type") == "llama3":
        out["rope_freqs.weight"] = _rope_freqs(rope, h.get("head_dim") or h["hidden_size"] //
                                               h["num_attention_heads"])
    return out


def convert(arch: str, model, folder, path, name: str = "tiny"):
    """Save `model` as a Hugging Face folder and as the GGUF file llama.cpp's converter writes."""
    model.save_pretrained(folder)
    h = model.config.to_dict()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    _metadata(w, arch, h)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([chr(0x21 + i) if i < 94 else f"t{i}" for i in range(V)])
    w.add_pad_token_id(0)     # the converter's SpecialVocab; Phi3Config's default 32000 is no id here
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for n, x in _tensors(arch, h, folder).items():
        w.add_tensor(n, np.ascontiguousarray(x))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ----------------------------------------------------------------------------- the checks

CASES = {  # case -> (GGUF architecture, config extras, transformers' GGUF loader knows it)
    "llama": ("llama", {}, True),
    "llama31": ("llama", {"rope_parameters": LLAMA31, "max_position_embeddings": 16384}, False),
    "llama3_odd": ("llama", {"rope_parameters": LLAMA3_ODD}, False),
    "qwen2": ("qwen2", {}, True),
    "qwen3": ("qwen3", {"tie_word_embeddings": True}, True),
    "gemma": ("gemma", {}, False),
    "gemma2": ("gemma2", {}, True),
    "gemma3": ("gemma3", {}, True),
    "phi3": ("phi3", {}, True),
    "phi3_longrope": ("phi3", {"partial_rotary_factor": 0.75, "original_max_position_embeddings": 16,
                               "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0,
                                                   "short_factor": SHORT, "long_factor": LONG}}, False),
    "olmo2": ("olmo2", {}, False),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    arch, extra, tf_gguf = CASES[request.param]
    model = _model(_config(arch, **extra))
    root = tmp_path_factory.mktemp(request.param)
    path = convert(arch, model, root / "hf", root / f"{request.param}.gguf")
    return request.param, model, root / "hf", path, tf_gguf


def _leaves(params):
    return jax.tree_util.tree_flatten_with_path(params)[0]


def test_gguf_loads_as_the_folder(case):
    """(a) the same ModelConfig and parameters from the GGUF file as from the folder."""
    _, _, folder, path, _ = case
    cfg, params, tok = kvjax.load_model(str(path))
    ref_cfg, ref_params = load_hf(folder)
    assert cfg == ref_cfg.replace(name=cfg.name)
    got, want = _leaves(params), _leaves(ref_params)
    assert [k for k, _ in got] == [k for k, _ in want]
    for (k, a), (_, b) in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6, err_msg=str(k))
    assert tok is not None and cfg.vocab_size == V


def _close(got, ref):
    assert np.abs(got - ref).max() <= TOL * np.abs(ref).max()


def test_gguf_matches_transformers(case):
    """(b) logits of kvjax on the GGUF file = transformers' model (and its GGUF loader)."""
    name, model, _, path, tf_gguf = case
    ids = IDS if name != "phi3_longrope" else np.arange(24)[None] % V    # past 16: long factors
    cfg, params, _ = load_gguf(path, with_tokenizer=False)
    got = np.asarray(kvjax.forward(cfg, params, ids))[0]
    with torch.no_grad():
        _close(got, model(torch.tensor(ids)).logits[0].numpy())
    if tf_gguf:
        require_module("accelerate", "transformers loads GGUF models only with accelerate")
        ref = tf.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                      dtype=torch.float32).eval()
        with torch.no_grad():
            _close(got, ref(torch.tensor(ids)).logits[0].numpy())


def test_llama3_rope_reconstructed():
    """rope_freqs.weight -> the folder's llama3 rope_scaling, defaults or not."""
    for extra in (CASES["llama31"][1], CASES["llama3_odd"][1]):
        h = _config("llama", **extra).to_dict()
        factors = _rope_freqs(h["rope_parameters"], 16)
        p = h["rope_parameters"]
        mine = converter_factors(p["rope_theta"], 16, p["factor"], p["low_freq_factor"],
                                 p["high_freq_factor"], p["original_max_position_embeddings"])
        np.testing.assert_allclose(mine, factors, rtol=1e-6)
        assert 1 < factors.max() == p["factor"] and factors.min() == 1


def _write(path, arch: str, h: dict, tensors: dict, **meta):
    w = gguf.GGUFWriter(str(path), arch)
    _metadata(w, arch, h)
    for key, value in meta.items():
        (w.add_string if isinstance(value, str) else w.add_float32)(f"{arch}.{key}", value)
    for n, x in tensors.items():
        w.add_tensor(n, np.ascontiguousarray(x, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unsupported_cases_name_the_key(tmp_path):
    """Rope scaling kvjax's families do not run, and rope_freqs no llama3 scaling produces,
    raise CheckpointError naming the key / tensor, before any parameter is read."""
    h = _config("qwen2").to_dict()
    emb = {"token_embd.weight": np.zeros((V, D), np.float32)}
    path = _write(tmp_path / "yarn.gguf", "qwen2", h, emb, **{"rope.scaling.type": "yarn"})
    with pytest.raises(CheckpointError, match=r"qwen2\.rope\.scaling\.type='yarn' is not supported.*'none'"):
        load_gguf(path)
    h = _config("llama").to_dict()
    odd = {**emb, "rope_freqs.weight": np.linspace(1, 3, 8)}
    with pytest.raises(CheckpointError, match=r"'rope_freqs\.weight'.*llama3"):
        load_gguf(_write(tmp_path / "freqs.gguf", "llama", h, odd))
    with pytest.raises(CheckpointError, match=r"general\.architecture='mamba'.*llama, gemma3, gemma, gemma2, "
                                              r"qwen2, qwen3, phi3, olmo2"):
        load_gguf(_write(tmp_path / "mamba.gguf", "mamba", h, emb))
