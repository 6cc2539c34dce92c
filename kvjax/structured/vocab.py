"""A kvjax tokenizer as the grammar engine sees it: every token's bytes, the EOS ids, the width.

The engine is llguidance (chosen in benchmarks/grammar_engines.py; BUILD_NOTES says why).
`tokenizer_info(tok, vocab_size)` builds its `LLTokenizer` once per tokenizer object and
mask width (building one reads the whole vocabulary: about a second at 262k tokens) and
caches it for as long as the tokenizer lives:

  HFTokenizer / GGUFTokenizer   the `tokenizers.Tokenizer` JSON, which llguidance reads
                                itself (byte-level BPE, SentencePiece byte fallback, added
                                and special tokens)
  ByteTokenizer                 ids 0..255 are the bytes, <pad> <bos> <eos> special

`vocab_size` is the width of the masks: the model's vocabulary, which may be wider than the
tokenizer's (padded embeddings); ids past the tokenizer are never allowed. Every id in the
tokenizer's `eos_ids` is an end of output: allowed exactly where the grammar can end.
"""
from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

from ..tokenizer import ByteTokenizer

INSTALL_HINT = "structured output needs llguidance: pip install 'kvjax[structured]' (or: pip install llguidance)"


def engine():
    """The llguidance module; ImportError with the install command when it is missing."""
    try:
        import llguidance
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} ({e})") from None
    return llguidance


@dataclass(frozen=True, eq=False)
class TokenizerInfo:
    """llguidance's tokenizer (`ll`), the mask width `vocab_size` (>= `tokenizer_vocab`, the
    tokenizer's own ids) and the EOS ids. Compared and hashed by identity (cache keys)."""
    ll: object
    vocab_size: int
    tokenizer_vocab: int
    eos_ids: tuple

    @property
    def mask_words(self) -> int:
        """int32 words of one packed bitmask: ceil(vocab_size / 32)."""
        return (self.vocab_size + 31) // 32

    @property
    def engine_words(self) -> int:
        """int32 words llguidance writes (its vocabulary); the rest of a mask is zero."""
        return (self.tokenizer_vocab + 31) // 32


class ByteVocab:
    """ByteTokenizer in the shape llguidance's TokenizerWrapper reads."""

    def __init__(self, tok: ByteTokenizer):
        names = {v: k for k, v in tok.SPECIALS.items()}
        self.tokens = [bytes([i]) for i in range(256)] + [names[i].encode() for i in range(256, tok.vocab_size)]
        self.special_token_ids = sorted(tok.SPECIALS.values())
        self.eos_token_id = tok.eos_id
        self.bos_token_id = tok.bos_id

    def __call__(self, text) -> list[int]:
        return list(text.encode("utf-8") if isinstance(text, str) else bytes(text))


def backend_tokenizer(tok):
    """The `tokenizers.Tokenizer` an HFTokenizer (or GGUFTokenizer) wraps."""
    inner = getattr(tok, "backend", None) or getattr(tok, "_tok", None)   # HFTokenizer keeps it as _tok
    if inner is None or not hasattr(inner, "to_str"):
        raise TypeError(f"structured output needs a ByteTokenizer or a tokenizers-backed tokenizer, got "
                        f"{type(tok).__name__}")
    return inner


def build_tokenizer_info(tok, vocab_size: int | None = None) -> TokenizerInfo:
    """A new TokenizerInfo for `tok` (see tokenizer_info, which caches it)."""
    llg = engine()
    eos = tuple(int(e) for e in getattr(tok, "eos_ids", ()) or ())
    if not eos:
        raise ValueError(f"{tok!r} has no EOS id; structured output ends the text with one")
    if isinstance(tok, ByteTokenizer):
        ll = llg.LLTokenizer(llg.TokenizerWrapper(ByteVocab(tok)), eos_token=list(eos))
    else:
        ll = llg.LLTokenizer(backend_tokenizer(tok).to_str(), eos_token=list(eos))
    n_tok = int(ll.vocab_size)
    width = n_tok if vocab_size is None else int(vocab_size)
    if width < n_tok:
        raise ValueError(f"vocab_size={width} is smaller than the tokenizer's {n_tok} ids")
    return TokenizerInfo(ll, width, n_tok, eos)


_CACHE: dict = {}
_LOCK = threading.Lock()


def tokenizer_info(tok, vocab_size: int | None = None) -> TokenizerInfo:
    """The TokenizerInfo of `tok` with masks `vocab_size` wide (None: the tokenizer's own
    vocabulary), built once per (tokenizer object, width) and kept while `tok` lives."""
    key = (id(tok), vocab_size)
    with _LOCK:
        hit = _CACHE.get(key)
        if hit is not None and hit[0]() is tok:
            return hit[1]
    info = build_tokenizer_info(tok, vocab_size)
    with _LOCK:
        _CACHE[key] = (weakref.ref(tok, lambda _, key=key: _CACHE.pop(key, None)), info)
    return info
