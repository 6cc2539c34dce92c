"""The tokenizer a GGUF file describes (`tokenizer.ggml.*` metadata) as a kvjax Tokenizer.

Byte-level BPE (`tokenizer.ggml.model` "gpt2": SmolLM2, Llama 3, Qwen) is rebuilt as a
`tokenizers` BPE model with the GPT-2 byte alphabet, exactly as transformers' GGUF tokenizer
conversion builds it (its result is the oracle in tests/test_gguf.py): tokens marked CONTROL
(type 3) are special added tokens, USER_DEFINED (type 4) plain added ones, and the
pre-tokenizer split follows `tokenizer.ggml.pre` (GPT-2's regex for names it does not list).
SentencePiece vocabularies (`tokenizer.ggml.model` "llama") of Gemma files become
transformers' GemmaTokenizer layout: whitespace-run tokens respelled with "\u2581", merges
rebuilt from the vocabulary in file order (Gemma files list none), byte fallback.
`tokenizer.chat_template` is the chat template; `tokenizer.ggml.eos_token_id` the EOS id.
"""
from __future__ import annotations

from pathlib import Path

from ..hf.common import CheckpointError
from ..tokenizer import HFTokenizer

SUPPORTED_MODELS = ("gpt2", "llama (gemma architectures)")
CONTROL, USER_DEFINED = 3, 4

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLITS = {**dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx"), _LLAMA3_SPLIT),
          **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2_SPLIT)}


def byte_alphabet() -> dict:
    """GPT-2's byte -> printable character table."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
          *range(ord("\u00ae"), ord("\u00ff") + 1)]
    cs = bs[:]
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + len(cs) - 188)
    return dict(zip(bs, map(chr, cs)))


def build_bpe(g):
    """A `tokenizers.Tokenizer` for a byte-level BPE GGUF vocabulary."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    tokens = list(g.get("tokenizer.ggml.tokens"))
    types = g.array("tokenizer.ggml.token_type")
    types = [0] * len(tokens) if types is None else [int(t) for t in types]
    spelling = byte_alphabet()
    alphabet = set(spelling.values())
    vocab = {(t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i
             for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ")) for m in g.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(vocab, merges, dropout=None, continuing_subword_prefix="",
                               end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    split = SPLITS.get(g.get("tokenizer.ggml.pre", None))
    tok.pre_tokenizer = (pre_tokenizers.ByteLevel(add_prefix_space=False) if split is None else
                         pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                  pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                           use_regex=False)]))
    tok.decoder = decoders.ByteLevel()
    _bos_processor(g, tok, tokens, processors)
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, k in zip(tokens, types) if k == CONTROL and set(t) <= alphabet])
    tok.add_tokens([AddedToken(t, normalized=False, special=False)
                    for t, k in zip(tokens, types) if k == USER_DEFINED and t in vocab])
    return tok, tokens


def spm_merges(tokens: list[str]) -> list[tuple]:
    """BPE merges implied by a vocabulary whose order is its merge priority (transformers'
    generate_merges with scores = -position)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for i, t in enumerate(tokens):
        local = [(t[:k], t[k:]) for k in range(1, len(t)) if t[:k] in vocab and t[k:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges += [(i, len(a), len(b), a, b) for a, b in local]
    merges.sort(key=lambda m: (m[0], -m[1], -m[2]))
    return [(a, b) for _, _, _, a, b in merges]


def build_gemma_spm(g):
    """A `tokenizers.Tokenizer` for a Gemma SentencePiece GGUF vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    raw = list(g.get("tokenizer.ggml.tokens"))
    tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in raw]
    types = g.array("tokenizer.ggml.token_type")
    types = [0] * len(raw) if types is None else [int(t) for t in types]
    vocab = {t: i for i, t in enumerate(tokens)}
    unk = g.get("tokenizer.ggml.unknown_token_id", None)
    tok = Tokenizer(models.BPE(vocab, spm_merges(tokens), dropout=None, fuse_unk=True, byte_fallback=True,
                               unk_token=None if unk is None else tokens[unk]))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous", invert=False)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    _bos_processor(g, tok, tokens, processors)
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, k in zip(raw, types) if k == CONTROL])
    tok.add_tokens([AddedToken(t, normalized=False, special=False)
                    for t, k in zip(raw, types) if k == USER_DEFINED and t in vocab])
    return tok, tokens


def _bos_processor(g, tok, tokens, processors):
    bos = g.get("tokenizer.ggml.bos_token_id", None)
    if g.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A {tokens[bos]} $B",
            special_tokens=[(tokens[bos], int(bos))])


class GGUFTokenizer(HFTokenizer):
    """The tokenizer and chat template stored in a GGUF file, with HFTokenizer's interface
    (encode, decode, apply_chat_template, save writes a tokenizer.json folder)."""

    def __init__(self, g):
        kind = g.get("tokenizer.ggml.model", None)
        if kind == "gpt2":
            self._tok, tokens = build_bpe(g)
        elif kind == "llama" and str(g.arch).startswith("gemma"):
            self._tok, tokens = build_gemma_spm(g)
        else:
            raise CheckpointError(f"{g.path}: tokenizer.ggml.model={kind!r} (architecture {g.arch!r}) "
                                  f"cannot be converted; kvjax reads GGUF tokenizers "
                                  f"{', '.join(SUPPORTED_MODELS)}")
        self.path = Path(g.path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        ids = {k: g.get(f"tokenizer.ggml.{k}_token_id", None) for k in ("bos", "eos", "padding", "unknown")}
        self.bos_id, self.pad_id = ids["bos"], ids["padding"]
        eot = g.get("tokenizer.ggml.eot_token_id", None)
        self.eos_ids = tuple(dict.fromkeys(int(i) for i in (ids["eos"], eot) if i is not None))
        self.eos_id = self.eos_ids[0] if self.eos_ids else None
        self.chat_template = g.get("tokenizer.chat_template", None)
        names = {"bos_token": "bos", "eos_token": "eos", "pad_token": "padding", "unk_token": "unknown"}
        self.special_tokens_map = {n: tokens[ids[k]] for n, k in names.items() if ids[k] is not None}

    def __repr__(self):
        return f"GGUFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"
