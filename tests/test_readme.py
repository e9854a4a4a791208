"""The README's promises, run the way a new user runs them.

README.md is parsed when the tests run, so every later edit is covered. Each fenced ``bash`` / ``python``
block runs in a fresh interpreter (a fresh ``bash`` for shell blocks) from its own temporary directory,
which holds a copy of the checkout's scripts/ and benchmarks/ (the blocks name them relative to the
repository root) but not the package itself: the installed ``retina_fast`` is used, as a user's shell
would. Blocks that would take long (training, 10 000 images) run with their arguments scaled down by the
explicit tables below -- never skipped. A block that is not quick after scaling, or that names a program
the tables do not know, fails the test: extend the tables when you add such a block.

The "fresh machine" set-up commands (venv + pip install) are not executed (that would download): the CI
block must be exactly what ``.ci/run`` extracts, and every other block's set-up prefix must equal the CI
block's except for the extras, which must exist in setup.py.

Every ``retina-fast <command> --help`` (and each sub-command's) runs too.
"""
from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from _newcomer import console_script, fresh_env

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CI_MARKER = "<!-- ci:test-command -->"
CODE_LANGS = {"bash": "bash", "sh": "bash", "shell": "bash", "console": "bash", "python": "python", "py": "python"}
# Untagged fences hold text (the layout tree); one that looks like a command must be tagged instead.
COMMAND_LIKE = re.compile(r"^\s*(\$ )?(retina-fast|python|pip|bash|torchrun|pytest|import |from retina_fast)", re.M)

# --- set-up segments (`a && b && ...` at the start of a line): checked, never executed -----------------------
SETUP = [re.compile(p) for p in (r"python3 -m venv \.venv", r"\. \.venv/bin/activate", r"pip install torch==[\w.+]+",
                                 r'pip install -e "\.\[([\w,-]+)\]"')]

# --- scaling: (pattern, replacement) applied to every runnable block -------------------------------------------
SCALE = [
    (r"--n \d+", "--n 2"),
    (r"--num-images \d+", "--num-images 2"),
    (r"--steps \d+", "--steps 2"),
    (r"--nproc_per_node \d+", "--nproc_per_node 2"),
    (r"\bsample\(\d+, steps=\d+", "sample(2, steps=2"),
    # each benchmark body runs once, nothing is timed; torch.compile only traces (inductor's paper-size
    # compiles alone took ~200 s of CI)
    (r"--benchmark-json=\S+", "--benchmark-disable --compile-backend eager"),
    (r"--preset paper-\d+", "--preset tiny"),
    (r"(retina-fast bench [^\n#]*\bcompile\b[^\n#]*)", r"\1 --compile-backend eager --repeats 1 "),
]
# A block is quick when every size argument is at most this after scaling.
LIMITS = [(r"--n(?:um-images)? (\d+)", 4), (r"--steps (\d+)", 4), (r"--nproc_per_node (\d+)", 2),
          (r"\bsample\((\d+)", 4), (r"\bsteps=(\d+)", 4)]


@dataclass
class Program:
    """How a long program a block names is scaled: substitutions in its (copied) file and environment."""

    subs: list[tuple[str, str]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    needs_in_block: str | None = None  # a scaled block must contain this (for programs run in place)


PROGRAMS = {
    "scripts/train_tiny.sh": Program(subs=[(r"--steps \d+", "--steps 2"), (r"--num-images \d+", "--num-images 8"),
                                           (r"--batch-size \d+", "--batch-size 2"),
                                           (r"--num-workers \d+", "--num-workers 0"),
                                           (r"--kmeans-images \d+", "--kmeans-images 2")]),
    "scripts/train_enhance_ablation.sh": Program(
        subs=[(r"--size 256 --crop 128 --batch-size 4 --eyes 48 --per-eye 4",
               "--size 64 --crop 32 --batch-size 2 --eyes 2 --per-eye 1"),
              (r"--real-images \d+", "--real-images 2"),
              (r"(-m retina_fast\.training\.eval_enhance)",
               r"\1 --n-test 2 --size 64 --kind-size 64 --test-seeds 0 --val-seeds 10")],
        # the knobs of the shipped recipe (README: the ladder's rerun), so its second segmenter is exercised too
        env={"STEPS_RSP": "2", "STEPS": "2", "STEPS_LONG": "2", "PARALLEL": "0", "STRUCTURE_WEIGHT": "0.2",
             "IDENTITY_FRACTION": "0.25", "RECIPE": "--pixel-loss l2 --charbonnier-from 0.5 --spot-fraction 0.5"}),
    "pytest benchmarks": Program(needs_in_block="--benchmark-disable"),
    # the GPU check runs on a CPU only as its dry run (the real command is a `text` block in the README)
    "benchmarks/gpu/run.sh": Program(needs_in_block="--dry-run"),
    "benchmarks/gpu/gpu_check.py": Program(),
    # paper size -> tiny, one batch size, one round, torch.compile's tracing-only backend
    "benchmarks/bench_presets.py": Program(subs=[(r'default=\["paper-224"\]', 'default=["tiny"]'),
                                                 (r"default=\[1, 4\]", "default=[1]"),
                                                 (r'"--rounds", type=int, default=\d+', '"--rounds", type=int, default=1'),
                                                 (r'default="inductor"', 'default="eager"'),
                                                 (r"list\(sweep_grid\(\)\)", "list(sweep_grid())[:1]")]),
}
# Anything else that looks like a repository program is unknown (and fails): scripts, benchmarks, python files.
PROGRAM_LIKE = re.compile(r"(?:^|[\s;&|(])((?:scripts|benchmarks)/[\w./-]+\.(?:sh|py)\b|pytest benchmarks\b|"
                          r"python3? [\w./-]+\.py)")

# Files a user brings along for a block (created in its directory when the block names them).
USER_FILES = ("photo1.jpg", "photo2.png")
COPIED = ("scripts", "benchmarks", "tests", "pyproject.toml", "setup.py", "README.md")  # tests: the GPU dry run's pytest


@dataclass
class Block:
    line: int
    lang: str | None
    text: str
    ci: bool

    @property
    def id(self) -> str:
        first = next((ln for ln in self.text.splitlines() if ln.strip()), "")
        return f"L{self.line}:" + re.sub(r"\W+", "-", first)[:40].strip("-")


def readme_blocks(text: str | None = None) -> list[Block]:
    lines = (README.read_text(encoding="utf-8") if text is None else text).splitlines()
    blocks, i, ci_next = [], 0, False
    while i < len(lines):
        if CI_MARKER in lines[i]:
            ci_next = True
        m = re.match(r"^```\s*([\w+-]*)\s*$", lines[i])
        if m:
            start, body = i + 1, []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            blocks.append(Block(start, m.group(1).lower() or None, "\n".join(body), ci_next))
            ci_next = False
        i += 1
    return blocks


BLOCKS = readme_blocks()
CODE = [b for b in BLOCKS if b.lang in CODE_LANGS]
CI_BLOCKS = [b for b in BLOCKS if b.ci]


def _extras_in_setup() -> set[str]:
    tree = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "extras_require" and isinstance(node.value, ast.Dict):
            return {k.value for k in node.value.keys if isinstance(k, ast.Constant)}
    raise AssertionError("setup.py: no extras_require dict")


def split_setup(line: str) -> tuple[list[str], str]:
    """(leading set-up segments, the rest of the line) of one ``a && b && ...`` command line."""
    segments = [s.strip() for s in line.split(" && ")]
    setup = []
    while segments and any(p.fullmatch(segments[0]) for p in SETUP):
        setup.append(segments.pop(0))
    return setup, " && ".join(segments)


def ci_extracted() -> str:
    """What .ci/run extracts from README.md (its own awk program, run here)."""
    script = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    m = re.search(r"cmd=\$\((awk .*README\.md)\)", script)
    assert m, ".ci/run: no `cmd=$(awk ... README.md)` line"
    return subprocess.run(["bash", "-c", m.group(1)], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def _unsetup(block: Block) -> str:
    """The block without its set-up segments (which are checked by test_setup_commands)."""
    out = []
    for line in block.text.splitlines():
        _, rest = split_setup(line)
        out.append(rest)
    return "\n".join(out)


def scale(block: Block) -> tuple[str, dict[str, Program]]:
    """The runnable text of a block, scaled, and the programs it names. Fails for an unknown program or a
    block that is still not quick."""
    text = _unsetup(block)
    for pattern, repl in SCALE:
        text = re.sub(pattern, repl, text)
    code = "\n".join(ln.split("#", 1)[0] if block.lang != "python" else ln for ln in text.splitlines())
    programs = {}
    for m in PROGRAM_LIKE.finditer(code):
        name = m.group(1).strip()
        key = next((k for k in PROGRAMS if name == k or name.endswith(" " + k)), None)
        assert key, (f"README.md line {block.line}: `{name}` is a program the README test does not know; add it "
                     f"to PROGRAMS in tests/test_readme.py with how to scale it down")
        programs[key] = PROGRAMS[key]
        need = PROGRAMS[key].needs_in_block
        assert need is None or need in code, f"README.md line {block.line}: `{key}` must run with {need}"
    for pattern, limit in LIMITS:
        for m in re.finditer(pattern, code):
            assert int(m.group(1)) <= limit, (
                f"README.md line {block.line}: `{m.group(0)}` is not quick after scaling; add a substitution to "
                f"SCALE in tests/test_readme.py")
    return text, programs


def _fundus(path: Path, seed: int) -> None:
    from PIL import Image

    from retina_fast.phantom import render

    rgb = render(seed, 64).rgb.permute(1, 2, 0).numpy()
    Image.fromarray(np.round(rgb * 255).astype(np.uint8)).save(path)


def _checkout(tmp: Path, programs: dict[str, Program]) -> dict[str, str]:
    """Copy what the blocks name relative to the repository root into ``tmp``; scale the programs' files.
    Returns extra environment variables."""
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, tmp / name, ignore=shutil.ignore_patterns("__pycache__", "results", "*.pyc"))
        else:
            shutil.copy2(src, tmp / name)
    env = {}
    for key, prog in programs.items():
        path = tmp / key
        if prog.subs:
            assert path.is_file(), f"{key}: not in the checkout"
            text = path.read_text(encoding="utf-8")
            for pattern, repl in prog.subs:
                text, count = re.subn(pattern, repl, text)
                assert count, f"{key}: the README test's substitution {pattern!r} no longer matches; update PROGRAMS"
            path.write_text(text, encoding="utf-8")
        env.update(prog.env)
    return env


# --------------------------------------------------------------------------------------------------- tests
def test_the_readme_has_the_blocks_this_test_knows():
    assert len(CI_BLOCKS) == 1 and CI_BLOCKS[0].lang == "bash", "exactly one CI test-command block"
    assert len(CODE) >= 6, "README code blocks went missing?"
    for b in BLOCKS:
        assert b.lang is None or b.lang in CODE_LANGS or b.lang in ("text", "json", "toml"), \
            f"README.md line {b.line}: code block language {b.lang!r} unknown to tests/test_readme.py"
        if b.lang is None:
            assert not COMMAND_LIKE.search(b.text), f"README.md line {b.line}: untagged block looks like code; tag it"


def test_ci_block_is_what_ci_runs():
    (block,) = CI_BLOCKS
    assert ci_extracted().strip() == block.text.strip()
    setup, rest = split_setup(block.text.strip())
    assert len(setup) == len(SETUP) and rest.startswith("pytest"), setup


def test_setup_commands_match_the_ci_ones():
    """Every set-up prefix is the CI block's, except for the extras, which setup.py must define."""
    (ci,) = CI_BLOCKS
    ci_setup, _ = split_setup(ci.text.strip())
    extras = _extras_in_setup()
    for b in CODE:
        for line in b.text.splitlines():
            setup, _ = split_setup(line)
            if not setup:
                continue
            if len(setup) == len(SETUP):  # a full fresh-machine prefix
                for got, want in zip(setup, ci_setup):
                    if want.startswith("pip install -e"):
                        assert got.startswith('pip install -e ".['), (b.line, got)
                    else:
                        assert got == want, f"README.md line {b.line}: {got!r} differs from the CI block's {want!r}"
            for seg in setup:
                m = SETUP[3].fullmatch(seg)
                if m:
                    unknown = set(m.group(1).split(",")) - extras
                    assert not unknown, f"README.md line {b.line}: extras {unknown} not in setup.py"


def test_scaling_tables_catch_long_blocks():
    """The guard itself: a block with 10 000 images after scaling, or an unknown script, fails."""
    with pytest.raises(AssertionError, match="not quick"):
        scale(Block(1, "python", "retina_fast.sample(10000)", False))
    with pytest.raises(AssertionError, match="does not know"):
        scale(Block(1, "bash", "bash scripts/new_training.sh", False))
    text, _ = scale(Block(1, "bash", "retina-fast sample --n 10000 --steps 50 --out x", False))
    assert "--n 2 --steps 2" in text


@pytest.mark.parametrize("block", [b for b in CODE if not b.ci], ids=lambda b: b.id)
def test_readme_block_runs(block, tmp_path):
    text, programs = scale(block)
    env = _checkout(tmp_path, programs)
    for name in USER_FILES:
        if name in text:
            _fundus(tmp_path / name, len(name))
    if CODE_LANGS[block.lang] == "python":
        (tmp_path / "readme_block.py").write_text(text, encoding="utf-8")
        cmd = [sys.executable, "readme_block.py"]
    else:
        cmd = ["bash", "-euo", "pipefail", "-c", text]
    proc = subprocess.run(cmd, cwd=tmp_path, env=fresh_env(**env), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (f"README.md line {block.line} (scaled):\n{text}\n--- stdout\n{proc.stdout[-3000:]}\n"
                                  f"--- stderr\n{proc.stderr[-3000:]}")
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    if "scripts/train_tiny.sh" in programs:  # the script installed a model: it must load and sample
        model = tmp_path / "retina_fast" / "weights" / "tiny"
        check = (f"import retina_fast; x = retina_fast.sample(1, steps=2, model={str(model)!r}, backend='torch'); "
                 f"assert x.shape[0] == 1")
        # from the parent directory: a `retina_fast/` folder in the working directory would shadow the package
        proc = subprocess.run([sys.executable, "-c", check], cwd=tmp_path.parent, env=fresh_env(),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]


def _commands() -> list[list[str]]:
    from retina_fast import cli
    from retina_fast.commands.train import TRAINERS

    out = [[]] + [[name] for name in cli.COMMANDS]
    out += [["train", name] for name in TRAINERS] + [["export", "onnx"], ["export", "tensorrt"]]
    return out


@pytest.mark.parametrize("command", _commands(), ids=lambda c: " ".join(c) or "retina-fast")
def test_help_runs(command, tmp_path):
    proc = subprocess.run([*console_script(), *command, "--help"], cwd=tmp_path, env=fresh_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "usage:" in proc.stdout and not proc.stderr.strip(), proc.stderr[-2000:]
    text = " ".join(proc.stdout.split())  # help lines are wrapped: one line
    assert "(default: None)" not in text, text  # no empty default
    assert not re.search(r"\(default[^()]*\) \(default", text), text  # none stated twice


def test_every_option_is_described():
    """Each option of each command says what it does (--help shows nothing for an option without help)."""
    import argparse

    from retina_fast import cli

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, path + [name])
            elif action.option_strings and action.help != argparse.SUPPRESS:
                yield " ".join(path), action

    missing = [f"{cmd} {a.option_strings[-1]}" for cmd, a in walk(cli.build_parser(), ["retina-fast"])
               if not (a.help or "").strip()]
    assert not missing, missing
