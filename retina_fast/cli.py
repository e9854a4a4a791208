"""``retina-fast`` command line: one subcommand per module in ``retina_fast.commands``.

Each command module defines ``add_parser(subparsers)`` (which sets ``func``) and is imported only
when the CLI starts, so ``retina-fast info`` works even where optional dependencies are missing.
Bad input exits with status 2 and a one-line reason on stderr, never a traceback: ``UserError`` (raised
by the commands), ``ValueError`` (bad values found by the library; ``FloatingPointError`` for a model whose
samples overflow), ``OSError`` (an output on a file, a
read-only or full disk, ...) and argparse's own errors. ``python -m retina_fast.cli`` (the form torchrun
uses) and ``python -m retina_fast`` behave exactly like ``retina-fast``.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from retina_fast.errors import UserError

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


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (``retina-fast sample: error: ... (see --help)``), exit status 2.
    Sub-parsers inherit the class."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="retina-fast", description=__doc__.splitlines()[0])
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
    except (UserError, ValueError, FloatingPointError) as exc:
        print(f"retina-fast {args.command}: error: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:  # FileNotFoundError, a file where a directory must be, read-only or full disk, ...
        print(f"retina-fast {args.command}: error: {_one_line(os_error_text(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"retina-fast {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


def os_error_text(exc: OSError) -> str:
    """``PATH: reason`` for an OSError raised by the system (``[Errno 30] ...`` otherwise reads like a crash)."""
    if exc.filename is not None and exc.strerror:
        names = f"{exc.filename}" + (f" -> {exc.filename2}" if exc.filename2 is not None else "")
        return f"{names}: {exc.strerror}"
    return str(exc) or type(exc).__name__


def _one_line(text: str) -> str:
    return " ".join(text.split())


if __name__ == "__main__":
    # Run as ``python -m retina_fast.cli`` this file is ``__main__``, a second copy of the module: hand over
    # to the imported ``retina_fast.cli`` so that there is one set of classes and state.
    from retina_fast.cli import main as _main

    sys.exit(_main())
