"""Backend runners: the same modules the trainers train, with ops swapped per backend.

A runner is built once per (pipeline, backend, device, dtype) and offers the four things the sampling
loop needs, every one with the same meaning as the reference:

    denoise(x fp32 (B, C, h, w), t int64 (B,)) -> eps fp32
    step(x, eps, coef, x0_prev, keys, clip) -> (x_out, x0)         (retina_fast.ops.sampler_step)
    decode(x0 scaled latents fp32) -> reflectance (B, bands, H, W) in [0, 1]

``torch`` is exactly the reference (eager fp32, reference ops). ``cpu`` runs the U-Net as
:class:`~retina_fast.backends.cpu_unet.FusedCPUUNet` (channels-last, oneDNN convolutions on prepacked weights,
fused C++ GroupNorm/attention kernels, C++ direct convolutions or oneDNN's, replayed as op graphs; fp32 by
default, bf16 on request), the decoder as :class:`~retina_fast.backends.cpu_decoder.FusedCPUDecoder` or a frozen
channels-last TorchScript graph (whichever measures faster), with the fused C++ sampler step (noise in the loop)
and C++ nearest-code lookup. ``cuda`` swaps in the Triton
GroupNorm+SiLU and attention kernels, runs the U-Net in bf16 with fp32 accumulation, and replays the
denoising step from a CUDA graph per batch shape (no host synchronisation inside the loop).
"""
from __future__ import annotations

import copy
import os
import warnings

import torch

from retina_fast.backends.cpu_decoder import FusedCPUDecoder
from retina_fast.backends.cpu_pack import CONV_LIBRARIES, mkldnn_usable
from retina_fast.backends.cpu_unet import (FusedCPUUNet, best_seconds, direct_plan, library_setting, measure_libraries,
                                           pick_library)
from retina_fast.backends.graphs import CudaGraphs, FrozenGraphs, fast_copy
from retina_fast.models.vqgan import model_to_reflectance, unscale_latent
from retina_fast.ops import nearest_code, sampler_step
from retina_fast.ops.table import UnsupportedOp
from retina_fast.shards import CONVOLUTION_PARTS

__all__ = ["Runner", "CPURunner", "CUDARunner", "default_dtype", "cuda_table"]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def default_dtype(backend: str, device: torch.device) -> torch.dtype:
    """bf16 for ``cuda``, fp16 for ``tensorrt``, fp32 elsewhere.

    ``cpu`` stays fp32 by default so that the same seed gives the reference's images (relative L2 ~1e-6).
    bf16 (``dtype=torch.bfloat16``) flips codebook choices, which moves the cubes by ~11 % (relative L2; plain
    PyTorch at bf16 ~12 %), and is faster only on some CPUs: shipped ``tiny``, n = 8, DDIM-50, over the
    reference: 2-core Xeon with AMX 3.51x vs fp32 2.26x; 2-core Xeon with AVX512-BF16 but no AMX 1.34x vs fp32
    2.23x; 2-core AMD EPYC with AVX512-BF16, no AMX, 3.24x vs fp32 1.89x (README, "Benchmarks")."""
    if backend == "cuda":
        return torch.bfloat16
    if backend == "tensorrt":
        return torch.float16
    return torch.float32


class Runner:
    """The reference (``torch`` backend); subclasses override what they accelerate.

    ``batch_invariant``: whether image i is bit-identical whatever the batch size and split of a run (the
    noise always is; the arithmetic is when every op computes each image on its own in a fixed order). Where
    it is False, a batched GEMM or convolution may round an image differently with another batch size (eager
    PyTorch: ~1e-6 in fp32), so a resumed run must keep its batch size to reproduce the images exactly."""

    nearest_impl = "torch"
    step_impl = "torch"
    # True only where image i is bit-identical whatever batch it is drawn in (tested for every runner that says
    # so: tests/test_engine.py); for the others ``retina-fast sample`` records the batch size of a run and keeps
    # it on --resume.
    batch_invariant = False
    backend = "torch"  # the registry name this runner was built for (set by Pipeline.runner)

    def __init__(self, loaded, device: torch.device, dtype: torch.dtype) -> None:
        self.loaded = loaded
        self.device = device
        self.dtype = dtype
        # The loaded modules are shared by every runner of a pipeline: a runner for another device gets its
        # own copy (``.to`` moves a module's parameters in place, which broke the runners built before).
        self.unet = _on_device(loaded.unet, device)
        self.vqgan = _on_device(loaded.vqgan, device)

    def prepare(self, batch: int) -> dict[str, str | None] | None:
        """Get ready for calls of ``batch`` images; the ``cpu`` backend chooses its convolution libraries
        here. Returns the libraries in use (None: no choice in this runner)."""
        return None

    @torch.no_grad()
    def denoise(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t)

    def step(self, x, eps, coef, x0_prev, keys, clip):
        return sampler_step(x, eps, coef, x0_prev=x0_prev, keys=keys, clip_x0=clip, impl=self.step_impl)

    @torch.no_grad()
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        lo, hi = self.loaded.latent_range
        if self.loaded.latent_whiten is not None:
            x0 = self.loaded.latent_whiten.invert(x0)
        z = unscale_latent(x0, lo, hi, self.loaded.latent_asinh)
        b, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c)
        idx, _ = nearest_code(flat, self.vqgan.codebook.embedding.float(), impl=self.nearest_impl)
        return self.decode_reflectance(idx.view(b, h, w))

    def decode_reflectance(self, idx: torch.Tensor) -> torch.Tensor:
        """Code indices (B, h, w) -> reflectance (B, bands, H, W) in [0, 1]: the decoder in model units,
        then the model's (per-band) normalisation inverted."""
        return model_to_reflectance(self.decode_indices(idx).float(), self.vqgan.config)

    def decode_indices(self, idx: torch.Tensor) -> torch.Tensor:
        return self.vqgan.decode_indices(idx)


def _on_device(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``module`` itself when all its tensors are on ``device``, else a copy there (the original untouched)."""
    device = torch.device(device)
    tensors = list(module.parameters()) + list(module.buffers())
    if all(_same_device(t.device, device) for t in tensors):
        return module
    return copy.deepcopy(module).to(device)


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    current = torch.cuda.current_device()
    return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)


class _DecodeIndices(torch.nn.Module):
    def __init__(self, vqgan: torch.nn.Module) -> None:
        super().__init__()
        self.vqgan = vqgan

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.vqgan.decode_indices(idx)


class CPURunner(Runner):
    """U-Net: :class:`~retina_fast.backends.cpu_unet.FusedCPUUNet` in ``dtype`` (fused C++ norm/attention
    kernels; C++ direct or oneDNN convolutions, replayed op graphs); decoder, in chunks of ``DECODE_CHUNK``
    images: :class:`~retina_fast.backends.cpu_decoder.FusedCPUDecoder` (the same C++ ops, direct convolutions)
    or a frozen channels-last TorchScript graph in ``dtype`` (oneDNN). Each part's library is measured for the
    batch size a run uses (:meth:`prepare`; ``convolutions``: a library for both, or None for
    ``RETINA_FAST_CPU_CONVS`` / auto)."""

    nearest_impl = "cpp"
    step_impl = "cpp"

    def __init__(self, loaded, device, dtype, convolutions: str | None = None) -> None:
        super().__init__(loaded, device, dtype)
        reason = None if mkldnn_usable() else "torch was built without oneDNN (mkldnn)"
        if reason is None:
            try:
                self.fast_unet = FusedCPUUNet(loaded.unet, dtype)
            except UnsupportedOp as exc:  # a layer the cpu op table does not have
                reason = str(exc)
        setting = library_setting(convolutions)
        self._latent = tuple(loaded.config.latent_shape[1:])
        # The parts whose library is measured (auto), per batch size: ``prepare(batch)`` chooses for the batch a
        # run uses (Pipeline.sample and ``retina-fast sample`` call it; else the first call does), so that a
        # batch of 1 is not run the way a batch of 8 is fastest. A pinned part (``convolutions``,
        # RETINA_FAST_CPU_CONVS, ``use_convolutions``) or one with no choice here is not measured.
        self._auto: set[str] = set()
        self.prepared_for: int | None = None  # the batch size the measured parts were last chosen for
        if reason is None:
            if setting == "auto":
                self.fast_unet.choose_library(self._latent, setting="direct")
                if self.fast_unet.batch_invariant:  # the direct kernels cover the model: there is a choice
                    self._auto.add("unet")
            else:
                self.fast_unet.choose_library(self._latent, setting=setting)
        else:  # say so once, run the same module as a frozen graph instead
            warnings.warn(f"the cpu backend runs the U-Net as a frozen TorchScript graph instead of the fused path: "
                          f"{reason}", RuntimeWarning, stacklevel=2)
            frozen = FrozenGraphs(fast_copy(loaded.unet, dtype, channels_last=True))
            self.fast_unet = lambda x, t: frozen(
                x.to(dtype).contiguous(memory_format=torch.channels_last), t).float().contiguous()
            self.unet_path = f"frozen TorchScript graph ({reason})"
        # The decoder: the fused C++ decoder (direct convolutions, per-image kernels: batch invariant) or the
        # frozen TorchScript graph (oneDNN), whichever is faster here by the U-Net's rule (pick_library, measured
        # at the run's chunk of at most DECODE_CHUNK images): on a CPU with AMX tiles oneDNN's bf16 decoder is the
        # faster one (README, "Speed" has the figures).
        self._frozen_decode = None
        self._decoder_reason = FusedCPUDecoder.unsupported_reason(loaded.vqgan, dtype)
        self._fused_decode = FusedCPUDecoder(loaded.vqgan, dtype) if self._decoder_reason is None else None
        self.decoder_timings: dict = {}  # what _measure_decoders measured last
        self._decoder_seconds: dict[tuple, float | None] = {}  # (library, images) -> seconds per call
        if self._fused_decode is None:
            self._use_decoder("onednn")
        else:
            self._use_decoder("direct" if setting == "auto" else setting)
            if setting == "auto":
                self._auto.add("decoder")
        # Every op a per-image C++ kernel (the direct convolutions need AVX-512, in bf16 AVX512-BF16): image i
        # cannot depend on the batch. oneDNN's convolutions are chosen per problem size and round some images
        # differently at some batch sizes (fp32: ~1e-6, enough to flip a codebook choice; bf16: a bf16 step), so
        # such a runner says False and ``retina-fast sample`` records the batch size of the run.
        self._measured_parts = frozenset(self._auto)
        self._describe()

    def unpin(self) -> None:
        """Measure again, at the next :meth:`prepare`, every part this runner was built to measure (undoes
        :meth:`use_convolutions`)."""
        self._auto = set(self._measured_parts)
        self.prepared_for = None

    def prepare(self, batch: int) -> dict[str, str | None] | None:
        """Choose the library of every measured (auto) part for calls of ``batch`` images: the U-Net by
        :meth:`FusedCPUUNet.choose_library` at that batch, the decoder at one chunk of min(batch, DECODE_CHUNK);
        timings are cached, so a batch size seen before costs nothing. Returns :attr:`convolutions`."""
        if self._auto and batch != self.prepared_for:
            if "unet" in self._auto:
                self.fast_unet.choose_library(self._latent, setting="auto", batch=batch)
            if "decoder" in self._auto:
                self._use_decoder(pick_library(*self._measure_decoders(self._latent, min(batch, self.DECODE_CHUNK))))
            self._describe()
        self.prepared_for = batch
        return self.convolutions

    @property
    def convolutions(self) -> dict[str, str | None] | None:
        """The convolution library (``direct`` or ``onednn``) of each part, ``{"unet": .., "decoder": ..}``;
        a part with no choice here is None (the U-Net's frozen-graph fallback; a decoder the fused C++ path
        cannot run); None when neither part has a choice."""
        unet = getattr(self.fast_unet, "library", None)
        decoder = None if self._fused_decode is None else \
            ("direct" if self.fast_decode is self._fused_decode else "onednn")
        return None if unet is None and decoder is None else {"unet": unet, "decoder": decoder}

    def use_convolutions(self, setting: str | dict) -> None:
        """Run the convolutions with ``setting``: one library for every part, or ``{"unet": .., "decoder":
        ..}`` (a resumed run keeps what its run.json records; :meth:`prepare` gives the runner's own choice
        for a batch size). A part given a library is pinned (``prepare`` no longer measures it); a part with
        no choice here, or given None, is left as it is."""
        if self.convolutions is None:
            raise ValueError("this cpu runner has no fused U-Net or decoder to choose convolutions for")
        wanted = setting if isinstance(setting, dict) else dict.fromkeys(CONVOLUTION_PARTS, setting)
        if set(wanted) != set(CONVOLUTION_PARTS) or any(v not in (None, *CONV_LIBRARIES) for v in wanted.values()):
            raise ValueError(f"convolutions: expected one of {CONV_LIBRARIES} or a dict with keys "
                             f"{CONVOLUTION_PARTS}, got {setting!r}")
        current = self.convolutions
        if wanted["unet"] and current["unet"] is not None:
            self._auto.discard("unet")
            if current["unet"] != wanted["unet"]:
                self.fast_unet.choose_library(self._latent, setting=wanted["unet"])
        if wanted["decoder"] and current["decoder"] is not None:
            self._auto.discard("decoder")
            if current["decoder"] != wanted["decoder"]:
                self._use_decoder(wanted["decoder"])
        self._describe()

    def _use_decoder(self, library: str) -> None:
        if library == "direct":
            self.fast_decode = self._fused_decode  # per-image C++ kernels: batch invariant
            self.decode_path = f"C++ ops + direct {_dtype_name(self.dtype)} convolutions, replayed op graph"
            return
        if self._frozen_decode is None:
            self._frozen_decode = FrozenGraphs(_DecodeIndices(fast_copy(self.loaded.vqgan, self.dtype,
                                                                        channels_last=True)))
        self.fast_decode = self._frozen_decode
        self.decode_path = "frozen TorchScript graph" + (f" ({self._decoder_reason})" if self._decoder_reason
                                                          else ", oneDNN convolutions")

    def _measure_decoders(self, shape: tuple[int, int], batch: int = 8, rounds: int = 2) -> tuple[float, float | None]:
        """Seconds to decode one chunk of ``batch`` images of latent ``shape``: the fused decoder timed at one
        image per core, times the images each core then runs (its time is per image); the frozen oneDNN graph
        at the chunk itself (None where torch has no oneDNN). Cached per (library, images)."""
        cores = self._fused_decode.cores
        plan = {"direct": direct_plan(batch, cores)}
        if mkldnn_usable():
            plan["onednn"] = (batch, 1)
        k = self.loaded.vqgan.codebook.embedding.shape[0]

        def time_one(library: str, images: int) -> float:
            idx = torch.randint(0, k, (images, *shape), generator=torch.Generator().manual_seed(0))
            self._use_decoder(library)
            return best_seconds(lambda: self.fast_decode(idx), rounds)

        seconds = {"onednn": None, **measure_libraries(plan, self.convolutions["decoder"], self._decoder_seconds,
                                                       lambda library, images: (library, images), time_one)}
        self.decoder_timings = {"seconds_at_batch": seconds, "batch": batch, "shape": tuple(shape)}
        return seconds["direct"], seconds["onednn"]

    def _describe(self) -> None:
        if getattr(self.fast_unet, "library", None) is not None:
            convs = "direct" if self.fast_unet.batch_invariant else "oneDNN"
            self.unet_path = f"fused C++ ops + {convs} convolutions ({_dtype_name(self.dtype)})"
        self.batch_invariant = bool(getattr(self.fast_unet, "batch_invariant", False)) and \
            isinstance(self.fast_decode, FusedCPUDecoder)

    # The decoder runs in chunks of 8 images: its full-resolution activations fall out of cache at larger
    # batches (frozen graph, one run: fp32 8.4 ms/image at B = 8 vs 18.9 at B = 32; bf16 4.5 vs 8.8).
    DECODE_CHUNK = 8

    @torch.no_grad()
    def denoise(self, x, t):
        if self.prepared_for is None:  # used without Pipeline.sample: choose for the first batch seen
            self.prepare(x.shape[0])
        return self.fast_unet(x, t)

    @torch.no_grad()
    def decode_indices(self, idx):
        if self.prepared_for is None:
            self.prepare(idx.shape[0])
        return torch.cat([self.fast_decode(chunk) for chunk in idx.split(self.DECODE_CHUNK)]).float()


def cuda_table():
    """The ``cuda`` backend's op table: Triton GroupNorm+SiLU and attention; every other op the reference."""
    from retina_fast.ops.attention import linear_attention, multihead_attention_ref, softmax_attention
    from retina_fast.ops.group_norm_silu import group_norm_silu
    from retina_fast.ops.table import OpTable

    def gn(m, x, scale_shift=None):
        scale, shift = scale_shift if scale_shift is not None else (None, None)
        return group_norm_silu(x, m.num_groups, m.weight, m.bias, m.eps, scale, shift, m.act, impl="triton")

    def attend(m, qkv):
        fn = linear_attention if m.kind == "linear" else softmax_attention
        return multihead_attention_ref(qkv, m.heads, m.head_dim, m.kind, lambda q, k, v: fn(q, k, v, impl="triton"))

    return OpTable("cuda", {"group_norm_silu": gn, "multihead_attention": attend})


CUDA_LAYOUTS = ("nchw", "nhwc")


def cuda_layout(layout: str | None = None) -> str:
    """The cuda backend's U-Net memory layout: ``layout``, else ``RETINA_FAST_CUDA_LAYOUT``, else ``nchw``.

    ``nhwc`` (channels-last) is the layout cuDNN's tensor-core convolutions work in (NVIDIA's cuDNN and
    "Deep Learning Performance" guides; an NCHW input is transposed around them), and the Triton GroupNorm
    and the attention read it without a copy. Which is faster for the U-Net here has not been measured on
    a GPU yet: ``benchmarks/gpu/run.sh`` times both (contenders ``cuda`` and ``cuda@nhwc``), and the default
    stays ``nchw`` until it has."""
    value = layout if layout is not None else (os.environ.get("RETINA_FAST_CUDA_LAYOUT") or "nchw")
    if value not in CUDA_LAYOUTS:
        where = "layout" if layout is not None else "RETINA_FAST_CUDA_LAYOUT"
        raise ValueError(f"{where}={value!r}: use one of {', '.join(CUDA_LAYOUTS)}")
    return value


class CUDARunner(Runner):
    """U-Net in ``dtype`` with the Triton GroupNorm+SiLU and attention (``cuda_table``), replayed from one CUDA
    graph per batch shape, its activations in ``layout`` (:func:`cuda_layout`); fused Triton step and
    nearest-code lookup."""

    nearest_impl = "triton"
    step_impl = "triton"

    def __init__(self, loaded, device, dtype, layout: str | None = None) -> None:
        super().__init__(loaded, device, dtype)
        self.layout = cuda_layout(layout)
        nhwc = self.layout == "nhwc"
        self.fast_unet = fast_copy(loaded.unet, dtype, device, channels_last=nhwc)
        fmt = torch.channels_last if nhwc else torch.contiguous_format
        self.unet_path = f"Triton GroupNorm/attention, cuDNN convolutions, {self.layout.upper()}, CUDA graphs"
        self.graphs = CudaGraphs(
            lambda x, t: self.fast_unet(x.to(self.dtype).contiguous(memory_format=fmt), t).float().contiguous(),
            device, table=cuda_table())

    @torch.no_grad()
    def denoise(self, x, t):
        return self.graphs(x, t)
