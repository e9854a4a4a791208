"""retina_fast: fast, reproducible sampling of 16-band hyperspectral retinal images (latent diffusion)
and fundus photograph enhancement (MAGE-Net), with a reference PyTorch package in
``retina_fast.training``.

Importing this package never fails because the compiled core, Triton or a GPU is missing; see
``retina_fast.info()`` for what loaded and why not.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

DEFAULT_WAVELENGTHS = (465, 490, 515, 530, 545, 555, 570, 585, 600, 615, 640, 680, 730, 780, 815, 900)

_LAZY = {
    "noise": "retina_fast.noise",
    "phantom": "retina_fast.phantom",
    "metrics": "retina_fast.metrics",
    "backends": "retina_fast.backends",
    "ops": "retina_fast.ops",
    "data": "retina_fast.data",
    "io": "retina_fast.io",
    "models": "retina_fast.models",
    "kernels": "retina_fast.kernels",
}


def info() -> dict:
    """Versions, build flags, CPU features, GPUs and the backend table (see ``retina-fast info``)."""
    from retina_fast.info import collect

    return collect()


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return importlib.import_module(_LAZY[name])
    if name in {"sample", "load", "Pipeline"}:
        return getattr(importlib.import_module("retina_fast.engine"), name)
    if name == "enhance":
        # ``from retina_fast import enhance`` inside this hook would look the name up on this package
        # again (hasattr -> __getattr__) before importing the submodule: endless recursion. Importing
        # by full name binds the submodule (callable: ``retina_fast.enhance(images)``) on the package.
        return importlib.import_module("retina_fast.enhance")
    raise AttributeError(f"module 'retina_fast' has no attribute {name!r}")
