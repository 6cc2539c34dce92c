"""The `kvjax` command: one entry point; `kvjax generate`, `kvjax run`, `kvjax train`,
`kvjax serve`, `kvjax models`.

Each subcommand has a registering function (SUBCOMMANDS) that adds its parser, with help
for every flag, and sets `func` to a callable taking the parsed args and returning an
exit code. Expected user errors (bad paths, bad values) are raised as
`UserError` and printed as one line on stderr with exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand name -> (module, function registering its parser)
SUBCOMMANDS = {
    "generate": ("kvjax.generate_cli", "add_parser"),
    "run": ("kvjax.runner.cli", "add_parser"),
    "train": ("kvjax.runner.cli", "add_train_parser"),
    "serve": ("kvjax.serve.cli", "add_parser"),
    "models": ("kvjax.models_cli", "add_parser"),
}


class UserError(Exception):
    """An input problem the user can fix; printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvjax", description="Fast KV-cache decoding in JAX.")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module, register in SUBCOMMANDS.values():
        getattr(importlib.import_module(module), register)(subs)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"kvjax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"kvjax {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # `python -m kvjax.cli` runs this file as __main__: call the imported module's main so
    # that UserError raised by subcommands is the class main catches.
    from kvjax.cli import main as _main

    sys.exit(_main())
