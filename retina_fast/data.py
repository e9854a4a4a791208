"""Datasets of hyperspectral cubes for training: a folder of files and the on-the-fly phantom.

Both yield float32 tensors (bands, H, W) at the model's wavelengths, mapped to the model range and
optionally randomly cropped / flipped:

* **Bands** (:func:`resample_bands`): ``mode="nearest"`` picks, for every model wavelength, the file
  band within ``tolerance_nm``; ``mode="linear"`` interpolates linearly between the two neighbouring
  file bands, x(l) = x(l_i) + (l - l_i) / (l_{i+1} - l_i) * (x(l_{i+1}) - x(l_i)), and refuses to
  extrapolate; ``"auto"`` (default) selects when every band matches, else interpolates. Files without
  wavelengths must already have the model's band count.
* **Range**: ``x' = lo' + (x - lo) / (hi - lo) * (hi' - lo')`` with ``value_range=(lo, hi)``
  (reflectance, default (0, 1)) and ``out_range=(lo', hi')`` (default (-1, 1), the diffusion
  models' range); ``out_range=None`` keeps reflectance.
* **Augmentation**: ``crop`` (int or (h, w)) takes a random window, ``hflip`` / ``vflip`` flip with
  probability 1/2. The draws for item ``i`` come from ``Generator(PCG64([seed, epoch, i]))``, so they
  do not depend on worker processes or iteration order; call ``set_epoch`` to change them per epoch.

Errors name the file (see :mod:`retina_fast.io`); a band or size mismatch found while loading is a
:class:`~retina_fast.io.CubeFormatError` too.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from retina_fast import DEFAULT_WAVELENGTHS
from retina_fast.io import CubeFormatError, is_cube_file, load_cube

__all__ = ["CubeFolderDataset", "PhantomDataset", "resample_bands", "normalize", "Augment"]


def resample_bands(
    cube: np.ndarray,
    src_nm: Sequence[float],
    dst_nm: Sequence[float],
    *,
    mode: str = "auto",
    tolerance_nm: float = 2.5,
    path: str | Path = "<array>",
) -> np.ndarray:
    """Map ``cube`` (len(src_nm), H, W) to the wavelengths ``dst_nm`` (see the module docstring)."""
    if mode not in ("auto", "nearest", "linear"):
        raise ValueError(f"mode must be 'auto', 'nearest' or 'linear', got {mode!r}")
    src = np.asarray(src_nm, dtype=np.float64)
    dst = np.asarray(dst_nm, dtype=np.float64)
    if cube.shape[0] != len(src):
        raise CubeFormatError(path, f"{cube.shape[0]} bands but {len(src)} wavelengths")
    nearest = np.abs(src[None, :] - dst[:, None]).argmin(axis=1)
    gap = np.abs(src[nearest] - dst)
    if mode == "nearest" or (mode == "auto" and (gap <= tolerance_nm).all()):
        if (gap > tolerance_nm).any():
            miss = ", ".join(f"{d:g}" for d in dst[gap > tolerance_nm])
            raise CubeFormatError(
                path, f"no band within {tolerance_nm:g} nm of {miss} nm (file has {_fmt(src)})"
            )
        return np.ascontiguousarray(cube[nearest])
    order = np.argsort(src)
    src, cube = src[order], cube[order]
    if dst.min() < src[0] - tolerance_nm or dst.max() > src[-1] + tolerance_nm:
        raise CubeFormatError(
            path, f"model wavelengths {_fmt(dst)} outside the file's range {src[0]:g}-{src[-1]:g} nm"
        )
    d = np.clip(dst, src[0], src[-1])
    if len(src) > 1:
        hi = np.clip(np.searchsorted(src, d, side="left"), 1, len(src) - 1)
    else:
        hi = np.zeros(len(d), dtype=int)
    lo = np.maximum(hi - 1, 0)
    span = np.where(src[hi] > src[lo], src[hi] - src[lo], 1.0)
    t = np.clip((d - src[lo]) / span, 0.0, 1.0).astype(np.float32)[:, None, None]
    return (cube[lo] * (1.0 - t) + cube[hi] * t).astype(np.float32)


def _fmt(nm: np.ndarray) -> str:
    return "[" + ", ".join(f"{v:g}" for v in nm) + "] nm"


def normalize(x: torch.Tensor, value_range=(0.0, 1.0), out_range=(-1.0, 1.0)) -> torch.Tensor:
    """Affine map of ``value_range`` onto ``out_range`` (identity when ``out_range`` is None)."""
    if out_range is None:
        return x
    lo, hi = value_range
    olo, ohi = out_range
    return (x - lo) * ((ohi - olo) / (hi - lo)) + olo


class Augment:
    """Seeded random crop and flips of (bands, H, W) tensors (see the module docstring)."""

    def __init__(self, crop=None, hflip: bool = False, vflip: bool = False, seed: int = 0) -> None:
        self.crop = (crop, crop) if isinstance(crop, int) else (tuple(crop) if crop else None)
        if self.crop is not None and min(self.crop) < 1:
            raise ValueError(f"crop must be positive, got {crop!r}")
        self.hflip, self.vflip, self.seed, self.epoch = hflip, vflip, int(seed), 0

    def __call__(self, x: torch.Tensor, index: int, path: str | Path = "<array>", masks=None):
        rng = np.random.Generator(np.random.PCG64([self.seed, self.epoch, int(index)]))
        h, w = x.shape[-2:]
        ops = []
        if self.crop is not None:
            ch, cw = self.crop
            if ch > h or cw > w:
                raise CubeFormatError(path, f"image {h}x{w} is smaller than the crop {ch}x{cw}")
            top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            ops.append(lambda t: t[..., top:top + ch, left:left + cw])
        if self.hflip and rng.random() < 0.5:
            ops.append(lambda t: t.flip(-1))
        if self.vflip and rng.random() < 0.5:
            ops.append(lambda t: t.flip(-2))
        for op in ops:
            x = op(x)
            if masks is not None:
                masks = {k: op(v) for k, v in masks.items()}
        x = x.contiguous()
        return x if masks is None else (x, {k: v.contiguous() for k, v in masks.items()})


class _CubeDataset(Dataset):
    def __init__(self, wavelengths, value_range, out_range, crop, hflip, vflip, seed) -> None:
        wl = DEFAULT_WAVELENGTHS if wavelengths is None else wavelengths
        self.wavelengths = tuple(float(w) for w in wl)
        self.value_range = tuple(value_range)
        self.out_range = None if out_range is None else tuple(out_range)
        if self.value_range[1] == self.value_range[0]:
            raise ValueError("value_range must span a non-empty interval")
        self.augment = Augment(crop, hflip, vflip, seed)

    def set_epoch(self, epoch: int) -> None:
        """Change the random crops / flips (deterministically) for a new epoch."""
        self.augment.epoch = int(epoch)

    def _finish(self, data: torch.Tensor, index: int, path, masks=None):
        data = normalize(data, self.value_range, self.out_range)
        return self.augment(data, index, path, masks)


class CubeFolderDataset(_CubeDataset):
    """Cubes in a folder (recursively; ``.npy .npz .tif .tiff .h5 .hdf5``, sorted by path).

    ``dataset[i]`` is a float32 tensor (len(wavelengths), H, W), or ``(tensor, masks)`` with
    ``with_masks=True`` (bool tensors read from ``<stem>_masks.npz`` next to the cube, as written by
    ``retina-fast phantom``). Files are read lazily, one per item; :meth:`check` validates them all
    up front. Options: see the module docstring.
    """

    def __init__(
        self,
        root: str | Path,
        wavelengths: Sequence[float] | None = None,
        *,
        mode: str = "auto",
        tolerance_nm: float = 2.5,
        value_range: Sequence[float] = (0.0, 1.0),
        out_range: Sequence[float] | None = (-1.0, 1.0),
        crop: int | Sequence[int] | None = None,
        hflip: bool = False,
        vflip: bool = False,
        seed: int = 0,
        with_masks: bool = False,
        size: int | Sequence[int] | None = None,
    ) -> None:
        super().__init__(wavelengths, value_range, out_range, crop, hflip, vflip, seed)
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: no such directory")
        self.files = sorted(p for p in self.root.rglob("*") if p.is_file() and is_cube_file(p))
        if not self.files:
            raise FileNotFoundError(f"{self.root}: no cube files (.npy .npz .tif .h5)")
        self.mode, self.tolerance_nm, self.with_masks = mode, float(tolerance_nm), with_masks
        self.size = (size, size) if isinstance(size, int) else (tuple(size) if size else None)

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> np.ndarray:
        """The cube of file ``index`` at the model's wavelengths, reflectance (no augmentation)."""
        path = self.files[index]
        n = len(self.wavelengths)
        cf = load_cube(path, expected_bands=n)
        data = cf.data
        if cf.wavelengths is not None:
            data = resample_bands(data, cf.wavelengths, self.wavelengths, mode=self.mode,
                                  tolerance_nm=self.tolerance_nm, path=path)
        if self.size is not None and tuple(data.shape[1:]) != self.size:
            raise CubeFormatError(path, f"image is {data.shape[1]}x{data.shape[2]}, expected "
                                        f"{self.size[0]}x{self.size[1]}")
        return data

    def check(self) -> dict:
        """Load every file once; raise on the first bad one. Returns a summary (count, shapes)."""
        shapes = {tuple(self.load(i).shape) for i in range(len(self))}
        return {"files": len(self), "shapes": sorted(shapes)}

    def __getitem__(self, index: int):
        data = torch.from_numpy(self.load(index))
        masks = None
        if self.with_masks:
            path = self.files[index]
            side = path.with_name(path.name[: -len(path.suffix)] + "_masks.npz")
            if not side.exists():
                raise FileNotFoundError(f"{side}: no masks file for {path.name}")
            from retina_fast.io import load_masks

            masks = {k: torch.from_numpy(v) for k, v in load_masks(side).items()}
        return self._finish(data, index, self.files[index], masks)


class PhantomDataset(_CubeDataset):
    """``n`` phantom eyes rendered on the fly: item ``i`` is ``retina_fast.phantom.render(base_seed
    + i, size)`` (same outputs and options as :class:`CubeFolderDataset`). Renders at the model's
    wavelengths directly (within 450-920 nm)."""

    def __init__(
        self,
        n: int,
        size: int = 224,
        *,
        base_seed: int = 0,
        wavelengths: Sequence[float] | None = None,
        value_range: Sequence[float] = (0.0, 1.0),
        out_range: Sequence[float] | None = (-1.0, 1.0),
        crop: int | Sequence[int] | None = None,
        hflip: bool = False,
        vflip: bool = False,
        seed: int = 0,
        with_masks: bool = False,
        noise: bool = True,
    ) -> None:
        super().__init__(wavelengths, value_range, out_range, crop, hflip, vflip, seed)
        if n < 0 or base_seed < 0:
            raise ValueError("n and base_seed must be non-negative")
        self.n, self.size, self.base_seed = int(n), int(size), int(base_seed)
        self.with_masks, self.noise = with_masks, noise

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        if not -self.n <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} phantoms")
        index %= self.n
        from retina_fast.phantom import render

        ph = render(self.base_seed + index, self.size, wavelengths=self.wavelengths, noise=self.noise)
        masks = ph.masks if self.with_masks else None
        return self._finish(ph.cube, index, f"<phantom seed {self.base_seed + index}>", masks)


def __getattr__(name: str):
    # SyntheticRetinaDataset lives in retina_fast.synthetic (it needs the engine); exposed here lazily
    if name == "SyntheticRetinaDataset":
        from retina_fast.synthetic import SyntheticRetinaDataset

        return SyntheticRetinaDataset
    raise AttributeError(f"module 'retina_fast.data' has no attribute {name!r}")
