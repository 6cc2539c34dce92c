"""The tokenizer a GGUF file describes (`tokenizer.ggml.*` metadata) as a kvjax Tokenizer.

Byte-level BPE (`tokenizer.ggml.model` "gpt2": SmolLM2, Llama 3, Qwen) is rebuilt as a
`tokenizers` BPE model with the GPT-2 byte alphabet, exactly as transformers' GGUF tokenizer
conversion builds it (its result is the oracle in tests/test_gguf.py): tokens marked CONTROL
(type 3) are special added tokens, USER_DEFINED (type 4) plain added ones, and the
pre-tokenizer split follows `tokenizer.ggml.pre` (GPT-2's regex for names it does not list).
SentencePiece vocabularies (`tokenizer.ggml.model` "llama") of Gemma files become
transformers' GemmaTokenizer layout: whitespace-run tokens respelled with "\u2581", merges
rebuilt from the vocabulary in file order (Gemma files list none), byte fallback.
Under any other architecture (Llama 2, Mistral, TinyLlama, Phi-3 files) a "llama" vocabulary
becomes what transformers' GGUF conversion builds (its LlamaTokenizer, legacy=False): merges
generated from `tokenizer.ggml.scores` (highest score first), BPE with byte fallback over the
`<0x0A>` byte tokens, a Metaspace pre-tokenizer (spaces as "\u2581", one prefixed to the text
before the first added token unless it starts with a space; Phi-3: a Prepend + Replace
normalizer instead, prefixing every segment), a decoder that drops one leading space, BOS added
unless `tokenizer.ggml.add_bos_token` is false (EOS when `add_eos_token`), CONTROL tokens and
the named unk/bos/eos/pad tokens special. `tokenizer.ggml.add_space_prefix` is not read:
transformers ignores it, so add_space_prefix=false is still prefixed (llama.cpp would not).
Any other `tokenizer.ggml.model` (bert, rwkv, t5, ...) is a CheckpointError naming it and
SUPPORTED_MODELS, raised when GGUFTokenizer is built (load_gguf: before any tensor is read).
`tokenizer.chat_template` is the chat template; `tokenizer.ggml.eos_token_id` the EOS id.
"""
from __future__ import annotations

from pathlib import Path

from ..hf.common import CheckpointError
from ..tokenizer import HFTokenizer

SUPPORTED_MODELS = ("gpt2", "llama")
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


def score_merges(tokens: list[str], scores: list[float]) -> list[tuple]:
    """BPE merges implied by a SentencePiece vocabulary and its scores: transformers'
    generate_merges(vocab, vocab_scores), every split of a token into two vocabulary pieces,
    highest score first, then the longer left and right piece (stable otherwise)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for t, score in dict(zip(tokens, scores)).items():
        local = [(t[:k], t[k:]) for k in range(1, len(t)) if t[:k] in vocab and t[k:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges += [(-score, -len(a), -len(b), a, b) for a, b in local]
    merges.sort(key=lambda m: m[:3])
    return [(a, b) for _, _, _, a, b in merges]


def build_llama_spm(g, phi3: bool = False):
    """A `tokenizers.Tokenizer` for a SentencePiece GGUF vocabulary (Llama 2, Mistral, Phi-3)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

    tokens = list(g.get("tokenizer.ggml.tokens"))
    scores = g.array("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise CheckpointError(f"{g.path}: a SentencePiece (tokenizer.ggml.model='llama') vocabulary needs "
                              f"tokenizer.ggml.scores, one per token ({len(tokens)}); the file has "
                              f"{'none' if scores is None else len(scores)}")
    types = g.array("tokenizer.ggml.token_type")
    types = [0] * len(tokens) if types is None else [int(t) for t in types]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab, score_merges(tokens, [float(x) for x in scores]), dropout=None,
                               fuse_unk=True, byte_fallback=True))
    if phi3:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1, right=0)])
    _spm_processor(g, tok, tokens)
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, k in zip(tokens, types) if k == CONTROL])
    tok.add_tokens([AddedToken(t, normalized=False, special=False)
                    for t, k in zip(tokens, types) if k == USER_DEFINED])
    named = (g.get(f"tokenizer.ggml.{k}_token_id", None) for k in ("bos", "eos", "unknown", "padding"))
    added = set(tok.get_added_tokens_decoder())
    tok.add_special_tokens([AddedToken(tokens[i], normalized=False, special=True)
                            for i in dict.fromkeys(int(i) for i in named if i is not None) if i not in added])
    return tok, tokens


def _spm_processor(g, tok, tokens):
    """transformers' update_post_processor: BOS unless add_bos_token is false, EOS if add_eos_token."""
    from tokenizers import processors

    ends = []
    for key, default in (("bos", True), ("eos", False)):
        i = g.get(f"tokenizer.ggml.{key}_token_id", None)
        ends.append(tokens[int(i)] if i is not None and g.get(f"tokenizer.ggml.add_{key}_token", default) else None)
    bos, eos = ends

    def seq(name, type_id):
        return " ".join([*(f"{bos}:{type_id}",) * bool(bos), f"${name}:{type_id}", *(f"{eos}:{type_id}",) * bool(eos)])
    tok.post_processor = processors.TemplateProcessing(
        single=seq("A", 0), pair=f"{seq('A', 0)} {seq('B', 1)}",
        special_tokens=[(t, tok.token_to_id(t)) for t in dict.fromkeys(e for e in ends if e)])


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
        elif kind == "llama":
            self._tok, tokens = build_llama_spm(g, phi3=g.arch == "phi3")
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
