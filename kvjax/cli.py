"""The `kvjax` command: one entry point, one module per subcommand.

Each subcommand module exposes `add_parser(subparsers)` (registering its flags, with
help for every one) and sets `func` on its parser to a callable taking the parsed args
and returning an exit code. Expected user errors (bad paths, bad values) are raised as
`UserError` and printed as one line on stderr with exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand name -> module holding add_parser(subparsers)
SUBCOMMANDS = {
    "generate": "kvjax.generate_cli",
    "run": "kvjax.runner.cli",
    "train": "kvjax.train_cli",
}


class UserError(Exception):
    """An input problem the user can fix; printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvjax", description="Fast KV-cache decoding in JAX.")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in SUBCOMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if not module.startswith(str(e.name)):  # a real import error inside it: surface it
                raise
            continue
        mod.add_parser(subs)
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
