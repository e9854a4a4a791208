"""Atomic file writes: a reader sees the old file or the new one, never half of one (a crash, a full disk,
a concurrent ``--resume``, another rank). One helper for every writer of the package: checkpoints, run
shards and manifests, cube files, ONNX exports, TensorRT engines and caches, trainer state, enhanced images.

The data go to a temporary file in the target's directory (same file system), are flushed to disk, and the
file is renamed over the target with ``os.replace`` (atomic on POSIX and Windows). The temporary file is
created with ``os.open(..., 0o666)``, so the kernel applies the user's umask exactly as for
``open(path, "w")`` (``tempfile.mkstemp`` would create it 0600, and the rename keeps that mode). The target's
directory must exist: a missing or non-directory parent is the caller's error to report, not to paper over.
"""
from __future__ import annotations

import errno
import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_write", "atomic_path", "temp_beside"]


def temp_beside(path: Path) -> Path:
    """Create (exclusively) and return an empty temporary file in ``path``'s directory, mode 0666 & ~umask.

    The name starts with a dot and keeps ``path``'s suffix (writers such as tifffile look at it)."""
    for _ in range(100):
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.{secrets.token_hex(4)}.tmp{path.suffix}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"{path.parent}: cannot create a temporary file beside {path.name}")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """``with atomic_path(p) as tmp: write(tmp)``: ``tmp`` is moved onto ``p`` when the block succeeds and
    deleted when it fails, so ``p`` is either the complete new file or whatever it was before. An OSError
    that names no file (a short write on a full disk) is re-raised naming ``p``."""
    path = Path(path)
    tmp = temp_beside(path)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:  # the data reach the disk before the rename makes them visible
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.filename is None:  # a failed write names no file: name the target
            if exc.errno is None:  # e.g. numpy's short write: "16384 requested and 4968 written"
                raise OSError(errno.ENOSPC, f"write failed ({exc}); is the disk full?", str(path)) from exc
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` (str as UTF-8) to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)
