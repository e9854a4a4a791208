"""Preview figures of hyperspectral cubes: a PNG contact sheet per image row.

Each row (one cube) shows the bands nearest 900 / 815 / 730 / 640 / 555 / 465 nm (the wavelengths of
the source's figures), a pseudo-colour view (640 / 555 / 465 nm as R / G / B), the colour fundus
rendering when given, and the masks overlaid on the pseudo-colour view when given. Every panel is
contrast-stretched to its 1st-99th percentile inside the field of view (the bright optic disc
saturates, like in a fundus photograph), so dark blue bands stay visible; the stretch is printed
in each band's title.

matplotlib is imported only when a sheet is drawn (a bare ``Figure``: the Agg canvas, no pyplot state).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["contact_sheet", "SHEET_NM", "PSEUDO_NM"]

SHEET_NM = (900.0, 815.0, 730.0, 640.0, 555.0, 465.0)
PSEUDO_NM = (640.0, 555.0, 465.0)
# Drawn in this order: regions blended at 50 %, then vessels opaque on top.
_MASK_COLOURS = {"onh": (1.0, 0.9, 0.1), "fovea": (0.1, 0.9, 0.3), "artery": (0.95, 0.15, 0.1),
                 "vein": (0.15, 0.35, 1.0)}
_BLENDED = ("onh", "fovea")


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


def _stretch(img: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, float, float]:
    vals = img[valid] if valid.any() else img.ravel()
    lo, hi = np.percentile(vals, [1.0, 99.0]) if vals.size else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1e-6
    return np.clip((img - lo) / (hi - lo), 0.0, 1.0), float(lo), float(hi)


def _nearest(wavelengths: np.ndarray, nm: float) -> int:
    return int(np.abs(wavelengths - nm).argmin())


def contact_sheet(
    cube: Any,
    wavelengths: Sequence[float],
    masks: dict | Sequence[dict] | None = None,
    path: str | Path = "preview.png",
    *,
    rgb: Any = None,
    titles: Sequence[str] | None = None,
    bands_nm: Sequence[float] = SHEET_NM,
    pseudo_nm: Sequence[float] = PSEUDO_NM,
    panel_inches: float = 1.9,
    dpi: int = 110,
) -> Path:
    """Draw a contact sheet of ``cube`` and save it as a PNG at ``path``; returns the path.

    ``cube``: (bands, H, W) or (N, bands, H, W), NumPy or torch, any range (reflectance expected);
    ``wavelengths``: nm per band (the nearest band is shown for each of ``bands_nm``); ``masks``: a
    dict of (H, W) bool masks (keys ``artery``, ``vein``, ``onh``, ``fovea``, ``fov``; others are
    ignored) or one such dict per row; ``rgb``: optional (3, H, W) / (N, 3, H, W) colour images in
    [0, 1]; ``titles``: one label per row.
    """
    # A bare Figure renders with the Agg canvas and never touches pyplot's global backend state.
    from matplotlib.figure import Figure

    data = _np(cube).astype(np.float32)
    if data.ndim == 3:
        data = data[None]
    if data.ndim != 4:
        raise ValueError(f"cube must be (bands, H, W) or (N, bands, H, W), got shape {data.shape}")
    wl = np.asarray(wavelengths, dtype=np.float64)
    if len(wl) != data.shape[1]:
        raise ValueError(f"{len(wl)} wavelengths for {data.shape[1]} bands")
    n = data.shape[0]
    mask_rows = [masks] * n if isinstance(masks, dict) or masks is None else list(masks)
    rgb_rows = None if rgb is None else _np(rgb).reshape(n, 3, *data.shape[-2:])
    cols = len(bands_nm) + 1 + (rgb_rows is not None) + (masks is not None)
    fig = Figure(figsize=(panel_inches * cols, (panel_inches + 0.25) * n + 0.1))
    axes = fig.subplots(n, cols, squeeze=False)
    for r in range(n):
        row_masks = {k: _np(v).astype(bool) for k, v in (mask_rows[r] or {}).items()}
        valid = row_masks.get("fov", data[r].max(axis=0) > 0)
        col = 0
        for nm in bands_nm:
            b = _nearest(wl, nm)
            img, lo, hi = _stretch(data[r, b], valid)
            ax = axes[r, col]
            ax.imshow(img, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(f"{wl[b]:g} nm  [{lo:.2f}, {hi:.2f}]", fontsize=7)
            col += 1
        pseudo = np.stack([_stretch(data[r, _nearest(wl, nm)], valid)[0] for nm in pseudo_nm], -1)
        axes[r, col].imshow(pseudo, interpolation="nearest")
        axes[r, col].set_title("pseudo " + "/".join(f"{wl[_nearest(wl, nm)]:g}" for nm in pseudo_nm),
                               fontsize=7)
        col += 1
        if rgb_rows is not None:
            axes[r, col].imshow(np.clip(np.moveaxis(rgb_rows[r], 0, -1), 0, 1), interpolation="nearest")
            axes[r, col].set_title("colour fundus", fontsize=8)
            col += 1
        if masks is not None:
            over = 0.55 * pseudo.mean(axis=-1, keepdims=True).repeat(3, -1)
            for name, colour in _MASK_COLOURS.items():
                if name in row_masks:
                    m = row_masks[name]
                    over[m] = 0.5 * over[m] + 0.5 * np.asarray(colour) if name in _BLENDED else colour
            if "fov" in row_masks:
                over[~row_masks["fov"]] *= 0.3
            axes[r, col].imshow(over, interpolation="nearest")
            axes[r, col].set_title("artery/vein/ONH/fovea", fontsize=7)
        if titles is not None:
            axes[r, 0].set_ylabel(str(titles[r]), fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
    fig.tight_layout(pad=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
