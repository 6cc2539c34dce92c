"""Tokenizers: ByteTokenizer (models trained here) and HFTokenizer (tokenizer.json), one interface."""
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kvjax
from conftest import require_module
from hf_fixtures import make_hf_tokenizer, random_params


# ----------------------------------------------------------------------------- ByteTokenizer

@settings(max_examples=50, deadline=None)
@given(text=st.text())
def test_byte_round_trip_any_text(text):
    tok = kvjax.ByteTokenizer()
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id == 257 and all(0 <= i < 256 for i in ids[1:])
    assert tok.decode(ids) == text
    assert tok.encode(text, add_special_tokens=False) == ids[1:]


def test_byte_ids_are_the_utf8_bytes():
    tok = kvjax.ByteTokenizer(add_bos=False)
    assert tok.encode("hé🙂") == list("hé🙂".encode("utf-8"))
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (256, 257, 258, 259)
    assert tok.eos_ids == (258,)
    assert tok.vocab_size <= kvjax.ModelConfig.preset("llama-tiny").vocab_size


@settings(max_examples=50, deadline=None)
@given(ids=st.lists(st.integers(0, 400)))
def test_byte_decode_never_raises(ids):
    """A model can emit any id in its vocabulary, including cut UTF-8 sequences."""
    assert isinstance(kvjax.ByteTokenizer().decode(ids), str)


def test_byte_decode_replaces_invalid_utf8_and_drops_specials():
    tok = kvjax.ByteTokenizer()
    assert tok.decode([0xFF, ord("a"), 0xE2, 0x82]) == "\ufffda\ufffd"
    assert tok.decode([257, ord("h"), ord("i"), 258, 256, 300]) == "hi"
    assert tok.decode([257, ord("h"), 258, 300], skip_special_tokens=False) == "<bos>h<eos><id:300>"
    # A multi-byte character split by a special still decodes its whole parts only.
    assert tok.decode(list("é".encode()) + [258]) == "é"
    with pytest.raises(ValueError, match="-1"):
        tok.decode([-1])


def test_byte_save_and_load(tmp_path):
    kvjax.ByteTokenizer(add_bos=False).save(tmp_path)
    data = json.loads((tmp_path / "kvjax_tokenizer.json").read_text())
    assert data["type"] == "byte" and data["specials"] == {"<pad>": 256, "<bos>": 257, "<eos>": 258}
    tok = kvjax.load_tokenizer(tmp_path)
    assert tok == kvjax.ByteTokenizer(add_bos=False)
    assert kvjax.load_tokenizer(tmp_path / "kvjax_tokenizer.json") == tok
    data["specials"]["<eos>"] = 3
    (tmp_path / "kvjax_tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="specials"):
        kvjax.load_tokenizer(tmp_path)


def test_byte_tokenizer_wins_over_tokenizer_json(tmp_path):
    make_hf_tokenizer(tmp_path)
    kvjax.ByteTokenizer().save(tmp_path)
    assert isinstance(kvjax.load_tokenizer(tmp_path), kvjax.ByteTokenizer)


# ----------------------------------------------------------------------------- HFTokenizer

@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_hf_tokenizer(tmp_path_factory.mktemp("tok"))


def test_hf_encode_decode_and_specials(hf_dir):
    tok = kvjax.load_tokenizer(hf_dir)
    assert isinstance(tok, kvjax.HFTokenizer)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)  # from tokenizer_config.json
    text = "The quick brown fox 🙂 caches keys."
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id and len(ids) < len(text.encode())  # merges were learned
    assert tok.encode(text, add_special_tokens=False) == ids[1:]
    assert tok.decode(ids) == text
    assert tok.decode(ids + [tok.eos_id]) == text
    assert tok.decode([tok.bos_id, *ids[1:]], skip_special_tokens=False).startswith("<s>")
    # Ids past the tokenizer (model vocab 320 > tokenizer 300) and cut UTF-8 never raise.
    assert tok.decode(ids + [310, 319]) == text
    assert isinstance(tok.decode(tok.encode("🙂", add_special_tokens=False)[:1]), str)


def test_hf_eos_from_generation_config_then_config(tmp_path):
    make_hf_tokenizer(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 5, "bos_token_id": 7}))
    tok = kvjax.load_tokenizer(tmp_path)
    assert (tok.eos_id, tok.eos_ids, tok.bos_id) == (5, (5,), 7)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 9]}))
    tok = kvjax.load_tokenizer(tmp_path)
    assert (tok.eos_id, tok.eos_ids) == (2, (2, 9))


def test_hf_tokenizer_matches_transformers(hf_dir):
    transformers = require_module("transformers", "the reference tokenizer comes from transformers")
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / "tokenizer.json"),
                                               bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok = kvjax.load_tokenizer(hf_dir)
    for text in ["", "Sliding windows bound the cache.", "Ünïcödé 🙂\nnew line  spaces"]:
        ids = tok.encode(text)
        assert ids == ref(text)["input_ids"]
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)


def test_hf_save_round_trip(hf_dir, tmp_path):
    tok = kvjax.load_tokenizer(hf_dir)
    tok.save(tmp_path)
    again = kvjax.load_tokenizer(tmp_path)
    assert (again.bos_id, again.eos_id, again.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert again.encode("quick fox") == tok.encode("quick fox")


def test_one_interface_for_both(hf_dir):
    for tok in (kvjax.ByteTokenizer(), kvjax.load_tokenizer(hf_dir)):
        assert isinstance(tok, kvjax.Tokenizer)
        assert tok.decode(tok.encode("cache")) == "cache"


def test_missing_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        kvjax.load_tokenizer(tmp_path / "nope")
    (tmp_path / "tokenizer.model").write_bytes(b"sp")
    with pytest.raises(FileNotFoundError, match="tokenizer.model.*save_pretrained"):
        kvjax.load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="tokenizer.json is not a valid tokenizers file"):
        kvjax.load_tokenizer(tmp_path)


def test_generate_stops_at_any_of_several_eos_ids():
    """eos_token_id as a list: each row stops at the first of ANY listed id (EOS included in its
    length, pad after); a row that emits none of them runs to max_new_tokens."""
    import numpy as np

    cfg = kvjax.ModelConfig.preset("llama-tiny")
    params = random_params(cfg, seed=1)
    prompts = np.array([[5, 6, 7, 8], [9, 10, 11, 0], [12, 13, 0, 0]], np.int32)
    lens = np.array([4, 3, 2], np.int32)
    N = 8
    free = np.asarray(kvjax.generate(cfg, params, prompts, lens, max_new_tokens=N).tokens)
    first_new = lambda row: next(t for i, t in enumerate(row) if i >= 1 and t not in row[:i])  # noqa: E731
    eos = []
    for row in free[:2]:
        eos.append(int(first_new([t for t in row.tolist() if t not in eos] + [-1])))
    out = kvjax.generate(cfg, params, prompts, lens, max_new_tokens=N, eos_token_id=eos, pad_token_id=0)
    toks, got = np.asarray(out.tokens), np.asarray(out.lengths)
    for b in range(3):
        hits = [i for i, t in enumerate(free[b]) if t in eos]
        n = hits[0] + 1 if hits else N
        assert got[b] == n and toks[b, :n].tolist() == free[b, :n].tolist()
        assert (toks[b, n:] == 0).all()
    assert got[0] < N and got[1] < N
    with pytest.raises(ValueError, match=r"eos_token_id=999 is outside the vocabulary \[0, 320\)"):
        kvjax.generate(cfg, params, prompts, lens, max_new_tokens=2, eos_token_id=[3, 999])
    with pytest.raises(ValueError, match="eos_token_id must be None, an int or a sequence of ints"):
        kvjax.generate(cfg, params, prompts, lens, max_new_tokens=2, eos_token_id="3")
