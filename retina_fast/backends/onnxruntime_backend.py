"""``onnxruntime`` backend: the U-Net step as an onnxruntime CPU session (fp32).

Added because, measured in one run on the 2-core AVX-512 CPU (AVX512-BF16, no AMX; load ~7 at the time) (benchmarks/bench_onnxruntime.py,
benchmarks/results/onnxruntime_vs_cpu.json), onnxruntime's fp32 U-Net step beats the ``cpu`` backend's
bf16 sharded TorchScript graphs (~2x at batch 4 on tiny latents) while matching torch fp32 to ~1e-6
(the ``cpu`` backend's bf16 is ~3e-2 off), and MAGE-Net at 512x512 beats eager channels-last bf16
(~1.8x); the decoder ties with eager PyTorch, so it runs as the ``cpu`` backend's frozen graph, which
beats both. ``ONNXRuntimeEnhancer`` is the MAGE-Net hook for the enhance engine.

    denoise   ONNX U-Net (export_onnx, dynamic batch) in an InferenceSession, all graph optimisations,
              intra-op threads = RETINA_FAST_NUM_THREADS or the core count
    step      the fused C++ sampler step (noise in the loop), as on ``cpu``
    decode    C++ nearest-code lookup, then the decoder as a frozen channels-last fp32 TorchScript graph

ONNX graphs are cached under ``<cache_dir>/onnxruntime/`` by architecture + latent shape + weights hash,
so a pipeline exports each network once per machine. Needs the ``onnx`` and ``onnxruntime`` packages
(imported when a runner is built, never at import).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from retina_fast import _env
from retina_fast.backends import need_onnxruntime  # noqa: F401  (re-exported)
from retina_fast.backends.graphs import FrozenGraphs, fast_copy
from retina_fast.backends.runners import Runner, _DecodeIndices
from retina_fast.export import architecture_hash, export_onnx, onnxruntime_session, weights_hash

__all__ = ["ONNXRuntimeRunner", "ONNXRuntimeEnhancer", "need_onnxruntime", "cached_onnx"]


def cached_onnx(module: nn.Module, what: str, sample_shape: tuple[int, ...],
                cache_dir: str | Path | None = None) -> Path:
    """The fp32 ONNX export of ``module`` for ``what`` at ``sample_shape``, exported once and cached."""
    root = Path(cache_dir if cache_dir is not None else _env.cache_dir()) / "onnxruntime"
    key = f"{architecture_hash(module, list(sample_shape))[:16]}-{weights_hash(module)[:16]}"
    path = root / f"{what}-{key}.onnx"
    if not path.is_file():
        export_onnx(module, what, path, sample_shape=sample_shape)
    return path


class ONNXRuntimeRunner(Runner):
    """Sampling runner for ``backend="onnxruntime"`` (CPU, fp32)."""

    nearest_impl = "cpp"
    step_impl = "cpp"

    def __init__(self, loaded, device, dtype) -> None:
        super().__init__(loaded, device, dtype)
        if dtype != torch.float32:
            raise ValueError(f"the onnxruntime backend runs float32 graphs, not {dtype}")
        threads = _env.num_threads() or os.cpu_count() or 1
        latent = tuple(loaded.config.latent_shape)
        self.unet_session = onnxruntime_session(cached_onnx(self.unet, "unet", latent), threads=threads)
        # The decoder runs as the cpu backend's frozen channels-last fp32 graph: measured in one run on the
        # 2-core CPU (tiny, B=8) it took 0.61x the time of eager PyTorch, the onnxruntime session 0.98x.
        self.fast_decode = FrozenGraphs(_DecodeIndices(fast_copy(loaded.vqgan, torch.float32, channels_last=True)))

    @torch.no_grad()
    def denoise(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        feed = {"x": x.float().contiguous().numpy(), "t": t.to(torch.int64).numpy()}
        return torch.from_numpy(self.unet_session.run(["eps"], feed)[0])

    @torch.no_grad()
    def decode_indices(self, idx: torch.Tensor) -> torch.Tensor:
        return self.fast_decode(idx)


class ONNXRuntimeEnhancer:
    """MAGE-Net ``restore`` through onnxruntime, for the enhance engine.

        enhancer = ONNXRuntimeEnhancer(magenet)
        restored = enhancer(images)   # (N, 3, H, W) float in [0, 1] -> (N, 3, H, W) fp32, unclamped

    One session per image size (H, W), exported on first use and cached like the sampling graphs."""

    def __init__(self, magenet: nn.Module, *, threads: int | None = None, cache_dir: str | Path | None = None) -> None:
        self.magenet = magenet.eval()
        self.threads = threads or _env.num_threads() or os.cpu_count() or 1
        self.cache_dir = cache_dir
        self._sessions: dict[tuple[int, int], object] = {}

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"ONNXRuntimeEnhancer expects (N, 3, H, W), got {tuple(images.shape)}")
        key = (images.shape[-2], images.shape[-1])
        if key not in self._sessions:
            path = cached_onnx(self.magenet, "magenet", (3, *key), self.cache_dir)
            self._sessions[key] = onnxruntime_session(path, threads=self.threads)
        feed = {"image": np.ascontiguousarray(images.detach().float().cpu().numpy())}
        return torch.from_numpy(self._sessions[key].run(["restored"], feed)[0])

