"""Tokenizers: one small interface for byte-level models trained here and Hugging Face checkpoints.

Both classes expose the same surface (`Tokenizer`):
  encode(text, add_special_tokens=True) -> list[int]
  decode(ids, skip_special_tokens=True) -> str   (never raises on invalid UTF-8)
  vocab_size, bos_id, eos_id, pad_id (int or None), eos_ids (every id that ends a turn)
  save(folder)

`ByteTokenizer`: ids 0..255 are raw UTF-8 bytes, then `<pad>`=256, `<bos>`=257, `<eos>`=258
(vocab 259). It is stored as `kvjax_tokenizer.json` next to a checkpoint.
`HFTokenizer`: wraps a `tokenizer.json` of the `tokenizers` library; special ids come from
the checkpoint's generation_config.json, config.json and tokenizer_config.json.
`load_tokenizer(folder)` returns whichever the folder holds.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Protocol, runtime_checkable

BYTE_TOKENIZER_FILE = "kvjax_tokenizer.json"
HF_TOKENIZER_FILE = "tokenizer.json"


@runtime_checkable
class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    eos_ids: tuple[int, ...]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str: ...

    def save(self, folder) -> None: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 plus three specials; nothing to train, nothing unknown.

    `add_bos`: whether `encode(..., add_special_tokens=True)` starts with `<bos>`
    (models trained here see `<bos>` first, so prompts should too).
    """

    PAD, BOS, EOS = 256, 257, 258
    SPECIALS = {"<pad>": PAD, "<bos>": BOS, "<eos>": EOS}
    vocab_size = 259

    def __init__(self, add_bos: bool = True):
        self.add_bos = bool(add_bos)
        self.bos_id, self.eos_id, self.pad_id = self.BOS, self.EOS, self.PAD
        self.eos_ids = (self.EOS,)

    def __repr__(self):
        return f"ByteTokenizer(add_bos={self.add_bos})"

    def __eq__(self, other):
        return isinstance(other, ByteTokenizer) and other.add_bos == self.add_bos

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"ByteTokenizer.encode takes a str, got {type(text).__name__}")
        ids = list(text.encode("utf-8"))
        return [self.BOS] + ids if add_special_tokens and self.add_bos else ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Bytes back to text; invalid UTF-8 becomes U+FFFD. Specials, and ids past the
        tokenizer's 259 (a model's vocab may be larger), are dropped unless
        `skip_special_tokens=False`, which shows them as `<bos>` or `<id:300>`."""
        names = {v: k for k, v in self.SPECIALS.items()}
        out, run = [], bytearray()
        for i in (int(t) for t in ids):
            if i < 0:
                raise ValueError(f"token id {i} is negative; ids are in [0, {self.vocab_size})")
            if i < 256:
                run.append(i)
                continue
            if not skip_special_tokens:
                out.append(run.decode("utf-8", errors="replace"))
                run = bytearray()
                out.append(names.get(i, f"<id:{i}>"))
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def to_json(self) -> dict:
        return {"type": "byte", "version": 1, "vocab_size": self.vocab_size,
                "specials": dict(self.SPECIALS), "add_bos": self.add_bos}

    def save(self, folder) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / BYTE_TOKENIZER_FILE).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, file) -> "ByteTokenizer":
        file = Path(file)
        data = _read_json(file)
        if data.get("type") != "byte":
            raise ValueError(f"{file}: type is {data.get('type')!r}, expected 'byte'")
        if data.get("specials", cls.SPECIALS) != cls.SPECIALS:
            raise ValueError(f"{file}: specials {data['specials']} differ from this kvjax's "
                             f"ByteTokenizer {cls.SPECIALS}")
        return cls(add_bos=data.get("add_bos", True))


class HFTokenizer:
    """A Hugging Face `tokenizer.json` (the `tokenizers` library) behind the kvjax interface.

    `encode(add_special_tokens=True)` runs the tokenizer's own post-processor (e.g. Llama's
    leading `<s>`), exactly as transformers' fast tokenizers do.
    """

    def __init__(self, folder):
        from tokenizers import Tokenizer as _Tok  # local: only HF checkpoints need it

        folder = Path(folder)
        self.path = folder / HF_TOKENIZER_FILE
        try:
            self._tok = _Tok.from_file(str(self.path))
        except Exception as e:  # the library raises a bare Exception on malformed files
            raise ValueError(f"{self.path} is not a valid tokenizers file: {e}") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        tok_cfg = _read_json_if(folder / "tokenizer_config.json")
        model_cfg = _read_json_if(folder / "config.json")
        gen_cfg = _read_json_if(folder / "generation_config.json")
        self.bos_id = self._special("bos", (gen_cfg, model_cfg), tok_cfg)
        self.pad_id = self._special("pad", (gen_cfg, model_cfg), tok_cfg)
        eos = _first_set("eos_token_id", gen_cfg, model_cfg)
        if eos is None:
            eos = self._from_token_config("eos", tok_cfg)
        self.eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None)
        self.eos_id = self.eos_ids[0] if self.eos_ids else None

    def __repr__(self):
        return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"

    def _special(self, kind, configs, tok_cfg):
        value = _first_set(f"{kind}_token_id", *configs)
        if isinstance(value, list):
            value = value[0] if value else None
        return int(value) if value is not None else self._from_token_config(kind, tok_cfg)

    def _from_token_config(self, kind, tok_cfg):
        token = tok_cfg.get(f"{kind}_token")
        if isinstance(token, dict):  # older files: {"content": "<s>", ...}
            token = token.get("content")
        return self._tok.token_to_id(token) if isinstance(token, str) else None

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"HFTokenizer.encode takes a str, got {type(text).__name__}")
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        # Ids past the tokenizer's vocabulary (a model's embedding may be padded wider)
        # would make the library raise; they carry no text, so they are dropped.
        ids = [int(i) for i in ids]
        if any(i < 0 for i in ids):
            raise ValueError(f"token ids must be >= 0, got {min(ids)}")
        return self._tok.decode([i for i in ids if i < self.vocab_size],
                                skip_special_tokens=skip_special_tokens)

    def save(self, folder) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(folder / HF_TOKENIZER_FILE))
        names = {k: self._tok.id_to_token(v) for k, v in
                 (("bos_token", self.bos_id), ("eos_token", self.eos_id), ("pad_token", self.pad_id))
                 if v is not None}
        cfg_file = folder / "tokenizer_config.json"
        existing = _read_json_if(cfg_file)
        cfg_file.write_text(json.dumps({**existing, **names}, indent=2) + "\n")


def load_tokenizer(path) -> ByteTokenizer | HFTokenizer:
    """The tokenizer stored in a checkpoint folder (or given as a tokenizer file).

    `kvjax_tokenizer.json` -> ByteTokenizer; else `tokenizer.json` -> HFTokenizer.
    """
    path = Path(path)
    if path.is_file():
        if path.name == BYTE_TOKENIZER_FILE:
            return ByteTokenizer.load(path)
        if path.name == HF_TOKENIZER_FILE:
            return HFTokenizer(path.parent)
        raise ValueError(f"{path}: expected a file named {BYTE_TOKENIZER_FILE} or {HF_TOKENIZER_FILE}")
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer folder {path} does not exist")
    if (path / BYTE_TOKENIZER_FILE).is_file():
        return ByteTokenizer.load(path / BYTE_TOKENIZER_FILE)
    if (path / HF_TOKENIZER_FILE).is_file():
        return HFTokenizer(path)
    found = sorted(p.name for p in path.iterdir())
    hint = ""
    if "tokenizer.model" in found:
        hint = (" It has only a SentencePiece tokenizer.model; write tokenizer.json once with "
                "transformers: AutoTokenizer.from_pretrained(folder).save_pretrained(folder).")
    raise FileNotFoundError(f"no tokenizer in {path}: expected {HF_TOKENIZER_FILE} or "
                            f"{BYTE_TOKENIZER_FILE}, found {found or 'nothing'}.{hint}")


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(Path(file).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(data).__name__}")
    return data


def _read_json_if(file: Path) -> dict:
    return _read_json(file) if file.is_file() else {}


def _first_set(key, *dicts):
    for d in dicts:
        if d.get(key) is not None:
            return d[key]
    return None
