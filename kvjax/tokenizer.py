"""Tokenizers: one small interface for byte-level models trained here and Hugging Face checkpoints.

Both classes expose the same surface (`Tokenizer`):
  encode(text, add_special_tokens=True) -> list[int]
  decode(ids, skip_special_tokens=True) -> str   (never raises on invalid UTF-8)
  apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **kwargs)
      -> list[int] (or the rendered str with tokenize=False)
  vocab_size, bos_id, eos_id, pad_id (int or None), eos_ids (every id that ends a turn)
  save(folder)

`ByteTokenizer`: ids 0..255 are raw UTF-8 bytes, then `<pad>`=256, `<bos>`=257, `<eos>`=258
(vocab 259). It is stored as `kvjax_tokenizer.json` next to a checkpoint.
`HFTokenizer`: wraps a `tokenizer.json` of the `tokenizers` library; special ids come from
the checkpoint's generation_config.json, config.json and tokenizer_config.json, the chat
template from chat_template.jinja (and additional_chat_templates/*.jinja) or
tokenizer_config.json's `chat_template`, rendered by jinja2's sandbox exactly as
transformers renders it (see `render_chat_template`).
`load_tokenizer(folder)` returns whichever the folder holds. `read_chat_template(file)` and
`use_chat_template(tok, text)` replace a checkpoint's chat template (`--chat-template`).
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Protocol, runtime_checkable

BYTE_TOKENIZER_FILE = "kvjax_tokenizer.json"
HF_TOKENIZER_FILE = "tokenizer.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"
# transformers' named special tokens, offered to chat templates as variables (bos_token, ...)
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                       "mask_token")


@runtime_checkable
class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    eos_ids: tuple[int, ...]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str: ...

    def apply_chat_template(self, messages, add_generation_prompt: bool = True,
                            tokenize: bool = True, **kwargs) -> list[int] | str: ...

    def save(self, folder) -> None: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 plus three specials; nothing to train, nothing unknown.

    `add_bos`: whether `encode(..., add_special_tokens=True)` starts with `<bos>`
    (models trained here see `<bos>` first, so prompts should too).

    Chat template (`apply_chat_template`): a fixed plain-text format, one block per message,
    `<|ROLE|>` on its own line, then the content and a newline; with
    `add_generation_prompt` an opening `<|assistant|>` line follows:

        <|system|>\nBe brief.\n<|user|>\nHi!\n<|assistant|>\n

    The markers are ordinary bytes (the byte vocabulary has no room for new specials); the ids
    are `encode(text)`, so `<bos>` comes first when `add_bos` is set.

    `chat_template` (None: the format above) may be set to a Jinja chat template
    (`use_chat_template`); it is then rendered as for Hugging Face tokenizers (variables
    bos_token="<bos>", eos_token="<eos>", pad_token="<pad>") and the text encoded with
    `encode_with_specials`, so those names in the rendered text become their ids.
    """

    PAD, BOS, EOS = 256, 257, 258
    SPECIALS = {"<pad>": PAD, "<bos>": BOS, "<eos>": EOS}
    vocab_size = 259
    chat_template: str | None = None

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

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = True,
                            **kwargs) -> list[int] | str:
        """The documented byte-level chat format (see the class docstring). Extra keyword
        arguments (template variables for Hugging Face templates, e.g. enable_thinking) are
        accepted and have no effect (unless a Jinja `chat_template` is set: see the class
        docstring). tokenize=False returns the text."""
        msgs = check_messages(messages)
        if self.chat_template is not None:
            names = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", **kwargs}
            text = render_chat_template(self.chat_template, msgs, add_generation_prompt=add_generation_prompt,
                                        **names)
            return self.encode_with_specials(text, add_special_tokens=False) if tokenize else text
        parts = []
        for i, m in enumerate(msgs):
            if not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}]['content'] must be a str for the byte-level chat "
                                 f"template, got {type(m.get('content')).__name__}")
            parts.append(f"<|{m['role']}|>\n{m['content']}\n")
        if add_generation_prompt:
            parts.append("<|assistant|>\n")
        text = "".join(parts)
        return self.encode(text) if tokenize else text

    def encode_with_specials(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """encode(), with the special-token names in `text` (`<bos>`, `<eos>`, `<pad>`) read as
        their ids, as Hugging Face tokenizers read theirs (rendered chat templates hold them)."""
        ids = [self.BOS] if add_special_tokens and self.add_bos else []
        rest = text
        while rest:
            hits = [(rest.find(n), n) for n in self.SPECIALS if n in rest]
            if not hits:
                ids += self.encode(rest, add_special_tokens=False)
                break
            pos, name = min(hits)
            ids += self.encode(rest[:pos], add_special_tokens=False) + [self.SPECIALS[name]]
            rest = rest[pos + len(name):]
        return ids

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
        self.chat_template = _read_chat_templates(folder, tok_cfg)
        self.special_tokens_map = _special_tokens_map(folder, tok_cfg)

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

    def get_chat_template(self, chat_template: str | None = None, tools=None) -> str:
        """The template text to render: the checkpoint's (its "default", or "tool_use" when
        tools are given and the checkpoint names one), a named one, or `chat_template` itself
        (transformers' `get_chat_template` rules)."""
        own = self.chat_template
        if isinstance(own, dict):
            if chat_template is not None and chat_template in own:
                return own[chat_template]
            if chat_template is None:
                if tools is not None and "tool_use" in own:
                    return own["tool_use"]
                if "default" in own:
                    return own["default"]
                raise ValueError(f"{self.path.parent} has several chat templates and none named 'default'; "
                                 f"pass chat_template= one of {sorted(own)}")
        if chat_template is not None:
            return chat_template
        if own is None:
            raise ValueError(f"{self.path.parent} has no chat template: none in {CHAT_TEMPLATE_FILE}, "
                             f"{CHAT_TEMPLATE_DIR}/ or tokenizer_config.json's 'chat_template'; pass "
                             f"chat_template= a Jinja template, or encode the prompt as plain text")
        return own

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = True,
                            chat_template: str | None = None, tools=None, documents=None,
                            **kwargs) -> list[int] | str:
        """Render `messages` (a list of {"role", "content"} dicts) with the checkpoint's Jinja chat
        template, as transformers' `apply_chat_template` does, and encode the text WITHOUT adding
        special tokens (the template writes its own, e.g. `{{ bos_token }}`). Returns the ids
        transformers returns for the same folder (tokenize=False: the rendered text).

        Unlike transformers, add_generation_prompt defaults to True (the usual case here: a
        prompt for the model to answer). Extra keyword arguments are template variables (e.g.
        enable_thinking=False); the named special tokens (bos_token, eos_token, ...) are
        variables too, and keyword arguments override them.
        """
        template = self.get_chat_template(chat_template, tools)
        msgs = check_messages(messages)
        variables = {**self.special_tokens_map, **kwargs}
        text = render_chat_template(template, msgs, add_generation_prompt=add_generation_prompt,
                                    tools=tools, documents=documents, **variables)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def save(self, folder) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(folder / HF_TOKENIZER_FILE))
        names = {k: self._tok.id_to_token(v) for k, v in
                 (("bos_token", self.bos_id), ("eos_token", self.eos_id), ("pad_token", self.pad_id))
                 if v is not None}
        cfg_file = folder / "tokenizer_config.json"
        existing = _read_json_if(cfg_file)
        if isinstance(self.chat_template, str):
            (folder / CHAT_TEMPLATE_FILE).write_text(self.chat_template)
        elif isinstance(self.chat_template, dict):
            names["chat_template"] = [{"name": k, "template": v} for k, v in self.chat_template.items()]
        cfg_file.write_text(json.dumps({**existing, **names}, indent=2) + "\n")


def model_eos_ids(tok, vocab_size: int) -> list[int]:
    """The tokenizer's end-of-sequence ids a model of `vocab_size` can produce (a tokenizer
    may list ids past the model's embedding table, which generation would never emit)."""
    return [e for e in tok.eos_ids if e < vocab_size]


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


def read_chat_template(path) -> str:
    """The text of a Jinja chat-template file, checked to parse (as `render_chat_template`
    compiles it). ValueError naming the file, and the line and problem of a syntax error."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot be read: {e}") from None
    if not text.strip():
        raise ValueError(f"{path}: the file is empty; expected a Jinja chat template")
    try:
        _compiled_template(text)
    except ChatTemplateSyntaxError as e:
        raise ValueError(f"{path}, line {e.lineno}: {e.problem}") from None
    return text


def use_chat_template(tokenizer, template: str):
    """Make `tokenizer` render chats with `template` (Jinja text, e.g. from `read_chat_template`)
    instead of its checkpoint's: every later `apply_chat_template` call uses it. Returns the
    tokenizer."""
    if not isinstance(template, str) or not template.strip():
        raise ValueError("a chat template must be a non-empty str")
    tokenizer.chat_template = template
    return tokenizer


def check_messages(messages) -> list[dict]:
    """A chat as a list of message dicts, checked: each has a str "role" and a "content" (a str,
    or a list of content parts such as {"type": "text", "text": ...}); an assistant message
    with "tool_calls" may omit it. Keys whose value is None are dropped (as transformers does:
    APIs send content=None). Returns new dicts; the caller's are not changed."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got "
                         f"{type(messages).__name__}")
    if not messages:
        raise ValueError("messages is empty; give at least one {'role': ..., 'content': ...} dict")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got "
                             f"{type(m).__name__}: {m!r}")
        m = {k: v for k, v in m.items() if v is not None}
        if not isinstance(m.get("role"), str) or not m["role"]:
            raise ValueError(f"messages[{i}] needs a non-empty str 'role' (e.g. 'user'), got {m.get('role')!r}")
        content = m.get("content")
        if content is None and "tool_calls" not in m:
            raise ValueError(f"messages[{i}] (role {m['role']!r}) has no 'content'")
        if content is not None and not isinstance(content, (str, list)):
            raise ValueError(f"messages[{i}]['content'] must be a str or a list of content parts, got "
                             f"{type(content).__name__}")
        out.append(m)
    return out


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool = True,
                         **variables) -> str:
    """Render a Hugging Face chat template the way transformers does (utils/chat_template_utils.py):
    jinja2's ImmutableSandboxedEnvironment with trim_blocks, lstrip_blocks and loop controls,
    `raise_exception(msg)`, `strftime_now(fmt)`, a `tojson` filter that does not escape HTML
    (json.dumps, ensure_ascii=False), and the message fields `reasoning_content`/`thinking`
    filled from each other. A template error becomes a ValueError naming it."""
    import jinja2

    msgs = []
    for m in messages:      # transformers aliases a message's reasoning under its usual names
        reasoning = next((m[k] for k in ("reasoning_content", "thinking", "reasoning")
                          if m.get(k) is not None), None)
        msgs.append(m if reasoning is None else {"thinking": reasoning, **m, "reasoning_content": reasoning})
    try:
        return _compiled_template(template).render(messages=msgs, add_generation_prompt=add_generation_prompt,
                                                   **variables)
    except jinja2.TemplateError as e:
        raise ValueError(f"chat template error: {e}") from None


class ChatTemplateSyntaxError(ValueError):
    """A chat template that does not parse: `lineno` (1-based) and `problem` (jinja2's message)."""

    def __init__(self, lineno: int, problem: str):
        super().__init__(f"chat template syntax error (line {lineno}): {problem}")
        self.lineno, self.problem = lineno, problem


@lru_cache(maxsize=16)
def _compiled_template(template: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if not isinstance(template, str):
        raise ValueError(f"a chat template must be a str, got {type(template).__name__}")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    class _Generation(jinja2.ext.Extension):
        """transformers' `{% generation %}...{% endgeneration %}` marks assistant text for its
        training masks; rendering keeps the body as it is."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateSyntaxError(e.lineno, e.message) from None


def _read_chat_templates(folder: Path, tok_cfg: dict):
    """The folder's chat template: a str, a dict name -> template, or None. Template files
    (chat_template.jinja as "default", additional_chat_templates/NAME.jinja) take priority
    over tokenizer_config.json's `chat_template` (a str or a list of {name, template}),
    as in transformers."""
    files = {}
    if (folder / CHAT_TEMPLATE_FILE).is_file():
        files["default"] = (folder / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    extra = folder / CHAT_TEMPLATE_DIR
    if extra.is_dir():
        for f in sorted(extra.glob("*.jinja")):
            files[f.name.removesuffix(".jinja")] = f.read_text(encoding="utf-8")
    if files:
        return files["default"] if list(files) == ["default"] else files
    value = tok_cfg.get("chat_template")
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                       and isinstance(t.get("template"), str) for t in value):
        return {t["name"]: t["template"] for t in value}
    raise ValueError(f"{folder / 'tokenizer_config.json'}: chat_template must be a str or a list of "
                     f"{{'name', 'template'}} objects, got {type(value).__name__}")


def _special_tokens_map(folder: Path, tok_cfg: dict) -> dict:
    """transformers' `special_tokens_map`: the named special tokens as strings (bos_token, ...,
    plus model-specific names from a dict `extra_special_tokens`), from tokenizer_config.json;
    a legacy special_tokens_map.json fills in when the config has no added_tokens_decoder."""
    merged = dict(tok_cfg)
    legacy = folder / "special_tokens_map.json"
    if "added_tokens_decoder" not in tok_cfg and legacy.is_file():
        merged.update(_read_json(legacy))
    names = list(SPECIAL_TOKEN_NAMES)
    for key in ("model_specific_special_tokens", "extra_special_tokens"):
        if isinstance(merged.get(key), dict):
            names += list(merged[key])
            merged = {**merged[key], **merged}
    out = {}
    for name in names:
        value = merged.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            out[name] = value
    return out


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
