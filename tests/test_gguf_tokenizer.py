"""GGUF SentencePiece "llama" tokenizers (Llama 2, Mistral, TinyLlama, Phi-3 files) against
transformers' own GGUF tokenizer conversion (AutoTokenizer.from_pretrained(..., gguf_file=)).

No such file is installed, so each test writes a tiny synthetic one whose vocabulary is laid out
as Llama 2's is: <unk>=0, <s>=1, </s>=2, the 256 byte tokens <0x00>..<0xFF> (type BYTE), then
real SentencePiece pieces (the first 4000 of Gemma 3's packaged GGUF vocabulary, in its merge
order, scored -position) and, last and lowest scored, its 400 most frequent single characters
(rarer characters, CJK and emoji fall back to bytes), plus a CONTROL and a USER_DEFINED token.
"""
import numpy as np
import pytest

from conftest import require_module
from kvjax.gguf import GGUFFile, GGUFTokenizer
from kvjax.hf import CheckpointError
from kvjax.models import load_model
from test_gguf import _write_gguf, corpus, need_packaged

gguf = require_module("gguf", "GGUF files are written with ggml-org's gguf package")
N_PIECES, N_CHARS = 4000, 400
EXTRA = ["", " ", "  two leading", "<s> and </s> and <unk> in text", "<0x0A> is text, \u2581 too",
         "x<|im_start|>y <|im_end|>z", "\n\nnewlines first", "ends with spaces  ", "a\u00a0b\u200bc\ufeffd"]


@pytest.fixture(scope="module")
def spm_vocab():
    """(tokens, scores, types) of a Llama-2-style SentencePiece vocabulary (module docstring)."""
    g = GGUFFile(need_packaged("gemma3-270m"))
    pieces = [t for t, k in zip(g.get("tokenizer.ggml.tokens"), g.array("tokenizer.ggml.token_type"))
              if int(k) == 1]
    chars = [t for t in pieces if len(t) == 1][:N_CHARS]
    words = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in pieces if len(t) > 1][:N_PIECES]
    words = list(dict.fromkeys(words))
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *words, *chars,
              "<|im_start|>", "<|im_end|>"]
    types = [2, 3, 3, *[6] * 256, *[1] * (len(words) + len(chars)), 3, 4]
    scores = [0.0] * 259 + [-float(i) for i in range(len(words) + len(chars))] + [0.0, 0.0]
    return tokens, scores, types


def _write(path, arch="llama", tokenizer=None):
    """A tiny 1-layer F32 GGUF model of `arch`; `tokenizer(writer)` writes its tokenizer keys."""
    return _write_gguf(path, arch, tokenizer=tokenizer or True)


def _spm(vocab, tie=1, **flags):
    """A tokenizer writer for `vocab`; scores coarsened to ties of `tie`, `flags`: add_bos_token,
    add_eos_token, add_space_prefix (None: key absent)."""
    tokens, scores, types = vocab

    def write(w):
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores([float(np.floor(s / tie)) for s in scores])
        w.add_token_types(types)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        for key, value in flags.items():
            if value is not None:
                getattr(w, f"add_{key}")(value)
        return len(tokens)
    return write


CASES = {"llama-defaults": ("llama", 1, {}),
         "llama-space-prefix": ("llama", 1, {"add_space_prefix": True, "add_bos_token": True}),
         "llama-no-space-prefix": ("llama", 500, {"add_space_prefix": False, "add_bos_token": False,
                                                "add_eos_token": True}),
         "phi3": ("phi3", 1, {"add_space_prefix": True})}


@pytest.mark.parametrize("case", CASES)
def test_sentencepiece_matches_transformers(tmp_path, spm_vocab, case):
    tf = require_module("transformers", "transformers' GGUF tokenizer conversion is the reference")
    arch, tie, flags = CASES[case]
    path = _write(tmp_path / f"{case}.gguf", arch, _spm(spm_vocab, tie, **flags))
    ours = GGUFTokenizer(GGUFFile(path))
    ref = tf.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    assert (ours.bos_id, ours.eos_id, ours.eos_ids) == (ref.bos_token_id, ref.eos_token_id, (2,)) == (1, 2, (2,))
    assert ours.vocab_size == len(ref) == len(spm_vocab[0])
    texts = corpus() + EXTRA
    for text in texts:
        for special in (True, False):
            ids = ours.encode(text, add_special_tokens=special)
            assert ids == ref.encode(text, add_special_tokens=special), (case, text[:80], special)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    ids = np.random.default_rng(1).integers(0, len(spm_vocab[0]), size=3000).tolist()  # bytes: invalid UTF-8
    assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False)
    assert (ours.encode("Hello world")[0] == 1) == flags.get("add_bos_token", True)
    # Metaspace prefixes "\u2581" to the first segment unless it starts with a space; Phi-3's
    # Prepend prefixes every segment; the decoder drops one leading space
    assert ours.decode(ours.encode(" x <|im_start|>y\n")) == ("x y\n" if arch == "llama" else " x  y\n")


def test_sentencepiece_loads_with_the_model(tmp_path, spm_vocab):
    cfg, _, tok = load_model(str(_write(tmp_path / "tiny.gguf", "llama", _spm(spm_vocab))))
    assert isinstance(tok, GGUFTokenizer) and cfg.vocab_size == tok.vocab_size == len(spm_vocab[0])
    assert tok.special_tokens_map == {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    assert tok.encode("\n") == [1, tok.token_to_id("\u2581"), 3 + 0x0A]      # "\u2581" prefix, byte fallback


@pytest.mark.parametrize("kind", ["bert", "rwkv", "t5", None])
def test_unsupported_tokenizer_models(tmp_path, monkeypatch, kind):
    def write(w):
        if kind is not None:
            w.add_tokenizer_model(kind)
        w.add_token_list([f"t{i}" for i in range(256)])
        return 256
    path = _write(tmp_path / "tiny.gguf", "llama", write)
    monkeypatch.setattr(GGUFFile, "tensor", lambda *a, **k: pytest.fail("a tensor was read"))
    with pytest.raises(CheckpointError, match=f"tokenizer.ggml.model={kind!r} .architecture 'llama'. cannot be "
                                              f"converted; kvjax reads GGUF tokenizers gpt2, llama"):
        load_model(str(path))


def test_sentencepiece_without_scores(tmp_path):
    def write(w):
        w.add_tokenizer_model("llama")
        w.add_token_list(["<unk>", "<s>", "</s>", *(f"t{i}" for i in range(253))])
        return 256
    with pytest.raises(CheckpointError, match="needs tokenizer.ggml.scores, one per token .256.; the file has none"):
        GGUFTokenizer(GGUFFile(_write(tmp_path / "tiny.gguf", "llama", write)))
