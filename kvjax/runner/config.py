"""The experiment file: top-level keys plus one section named after the kind.

    name: cache_vs_nocache       # results go to <out_dir>/<name>/<timestamp>/
    kind: cache_vs_nocache       # which experiment (kvjax.runner.kinds.KINDS)
    seed: 0                      # random weights, prompts
    device: auto                 # auto | cpu | gpu | tpu
    dtype: float32               # model dtype: float32 | bfloat16 | float16
    out_dir: runs
    mesh: {}                     # optional device mesh, e.g. {data: 2, model: 4} (see kvjax.sharding)
    cache_vs_nocache:            # the kind's own keys (its frozen Config dataclass)
      seq_lens: [64, 128, 256]

`load_config` validates the whole file (top level, the section, and the kind's
cross-field checks) and returns a `RunConfig`; nothing is built and no folder is
created before it succeeds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import kinds
from .schema import ConfigError, apply_overrides, build, load_yaml, option, to_plain

DEVICES = ("auto", "cpu", "gpu", "tpu")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class TopLevel:
    name: str = option(help="run name: the results folder is <out_dir>/<name>/<timestamp>/",
                       pattern=r"[A-Za-z0-9][A-Za-z0-9._-]*")
    kind: str = option(help="experiment kind; its keys go in a section named after it")
    seed: int = option(0, help="seed for random weights and prompts", min=0)
    device: str = option("auto", help="JAX platform to run on; auto = JAX's default",
                         choices=DEVICES)
    dtype: str = option("float32", help="model parameter/activation dtype", choices=DTYPES)
    out_dir: str = option("runs", help="root folder for results (--out DIR names the exact folder)")
    mesh: dict = option({}, help="device mesh axes, e.g. {data: 2, model: 4}; kinds that shard "
                                 "(sharded_decode) run on it; empty = no mesh")


@dataclass(frozen=True)
class RunConfig:
    name: str
    kind: str
    seed: int
    device: str
    dtype: str
    out_dir: str
    settings: Any  # the kind's Config instance (the section named after the kind)
    mesh: dict = None

    def to_dict(self) -> dict:
        """The resolved config (every default filled in), as plain YAML-able data."""
        top = {k: getattr(self, k) for k in ("name", "kind", "seed", "device", "dtype", "out_dir", "mesh")}
        return {**top, self.kind: to_plain(self.settings)}


def load_config(path, overrides=()) -> RunConfig:
    """Read, override and validate an experiment file; ConfigError names any bad key."""
    return parse_config(load_yaml(path), overrides)


def parse_config(data: dict, overrides=()) -> RunConfig:
    data = apply_overrides(data, overrides)
    known = kinds.names()
    kind = data.get("kind")
    if kind is None:
        raise ConfigError(f"kind: required key is missing; known kinds: {', '.join(known)}")
    if not isinstance(kind, str) or kind not in known:
        import difflib

        close = difflib.get_close_matches(str(kind), known, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"kind: unknown kind {kind!r}{hint}; known kinds: {', '.join(known)}")
    top_keys = {k: v for k, v in data.items() if k != kind}
    try:
        top = build(TopLevel, top_keys, extra_keys=(kind,))
    except ConfigError as e:
        # An unknown top-level key may be a section meant for another kind: say so.
        other = [k for k in top_keys if k in known]
        if other:
            raise ConfigError(f"{other[0]}: this section belongs to kind {other[0]!r} but the "
                              f"config's kind is {kind!r}; rename the section to {kind!r}") from None
        raise e
    module = kinds.load(kind)
    section = data.get(kind)
    inherit = getattr(module, "section_defaults", None)
    if inherit is not None and (section is None or isinstance(section, dict)):
        section = {**inherit(top), **(section or {})}
    settings = build(module.Config, section, kind)
    for axis, size in top.mesh.items():
        if axis not in ("data", "model") or not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ConfigError(f"mesh.{axis}: got {size!r}; allowed: axes 'data' and 'model' with "
                              f"positive integer sizes")
    cfg = RunConfig(name=top.name, kind=top.kind, seed=top.seed, device=top.device,
                    dtype=top.dtype, out_dir=top.out_dir, settings=settings, mesh=dict(top.mesh))
    check = getattr(module, "validate", None)
    if check is not None:
        check(cfg)  # cross-field checks; raises ConfigError naming the key
    return cfg
