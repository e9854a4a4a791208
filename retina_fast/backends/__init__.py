"""Backend registry: one table for every workload, capabilities as data, reasons when unusable, explicit
selection, no silent fallback.

Each backend declares what it supports (devices, dtypes, minimum CUDA compute capability, software it
needs) and, per workload (``sample``: the diffusion sampler's runner; ``enhance``: MAGE-Net's), where its
runner lives -- a ``"module:attribute"`` path imported only when a runner is built, so importing the registry
imports no backend -- and how ``auto`` ranks it for that workload. It answers
:meth:`Backend.not_supported_reasons`. Selection, highest precedence first:

1. the ``backend=`` argument of a call (``"auto"`` means "no preference here"),
2. the innermost ``with use_backend(name):`` block,
3. the ``RETINA_FAST_BACKEND`` environment variable,
4. ``auto``: the fastest usable backend for the device.

Asking for an unusable backend raises :class:`BackendUnavailable` listing every reason. ``auto`` never
falls back silently: when a faster backend for the same device is unusable it warns with the reasons
(``RETINA_FAST_STRICT=1`` turns that warning into an error). Resolution happens once per pipeline.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import importlib.util
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from retina_fast import _env, _ext

__all__ = [
    "Backend",
    "Workload",
    "WORKLOADS",
    "runner_factory",
    "BackendUnavailable",
    "BackendFallbackWarning",
    "register",
    "get",
    "names",
    "all_backends",
    "resolve",
    "use_backend",
    "cpu_features",
    "cuda_device_reason",
    "check_device",
]


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here; the message lists every reason."""


class BackendFallbackWarning(RuntimeWarning):
    """``auto`` skipped a faster backend for this device; the message says why."""


WORKLOADS = ("sample", "enhance")


@dataclass(frozen=True)
class Workload:
    """A backend's runner for one workload: ``runner`` is ``"module.path:attribute"`` (a callable
    ``(model, device, dtype) -> runner``), imported when first built; ``rank``: ``auto`` prefers the highest
    usable rank, and ``None`` means only when asked for by name."""

    runner: str
    rank: int | None


@dataclass(frozen=True, eq=False)
class Backend:
    name: str
    description: str
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    workloads: dict[str, Workload] = field(default_factory=dict)
    min_compute_capability: tuple[int, int] | None = None
    requirements: tuple[Callable[[], str | None], ...] = field(default=(), repr=False)
    optional: bool = False  # needs an optional package: ``auto`` skips it quietly when that is missing

    @property
    def speed_rank(self) -> int:
        """The sampling rank (``workloads["sample"].rank``)."""
        w = self.workloads.get("sample")
        return w.rank if w is not None and w.rank is not None else -1

    def not_supported_reasons(self, device: str | torch.device | None = None,
                              dtype: torch.dtype | None = None, workload: str | None = None) -> list[str]:
        """Why this backend cannot run for (device, dtype[, workload]) here; empty when it can."""
        reasons = [r for r in (req() for req in self.requirements) if r]
        if workload is not None and workload not in self.workloads:
            reasons.insert(0, f"has no {workload} runner (it runs {', '.join(self.workloads) or 'nothing'})")
        dev = torch.device(device) if device is not None else torch.device(self.devices[0])
        if dev.type not in self.devices:
            reasons.append(f"runs on {'/'.join(self.devices)}, not {dev.type}")
        elif dev.type == "cuda" and cuda_device_reason() not in reasons + [None]:
            reasons.append(cuda_device_reason())
        if dtype is not None and dtype not in self.dtypes:
            names_ = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            reasons.append(f"supports dtypes {names_}, not {str(dtype).replace('torch.', '')}")
        if dev.type == "cuda" and self.min_compute_capability and not reasons:
            cc = torch.cuda.get_device_capability(dev)
            if cc < self.min_compute_capability:
                need = ".".join(map(str, self.min_compute_capability))
                reasons.append(f"needs compute capability >= {need}, GPU has {cc[0]}.{cc[1]}")
        return reasons

    def usable(self, device=None, dtype=None) -> bool:
        return not self.not_supported_reasons(device, dtype)


# --- requirement probes (called lazily, never at import) ---------------------------------------------

def _need_extension() -> str | None:
    return None if _ext.available() else f"compiled core retina_fast._C not loaded ({_ext.load_error})"


def _need_extension_cuda() -> str | None:
    if not _ext.available():
        return f"compiled core retina_fast._C not loaded ({_ext.load_error})"
    return None if _ext.has_cuda() else "retina_fast._C was built without CUDA (no nvcc at build time)"


def cuda_device_reason() -> str | None:
    """Why no CUDA GPU can be used here (None when one can). Never touches CUDA when torch is CPU-only."""
    if not torch.backends.cuda.is_built():
        return f"this torch ({torch.__version__}) is a CPU-only build"
    if not torch.cuda.is_available():
        return "no CUDA GPU visible (torch.cuda.is_available() is False)"
    return None


def check_device(device) -> torch.device | None:
    """``device`` as a torch.device (None stays None) that this machine can run on; otherwise a one-line
    error: a malformed name (ValueError), a device type no backend runs on, CUDA on a CPU-only torch or
    without a GPU, or a GPU index that does not exist (BackendUnavailable)."""
    if device is None:
        return None
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise TypeError(f"device must be a string such as 'cpu' or 'cuda:0', or a torch.device, got {device!r}")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device {device!r} is not a device name (use cpu, cuda or cuda:N)") from None
    if dev.type not in ("cpu", "cuda"):
        raise BackendUnavailable(f"device {dev}: retina_fast's backends run on cpu or cuda, not {dev.type}")
    if dev.type == "cuda":
        reason = cuda_device_reason()
        if reason is not None:
            raise BackendUnavailable(f"device {dev}: {reason}")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise BackendUnavailable(f"device {dev}: this machine has {count} CUDA GPU(s) (cuda:0 .. cuda:{count - 1})")
    return dev


def _need_triton() -> str | None:
    from retina_fast import kernels

    return None if kernels.available else f"Triton not importable ({kernels.load_error})"


def need_onnxruntime() -> str | None:
    missing = [name for name in ("onnx", "onnxruntime") if importlib.util.find_spec(name) is None]
    return f"{' and '.join(missing)} not installed (pip install 'retina_fast[onnx]')" if missing else None


def _need_tensorrt() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return "the tensorrt Python package is not installed (not obtainable on this workplace's registries)"
    return None


def cpu_features() -> dict[str, bool]:
    """x86 features that matter here, from /proc/cpuinfo (Linux) or the extension's cpuid probe."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    if not flags and _ext.available():
        info = _ext.build_info()
        return {"avx2": info["cpu_avx2"], "avx512f": info["cpu_avx512f"],
                "avx512_bf16": info["cpu_avx512bf16"], "amx_bf16": info["cpu_amx_bf16"]}
    return {"avx2": "avx2" in flags, "avx512f": "avx512f" in flags,
            "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags}


def cpu_has_fast_bf16() -> bool:
    feats = cpu_features()
    return feats["amx_bf16"] or feats["avx512_bf16"]


# --- the registry -------------------------------------------------------------------------------------

_REGISTRY: dict[str, Backend] = {}
_ACTIVE: contextvars.ContextVar[str | None] = contextvars.ContextVar("retina_fast_backend", default=None)


def register(backend: Backend) -> Backend:
    if backend.name in _REGISTRY or backend.name == "auto":
        raise ValueError(f"backend name {backend.name!r} is already taken")
    _REGISTRY[backend.name] = backend
    return backend


def get(name: str) -> Backend:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; known: auto, {', '.join(_REGISTRY)}") from None


def names() -> list[str]:
    return list(_REGISTRY)


def all_backends() -> list[Backend]:
    return list(_REGISTRY.values())


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Select a backend for calls inside the block that pass no explicit ``backend``."""
    if name != "auto":
        get(name)
    token = _ACTIVE.set(name)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def requested_name(explicit: str | None = None) -> str:
    """The backend name in force for a call: argument > context manager > environment > auto."""
    for candidate in (explicit, _ACTIVE.get(), _env.backend_override()):
        if candidate and candidate != "auto":
            return candidate
    return "auto"


def resolve(name: str | None = None, *, device: str | torch.device | None = None,
            dtype: torch.dtype | None = None, workload: str = "sample") -> Backend:
    """The backend to use for ``workload`` on (device, dtype). Raises :class:`BackendUnavailable` with all
    reasons."""
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; known: {', '.join(WORKLOADS)}")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype (e.g. torch.float32) or None, got {dtype!r}")
    name = requested_name(name)
    if device is None:
        device = "cuda" if cuda_device_reason() is None else "cpu"
    device = check_device(device)
    if name != "auto":
        backend = get(name)
        reasons = backend.not_supported_reasons(device, dtype, workload)
        if reasons:
            raise BackendUnavailable(f"backend {name!r} cannot run on {device}: " + "; ".join(reasons))
        return backend
    candidates = sorted((b for b in _REGISTRY.values() if device.type in b.devices
                         and workload in b.workloads and b.workloads[workload].rank is not None),
                        key=lambda b: -b.workloads[workload].rank)
    if not candidates:
        runs_on = sorted({d for b in _REGISTRY.values() if workload in b.workloads for d in b.devices})
        raise BackendUnavailable(f"no backend runs {workload!r} on device type {device.type!r}; they run on "
                                 f"{', '.join(runs_on)}")
    skipped: list[str] = []
    for backend in candidates:
        reasons = backend.not_supported_reasons(device, dtype, workload)
        if not reasons:
            if skipped:
                msg = f"auto chose {backend.name!r} on {device}; faster backends skipped: " + " | ".join(skipped)
                if _env.strict():
                    raise BackendUnavailable(msg + " (RETINA_FAST_STRICT=1)")
                warnings.warn(msg, BackendFallbackWarning, stacklevel=2)
            return backend
        if not backend.optional:  # an optional package's absence is not news
            skipped.append(f"{backend.name}: {'; '.join(reasons)}")
    raise BackendUnavailable(f"no backend can run {workload} on {device}: " + " | ".join(skipped))


def runner_factory(backend: Backend | str, workload: str) -> Callable:
    """The callable that builds ``backend``'s runner for ``workload``, imported by its module path now."""
    b = get(backend) if isinstance(backend, str) else backend
    if workload not in b.workloads:
        raise BackendUnavailable(f"backend {b.name!r} has no {workload} runner")
    module, _, attr = b.workloads[workload].runner.partition(":")
    return getattr(importlib.import_module(module), attr)


_RUNNERS = "retina_fast.backends.runners"
_ENHANCE = "retina_fast.enhance"

register(Backend(
    name="torch", description="eager fp32 PyTorch: exactly the reference",
    devices=("cpu", "cuda"), dtypes=(torch.float32,),
    workloads={"sample": Workload(f"{_RUNNERS}:Runner", 0), "enhance": Workload(f"{_ENHANCE}:TorchRunner", 0)}))
# cpu ranks above onnxruntime: shipped tiny, n=8, DDIM-50, one run on the 2-core AVX512-BF16 CPU: cpu fp32
# (fused U-Net) 2.30x the reference vs onnxruntime 1.31x (benchmarks/results/). For MAGE-Net at 512^2 the cpu
# backend (frozen bf16 graph) was 2.1x faster than onnxruntime fp32, so onnxruntime enhances only when named.
register(Backend(
    name="cpu", description="channels-last fused C++ ops and direct convolutions replayed as op graphs, fp32 or bf16",
    devices=("cpu",), dtypes=(torch.float32, torch.bfloat16),
    workloads={"sample": Workload(f"{_RUNNERS}:CPURunner", 15), "enhance": Workload(f"{_ENHANCE}:CPURunner", 15)},
    requirements=(_need_extension,)))
register(Backend(
    name="onnxruntime", description="U-Net as an onnxruntime CPU session (fp32), fused C++ step",
    devices=("cpu",), dtypes=(torch.float32,), optional=True,
    workloads={"sample": Workload("retina_fast.backends.onnxruntime_backend:ONNXRuntimeRunner", 10),
               "enhance": Workload(f"{_ENHANCE}:onnxruntime_runner", None)},
    requirements=(_need_extension, need_onnxruntime)))
register(Backend(
    name="cuda", description="Triton kernels, CUDA graphs, bf16/fp16 with fp32 accumulation",
    devices=("cuda",), dtypes=(torch.float32, torch.bfloat16, torch.float16),
    workloads={"sample": Workload(f"{_RUNNERS}:CUDARunner", 20), "enhance": Workload(f"{_ENHANCE}:CUDARunner", 20)},
    min_compute_capability=(8, 0),
    requirements=(cuda_device_reason, _need_triton, _need_extension_cuda)))
register(Backend(
    name="tensorrt", description="whole-model TensorRT engines built from ONNX exports",
    devices=("cuda",), dtypes=(torch.float16, torch.bfloat16, torch.float32), optional=True,
    workloads={"sample": Workload("retina_fast.backends.tensorrt_backend:TensorRTRunner", 30),
               "enhance": Workload(f"{_ENHANCE}:tensorrt_runner", 30)},
    min_compute_capability=(8, 0),
    requirements=(cuda_device_reason, _need_tensorrt, _need_extension_cuda)))
