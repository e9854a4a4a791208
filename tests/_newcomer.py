"""Helpers for tests that use retina_fast the way a new user does: a fresh interpreter started from a
temporary directory (no test module imported first), the ``retina-fast`` console script, and a check
that a failing command leaves every file it found exactly as it was."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def fresh_env(**extra: str) -> dict:
    """The environment of a user's shell: this interpreter's venv first on PATH, no test-only settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RETINA_FAST_", "PYTEST", "TRITON_INTERPRET")) and k != "PYTHONPATH"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def console_script() -> list[str]:
    """``retina-fast`` as installed (console script beside the interpreter), else ``python -m retina_fast``."""
    exe = shutil.which("retina-fast", path=str(BIN))
    return [exe] if exe else [sys.executable, "-m", "retina_fast"]


def run(cmd: list[str], cwd: Path, timeout: float = 600, preexec_fn=None, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=fresh_env(**env), capture_output=True, text=True, timeout=timeout,
                          preexec_fn=preexec_fn)


def snapshot(root: Path) -> dict[str, str]:
    """relative path -> sha256 (or 'dir') of everything under ``root``: any change, addition, leftover
    temporary file or removal shows up as a difference."""
    out = {}
    if not root.exists():
        return out
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def assert_user_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit status 2, no traceback, exactly one line on stderr that contains every needle; returns it."""
    err = result.stderr.strip()
    assert result.returncode == 2, f"exit {result.returncode}, stderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got:\n{err}"
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]
