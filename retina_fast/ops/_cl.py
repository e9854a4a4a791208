"""Shared checks and buffers of the channels-last C++ CPU ops (``retina_fast._C``, data pointers in).

Every C++ entry point takes an optional ``graph``: instead of running, the op is appended to that C++
``OpGraph`` (the ``cpu`` backend's recorded programs, ``retina_fast.backends.cpu_graph``), so the ``*_cl``
raw functions of the op modules take ``graph=None`` and an output buffer the caller allocated.
"""
from __future__ import annotations

import torch

STORAGE = (torch.float32, torch.bfloat16)


def check_cl(x: torch.Tensor, name: str = "x") -> None:
    """A 4-D float32/bfloat16 channels-last CPU tensor, or a ValueError saying what is wrong."""
    if x.device.type != "cpu" or x.dtype not in STORAGE or x.dim() != 4:
        raise ValueError(f"{name}: expected a 4-D float32/bfloat16 CPU tensor, got {x.dtype} "
                         f"{tuple(x.shape)} on {x.device}")
    if not x.is_contiguous(memory_format=torch.channels_last):
        raise ValueError(f"{name}: must be channels-last contiguous")


def empty_cl(shape, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(tuple(shape), dtype=dtype, memory_format=torch.channels_last)


def ptr(t: torch.Tensor | None) -> int:
    return t.data_ptr() if t is not None else 0


def is_bf16(t: torch.Tensor) -> bool:
    return t.dtype == torch.bfloat16
