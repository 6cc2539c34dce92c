"""Experiment kinds: one module per kind, registered by name.

A kind module defines
  * `Config`: a frozen dataclass whose fields are the keys of the config section named
    after the kind (validated by `kvjax.runner.schema.build`);
  * `validate(run_cfg)` (optional): cross-field checks, raising ConfigError naming a key;
  * `run(ctx, cfg) -> dict`: does the work through `ctx` (metrics, tables, plots,
    progress) and returns headline numbers for summary.json. A headline `ok: False`
    means a check inside the experiment failed (the command then exits with 1).

Modules are imported on first use, so a kind whose dependencies are missing only
fails when it is asked for.
"""
from __future__ import annotations

import importlib

KINDS = {
    "quickstart": "kvjax.runner.kinds.quickstart",
    "cache_vs_nocache": "kvjax.runner.kinds.cache_vs_nocache",
    "memory_scaling": "kvjax.runner.kinds.memory_scaling",
    "batch_throughput": "kvjax.runner.kinds.batch_throughput",
    "train": "kvjax.runner.kinds.train",
    "decode_bench": "kvjax.runner.kinds.decode_bench",
    "sharded_decode": "kvjax.runner.kinds.sharded_decode",
    "compression_quality": "kvjax.runner.kinds.compression_quality",
    "press_benchmark": "kvjax.runner.kinds.press_benchmark",
    "long_press_benchmark": "kvjax.runner.kinds.long_press",
    "serving_bench": "kvjax.runner.kinds.serving_bench",
    "speculative": "kvjax.runner.kinds.speculative",
}


def names() -> list[str]:
    return list(KINDS)


def load(name: str):
    from ..schema import ConfigError

    try:
        return importlib.import_module(KINDS[name])
    except ImportError as e:
        if e.name and KINDS[name].startswith(e.name):  # the kind module itself is missing
            raise
        raise ConfigError(f"kind: {name!r} is unavailable here: {e}") from None
