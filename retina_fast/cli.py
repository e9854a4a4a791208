"""``retina-fast`` command line: one subcommand per module in ``retina_fast.commands``.

Each command module defines ``add_parser(subparsers)`` (which sets ``func``) and is imported only when that
command runs (``retina-fast --help`` and ``--version`` import none of them, nor torch: well under half a
second), so ``retina-fast info`` works even where optional dependencies are missing. Every subcommand's
``--help`` shows the defaults. Bad input exits with status 2 and a one-line reason on stderr, never a
traceback: ``UserError`` (raised by the commands), ``ValueError`` (bad values found by the library;
``FloatingPointError`` for a model whose samples overflow), ``OSError`` (an output on a file, a read-only or
full disk, ...) and argparse's own errors. ``python -m retina_fast.cli`` (the form torchrun uses) and
``python -m retina_fast`` behave exactly like ``retina-fast``.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from retina_fast.errors import UserError

# name -> (module under retina_fast.commands, one-line summary for the top-level help)
COMMANDS = {
    "info": ("info", "versions, build flags, CPU/GPU features and usable backends"),
    "phantom": ("phantom", "render hyperspectral retina phantoms (cubes + masks) to a folder"),
    "train": ("train", "train a model (VQ-GAN, latent diffusion, ...) with the reference trainers"),
    "sample": ("sample", "draw synthetic 16-band cubes into shards with a manifest"),
    "evaluate": ("evaluate", "quality report of synthetic cubes vs real ones"),
    "enhance": ("enhance", "enhance colour fundus photographs (MAGE-Net)"),
    "degrade": ("degrade", "degrade clean fundus photographs (Cofe-Net model, seeded)"),
    "export": ("export", "export a network as ONNX or as a TensorRT engine"),
    "bench": ("bench", "speed-up table: backends vs the reference sampler, one run"),
}


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (``retina-fast sample: error: ... (see --help)``), exit status 2.
    Subcommand parsers (the same class) show their defaults in ``--help``."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to an option's help unless the help already states its default or there is
    none to state (None: decided later, e.g. by a preset or a resumed run; False: an off switch)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default" in text or any(action.default is v for v in (None, False, argparse.SUPPRESS)):
            return action.help
        return f"{text} (default: %(default)s)".lstrip()


class _SubParser(_Parser):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)


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


def _selected(argv: list[str]) -> str | None:
    """The command named on the command line (the first argument that is not an option)."""
    for arg in argv:
        if not arg.startswith("-"):
            return arg if arg in COMMANDS else None
    return None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; only the command selected in ``argv`` (all of them when ``argv`` is None) is imported and
    gets its full arguments, the others are listed by name and summary."""
    from retina_fast import __version__

    parser = _Parser(prog="retina-fast", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"retina-fast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_SubParser)
    chosen = None if argv is None else _selected(argv)
    for name, (module, summary) in COMMANDS.items():
        if argv is not None and name != chosen:
            sub.add_parser(name, help=summary, add_help=False)
            continue
        try:
            mod = importlib.import_module(f"retina_fast.commands.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"retina_fast.commands.{module}":
                raise
            continue  # command not part of this build yet
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
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
