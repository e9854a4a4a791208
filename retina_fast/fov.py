"""Field of view of colour fundus photographs, and the image containers the fundus tools accept.

A fundus camera's field stop leaves a black surround; the enhancer (``retina_fast.enhance``) keeps it black,
and the degradation model (``retina_fast.training.degrade``) degrades only inside it.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["fov_mask", "to_batch"]


def fov_mask(image, threshold: float = 0.04):
    """Estimate the field of view of a real photograph: pixels whose max over channels and whose 5×5
    box mean of it both exceed ``threshold`` (in [0, 1] units; the mean drops isolated noise outside
    the FOV), then holes filled per row and per column (intersection),
    which assumes a convex-ish FOV. Input as for ``degrade``; returns bool (H, W) for one image or
    (N, H, W) for a batch (torch in, torch out; numpy in, numpy out)."""
    x, _ = to_batch(image)
    peak = x.amax(1, keepdim=True)
    m = ((peak > threshold) & (F.avg_pool2d(peak, 5, 1, 2, count_include_pad=False) > threshold))[:, 0]

    def fill(a: torch.Tensor, dim: int) -> torch.Tensor:
        c = a.int().cumsum(dim)
        return (c > 0) & (c < c.narrow(dim, a.shape[dim] - 1, 1)) | a

    m = fill(m, 2) & fill(m, 1)
    single = (isinstance(image, torch.Tensor) and image.dim() == 3) or (isinstance(image, np.ndarray) and image.ndim == 3)
    m = m[0] if single else m
    return m if isinstance(image, torch.Tensor) else m.cpu().numpy()


def to_batch(image):
    """-> ((N, 3, H, W) float32 tensor in [0, 1], restore function back to the input's type)."""
    if isinstance(image, torch.Tensor):
        if image.dim() not in (3, 4) or image.shape[-3] != 3 or not image.is_floating_point():
            raise ValueError(f"expected a float tensor (3, H, W) or (N, 3, H, W), got {tuple(image.shape)} {image.dtype}")
        single, dtype = image.dim() == 3, image.dtype
        x = (image[None] if single else image).float()
        return x, lambda y: (y[0] if single else y).to(dtype)
    if isinstance(image, np.ndarray):
        if image.ndim not in (3, 4) or image.shape[-1] != 3:
            raise ValueError(f"expected a numpy array (H, W, 3) or (N, H, W, 3), got {image.shape}")
        single, dtype = image.ndim == 3, image.dtype
        arr = image[None] if single else image
        x = torch.tensor(arr).permute(0, 3, 1, 2).float()
        if dtype == np.uint8:
            x = x / 255.0
        elif not np.issubdtype(dtype, np.floating):
            raise ValueError(f"numpy images must be uint8 or float, got {dtype}")

        def restore(y: torch.Tensor):
            out = y.permute(0, 2, 3, 1).cpu().numpy()
            out = np.round(out * 255).clip(0, 255).astype(np.uint8) if dtype == np.uint8 else out.astype(dtype)
            return out[0] if single else out

        return x, restore
    raise TypeError(f"expected a torch tensor or numpy array, got {type(image).__name__}")
