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


def input_files(inputs):
    """Paths of the input files of a command that writes ``<out>/<stem>.<ext>`` per input: every one must
    exist and stems must not repeat (outputs would collide). Checked before any work is done."""
    from pathlib import Path

    paths = [Path(p) for p in inputs]
    stems = [p.stem for p in paths]
    dupes = sorted({s for s in stems if stems.count(s) > 1})
    if dupes:
        raise UserError(f"several inputs share the name(s) {', '.join(dupes)}; outputs would collide")
    for p in paths:
        if not p.is_file():
            raise UserError(f"{p}: no such file")
    return paths


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
