"""``retina-fast`` command line: one subcommand per module in ``retina_fast.commands``.

Each command module defines ``add_parser(subparsers)`` (which sets ``func``) and is imported only
when the CLI starts, so ``retina-fast info`` works even where optional dependencies are missing.
Bad input exits non-zero with a one-line reason on stderr.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> module under retina_fast.commands
COMMANDS = {
    "info": "info",
    "phantom": "phantom",
    "train": "train",
    "sample": "sample",
    "evaluate": "evaluate",
    "enhance": "enhance",
    "degrade": "degrade",
    "export": "export",
    "bench": "bench",
}


class UserError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="retina-fast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        try:
            mod = importlib.import_module(f"retina_fast.commands.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"retina_fast.commands.{module}":
                raise
            continue  # command not part of this build yet
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except (UserError, FileNotFoundError, ValueError) as exc:
        print(f"retina-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"retina-fast {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
