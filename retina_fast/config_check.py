"""Checks of a checkpoint's ``config.json`` values before anything is built from them.

A config dataclass's own ``__post_init__`` checks consistency (f divides the image size, channels divide
into groups, ...), but it trusts the JSON's types: ``base_channels: 800000`` or ``image_size: 2**20``
would be allocated as given (terabytes), ``null`` or ``"8"`` reach arithmetic deep inside, and
``Infinity`` passes as a float. :func:`check_fields` checks every value against the field's annotated
type and a sane range first; :func:`check_weight_budget` builds the modules on the ``meta`` device (no
memory) and compares their size with the weights file's recorded size, so that an architecture larger
than its weights is refused before any real allocation. Errors are :class:`CheckpointError` naming the
file and the field (``.../config.json: architecture.vqgan.base_channels must be ...``).
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Mapping

import torch

from retina_fast.checkpoint import CheckpointError

__all__ = ["check_fields", "check_weight_budget", "check_number", "check_wavelengths", "INT_RANGES"]

# Inclusive ranges of integer fields (by field name; any other int field: 0 .. 2**31 - 1). Generous: the
# paper-size presets use at most 512 U-Net channels at 672 px.
INT_RANGES: dict[str, tuple[int, int]] = {
    "bands": (1, 1024), "image_size": (8, 8192), "f": (2, 32), "base_channels": (1, 4096),
    "enc_res_blocks": (0, 64), "dec_res_blocks": (0, 64), "latent_channels": (1, 4096),
    "codebook_size": (1, 1 << 20), "gn_groups": (1, 4096), "disc_channels": (1, 4096), "disc_layers": (0, 64),
    "in_channels": (1, 4096), "num_res_blocks": (0, 64), "attn_heads": (1, 1024), "attn_head_dim": (1, 4096),
    "groups": (1, 4096), "init_kernel": (1, 63), "time_mult": (1, 64), "timesteps": (1, 100_000),
    "channel_mults": (1, 64), "channels": (1, 4096), "scale_channels": (0, 4096), "cabs_per_level": (1, 64),
    "cabs_per_fab": (1, 64), "num_fabs": (1, 64), "reduction": (1, 4096), "rsp_base": (1, 4096),
    "rsp_channels": (1, 4096), "gf_radius": (0, 256),
    "softmax_attn_levels": (0, 64),
}
# Float fields that must be strictly positive (their own classes accept anything finite otherwise).
POSITIVE = {"gn_eps", "cosine_s", "max_beta", "gf_eps", "ema_eps"}
MAX_LIST = 4096


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _problem(name: str, hint: Any, value: Any) -> str | None:
    """Why ``value`` does not fit the annotation ``hint`` of field ``name`` (None when it does)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        problems = [_problem(name, h, value) for h in options]
        if any(p is None for p in problems):
            return None
        return " or ".join(dict.fromkeys(p for p in problems if p))
    if hint is type(None):
        return None if value is None else "must be null"
    if origin is tuple:
        (item,) = [a for a in typing.get_args(hint) if a is not Ellipsis][:1] or [Any]
        if not isinstance(value, list) or len(value) > MAX_LIST:
            return f"must be a list (of at most {MAX_LIST} entries)"
        for i, v in enumerate(value):
            p = _problem(name, item, v)
            if p:
                return f"entry {i} {p}"
        return None
    if hint is bool:
        return None if isinstance(value, bool) else "must be true or false"
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            return "must be an integer"
        lo, hi = INT_RANGES.get(name, (0, 2**31 - 1))
        return None if lo <= value <= hi else f"must be in {lo} .. {hi}"
    if hint is float:
        if not _is_number(value) or not math.isfinite(value):
            return "must be a finite number"
        return "must be > 0" if name in POSITIVE and not value > 0 else None
    if hint is str:
        return None if isinstance(value, str) else "must be a string"
    return None  # nested dataclasses are checked by the caller


def check_fields(cls, data: Any, where: str) -> None:
    """Every key of ``data`` (a JSON object for the config dataclass ``cls``) has the field's type and a
    sane value; ``where`` prefixes the messages (``'<file>: architecture.vqgan'``). Unknown keys are
    left to ``cls.from_dict`` (which lists the known ones); missing keys take the class defaults."""
    if not isinstance(data, dict):
        raise CheckpointError(f"{where} must be a JSON object, got {_show(data)}")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name not in data or dataclasses.is_dataclass(hints[f.name]):
            continue
        problem = _problem(f.name, hints[f.name], data[f.name])
        if problem:
            raise CheckpointError(f"{where}.{f.name} {problem}, got {_show(data[f.name])}")


def check_number(value: Any, where: str) -> float:
    if not _is_number(value) or not math.isfinite(value):
        raise CheckpointError(f"{where} must be a finite number, got {_show(value)}")
    return float(value)


def check_wavelengths(value: Any, bands: int, where: str) -> tuple[float, ...]:
    if not isinstance(value, list) or len(value) != bands:
        got = f"{len(value)} entries" if isinstance(value, list) else _show(value)
        raise CheckpointError(f"{where} must list one wavelength (nm) per band ({bands}), got {got}")
    out = tuple(check_number(v, f"{where}[{i}]") for i, v in enumerate(value))
    if not all(w > 0 for w in out):
        raise CheckpointError(f"{where} must be positive (nm), got {_show(value)}")
    return out


def _state_bytes_lower_bound(build) -> int:
    """Bytes the state dict of ``build()`` needs at least (2 per floating element: bf16/fp16 files), built
    on the meta device so nothing is allocated."""
    with torch.device("meta"):
        module = build()
    return sum(t.numel() * (2 if t.is_floating_point() else 1) for t in module.state_dict().values())


def check_weight_budget(path: Path, doc: Mapping[str, Any], name: str, build) -> None:
    """Refuse an architecture whose weights cannot fit in module ``name``'s recorded file size."""
    entry = doc["weights"].get(name) if isinstance(doc.get("weights"), dict) else None
    if not isinstance(entry, dict) or isinstance(entry.get("bytes"), bool) or not isinstance(entry.get("bytes"), int):
        return  # checkpoint.load_checkpoint reports a bad weights entry with its own message
    need = _state_bytes_lower_bound(build)
    if need > entry["bytes"]:
        raise CheckpointError(f"{path}: the architecture needs at least {need:,} bytes of weights for {name!r}, "
                              f"but its file is recorded as {entry['bytes']:,} bytes: the architecture does not "
                              f"belong to these weights")
