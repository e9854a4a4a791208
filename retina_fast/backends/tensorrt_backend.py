"""TensorRT engines for the U-Net step, the VQ-GAN decoder and MAGE-Net, built from ``retina_fast.export``.

Status: complete but never run on this workplace (TensorRT cannot be installed here; see
docs/tensorrt.md). Written against the TensorRT 10 Python API; TensorRT 11 (which removed the
fp16/bf16 builder flags in favour of strongly typed networks) is handled by exporting the ONNX graph
in the target dtype. ``tensorrt`` is imported only inside the functions that need it.

Flow, per network:

    ensure_engine(module, spec)      engine file in the cache, keyed by structure hash + GPU + TensorRT
      export_onnx(module, ...)       -> <cache>/onnx/*.onnx (fp32 graph; target dtype on TensorRT >= 11)
      build_engine(onnx, spec)       Builder + OnnxParser + BuilderConfig (REFIT, FP16/BF16), one
                                     optimisation profile over the batch axis, timing cache on disk
      refit_engine(engine, onnx)     same structure, new weights: Refitter instead of a rebuild
    TensorRTEngine(path, device)     runtime + one execution context and one CUDA graph per batch size

Cache layout under ``retina_fast._env.cache_dir()`` (RETINA_FAST_CACHE, default ~/.cache/retina_fast):

    tensorrt/<what>-<structure hash>-<gpu>-sm<cc>-trt<version>-<precision>-b<min>-<opt>-<max>.engine
    tensorrt/<same>.json             {"weights": sha256 of the weights the engine holds, ...}
    tensorrt/timing-<gpu>-sm<cc>-trt<version>.cache
    tensorrt/onnx/<what>-<structure hash>-<dtype>.onnx (+ .onnx.data for large graphs)

The structure hash covers the module class, its config, every parameter / buffer name, shape and
dtype, and the engine spec; weights are hashed separately so that new weights of the same
architecture (a further training run) refit the cached engine instead of rebuilding it.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from retina_fast import _env
from retina_fast.backends.graphs import capture_cuda_graph
from retina_fast.files import atomic_write
from retina_fast.backends.runners import Runner
from retina_fast.export import INPUT_NAMES, WHATS, architecture_hash, export_onnx, weights_hash

__all__ = ["PRECISIONS", "SAMPLING_BATCHES", "EngineSpec", "DeviceInfo", "structure_hash", "weights_hash",
           "engine_path", "timing_cache_path", "onnx_dtype", "build_engine", "refit_engine", "ensure_engine",
           "TensorRTEngine", "TensorRTRunner", "TensorRTEnhancer", "tensorrt_version"]

PRECISIONS: dict[torch.dtype, str] = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_DTYPES = {name: dtype for dtype, name in PRECISIONS.items()}
SAMPLING_BATCHES = (1, 16, 64)   # (min, opt, max) batch of the sampling engines; larger batches are split
WORKSPACE_BYTES = 4 << 30


@dataclass(frozen=True)
class EngineSpec:
    """What one engine is built for: network, per-item input shape (no batch axis), precision, and the
    batch range of its single optimisation profile (min <= opt <= max)."""

    what: str
    sample_shape: tuple[int, ...]
    precision: str = "fp16"
    min_batch: int = 1
    opt_batch: int = 16
    max_batch: int = 64

    def __post_init__(self) -> None:
        if self.what not in WHATS:
            raise ValueError(f"what must be one of {', '.join(WHATS)}, got {self.what!r}")
        if self.precision not in _DTYPES:
            raise ValueError(f"precision must be one of {', '.join(_DTYPES)}, got {self.precision!r}")
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"need 1 <= min_batch <= opt_batch <= max_batch, got "
                             f"{self.min_batch}, {self.opt_batch}, {self.max_batch}")

    def profile_shapes(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """Input name -> (min, opt, max) shapes for ``IOptimizationProfile.set_shape``; only the batch varies.
        The U-Net's second input, the timesteps ``t``, is (B,)."""
        item = {name: self.sample_shape for name in INPUT_NAMES[self.what]}
        if self.what == "unet":
            item["t"] = ()
        return {name: tuple((b, *shape) for b in (self.min_batch, self.opt_batch, self.max_batch))  # type: ignore[misc]
                for name, shape in item.items()}


@dataclass(frozen=True)
class DeviceInfo:
    """What an engine is specific to besides the network: the GPU and the TensorRT version."""

    gpu_name: str
    capability: tuple[int, int]
    trt_version: str

    @classmethod
    def current(cls, device: torch.device | str = "cuda") -> "DeviceInfo":
        return cls(torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device), tensorrt_version())

    def tag(self) -> str:
        gpu = re.sub(r"[^a-z0-9]+", "-", self.gpu_name.lower()).strip("-")
        return f"{gpu}-sm{self.capability[0]}{self.capability[1]}-trt{self.trt_version}"


def tensorrt_version() -> str:
    import tensorrt as trt

    return trt.__version__


def structure_hash(module: nn.Module, spec: EngineSpec) -> str:
    """sha256 (hex) of everything that fixes the engine's graph: class, config, tensor names / shapes /
    dtypes, and the spec. Equal hashes mean an engine can be refitted with the other's weights."""
    return architecture_hash(module, dataclasses.asdict(spec))


def _root(cache_dir: str | Path | None) -> Path:
    return Path(cache_dir if cache_dir is not None else _env.cache_dir()) / "tensorrt"


def engine_path(structure: str, spec: EngineSpec, device: DeviceInfo, cache_dir: str | Path | None = None) -> Path:
    """Where the engine for (structure hash, spec, GPU, TensorRT version) lives."""
    name = (f"{spec.what}-{structure[:16]}-{device.tag()}-{spec.precision}"
            f"-b{spec.min_batch}-{spec.opt_batch}-{spec.max_batch}.engine")
    return _root(cache_dir) / name


def timing_cache_path(device: DeviceInfo, cache_dir: str | Path | None = None) -> Path:
    """One timing cache per (GPU, TensorRT version), shared by every engine built there."""
    return _root(cache_dir) / f"timing-{device.tag()}.cache"


def onnx_dtype(precision: str, has_precision_flags: bool) -> torch.dtype:
    """dtype of the ONNX graph to build from: fp32 where the builder has FP16/BF16 flags (TensorRT 10),
    else (TensorRT >= 11, strongly typed networks only) the target precision itself."""
    return torch.float32 if has_precision_flags else _DTYPES[precision]


# --- everything below needs the tensorrt package -------------------------------------------------------

_LOGGER = None


def _logger():
    """One process-wide trt.Logger at WARNING (TensorRT objects keep a reference to it)."""
    import tensorrt as trt

    global _LOGGER
    if _LOGGER is None:
        _LOGGER = trt.Logger(trt.Logger.WARNING)
    return _LOGGER


def build_engine(onnx_path: Path, spec: EngineSpec, timing_cache: Path) -> bytes:
    """Parse the ONNX file and build a refittable serialized engine (the plan) for ``spec``."""
    import tensorrt as trt

    builder = trt.Builder(_logger())
    network = builder.create_network(0)  # explicit batch is the only mode since TensorRT 10
    parser = trt.OnnxParser(network, _logger())
    if not parser.parse_from_file(str(onnx_path)):  # reads <file>.data beside it for external weights
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    config.set_flag(trt.BuilderFlag.REFIT)
    if spec.precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)  # on by default; fp32 engines stay comparable to torch fp32
    flag = {"fp16": "FP16", "bf16": "BF16"}.get(spec.precision)
    if flag is not None and hasattr(trt.BuilderFlag, flag):  # absent on TensorRT >= 11: see onnx_dtype
        config.set_flag(getattr(trt.BuilderFlag, flag))

    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in spec.profile_shapes().items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)

    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} for {spec}")
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(timing_cache, bytes(cache.serialize()))
    return bytes(plan)


def refit_engine(engine, onnx_path: Path) -> None:
    """Load new weights into a refittable engine from an ONNX file of the same structure.

    The ONNX parser names engine weights after the ONNX initialisers (and Constant node outputs), so
    each refittable weight is looked up by name there."""
    import numpy as np
    import onnx
    import tensorrt as trt
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            arrays[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    refitter = trt.Refitter(engine, _logger())
    kept = []  # the Weights views must outlive refit_cuda_engine()
    for name in refitter.get_all_weights():
        if name in arrays:
            kept.append(np.ascontiguousarray(arrays[name]))
            refitter.set_named_weights(name, trt.Weights(kept[-1]))
    missing = refitter.get_missing_weights()
    if missing:
        raise RuntimeError(f"cannot refit from {onnx_path}: weights missing for {missing[:5]}")
    if not refitter.refit_cuda_engine():
        raise RuntimeError(f"TensorRT refused to refit the engine from {onnx_path}")


def ensure_engine(module: nn.Module, spec: EngineSpec, device: torch.device | str = "cuda",
                  cache_dir: str | Path | None = None) -> Path:
    """The cached engine for ``module`` / ``spec`` on this GPU: reused when the weights match, refitted when
    only the weights changed, built otherwise. Returns the engine path."""
    import tensorrt as trt

    info = DeviceInfo.current(device)
    structure = structure_hash(module, spec)
    path = engine_path(structure, spec, info, cache_dir)
    meta_path = path.with_suffix(".json")
    weights = weights_hash(module)
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() and path.is_file() else None
    if meta is not None and meta.get("weights") == weights:
        return path

    dtype = onnx_dtype(spec.precision, hasattr(trt.BuilderFlag, "FP16"))
    onnx_file = _root(cache_dir) / "onnx" / f"{spec.what}-{structure[:16]}-{PRECISIONS[dtype]}.onnx"
    export_onnx(module, spec.what, onnx_file, sample_shape=spec.sample_shape, dtype=dtype)
    if meta is not None:  # same structure, new weights
        engine = trt.Runtime(_logger()).deserialize_cuda_engine(path.read_bytes())
        refit_engine(engine, onnx_file)
        plan = bytes(engine.serialize())
    else:
        plan = build_engine(onnx_file, spec, timing_cache_path(info, cache_dir))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, plan)
    atomic_write(meta_path, json.dumps({"weights": weights, "structure": structure, "spec": dataclasses.asdict(spec),
                                         "gpu": info.gpu_name, "capability": list(info.capability),
                                         "tensorrt": info.trt_version}, indent=2).encode())
    return path


def _torch_dtype(trt_dtype) -> torch.dtype:
    import tensorrt as trt

    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.BF16: torch.bfloat16,
             trt.DataType.INT32: torch.int32, trt.DataType.INT64: torch.int64}
    return table[trt_dtype]


class TensorRTEngine:
    """A deserialized engine that runs on CUDA tensors: ``engine(*inputs) -> first output``.

    One execution context and one CUDA graph per batch size (a captured graph fixes shapes and
    addresses); inputs are copied into the graph's static buffers, the output is cloned out. Batches
    above the profile's maximum are split."""

    def __init__(self, path: Path, device: torch.device | str = "cuda") -> None:
        import tensorrt as trt

        self.device = torch.device(device)
        self.runtime = trt.Runtime(_logger())
        self.engine = self.runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {path} (built by another TensorRT version or GPU?)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.max_batch = self.engine.get_tensor_profile_shape(self.inputs[0], 0)[2][0]
        self._graphs: dict[int, tuple[Any, Any, list[torch.Tensor], list[torch.Tensor]]] = {}

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        batch = inputs[0].shape[0]
        if batch > self.max_batch:
            m = self.max_batch
            return torch.cat([self(*(x[i:i + m] for x in inputs)) for i in range(0, batch, m)])
        if batch not in self._graphs:
            self._graphs[batch] = self._capture(batch)
        graph, _context, ins, outs = self._graphs[batch]
        for buf, x in zip(ins, inputs):
            buf.copy_(x)
        graph.replay()
        return outs[0].clone()

    def _capture(self, batch: int):
        context = self.engine.create_execution_context()
        ins, outs = [], []
        for name in self.inputs:
            item = tuple(self.engine.get_tensor_shape(name))[1:]
            dtype = _torch_dtype(self.engine.get_tensor_dtype(name))
            buf = torch.zeros((batch, *item), dtype=dtype, device=self.device)
            context.set_input_shape(name, tuple(buf.shape))
            context.set_tensor_address(name, buf.data_ptr())
            ins.append(buf)
        for name in self.outputs:
            buf = torch.empty(tuple(context.get_tensor_shape(name)),
                              dtype=_torch_dtype(self.engine.get_tensor_dtype(name)), device=self.device)
            context.set_tensor_address(name, buf.data_ptr())
            outs.append(buf)
        def execute(stream: torch.cuda.Stream) -> None:
            if not context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed")

        # once outside the graph, waited for: TensorRT finishes its lazy setup there
        graph, _ = capture_cuda_graph(execute, self.device, warmup=1, sync=True)
        return graph, context, ins, outs


class TensorRTRunner(Runner):
    """Sampling runner (``backend="tensorrt"``): the U-Net step and the decoder run as TensorRT engines
    (precision = the pipeline dtype); noise, sampler step and nearest-code lookup as on ``cuda``."""

    nearest_impl = "triton"
    step_impl = "triton"

    def __init__(self, loaded, device, dtype) -> None:
        super().__init__(loaded, device, dtype)
        precision = PRECISIONS[dtype]
        lo, opt, hi = SAMPLING_BATCHES
        c, h, w = loaded.config.latent_shape
        unet_spec = EngineSpec("unet", (c, h, w), precision, lo, opt, hi)
        decoder_spec = EngineSpec("decoder", (loaded.config.vqgan.latent_channels, h, w), precision, lo, opt, hi)
        self.unet_engine = TensorRTEngine(ensure_engine(self.unet, unet_spec, device), device)
        self.decoder_engine = TensorRTEngine(ensure_engine(self.vqgan, decoder_spec, device), device)

    @torch.no_grad()
    def denoise(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet_engine(x, t).float()

    @torch.no_grad()
    def decode_reflectance(self, idx: torch.Tensor) -> torch.Tensor:
        """The exported decoder ends in reflectance (``retina_fast.export``: normalisation inverted, clamped)."""
        return self.decoder_engine(self.vqgan.codebook.lookup(idx)).float()


class TensorRTEnhancer:
    """MAGE-Net ``restore`` as TensorRT engines, for the enhance engine.

        enhancer = TensorRTEnhancer(magenet, precision="fp16")
        restored = enhancer(images)   # (N, 3, H, W) float in [0, 1] on CUDA -> (N, 3, H, W) fp32, unclamped

    One engine per image size (H, W), built (or loaded from the cache) on first use; batches up to
    ``max_batch`` per launch, larger ones are split."""

    def __init__(self, magenet: nn.Module, *, device: torch.device | str = "cuda", precision: str = "fp16",
                 opt_batch: int = 1, max_batch: int = 8, cache_dir: str | Path | None = None) -> None:
        self.magenet = magenet.to(device).eval()
        self.device = torch.device(device)
        self.precision = precision
        self.batches = (1, opt_batch, max_batch)
        self.cache_dir = cache_dir
        self._engines: dict[tuple[int, int], TensorRTEngine] = {}

    def engine_for(self, height: int, width: int) -> TensorRTEngine:
        key = (height, width)
        if key not in self._engines:
            spec = EngineSpec("magenet", (3, height, width), self.precision, *self.batches)
            path = ensure_engine(self.magenet, spec, self.device, self.cache_dir)
            self._engines[key] = TensorRTEngine(path, self.device)
        return self._engines[key]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"TensorRTEnhancer expects (N, 3, H, W), got {tuple(images.shape)}")
        engine = self.engine_for(images.shape[-2], images.shape[-1])
        return engine(images.to(self.device)).float()
