"""Triton kernels (installed as ``retina_fast.kernels``).

Importing this package never fails: if Triton is missing, ``available`` is False and ``load_error``
says why. Each kernel module holds the ``@triton.jit`` kernel and its launcher; the plain PyTorch
reference lives beside the public op in ``retina_fast.ops`` / ``retina_fast.noise``.
On a CPU machine the kernels run only with ``TRITON_INTERPRET=1`` set before Triton is imported.
"""
from __future__ import annotations

try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401

    available = True
    load_error: str | None = None
    version = triton.__version__
except Exception as exc:  # pragma: no cover - depends on the machine
    available = False
    load_error = f"{type(exc).__name__}: {exc}"
    version = None


def require() -> None:
    if not available:
        raise RuntimeError(f"Triton is not available: {load_error}. Install it with `pip install triton`.")
