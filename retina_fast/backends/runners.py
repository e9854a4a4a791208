"""Backend runners: the same modules the trainers train, with ops swapped per backend.

A runner is built once per (pipeline, backend, device, dtype) and offers the four things the sampling
loop needs, every one with the same meaning as the reference:

    denoise(x fp32 (B, C, h, w), t int64 (B,)) -> eps fp32
    step(x, eps, coef, x0_prev, keys, clip) -> (x_out, x0)         (retina_fast.ops.sampler_step)
    decode(x0 scaled latents fp32) -> reflectance (B, bands, H, W) in [0, 1]

``torch`` is exactly the reference (eager fp32, reference ops). ``cpu`` runs the U-Net as
:class:`~retina_fast.backends.cpu_unet.FusedCPUUNet` (channels-last, oneDNN convolutions on prepacked weights,
fused C++ GroupNorm/attention kernels, C++ direct convolutions and a replayed op graph in bf16; fp32 by
default, bf16 on request), the decoder as a frozen
channels-last TorchScript graph, with the fused C++ sampler step (noise in the loop) and C++ nearest-code
lookup. ``cuda`` swaps in the Triton
GroupNorm+SiLU and attention kernels, runs the U-Net in bf16 with fp32 accumulation, and replays the
denoising step from a CUDA graph per batch shape (no host synchronisation inside the loop).
"""
from __future__ import annotations

import copy
import types
import warnings

import torch

from retina_fast.backends.cpu_decoder import FusedCPUDecoder
from retina_fast.backends.cpu_unet import FusedCPUUNet, mkldnn_usable
from retina_fast.models.attention import Attention, LinearAttention
from retina_fast.models.layers import GroupNormSiLU
from retina_fast.models.vqgan import model_to_reflectance, unscale_latent
from retina_fast.ops import nearest_code, sampler_step

__all__ = ["Runner", "make_runner", "default_dtype"]


def default_dtype(backend: str, device: torch.device) -> torch.dtype:
    """bf16 for ``cuda``, fp16 for ``tensorrt``, fp32 elsewhere.

    ``cpu`` stays fp32 by default so that the same seed gives the reference's images (relative L2 ~1e-5):
    bf16 is faster (shipped ``tiny``, 2-core AVX512-BF16 CPU, n=8, DDIM-50: 3.65-4.38x over runs vs
    1.85-2.45x for fp32) but flips codebook choices, which moves the cubes by ~4 % (relative L2; plain
    PyTorch at bf16 moves them ~8 %); pass dtype=torch.bfloat16 to opt in."""
    if backend == "cuda":
        return torch.bfloat16
    if backend == "tensorrt":
        return torch.float16
    return torch.float32


class Runner:
    """The reference (``torch`` backend); subclasses override what they accelerate."""

    nearest_impl = "torch"
    step_impl = "torch"
    # True only where image i is bit-identical whatever batch it is drawn in (tested for every runner that
    # says so: tests/test_engine.py). Measured on the shipped tiny, 2-core AVX-512 CPU, n = 8 in one batch
    # against batches of 1: eager torch (oneDNN picks kernels by batch size) max |diff| 0.026 in the cubes,
    # cpu fp32 2e-6, cpu bf16 0.13, onnxruntime 2e-6 -- so no runner promises it yet, and
    # ``retina-fast sample`` records the batch size of such runs and keeps it on --resume.
    batch_invariant = False

    def __init__(self, loaded, device: torch.device, dtype: torch.dtype) -> None:
        self.loaded = loaded
        self.device = device
        self.dtype = dtype
        # The loaded modules are shared by every runner of a pipeline: a runner for another device gets its
        # own copy (``.to`` moves a module's parameters in place, which broke the runners built before).
        self.unet = _on_device(loaded.unet, device)
        self.vqgan = _on_device(loaded.vqgan, device)

    @torch.no_grad()
    def denoise(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t)

    def step(self, x, eps, coef, x0_prev, keys, clip):
        return sampler_step(x, eps, coef, x0_prev=x0_prev, keys=keys, clip_x0=clip, impl=self.step_impl)

    @torch.no_grad()
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        lo, hi = self.loaded.latent_range
        z = unscale_latent(x0, lo, hi)
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


def _fast_copy(module: torch.nn.Module, dtype: torch.dtype, channels_last: bool) -> torch.nn.Module:
    fast = copy.deepcopy(module).eval().to(dtype)
    return fast.to(memory_format=torch.channels_last) if channels_last else fast


class _DecodeIndices(torch.nn.Module):
    def __init__(self, vqgan: torch.nn.Module) -> None:
        super().__init__()
        self.vqgan = vqgan

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.vqgan.decode_indices(idx)


class _FrozenGraphs:
    """Run a module through a frozen, inference-optimised TorchScript graph, one per input shape/dtype.

    Freezing folds weights and fuses conv + add chains in oneDNN; tracing costs ~1 s per new shape.
    ``torch.jit.optimize_for_inference`` is deliberately not applied: on the 2-core AVX-512 CPU it made
    the channels-last fp32 graphs slower, not faster (same run, tiny model: U-Net step B=8 1.16x vs
    1.43x over eager without it, B=32 1.06x vs 1.47x; decoder B=8 0.85x vs 1.63x).
    (Splitting the batch over single-threaded workers looked faster on a loaded machine but gave no
    gain on a quiet one and slowed later eager work in the same process, so it is not done.)
    """

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self._graphs: dict[tuple, torch.jit.ScriptModule] = {}

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        key = tuple((tuple(a.shape), a.dtype) for a in args)
        if key not in self._graphs:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tracer notes on shape checks: shapes are fixed per graph
                traced = torch.jit.trace(self.module, args, check_trace=False)
                self._graphs[key] = torch.jit.freeze(traced.eval())
        return self._graphs[key](*args)


class CPURunner(Runner):
    """U-Net: :class:`~retina_fast.backends.cpu_unet.FusedCPUUNet` in ``dtype`` (fused C++ norm/attention
    kernels; oneDNN convolutions in fp32, C++ direct convolutions and a replayed op graph in bf16 on
    AVX512-BF16 CPUs); decoder, in chunks of ``DECODE_CHUNK`` images: in bf16 on AVX512-BF16 CPUs
    :class:`~retina_fast.backends.cpu_decoder.FusedCPUDecoder` (the same C++ ops, replayed), otherwise a
    frozen channels-last TorchScript graph in ``dtype``."""

    nearest_impl = "cpp"
    step_impl = "cpp"

    def __init__(self, loaded, device, dtype) -> None:
        super().__init__(loaded, device, dtype)
        if mkldnn_usable():
            self.fast_unet = FusedCPUUNet(loaded.unet, dtype)
            self.unet_path = f"fused C++ ops + oneDNN convolutions ({str(dtype).replace('torch.', '')})"
        else:  # a torch build without oneDNN: say so once, run the frozen graph instead
            warnings.warn("torch was built without oneDNN (mkldnn): the cpu backend runs the U-Net as a frozen "
                          "TorchScript graph instead of the fused path", RuntimeWarning, stacklevel=2)
            frozen = _FrozenGraphs(_fast_copy(loaded.unet, dtype, channels_last=True))
            self.fast_unet = lambda x, t: frozen(
                x.to(dtype).contiguous(memory_format=torch.channels_last), t).float().contiguous()
            self.unet_path = "frozen TorchScript graph"
        reason = "fp32" if dtype != torch.bfloat16 else FusedCPUDecoder.unsupported_reason(loaded.vqgan)
        if reason is None:
            self.fast_decode = FusedCPUDecoder(loaded.vqgan)  # per-image C++ kernels: batch invariant
            self.decode_path = "C++ ops + direct bf16 convolutions, replayed op graph"
        else:  # same speed (measured, bf16), oneDNN kernels: batches padded in bf16 (see BF16_BATCH_MULTIPLE)
            self.fast_decode = _FrozenGraphs(_DecodeIndices(_fast_copy(loaded.vqgan, dtype, True)))
            self.decode_path = f"frozen TorchScript graph ({reason})"

    # bf16 only: oneDNN picks its bf16 convolution kernels by batch size, and some picks round differently
    # (shipped tiny, 2-core AVX512-BF16 CPU: batches of 1, 2, 3, 7 gave an image differing by one bf16 step
    # from batches of 4, 5, 8, 9, 12, 16, 24, 32). Whatever runs through oneDNN in bf16 -- U-Net and decoder on
    # a CPU without AVX512-BF16; with it both are our own per-image kernels and need nothing -- gets its batch
    # padded to a multiple of 8, which keeps image i independent of batch size and split (tested); at most 7
    # dummy images.
    BF16_BATCH_MULTIPLE = 8
    # The decoder runs in chunks of 8 images: its full-resolution activations fall out of cache at larger
    # batches (frozen graph, one run: fp32 8.4 ms/image at B = 8 vs 18.9 at B = 32; bf16 4.5 vs 8.8).
    DECODE_CHUNK = 8

    def _pad(self, *tensors: torch.Tensor) -> tuple[int, list[torch.Tensor]]:
        b = tensors[0].shape[0]
        pad = -b % self.BF16_BATCH_MULTIPLE if self.dtype == torch.bfloat16 else 0
        if not pad:
            return b, list(tensors)
        return b, [torch.cat([a, a[-1:].expand(pad, *a.shape[1:])]) for a in tensors]

    @torch.no_grad()
    def denoise(self, x, t):
        if getattr(self.fast_unet, "batch_invariant", False):  # all per-image C++ kernels: no padding needed
            return self.fast_unet(x, t)
        b, (x, t) = self._pad(x, t)
        return self.fast_unet(x, t)[:b]

    @torch.no_grad()
    def decode_indices(self, idx):
        if isinstance(self.fast_decode, FusedCPUDecoder):
            return torch.cat([self.fast_decode(chunk) for chunk in idx.split(self.DECODE_CHUNK)])
        b, (idx,) = self._pad(idx)
        out = [self.fast_decode(chunk) for chunk in idx.split(self.DECODE_CHUNK)]
        return torch.cat(out)[:b].float()


def _swap_cuda_kernels(unet: torch.nn.Module) -> None:
    from retina_fast.kernels import attention as tk_attn
    from retina_fast.kernels.group_norm_silu import group_norm_silu

    def gn_forward(self, x, scale_shift=None):
        scale, shift = scale_shift if scale_shift is not None else (None, None)
        return group_norm_silu(x, self.num_groups, self.weight, self.bias, self.eps, scale, shift, self.act)

    for m in unet.modules():
        if isinstance(m, GroupNormSiLU):
            m.forward = types.MethodType(gn_forward, m)
        elif isinstance(m, LinearAttention):
            m.attention_fn = tk_attn.linear_attention
        elif isinstance(m, Attention):
            m.attention_fn = tk_attn.softmax_attention


class CUDARunner(Runner):
    nearest_impl = "triton"
    step_impl = "triton"

    def __init__(self, loaded, device, dtype) -> None:
        super().__init__(loaded, device, dtype)
        self.fast_unet = _fast_copy(loaded.unet, dtype, channels_last=False).to(device)
        _swap_cuda_kernels(self.fast_unet)
        self._graphs: dict[tuple, tuple] = {}

    @torch.no_grad()
    def denoise(self, x, t):
        key = tuple(x.shape)
        if key not in self._graphs:
            self._graphs[key] = self._capture(x, t)
        graph, x_in, t_in, out = self._graphs[key]
        x_in.copy_(x)
        t_in.copy_(t)
        graph.replay()
        return out.clone()

    def _capture(self, x, t):
        x_in, t_in = x.clone(), t.clone()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up: Triton compilation and allocator pools outside the graph
                self.fast_unet(x_in.to(self.dtype), t_in)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.fast_unet(x_in.to(self.dtype), t_in).float()
        return graph, x_in, t_in, out


RUNNERS = {"torch": Runner, "cpu": CPURunner, "cuda": CUDARunner}


def make_runner(backend: str, loaded, device: torch.device, dtype: torch.dtype) -> Runner:
    if backend not in RUNNERS:
        raise ValueError(f"backend {backend!r} has no sampling runner here (tensorrt registers a runner only where the tensorrt package imports)")
    return RUNNERS[backend](loaded, device, dtype)


from retina_fast.backends import onnxruntime_backend, tensorrt_backend  # noqa: E402,F401  (they add to RUNNERS)
