"""Loads the compiled core ``retina_fast._C`` once and records why it is unavailable, never raising."""
from __future__ import annotations

from types import ModuleType

_C: ModuleType | None
load_error: str | None

try:
    from retina_fast import _C  # type: ignore[attr-defined, no-redef]

    load_error = None
except Exception as exc:  # ImportError, or an OSError from a missing shared library
    _C = None
    load_error = f"{type(exc).__name__}: {exc}"


def available() -> bool:
    return _C is not None


def has_cuda() -> bool:
    return _C is not None and hasattr(_C, "randn_cuda")


def require() -> ModuleType:
    """The extension module, or a RuntimeError saying why it did not load."""
    if _C is None:
        raise RuntimeError(
            f"retina_fast._C (the compiled core) is not available: {load_error}. "
            "Reinstall with `pip install -e .` on a machine with a C++17 compiler and CMake."
        )
    return _C


def build_info() -> dict:
    return dict(_C.build_info()) if _C is not None else {"error": load_error}
