"""Op tables: how one model definition runs on every backend.

The layers of the networks (``retina_fast.models``) call their compute through named ops: a layer's
``forward`` (or a free function such as the bilinear resize) is decorated with :func:`op`, which runs the
decorated code itself -- the reference -- unless an :class:`OpTable` is active and implements that name::

    class GroupNormSiLU(nn.Module):
        @op("group_norm_silu")
        def forward(self, x, scale_shift=None): ...            # the reference

    with use_table(OpTable("cuda", {"group_norm_silu": triton_gn})):
        unet(x, t)                                             # the same forward, Triton GroupNorm

A backend therefore never copies a network's forward: it runs the trainers' own modules with its table.
Tables that *record* a network (the ``cpu`` backend's op graphs, ``retina_fast.backends.cpu_graph``) are
``strict``: an op they do not implement raises :class:`UnsupportedOp` naming it, so a layer type the backend
has never seen fails at recording time instead of being silently skipped; other tables (``cuda``) let the
reference run for ops they leave alone.

Dispatch costs one global read when no table is active anywhere (so ``torch.compile`` traces the reference
without a graph break), and a context-variable lookup otherwise (tables are per thread / task).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import threading
from typing import Any, Callable, Iterator

__all__ = ["op", "OpTable", "use_table", "current_table", "UnsupportedOp"]


class UnsupportedOp(NotImplementedError):
    """A backend's op table cannot run something the model does; the message names it."""


class OpTable:
    """Implementations by op name. ``impls[name](*args, **kwargs)`` receives exactly what the decorated
    reference receives (for a layer's forward: the module first). ``strict``: ops without an implementation
    raise :class:`UnsupportedOp` instead of running the reference."""

    def __init__(self, name: str, impls: dict[str, Callable[..., Any]], *, strict: bool = False) -> None:
        self.name = name
        self.impls = dict(impls)
        self.strict = strict

    def run(self, name: str, reference: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        impl = self.impls.get(name)
        if impl is None:
            if self.strict:
                raise UnsupportedOp(f"the {self.name!r} op table has no implementation of op {name!r} "
                                    f"({getattr(reference, '__qualname__', reference)}); add one there or run "
                                    f"this model on a backend that has it")
            return reference(*args, **kwargs)
        return impl(*args, **kwargs)

    def __repr__(self) -> str:
        return f"OpTable({self.name!r}, {sorted(self.impls)}, strict={self.strict})"


_CURRENT: contextvars.ContextVar[OpTable | None] = contextvars.ContextVar("retina_fast_op_table", default=None)
_ACTIVE = 0  # tables active in any thread: while 0, dispatch is one global read (torch.compile-friendly)
_LOCK = threading.Lock()


def current_table() -> OpTable | None:
    """The op table in force in this thread / task (None: the references)."""
    return _CURRENT.get() if _ACTIVE else None


@contextlib.contextmanager
def use_table(table: OpTable | None) -> Iterator[None]:
    """Run the decorated ops inside the block with ``table`` (None: the references)."""
    global _ACTIVE
    token = _CURRENT.set(table)
    with _LOCK:
        _ACTIVE += 1
    try:
        yield
    finally:
        with _LOCK:
            _ACTIVE -= 1
        _CURRENT.reset(token)


def op(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a reference (a layer's ``forward`` or another method, or a free function) as op ``name``:
    it runs as written unless the active :class:`OpTable` implements ``name``. The reference stays reachable
    as ``.reference``."""

    def wrap(reference: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(reference)
        def dispatch(*args: Any, **kwargs: Any) -> Any:
            if _ACTIVE:
                table = _CURRENT.get()
                if table is not None:
                    return table.run(name, reference, *args, **kwargs)
            return reference(*args, **kwargs)

        dispatch.op_name = name  # type: ignore[attr-defined]
        dispatch.reference = reference  # type: ignore[attr-defined]
        return dispatch

    return wrap
