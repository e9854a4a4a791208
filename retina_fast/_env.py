"""Every environment variable retina_fast reads, read here and nowhere else."""
from __future__ import annotations

import os

__all__ = ["backend_override", "strict", "triton_interpret", "num_threads", "cache_dir", "dist_env", "local_rank"]


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def backend_override() -> str | None:
    """RETINA_FAST_BACKEND: force a backend name for every pipeline (e.g. ``torch``, ``cpu``)."""
    value = os.environ.get("RETINA_FAST_BACKEND", "").strip()
    return value or None


def strict() -> bool:
    """RETINA_FAST_STRICT=1: anything that would warn about a slower substitute raises instead."""
    return _flag("RETINA_FAST_STRICT")


def triton_interpret() -> bool:
    """TRITON_INTERPRET=1: Triton kernels run on CPU tensors in the interpreter (tests only)."""
    return _flag("TRITON_INTERPRET")


def num_threads() -> int | None:
    """RETINA_FAST_NUM_THREADS: intra-op threads for the cpu backend (default: physical cores)."""
    value = os.environ.get("RETINA_FAST_NUM_THREADS", "").strip()
    return int(value) if value else None


def cache_dir() -> str:
    """RETINA_FAST_CACHE: engine / compilation cache directory."""
    return os.environ.get("RETINA_FAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "retina_fast")


def dist_env() -> tuple[int, int]:
    """(rank, world_size) set by torchrun (RANK / WORLD_SIZE); (0, 1) outside torchrun."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """LOCAL_RANK set by torchrun: which GPU of this node a rank uses."""
    return int(os.environ.get("LOCAL_RANK", "0"))
