"""YAML -> typed frozen dataclasses, with errors a user can act on.

`build(cls, data, where)` checks a mapping against the fields of a (frozen) dataclass and
returns an instance. It is generic: the experiment kinds' configs and
`kvjax.train.TrainConfig` go through the same code. What a field accepts comes from its
type annotation (int, float, bool, str, `X | None`, `tuple[X, ...]`, `dict`, `Literal`)
plus optional limits in its metadata (see `option`):

  * an unknown key names itself, the closest allowed key (difflib) and every allowed key;
  * a wrong type or out-of-range value names the key, the value and what is allowed;
  * a missing required key says so.

Every error is a `ConfigError` whose message starts with the dotted key path
(`cache_vs_nocache.seq_lens[2]: ...`), so the command line prints it as one line.

`apply_overrides(data, ["a.b=value", ...])` applies `--set` overrides to the raw
mapping before validation; each value is parsed with `yaml.safe_load`, so
`--set x.seq_lens=[64,128]` gives a list and `--set x.flag=false` a bool.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import types
import typing
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config problem the user can fix; the message names the key."""


def option(default=dataclasses.MISSING, *, help: str, min=None, max=None, choices=None,
           pattern: str | None = None, min_items: int | None = None):
    """A dataclass field with the limits `build` enforces and a help line for docs.

    min/max: inclusive bounds for numbers (for a list, for each item); choices: allowed
    values; pattern: a regex a string must match in full; min_items: shortest list.
    Mutable defaults (dict) are copied per instance.
    """
    meta = {"help": help, "min": min, "max": max, "choices": choices, "pattern": pattern,
            "min_items": min_items}
    if isinstance(default, dict):
        return dataclasses.field(default_factory=lambda: dict(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# ----------------------------------------------------------------------------- building

def build(cls, data, where: str = "", extra_keys=()):
    """An instance of dataclass `cls` from the mapping `data` (None = all defaults).

    `where` is the dotted path of this mapping in the whole config, used in messages;
    `extra_keys` are keys handled elsewhere, listed as allowed in unknown-key messages.
    ValueError/TypeError raised by the dataclass itself (its own __post_init__ checks)
    are re-raised as ConfigError prefixed with `where`.
    """
    label = where or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: expected a mapping of keys to values, got {_show(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for key in data:
        if not isinstance(key, str):
            raise ConfigError(f"{label}: keys must be strings, got {_show(key)}")
        if key not in fields:
            raise ConfigError(unknown_key_message(label, key, [*fields, *extra_keys]))
    kwargs = {}
    for name, f in fields.items():
        path = f"{where}.{name}" if where else name
        if name in data:
            kwargs[name] = check_value(path, data[name], hints.get(name, Any), f.metadata)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{path}: required key is missing (expected "
                              f"{describe(hints.get(name, Any), f.metadata)})")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{label}: {e}") from None


def unknown_key_message(label: str, key: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{label}: unknown key {key!r}{hint}; allowed keys: {', '.join(sorted(allowed))}"


def to_plain(obj):
    """A dataclass instance as plain YAML-able data (tuples become lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(x) for x in obj]
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    return obj


# ----------------------------------------------------------------------------- values

_NONE = type(None)


def check_value(path: str, value, tp, meta=None):
    """`value` converted to type `tp`, or ConfigError naming path, value and what is allowed."""
    meta = dict(meta or {})
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not _NONE]
        if value is None and _NONE in args:
            return None
        for a in options:
            try:
                return check_value(path, value, a, meta)
            except ConfigError:
                continue
        raise ConfigError(f"{path}: got {_show(value)}; allowed: {describe(tp, meta)}")
    if origin is typing.Literal:
        meta["choices"] = args
        return _check_choice(path, value, tp, meta)
    if tp is Any or tp is object:
        return value
    if origin in (tuple, list) or tp in (tuple, list):
        return _check_list(path, value, tp, meta)
    if origin is dict or tp is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{path}: got {_show(value)}; allowed: {describe(tp, meta)}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: got {_show(value)}; allowed: {describe(tp, meta)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: got {_show(value)}; allowed: {describe(tp, meta)}")
        return _check_range(path, value, tp, meta)
    if tp is float:
        v = _as_float(value)
        if v is None:
            raise ConfigError(f"{path}: got {_show(value)}; allowed: {describe(tp, meta)}")
        return _check_range(path, v, tp, meta)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: got {_show(value)}; allowed: {describe(tp, meta)}")
        if meta.get("pattern") and not re.fullmatch(meta["pattern"], value):
            raise ConfigError(f"{path}: got {_show(value)}; allowed: {describe(tp, meta)}")
        return _check_choice(path, value, tp, meta)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    # A type this schema does not know (a field of someone else's dataclass): pass the
    # value through and let that dataclass's own checks judge it.
    return value


def _as_float(value):
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        v = float(value)
    elif isinstance(value, str):
        # PyYAML reads "1e-3" (no dot) as a string; accept it as the number it plainly is.
        try:
            v = float(value)
        except ValueError:
            return None
    else:
        return None
    return v if math.isfinite(v) else None


def _check_list(path, value, tp, meta):
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{path}: got {_show(value)}; allowed: {describe(tp, meta)}")
    args = typing.get_args(tp)
    item_tp = args[0] if args else Any
    if typing.get_origin(tp) is tuple and args and (len(args) != 2 or args[1] is not Ellipsis):
        raise TypeError(f"schema supports tuple[X, ...] only, not {tp}")
    min_items = meta.get("min_items")
    if min_items is not None and len(value) < min_items:
        raise ConfigError(f"{path}: got {_show(value)}; allowed: {describe(tp, meta)}")
    item_meta = {k: v for k, v in meta.items() if k != "min_items"}
    return tuple(check_value(f"{path}[{i}]", v, item_tp, item_meta) for i, v in enumerate(value))


def _check_range(path, value, tp, meta):
    lo, hi = meta.get("min"), meta.get("max")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ConfigError(f"{path}: {value!r} is out of range; allowed: {describe(tp, meta)}")
    return _check_choice(path, value, tp, meta)


def _check_choice(path, value, tp, meta):
    choices = meta.get("choices")
    if choices is None or value in choices:
        return value
    hint = ""
    if isinstance(value, str):
        close = difflib.get_close_matches(value, [str(c) for c in choices], n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"{path}: {_show(value)} is not allowed{hint}; allowed: {describe(tp, meta)}")


def describe(tp, meta=None) -> str:
    """What a field accepts, in words: 'an integer >= 1', 'one of 'cpu', 'gpu''."""
    meta = meta or {}
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if meta.get("choices") is not None:
        return "one of " + ", ".join(repr(c) for c in meta["choices"])
    if origin in (typing.Union, types.UnionType):
        parts = [describe(a, meta) for a in args if a is not _NONE]
        return " or ".join(parts) + (" or null" if _NONE in args else "")
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (tuple, list) or tp in (tuple, list):
        item = describe(args[0], {k: v for k, v in meta.items() if k != "min_items"}) if args else "anything"
        n = meta.get("min_items")
        size = f" with at least {n} item{'s' if n != 1 else ''}" if n else ""
        return f"a list{size} of: {item}"
    if origin is dict or tp is dict:
        return "a mapping of names to values"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    text = names.get(tp, getattr(tp, "__name__", str(tp)))
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and hi is not None:
        text += f" in [{lo}, {hi}]"
    elif lo is not None:
        text += f" >= {lo}"
    elif hi is not None:
        text += f" <= {hi}"
    if meta.get("pattern"):
        text += f" matching {meta['pattern']}"
    return text


def _show(value) -> str:
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a mapping", type(None): "null"}.get(type(value), type(value).__name__)
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({kind})"


# ----------------------------------------------------------------------------- overrides

def apply_overrides(data: dict, overrides) -> dict:
    """A copy of `data` with each "dotted.key=value" applied (value parsed as YAML)."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not p for p in key.split(".")):
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted key, "
                              f"e.g. --set cache_vs_nocache.batch_size=4")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({_yaml_problem(e)})") from None
        parts = key.split(".")
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                where = ".".join(parts[:i + 1])
                raise ConfigError(f"--set {item!r}: {where} is {_show(child)}, not a section with keys")
            node = child
        node[parts[-1]] = value
    return data


def _yaml_problem(e: yaml.YAMLError) -> str:
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    mark = getattr(e, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def load_yaml(path) -> dict:
    """The mapping in a YAML file, or ConfigError for a missing file or a syntax error."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} not found") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {str(path)!r} is a directory, not a YAML file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {_yaml_problem(e)}") from None
    if data is None:
        raise ConfigError(f"{path}: the file is empty; a config needs at least 'name' and 'kind'")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top, got {_show(data)}")
    return data
