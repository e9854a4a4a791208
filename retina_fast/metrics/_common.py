"""Shared helpers of ``retina_fast.metrics``: input checks, reductions, batched feature extraction."""
from __future__ import annotations

import warnings
from typing import Callable, Iterable, Union

import numpy as np
import torch

ImagesLike = Union[torch.Tensor, np.ndarray]
Reduction = str

__all__ = ["MetricWarning", "as_images", "reduce", "compute_dtype", "extract_features", "as_features"]


class MetricWarning(UserWarning):
    """Raised as a warning when a metric result is valid but should be read with care
    (reduced MS-SSIM scales, fewer samples than feature dimensions, empty structure masks...)."""


def warn(message: str, depth: int = 1) -> None:
    """Issue a :class:`MetricWarning` attributed to the code ``depth`` frames above the caller."""
    warnings.warn(message, MetricWarning, stacklevel=2 + depth)


def as_images(x: ImagesLike, name: str = "images") -> torch.Tensor:
    """Return ``x`` as a (N, C, H, W) floating tensor; raise a clear ``ValueError`` otherwise."""
    t = torch.as_tensor(x)
    if t.ndim != 4:
        raise ValueError(f"{name} must have shape (N, C, H, W), got {tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.float()
    return t


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64; every other floating type (fp16, bf16, fp32) is computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def reduce(values: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    """``"none"`` → the per-image tensor (N,), ``"mean"`` / ``"sum"`` → a 0-d tensor."""
    if reduction == "none":
        return values
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")


def as_features(f: Union[torch.Tensor, np.ndarray], name: str = "features") -> np.ndarray:
    """Return a (N, F) float64 NumPy array."""
    if isinstance(f, torch.Tensor):
        f = f.detach().cpu().double().numpy()
    a = np.asarray(f, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name} must have shape (N, F), got {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or Inf")
    return a


def _batches(images: Union[ImagesLike, Iterable[torch.Tensor]], batch_size: int) -> Iterable[torch.Tensor]:
    if isinstance(images, (torch.Tensor, np.ndarray)):
        t = as_images(images)
        for start in range(0, t.shape[0], batch_size):
            yield t[start:start + batch_size]
    else:
        for batch in images:
            yield as_images(batch)


def extract_features(images: Union[ImagesLike, Iterable[torch.Tensor]],
                     extractor: Callable[[torch.Tensor], torch.Tensor],
                     batch_size: int = 32, device: Union[str, torch.device, None] = None) -> torch.Tensor:
    """Apply ``extractor`` ((B, C, H, W) → (B, F)) to ``images`` in batches, without gradients.

    ``images`` is a (N, C, H, W) tensor / array or an iterable of such batches (e.g. a DataLoader).
    An ``nn.Module`` extractor is put in eval mode for the call and restored afterwards.
    Returns a (N, F) float64 CPU tensor.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    module = extractor if isinstance(extractor, torch.nn.Module) else None
    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()
    if device is None and module is not None:
        p = next(iter(module.parameters()), None)
        device = p.device if p is not None else None
    out = []
    try:
        with torch.no_grad():
            for batch in _batches(images, batch_size):
                if device is not None:
                    batch = batch.to(device)
                f = torch.as_tensor(extractor(batch))
                if f.ndim != 2 or f.shape[0] != batch.shape[0]:
                    raise ValueError(f"extractor must map (B, C, H, W) to (B, F); got {tuple(f.shape)} "
                                     f"for a batch of shape {tuple(batch.shape)}")
                out.append(f.detach().to("cpu", torch.float64))
    finally:
        if module is not None:
            module.train(was_training)
    if not out:
        raise ValueError("no images to extract features from")
    return torch.cat(out)
