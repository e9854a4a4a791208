"""retina_fast.training: the reference PyTorch package — trainers, losses, phantom-based data and the
reference sampler that defines correct output. Imports point one way: training -> retina_fast.

Exports (imported lazily, so ``import retina_fast.training`` stays cheap):
``reference_sample`` (training/reference.py).
"""
from __future__ import annotations

import importlib
from typing import Any

__all__ = ["reference_sample"]

_LAZY = {"reference_sample": "retina_fast.training.reference"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'retina_fast.training' has no attribute {name!r}")
