"""`kvjax run CONFIG.yaml [--set key=value ...] [--out DIR] [--dry-run]`.

The whole config (file, overrides, the kind's section and its cross-field checks) is
validated before any model is built or any folder is created; a config mistake is one
line on stderr and exit code 2. Exit code 1 means the run finished but a check inside
it failed (e.g. cached and uncached tokens differ); 0 means it finished and passed.
"""
from __future__ import annotations

import argparse

import yaml

from . import kinds
from .schema import ConfigError


def add_parser(subparsers):
    p = subparsers.add_parser(
        "run", help="run an experiment config (YAML) into a results folder",
        description="Run an experiment described by a YAML config and write a results folder "
                    "(config, environment, metrics JSONL/CSV, summary, plots, COMPLETE marker). "
                    f"Kinds: {', '.join(kinds.names())}.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    return _add_arguments(p, run)


def add_train_parser(subparsers):
    p = subparsers.add_parser(
        "train", help="train a model from a config of kind 'train' (same as `kvjax run`)",
        description="Train a model with optax from a YAML config of kind 'train' (e.g. "
                    "experiments/train_tiny.yaml) into a results folder with checkpoints; "
                    "exactly `kvjax run` restricted to that kind.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    return _add_arguments(p, run_train)


def _add_arguments(p, func):
    p.add_argument("config", metavar="CONFIG.yaml", help="experiment config file (see experiments/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value by dotted key, value parsed as YAML; repeatable "
                        "(e.g. --set cache_vs_nocache.seq_lens=[64,128] --set device=cpu)")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="write results into exactly this (new or empty) folder instead of "
                        "<out_dir>/<name>/<timestamp>/")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the config, print the resolved config and exit without running")
    p.add_argument("--coordinator", metavar="HOST:PORT", default=None,
                   help="multi-host: address of process 0's coordinator (or env KVJAX_COORDINATOR); "
                        "every process runs the same command; only process 0 writes results")
    p.add_argument("--num-processes", type=int, default=None, metavar="N",
                   help="multi-host: total processes (or env KVJAX_NUM_PROCESSES)")
    p.add_argument("--process-id", type=int, default=None, metavar="I",
                   help="multi-host: this process's index in [0, N) (or env KVJAX_PROCESS_ID)")
    p.set_defaults(func=func)
    return p


def run_train(args) -> int:
    return run(args, require_kind="train")


def run(args, require_kind: str | None = None) -> int:
    from kvjax.cli import UserError

    from .config import load_config

    try:
        cfg = load_config(args.config, args.overrides)
        if require_kind and cfg.kind != require_kind:
            raise UserError(f"{args.config}: kind {cfg.kind!r} is not {require_kind!r}; "
                            f"use `kvjax run {args.config}`")
        if not args.dry_run:
            _start_distributed(args)
        if args.dry_run:
            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True), end="")
            return 0
        from .experiment import run_experiment

        result = run_experiment(cfg, out=args.out)
    except ConfigError as e:
        raise UserError(str(e)) from None
    return 0 if result.ok else 1


def _start_distributed(args) -> None:
    """jax.distributed from flags or KVJAX_* variables (a no-op when neither names a coordinator)."""
    import os

    from kvjax.cli import UserError
    from kvjax.sharding import init_distributed

    given = [args.coordinator, args.num_processes, args.process_id]
    if args.coordinator is None and not os.environ.get("KVJAX_COORDINATOR"):
        if any(v is not None for v in given):
            raise UserError("--num-processes/--process-id need --coordinator (or KVJAX_COORDINATOR)")
        return
    try:
        init_distributed(args.coordinator, args.num_processes, args.process_id)
    except (KeyError, ValueError) as e:
        raise UserError(f"multi-host start failed: {e}; give --coordinator, --num-processes and "
                        f"--process-id (or the KVJAX_* variables)") from None
