"""Checkpoint directories: ``config.json`` + one ``<name>.safetensors`` per module.

Layout of ``config.json``::

    {"format": "retina_fast.checkpoint", "format_version": 1,
     ...the caller's config (architecture, preset, wavelengths, latent_range, normalisation)...,
     "provenance": {"data": ..., "steps": ..., "command": ..., "code_version": ...},
     "weights": {"<name>": {"file": "<name>.safetensors", "sha256": "<hex>", "bytes": <int>}}}

Every file is written to a temporary name in the same directory and moved into place with
``os.replace`` (atomic on POSIX); ``config.json`` is written last, so a directory with a readable
``config.json`` references complete weight files. Loading checks each file's size and sha256 before
parsing it, and never unpickles anything (safetensors only; no ``torch.load``).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from retina_fast.files import atomic_write

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "load_state_into", "model_config", "read_config",
           "config_part", "CONFIG_NAME", "FORMAT", "FORMAT_VERSION"]

CONFIG_NAME = "config.json"
FORMAT = "retina_fast.checkpoint"
FORMAT_VERSION = 1
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_RESERVED = {"format", "format_version", "provenance", "weights"}


def config_part(doc: Mapping[str, Any], drop: Iterable[str] = ()) -> dict[str, Any]:
    """The ``config`` a checkpoint was saved with, from its config.json ``doc``: everything but the entries
    :func:`save_checkpoint` writes itself (format, version, provenance, weights table) and the keys in ``drop``
    -- what to pass to :func:`save_checkpoint` to save the same model again."""
    skip = _RESERVED | set(drop)
    return {k: v for k, v in doc.items() if k not in skip}


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, tampered with or does not match the model; names the file."""


def _state(obj: nn.Module | Mapping[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    state = obj.state_dict() if isinstance(obj, nn.Module) else obj
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"module {name!r}: state entry {key!r} is {type(value).__name__}, not a tensor")
        # safetensors needs contiguous CPU tensors that share no storage.
        out[key] = value.detach().to("cpu").contiguous().clone()
    return out


def save_checkpoint(directory: str | os.PathLike, modules: Mapping[str, nn.Module | Mapping[str, torch.Tensor]],
                    config: Mapping[str, Any], provenance: Mapping[str, Any] | None = None) -> Path:
    """Write ``modules`` (name -> module or state dict) and ``config`` (JSON-serialisable) to ``directory``.

    ``provenance`` (data, steps, command, ...) is stored under ``"provenance"``; ``code_version`` is
    filled with ``retina_fast.__version__`` when absent. Returns the directory path.
    """
    from retina_fast import __version__

    directory = Path(directory)
    bad = sorted(_RESERVED & set(config))
    if bad:
        raise ValueError(f"config keys {bad} are reserved by the checkpoint format")
    directory.mkdir(parents=True, exist_ok=True)
    weights: dict[str, dict[str, Any]] = {}
    for name, obj in modules.items():
        if not _NAME_RE.match(name) or name == "config":
            raise ValueError(f"module name {name!r} must match {_NAME_RE.pattern} and not be 'config'")
        data = st_save(_state(obj, name), metadata={"format": "pt", "module": name})
        fname = f"{name}.safetensors"
        atomic_write(directory / fname, data)
        weights[name] = {"file": fname, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    prov = dict(provenance or {})
    prov.setdefault("code_version", __version__)
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, **dict(config), "provenance": prov,
           "weights": weights}
    text = json.dumps(doc, indent=2, sort_keys=False, allow_nan=False) + "\n"
    atomic_write(directory / CONFIG_NAME, text.encode("utf-8"))
    return directory


def model_config(config: Any, latent_range: tuple[float, float] | None = None) -> dict[str, Any]:
    """The standard ``config`` argument for an LDM / VQ-GAN checkpoint from an ``LDMConfig``:

    ``architecture`` (config.to_dict()), ``preset``, ``wavelengths`` (nm), ``latent_range``
    ({"min", "max"} of the codebook, or None), ``normalisation`` (x_b = scale_b * reflectance_b + shift_b
    in the VQ-GAN; one number for all bands or one per band; the architecture holds the same values)."""
    vq = config.vqgan
    return {
        "architecture": config.to_dict(),
        "preset": config.name,
        "wavelengths": list(vq.wavelengths),
        "latent_range": None if latent_range is None else {"min": float(latent_range[0]),
                                                           "max": float(latent_range[1])},
        "normalisation": {"reflectance_scale": _plain(vq.reflectance_scale),
                          "reflectance_shift": _plain(vq.reflectance_shift),
                          "per_band": vq.per_band_normalisation, "output": "reflectance in [0, 1]"},
    }


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_NAME
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: checkpoint directory does not exist")
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (a checkpoint directory needs {CONFIG_NAME})")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc}); the file is truncated or corrupt") from exc
    fmt = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
    if fmt != FORMAT:
        raise CheckpointError(f"{path}: not a retina_fast checkpoint (format {fmt!r}, expected {FORMAT!r})")
    version = doc.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{path}: format_version must be a positive integer, got {json.dumps(version)[:40]}")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {version} is newer than this "
                              f"retina_fast understands ({FORMAT_VERSION}); upgrade retina_fast")
    if not isinstance(doc.get("weights"), dict):
        raise CheckpointError(f"{path}: no 'weights' table")
    return doc


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's ``config.json`` (format and weights table checked), without reading any weights."""
    return _read_config(Path(directory))


def _check_weights_entry(directory: Path, name: str, entry: Any) -> tuple[Path, str, int]:
    """(path, sha256, bytes) of a weights-table entry whose file exists with the recorded size (a stat,
    nothing is read); CheckpointError naming config.json or the file otherwise."""
    fname, digest, size = (entry.get(k) for k in ("file", "sha256", "bytes")) if isinstance(entry, Mapping) else (
        None, None, None)
    if not (isinstance(fname, str) and fname and isinstance(digest, str) and _SHA256_RE.match(digest)
            and isinstance(size, int) and not isinstance(size, bool) and size >= 0):
        raise CheckpointError(f"{directory / CONFIG_NAME}: bad weights entry for {name!r} (needs file, a 64-digit "
                              f"hex sha256 and a byte count): {json.dumps(entry)[:120]}")
    path = directory / fname
    if Path(fname).name != fname:
        raise CheckpointError(f"{directory / CONFIG_NAME}: weights file {fname!r} must be inside the directory")
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (listed in {CONFIG_NAME} for module {name!r})")
    on_disk = path.stat().st_size  # compared before reading: a wrong file is never read whole
    if on_disk != size:
        kind = "truncated" if on_disk < size else "longer than recorded"
        raise CheckpointError(f"{path}: {kind}: {on_disk} bytes, {CONFIG_NAME} records {size}")
    return path, digest, size


def _read_weights(path: Path, digest: str, size: int) -> dict[str, torch.Tensor]:
    data = path.read_bytes()
    if len(data) != size:
        raise CheckpointError(f"{path}: changed while it was read ({len(data)} bytes, {CONFIG_NAME} records {size})")
    actual = hashlib.sha256(data).hexdigest()
    if actual != digest:
        raise CheckpointError(f"{path}: sha256 mismatch (file {actual[:16]}..., {CONFIG_NAME} records "
                              f"{digest[:16]}...): the file was modified or corrupted")
    try:
        return st_load(data)
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: not a valid safetensors file ({exc})") from exc


def load_checkpoint(directory: str | os.PathLike, names: list[str] | None = None
                    ) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """Read ``config.json`` and the verified state dicts: returns (config, {name: state_dict}).

    ``names`` restricts which modules are read (all by default). Raises ``CheckpointError`` naming the
    file for a missing directory/file, invalid JSON, size or sha256 mismatch, or unparsable weights.
    """
    directory = Path(directory)
    doc = _read_config(directory)
    table = doc["weights"]
    wanted = list(table) if names is None else names
    missing = [n for n in wanted if n not in table]
    if missing:
        raise CheckpointError(f"{directory / CONFIG_NAME}: no module(s) {missing}; it has {sorted(table)}")
    checked = {n: _check_weights_entry(directory, n, table[n]) for n in wanted}  # every entry before any read
    return doc, {n: _read_weights(*checked[n]) for n in wanted}


def load_state_into(module: nn.Module, state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Strictly load ``state`` into ``module``; a mismatch raises ``CheckpointError`` listing missing,
    unexpected and wrongly shaped keys, with ``source`` (e.g. the file) named in the message."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if items:
                parts.append(f"{label} ({len(items)}): {', '.join(items[:6])}{' ...' if len(items) > 6 else ''}")
        raise CheckpointError(f"{source}: does not match {type(module).__name__}: " + "; ".join(parts))
    module.load_state_dict(state, strict=True)
