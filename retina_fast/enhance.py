"""``retina_fast.enhance(images)``: MAGE-Net fundus enhancement on the shipped or a given checkpoint.

Inputs and outputs (same type and shape out as in):
- torch float tensor (3, H, W) or (N, 3, H, W) in [0, 1] (any float dtype / device);
- numpy array (H, W, 3) or (N, H, W, 3), uint8 (0–255) or float in [0, 1];
- PIL.Image in mode RGB; or a list / tuple of any of these (sizes may differ) -> a list.
Any size ≥ 16 px: images are reflect-padded at the bottom / right to multiples of 8 (as
``MAGENet.forward`` does) and cropped back. Images larger than ``MAX_WHOLE_PIXELS`` (or when ``tile``
is given) are processed in overlapping tiles blended with linear ramps. Tiles are not the same
function as the whole image: the channel attention pools over the whole input and the RSP module
uses GroupNorm, both image-global, so the default processes the whole image whenever it fits.
Field of view: the output is clamped to [0, 1] and multiplied by the FOV mask estimated on the input
(``fov_mask``), so the black surround stays black.
Residual threshold (not in the paper): a checkpoint's config.json may set ``residual_threshold`` τ; the
network's change to each pixel and channel, r = out − in, is then soft-thresholded, in + sign(r)·max(|r| − τ, 0)
(``shrink_residual``; r after the clamp): changes smaller than τ are not made, larger ones are made τ smaller.
Measured on the shipped weights (docs/enhance_eval/no_harm_study.md), the network's small changes are mostly its
own error (a smooth ~0.005 RMS shading change on a clean photograph) and its useful ones are large (lifting
a dark photograph by 0.1-0.3), so this leaves good photographs alone at a small cost on bad ones. τ is chosen
on a validation split (``retina_fast.training.enhance_kinds --choose-threshold``); ``residual_threshold=`` on
a call overrides it (0 = the network's output as it is).
Work size (not in the paper): a checkpoint's config.json may set ``work_size`` N; an image whose shorter side
is larger is then enhanced on a copy scaled down to N (antialiased bilinear), and the network's change,
out − in, is resized back (bilinear) and added to the full-size input. A network trained on 256-px fundus
images sees the same anatomy and degradations at the same scale this way, and the input's fine detail passes
through unchanged. Measured on the shipped weights, the real photograph at 512 px, held-out half
(docs/enhance_eval/no_harm_study.md): the worst degradation combination went from −0.24 to −0.04 dB and the mean
illumination gain from +7.4 to +8.6 dB (each with its own threshold); a network trained on spot-only rows
removes 88 % of the spots at its training scale against 47 % at 2x. ``work_size=`` on a call overrides it
(0 = the image's own size).
Follow-up stages (not in the paper): a checkpoint's config.json may list ``then``: further MAGE-Net checkpoints
(packaged names, or paths relative to the checkpoint directory) run in order on its output, each with its own
residual threshold and work size, inside the same field of view. The shipped default is two stages: a
T-MAGE-Net trained on the batch mean of its rows' losses (lifts badly lit photographs), then one trained with
each row counted by the log of its loss (``magenet-spots``: removes light spots, which the first leaves). One
network trained either way does one of the two well at this size (docs/enhance_eval/no_harm_study.md).
``then=`` on a call overrides the list (``()`` = the named checkpoint alone); a follow-up stage's own ``then``
is not followed (a config.json that chains further is refused), so a chain cannot loop.
Deblurring (not in the paper): a checkpoint's config.json may set ``deblur`` ({"lambda", "native_width",
"min_agreement"}, ``retina_fast.deblur``): before its first network, each image's blur is read off its
field-of-view edge and, where the edge shows one, undone by regularised deconvolution; an image whose edge is
sharp, or does not look like a blurred step, passes unchanged. The networks do not learn to sharpen real
photographs from the phantom (docs/enhance_eval/no_harm_study.md); this step does, for the blur model they
are trained on. ``deblur=`` on a call: False = off, True = on (the checkpoint's settings, else the defaults).

Backends (``retina_fast.backends``; resolved once per enhancer, device and dtype):
- ``torch``: the reference: eager fp32 ``MAGENet.restore``.
- ``cpu``: a copy of the same modules in channels-last, bf16 where the CPU has AVX512-BF16 / AMX
  (fp32 otherwise or with dtype=torch.float32) except the RSP module, which stays fp32 (its
  few-channel box filters / GroupNorm are slower in bf16 on the CPU), each CAB's channel attention +
  residual and every bilinear resize swapped for fused C++ ops (``retina_fast.backends.cpu_enhance``),
  traced and frozen with TorchScript per input shape (constant folding, weight pre-packing, dead
  outputs removed: the segmentation heads).
- ``cuda``: the same copy in bf16 channels-last on the GPU, channel attention swapped for the fused
  Triton kernel (``retina_fast.kernels.channel_attention``), replayed from a CUDA graph per shape.
- ``onnxruntime`` (fp32) / ``tensorrt`` (fp16 by default): the MAGE-Net hooks of those backend modules
  (``ONNXRuntimeEnhancer`` / ``TensorRTEnhancer``); onnxruntime only when named (its ``enhance`` rank in the
  registry is None: 2.1x slower than ``cpu`` at 512²).
Tolerance (tests/test_enhance.py): with err = max |out − out_torch_fp32| over pixels,
err(backend) <= 2 · err(eager PyTorch with the model and input cast to the same dtype) + 2/255.
"""
from __future__ import annotations

import copy
import os
import sys
import types
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from retina_fast import backends
from retina_fast.checkpoint import CheckpointError, load_checkpoint, load_state_into, read_config
from retina_fast.fov import fov_mask
from retina_fast.deblur import DEFAULTS as DEBLUR_DEFAULTS, check_deblur_config
from retina_fast.deblur import deblur as undo_blur
from retina_fast.models.magenet import MAGENet, MAGENetConfig
from retina_fast.backends.graphs import CudaGraphs, FrozenGraphs, fast_copy
from retina_fast.models.rsp import RSPOutput, pad_to_multiple
from retina_fast.ops.table import OpTable

__all__ = ["enhance", "load_enhancer", "unload_enhancer", "resolve_enhancer", "Enhancer", "shrink_residual",
           "check_residual_threshold", "check_work_size", "work_size_option_error",
           "work_shape", "DEFAULT_ENHANCER",
           "MAX_WHOLE_PIXELS", "TILE_OVERLAP", "MIN_SIDE"]

DEFAULT_ENHANCER = "magenet-tiny"
MAX_WHOLE_PIXELS = 2048 * 2048
DEFAULT_TILE = 1024
TILE_OVERLAP = 64
MIN_SIDE = 16
_GRAPH_CACHE = 4


def resolve_enhancer(model: str | os.PathLike = "default") -> Path:
    """"default", a packaged name, a checkpoint directory or a training run directory (its ``final/``) -> the
    checkpoint directory (``retina_fast.modelzoo.resolve_model`` for kind ``magenet``)."""
    from retina_fast.modelzoo import resolve_model

    return resolve_model(model, kind="magenet")


def check_residual_threshold(value, what: str = "residual_threshold") -> float:
    """``value`` as a float in [0, 1); ValueError naming ``what`` otherwise."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= float(value) < 1.0
    if not ok:  # NaN fails the comparison too
        raise ValueError(f"{what} must be a number in [0, 1), got {value!r}")
    return float(value)


def work_size_option_error(value: int | None) -> str | None:
    """The one-line message for a bad ``--work-size`` option (the commands' check; the rule is
    :func:`check_work_size`'s), or None when it is fine."""
    try:
        check_work_size(value)
    except ValueError:
        return f"--work-size must be 0 or >= {MIN_SIDE}, got {value}"
    return None


def check_work_size(value, what: str = "work_size") -> int:
    """0 / None (off) or an int >= MIN_SIDE."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int or None, got {type(value).__name__} {value!r}")
    if value and value < MIN_SIDE:
        raise ValueError(f"{what} must be 0 / None (off) or >= {MIN_SIDE}, got {value}")
    return value


def shrink_residual(x: torch.Tensor, y: torch.Tensor, threshold: float) -> torch.Tensor:
    """x + sign(y − x)·max(|y − x| − threshold, 0): the change y − x soft-thresholded per element."""
    if threshold == 0:
        return y
    r = y - x
    return x + torch.sign(r) * (r.abs() - threshold).clamp_min(0)


class Enhancer:
    """A loaded MAGE-Net (fp32, eval, on the CPU) plus its backend runners; ``residual_threshold`` and
    ``work_size`` from its config.json (0 = off when absent); ``then``: the checkpoint directories of its
    follow-up stages (module doc), resolved and checked when it was loaded."""

    def __init__(self, model: MAGENet, meta: dict[str, Any], path: Path | None = None,
                 then: Sequence[Path] = ()) -> None:
        self.model, self.meta, self.path = model.eval().requires_grad_(False), meta, path
        self.residual_threshold = float(meta.get("residual_threshold", 0.0))
        self.work_size = int(meta.get("work_size") or 0)
        self.then = tuple(then)
        self.deblur = check_deblur_config(meta["deblur"]) if meta.get("deblur") is not None else None
        self._runners: dict[tuple, Callable] = {}

    @property
    def config(self) -> MAGENetConfig:
        return self.model.config

    def runner(self, backend: str = "auto", device=None, dtype: torch.dtype | None = None):
        """The runner of ``backend`` (the registry's ``enhance`` workload), built once per (backend, device,
        dtype)."""
        if device is None and backends.requested_name(backend) == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        chosen = backends.resolve(backend, device=device, dtype=dtype, workload="enhance")
        dev = torch.device(device) if device is not None else torch.device(chosen.devices[0])
        dtype = dtype or _default_dtype(chosen.name)
        reasons = chosen.not_supported_reasons(dev, dtype, "enhance")
        if reasons:
            raise backends.BackendUnavailable(f"backend {chosen.name!r}: " + "; ".join(reasons))
        key = (chosen.name, str(dev), dtype)
        if key not in self._runners:
            self._runners[key] = backends.runner_factory(chosen, "enhance")(self.model, dev, dtype)
        return self._runners[key]


def _default_dtype(backend: str) -> torch.dtype:
    """MAGE-Net's own defaults (not the sampler's): bf16 on ``cuda`` and on ``cpu`` where the CPU has
    AVX512-BF16 / AMX (there it is what makes the cpu backend fast), fp16 on ``tensorrt``, else fp32."""
    if backend == "cuda" or (backend == "cpu" and backends.cpu_has_fast_bf16()):
        return torch.bfloat16
    return torch.float16 if backend == "tensorrt" else torch.float32


_ENHANCERS: dict[str, Enhancer] = {}


def load_enhancer(model: str | os.PathLike = "default") -> Enhancer:
    """Load (once per path) a MAGE-Net checkpoint: ``kind: "magenet"``, ``architecture``, ``model`` weights."""
    path = resolve_enhancer(model)
    key = str(path.resolve())
    if key not in _ENHANCERS:
        from retina_fast.config_check import check_fields, check_weight_budget

        cfg_file = path / "config.json"
        doc = read_config(path)  # values checked before anything is built or read
        if doc.get("kind") != "magenet":
            raise CheckpointError(f"{cfg_file}: a {doc.get('kind')!r} checkpoint, not a MAGE-Net one")
        if "architecture" not in doc:
            raise CheckpointError(f"{cfg_file}: no 'architecture' entry")
        check_fields(MAGENetConfig, doc["architecture"], f"{cfg_file}: architecture")
        try:
            if "residual_threshold" in doc:
                check_residual_threshold(doc["residual_threshold"])
            if "work_size" in doc:
                check_work_size(doc["work_size"])
            if doc.get("deblur") is not None:
                check_deblur_config(doc["deblur"])
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{cfg_file}: {exc}") from None
        try:
            config = MAGENetConfig.from_dict(doc["architecture"])
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{cfg_file}: invalid MAGE-Net architecture ({exc})") from exc
        then = _follow_up_stages(doc.get("then", []), path, cfg_file)
        check_weight_budget(cfg_file, doc, "model", lambda: MAGENet(config))
        doc, states = load_checkpoint(path, ["model"])
        net = MAGENet(config)
        load_state_into(net, states["model"], str(path / doc["weights"]["model"]["file"]))
        _ENHANCERS[key] = Enhancer(net, doc, path, then)
    return _ENHANCERS[key]


def _follow_up_stages(then, path: Path, cfg_file: Path) -> list[Path]:
    """config.json ``then`` -> the follow-up checkpoint directories (a name is looked up beside the checkpoint
    first, then as a packaged model); CheckpointError naming the file for a bad entry, a stage that is the
    checkpoint itself or one that lists follow-ups of its own."""
    if not isinstance(then, list) or not all(isinstance(s, str) and s.strip() for s in then):
        raise CheckpointError(f"{cfg_file}: 'then' must be a list of MAGE-Net model names or paths, got {then!r}")
    stages = []
    for entry in then:
        local = path / entry
        try:
            stage = resolve_enhancer(local if (local / "config.json").is_file() else entry)
        except (OSError, ValueError, CheckpointError) as exc:
            raise CheckpointError(f"{cfg_file}: follow-up stage {entry!r}: {exc}") from None
        if stage.resolve() == path.resolve():
            raise CheckpointError(f"{cfg_file}: follow-up stage {entry!r} is this checkpoint itself")
        try:
            nested = read_config(stage).get("then")
        except (OSError, ValueError) as exc:  # CheckpointError is a ValueError
            raise CheckpointError(f"{cfg_file}: follow-up stage {entry!r}: {exc}") from None
        if nested:
            raise CheckpointError(f"{cfg_file}: follow-up stage {entry!r} lists follow-up stages of its own "
                                  f"({nested!r}); chains are one level deep")
        stages.append(stage)
    return stages


def unload_enhancer(model: str | os.PathLike = "default") -> None:
    """Forget the loaded enhancer of ``model`` (and its runners), so the next use reads its files again (after
    its config.json was changed, e.g. by ``enhance_kinds --choose-threshold --write``)."""
    _ENHANCERS.pop(str(resolve_enhancer(model).resolve()), None)


# ----------------------------------------------------------------------------- runners


class TorchRunner:
    """The reference: x (N, 3, H, W) fp32, H and W multiples of 8 -> restored fp32 (unclamped)."""

    def __init__(self, model: MAGENet, device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype
        self.model = model if device.type == "cpu" else copy.deepcopy(model).to(device)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.restore(x.to(self.device))


class _Restore(torch.nn.Module):
    def __init__(self, model: MAGENet) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.restore(x)


class _FP32RSP(torch.nn.Module):
    """The RSP module kept in fp32 inside a reduced-precision copy; its outputs are cast back."""

    def __init__(self, rsp: torch.nn.Module) -> None:
        super().__init__()
        self.inner = rsp

    def forward_padded(self, x: torch.Tensor) -> RSPOutput:
        out = self.inner.forward_padded(x.float())
        return RSPOutput(sides=[t.to(x.dtype) for t in out.sides], mean=out.mean.to(x.dtype),
                         features=[t.to(x.dtype) for t in out.features])


class CPURunner(TorchRunner):
    """Channels-last copy in ``dtype`` (RSP module in fp32), traced with the cpu enhancer's op table (fused C++
    channel attention and bilinear resizes, ``retina_fast.backends.cpu_enhance``) into one frozen TorchScript
    graph per shape."""

    def __init__(self, model, device, dtype) -> None:
        from retina_fast.backends.cpu_enhance import enhance_table

        self.device, self.dtype = device, dtype
        self.fast = fast_copy(model, dtype, device, channels_last=True)
        if dtype != torch.float32 and model.rsp is not None:
            # Measured at 512² on the 2-core AVX512-BF16 CPU: the RSP module's few-channel bilinear
            # upsampling, box filters and channels-last GroupNorm are 2-3× slower in bf16 than in fp32,
            # and the whole runner ~10 % faster with the RSP module in fp32 (also more accurate).
            self.fast.rsp = _FP32RSP(fast_copy(model.rsp, torch.float32, device, channels_last=True))
        self.graphs = FrozenGraphs(_Restore(self.fast), table=enhance_table(), cache=_GRAPH_CACHE, warmup=2)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xin = x.to(self.device, self.dtype).contiguous(memory_format=torch.channels_last)
        return self.graphs(xin).float().contiguous()


def cuda_enhance_table() -> OpTable:
    """The ``cuda`` enhancer's op table: the fused Triton channel attention; everything else the reference."""
    from retina_fast.ops.channel_attention import channel_attention

    def ca(m, x, residual=None):
        return channel_attention(x, m.down.weight, m.up.weight, residual, impl="triton")

    return OpTable("cuda-enhance", {"channel_attention": ca})


class CUDARunner(TorchRunner):
    """bf16 channels-last copy with the fused Triton channel attention, one CUDA graph per shape."""

    def __init__(self, model, device, dtype) -> None:
        self.device, self.dtype = device, dtype
        self.fast = fast_copy(model, dtype, device, channels_last=True)
        self.graphs = CudaGraphs(lambda x: self.fast.restore(x).float(), device, table=cuda_enhance_table(),
                                 cache=_GRAPH_CACHE)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xin = x.to(self.device, self.dtype).contiguous(memory_format=torch.channels_last)
        return self.graphs(xin).contiguous()


class _HookRunner:
    """The runner interface around the MAGE-Net hooks of the onnxruntime / tensorrt backend modules."""

    def __init__(self, hook, device: torch.device, dtype: torch.dtype) -> None:
        self.hook, self.device, self.dtype = hook, device, dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.hook(x.to(self.device)).float()


def onnxruntime_runner(model, device, dtype):
    from retina_fast.backends.onnxruntime_backend import ONNXRuntimeEnhancer

    return _HookRunner(ONNXRuntimeEnhancer(model), device, dtype)


def tensorrt_runner(model, device, dtype):
    from retina_fast.backends.tensorrt_backend import TensorRTEnhancer

    precision = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    return _HookRunner(TensorRTEnhancer(copy.deepcopy(model), device=device, precision=precision), device, dtype)


# ----------------------------------------------------------------------------- inputs and outputs


def _check_not_empty(shape, what: str) -> None:
    if 0 in tuple(shape):
        raise ValueError(f"{what}: empty input of shape {tuple(shape)}; need at least one image of at least "
                         f"{MIN_SIDE}×{MIN_SIDE} px")


def _check_float(x: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{what}: contains NaN or Inf")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"{what}: float values must be in [0, 1], got [{lo:.4g}, {hi:.4g}] "
                         "(divide 8-bit data by 255)")


def _as_batch(image, what: str = "image") -> tuple[torch.Tensor, Callable[[torch.Tensor], Any]]:
    """One input -> ((N, 3, H, W) float32 CPU or device tensor, function mapping the result back)."""
    if isinstance(image, torch.Tensor):
        if image.dim() not in (3, 4) or image.shape[-3] != 3:
            raise ValueError(f"{what}: expected a tensor (3, H, W) or (N, 3, H, W), got {tuple(image.shape)}")
        _check_not_empty(image.shape, what)
        if not image.is_floating_point():
            raise ValueError(f"{what}: tensors must be float in [0, 1], got {image.dtype}")
        single, dtype = image.dim() == 3, image.dtype
        x = (image[None] if single else image).float().contiguous()
        _check_float(x, what)
        return x, lambda y: (y[0] if single else y).to(device=image.device, dtype=dtype)
    if isinstance(image, np.ndarray):
        if image.ndim not in (3, 4) or image.shape[-1] != 3:
            raise ValueError(f"{what}: expected an array (H, W, 3) or (N, H, W, 3), got {image.shape}")
        _check_not_empty(image.shape, what)
        single, dtype = image.ndim == 3, image.dtype
        if dtype != np.uint8 and not np.issubdtype(dtype, np.floating):
            raise ValueError(f"{what}: numpy images must be uint8 or float, got {dtype}")
        arr = np.ascontiguousarray(image[None] if single else image)
        if not arr.flags.writeable:  # e.g. np.asarray(PIL image): torch warns about read-only arrays
            arr = arr.copy()
        x = torch.from_numpy(arr).permute(0, 3, 1, 2)
        x = x.float().contiguous()
        if dtype == np.uint8:
            x = x / 255.0
        else:
            _check_float(x, what)

        def back(y: torch.Tensor):
            out = y.permute(0, 2, 3, 1).cpu().numpy()
            out = np.round(out * 255).astype(np.uint8) if dtype == np.uint8 else out.astype(dtype)
            return out[0] if single else out

        return x, back
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        Image = None
    if Image is not None and isinstance(image, Image.Image):
        if image.mode != "RGB":
            raise ValueError(f"{what}: PIL images must be mode RGB, got {image.mode!r} (use .convert('RGB'))")
        x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)[None].float().contiguous() / 255.0
        return x, lambda y: Image.fromarray(np.round(y[0].permute(1, 2, 0).cpu().numpy() * 255).astype(np.uint8))
    raise TypeError(f"{what}: expected a torch tensor, numpy array or PIL image, got {type(image).__name__}")


def _blend_ramp(n: int, lo_edge: bool, hi_edge: bool, overlap: int) -> torch.Tensor:
    w = torch.ones(n)
    ramp = (torch.arange(overlap, dtype=torch.float32) + 0.5) / overlap
    if lo_edge:
        w[:overlap] = ramp
    if hi_edge:
        w[n - overlap:] = ramp.flip(0)
    return w


def _starts(size: int, tile: int, overlap: int) -> list[int]:
    if size <= tile:
        return [0]
    stride = tile - overlap
    return list(range(0, size - tile, stride)) + [size - tile]


def _run_tiled(run: Callable, x: torch.Tensor, tile: int, overlap: int) -> torch.Tensor:
    """x (N, 3, H, W) -> restored, tile × tile windows overlapping by ≥ ``overlap``, linear blending."""
    n, _, h, w = x.shape
    out = torch.zeros(n, 3, h, w)
    acc = torch.zeros(1, 1, h, w)
    ys, xs = _starts(h, tile, overlap), _starts(w, tile, overlap)
    for y0 in ys:
        for x0 in xs:
            th, tw = min(tile, h), min(tile, w)
            pad, size = pad_to_multiple(x[..., y0:y0 + th, x0:x0 + tw], 8)
            res = run(pad)[..., :size[0], :size[1]].cpu()
            wy = _blend_ramp(th, y0 > 0, y0 + th < h, min(overlap, th // 2))
            wx = _blend_ramp(tw, x0 > 0, x0 + tw < w, min(overlap, tw // 2))
            wt = (wy[:, None] * wx[None, :])[None, None]
            out[..., y0:y0 + th, x0:x0 + tw] += res * wt
            acc[..., y0:y0 + th, x0:x0 + tw] += wt
    return out / acc


def _auto_batch(device: torch.device, pixels: int) -> int:
    budget = 4 * 2**20 if device.type == "cpu" else 32 * 2**20  # pixels per batch
    return max(1, min(16, budget // max(pixels, 1)))


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (N, C, H, W); antialiased when shrinking."""
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)


def work_shape(h: int, w: int, work_size: int | None) -> tuple[int, int]:
    """The size an h × w image is enhanced at: its shorter side scaled down to ``work_size`` (never up)."""
    if not work_size or min(h, w) <= work_size:
        return h, w
    scale = work_size / min(h, w)
    return max(MIN_SIDE, round(h * scale)), max(MIN_SIDE, round(w * scale))


def enhance(images, *, model="default", backend: str = "auto", device=None, dtype: torch.dtype | None = None,
            tile: int | None = None, batch_size: int | None = None,
            progress: Callable[[int], None] | None = None, residual_threshold: float | None = None,
            work_size: int | None = None, then: Sequence[str | os.PathLike] | None = None,
            deblur: bool | dict | None = None):
    """Enhance colour fundus image(s) with MAGE-Net; returns the same type and shape (see module doc).

    model: "default" (packaged ``magenet-tiny`` and its follow-up stage), a packaged name or a checkpoint /
    run directory.
    backend: "auto", "torch", "cpu" or "cuda"; device / dtype: override the backend's defaults.
    tile: None = whole image up to MAX_WHOLE_PIXELS, else DEFAULT_TILE tiles; 0 = never tile; an int
    ≥ 64 = tiles of that side. batch_size: images per forward pass (default from the image size).
    progress: called with the number of images finished after each batch.
    residual_threshold: None = each stage's own (module doc); a number in [0, 1) overrides it for every
    stage, 0 = the networks' outputs as they are.
    work_size: None = each stage's own (module doc); 0 = run the networks at the image's own size; an int ≥
    MIN_SIDE = run them on a copy whose shorter side is scaled down to work_size (``work_shape``) and add
    each one's change, out − in, resized back bilinearly, to its full-size input.
    then: None = the checkpoint's follow-up stages (config.json ``then``); a list of models = these instead;
    () = the named checkpoint alone.
    deblur: None = as the checkpoint's config.json says (module doc); False = off; True = on, with the
    checkpoint's settings or ``retina_fast.deblur.DEFAULTS``; a dict = on, with these settings (keys of
    DEFAULTS, the rest from the checkpoint's or the defaults).
    """
    for name, value in (("tile", tile), ("batch_size", batch_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(f"{name} must be an int or None, got {type(value).__name__} {value!r}")
    if tile is not None and tile != 0 and tile < 64:
        raise ValueError(f"tile must be 0 (off), None (auto) or >= 64, got {tile}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (None means automatic), got {batch_size}")
    if residual_threshold is not None:
        check_residual_threshold(residual_threshold)
    if work_size is not None:
        check_work_size(work_size)
    if then is not None and (isinstance(then, (str, os.PathLike)) or not isinstance(then, (list, tuple))):
        raise TypeError(f"then must be a list or tuple of models (or None), got {type(then).__name__} {then!r}")
    if deblur is not None and not isinstance(deblur, (bool, dict)):
        raise TypeError(f"deblur must be True, False, None or a dict of settings, got {type(deblur).__name__} "
                        f"{deblur!r}")
    if isinstance(deblur, dict):
        check_deblur_config(deblur)
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("no images given")
        return [enhance(im, model=model, backend=backend, device=device, dtype=dtype, tile=tile,
                        batch_size=batch_size, progress=progress, residual_threshold=residual_threshold,
                        work_size=work_size, then=then, deblur=deblur)
                for im in images]
    x, back = _as_batch(images)
    n, _, h, w = x.shape
    if n == 0 or min(h, w) < MIN_SIDE:
        raise ValueError(f"image: need at least one image of at least {MIN_SIDE}×{MIN_SIDE} px, got {tuple(x.shape)}")
    if device is None and x.device.type == "cuda":
        device = x.device
    first = load_enhancer(model)
    chain = [first, *(load_enhancer(m) for m in (first.then if then is None else then))]
    stages = [_Stage(e, backend, device, dtype, tile, residual_threshold, work_size, h, w) for e in chain]
    fov = fov_mask(x.cpu()).float()[:, None]
    if deblur is None or deblur is False:
        sharpen = first.deblur if deblur is None else None
    else:
        sharpen = {**(first.deblur or DEBLUR_DEFAULTS), **(deblur if isinstance(deblur, dict) else {})}
    bs = batch_size or min(s.auto_batch for s in stages)
    outs = []
    for i in range(0, n, bs):
        y = x[i:i + bs].cpu()
        if sharpen is not None:
            y = undo_blur(y.float(), fov[i:i + bs, 0] > 0, sharpen)[0]
        for stage in stages:
            y = stage(y) * fov[i:i + bs]
        outs.append(y)
        if progress is not None:
            progress(y.shape[0])
    return back(torch.cat(outs))


class _Stage:
    """One network of an enhancement chain on (n, 3, h, w) CPU float images: the runner at its work shape
    (tiled when large), its change resized back and soft-thresholded; output in [0, 1] (before the FOV mask)."""

    def __init__(self, enhancer: Enhancer, backend, device, dtype, tile, residual_threshold, work_size,
                 h: int, w: int) -> None:
        self.run = enhancer.runner(backend, device, dtype)
        self.threshold = enhancer.residual_threshold if residual_threshold is None else float(residual_threshold)
        self.shape, self.work = (h, w), work_shape(h, w, enhancer.work_size if work_size is None else work_size)
        wh, ww = self.work
        self.tile = tile if tile is not None else (0 if wh * ww <= MAX_WHOLE_PIXELS else DEFAULT_TILE)
        self.auto_batch = _auto_batch(self.run.device, min(wh * ww, self.tile ** 2) if self.tile else wh * ww)

    def network(self, img: torch.Tensor) -> torch.Tensor:  # (n, 3, wh, ww) -> clamped output
        wh, ww = self.work
        if self.tile and (wh > self.tile or ww > self.tile):
            return _run_tiled(self.run, img, self.tile, min(TILE_OVERLAP, self.tile // 4)).float().clamp(0, 1)
        pad, size = pad_to_multiple(img, 8)
        return self.run(pad)[..., :size[0], :size[1]].cpu().float().clamp(0, 1)

    def __call__(self, chunk: torch.Tensor) -> torch.Tensor:
        chunk = chunk.float()
        if self.work == self.shape:
            y = self.network(chunk)
        else:
            small = _resize(chunk, self.work)
            y = (chunk + _resize(self.network(small) - small, self.shape)).clamp(0, 1)
        return shrink_residual(chunk, y, self.threshold)  # between input and output: in [0, 1]


class _CallableModule(types.ModuleType):
    """``retina_fast.enhance`` is both this module and, when called, ``enhance(...)`` (the documented API)."""

    def __call__(self, images, **kwargs):
        return enhance(images, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
