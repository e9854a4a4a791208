"""Exception classes shared by the command line and the library (no heavy imports here).

``UserError`` lives in its own module, not in ``retina_fast.cli``: when the CLI runs as
``python -m retina_fast.cli`` (the form torchrun uses) that file is executed as ``__main__``, a second
module object whose ``UserError`` would be a different class from the one the commands raise.
"""
from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""
