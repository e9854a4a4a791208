"""Writing files atomically beside their final name, with the permissions of any other output file.

``tempfile.mkstemp`` creates its file with mode 0600 whatever the umask, and ``os.replace`` keeps that
mode: outputs written that way end up ``-rw-------``. Here the temporary file is created with
``os.open(..., 0o666)``, so the kernel applies the user's umask exactly as for ``open(path, "w")``.
"""
from __future__ import annotations

import errno
import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["temp_beside", "atomic_path", "atomic_write_bytes"]


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
    deleted when it fails, so ``p`` is either the complete new file or whatever it was before."""
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


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
