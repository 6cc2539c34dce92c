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
    p.add_argument("config", metavar="CONFIG.yaml", help="experiment config file (see experiments/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value by dotted key, value parsed as YAML; repeatable "
                        "(e.g. --set cache_vs_nocache.seq_lens=[64,128] --set device=cpu)")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="write results into exactly this (new or empty) folder instead of "
                        "<out_dir>/<name>/<timestamp>/")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the config, print the resolved config and exit without running")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from kvjax.cli import UserError

    from .config import load_config

    try:
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True), end="")
            return 0
        from .experiment import run_experiment

        result = run_experiment(cfg, out=args.out)
    except ConfigError as e:
        raise UserError(str(e)) from None
    return 0 if result.ok else 1
