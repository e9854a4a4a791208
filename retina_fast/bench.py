"""Side-by-side timing of sampling contenders in one process (``retina-fast bench``, benchmarks/).

Method (the device tool's METHOD.md): check correctness first, warm up once (traces graphs, compiles,
fills caches), then time every contender ``repeats`` times *interleaved* (so machine load hits all of
them alike) and report medians and minima. Ratios are only meaningful within one run. Achieved GFLOP/s
use the written FLOP count of ``retina_fast.flops``.

A contender is written ``NAME[:DTYPE]`` (DTYPE fp32, bf16 or fp16; default: the backend's own):

* a registered backend (``torch``, ``cpu``, ``onnxruntime``, ``cuda``, ``tensorrt``);
* ``plain`` -- the reference loop with the U-Net and the decoder run as eager PyTorch modules at DTYPE
  (``plain-bf16`` = ``plain:bf16``): what PyTorch itself gives at that precision, the yardstick for a
  reduced-precision contender's error (err <= 2 err(plain same dtype) + 1e-3, flash-attention's rule);
* ``compile`` -- the same with the U-Net (and, when asked, the decoder) through ``torch.compile``: what a
  PyTorch user tries first. Its first call compiles; that time is reported as ``setup_s``.
"""
from __future__ import annotations

import copy
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

import torch

__all__ = ["machine", "hardware_line", "render_phantom_folder", "interleaved", "random_pipeline", "parse_spec",
           "Contender", "make_contender", "plain_bf16_pipeline", "relative_l2", "within_tolerance",
           "sampling_speedups", "step_speedups", "format_table", "format_step_table"]


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, cwd=os.path.dirname(__file__),
                             check=False, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def machine() -> dict:
    gpu = torch.cuda.get_device_name(0) if torch.backends.cuda.is_built() and torch.cuda.is_available() else None
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    status = _git("status", "--porcelain", "--untracked-files=no")
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cpu, features = cpu_info()
    return {"platform": platform.platform(), "cpu": cpu, "cpu_features": features, "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda, "gpu": gpu,
            "load_avg_1min": load, "commit": _git("rev-parse", "--short", "HEAD"),
            "commit_full": _git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


_CPU_FEATURES = ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile")  # what decides which kernels win here


def cpu_info() -> tuple[str, list[str]]:
    """(CPU model name, which of the features that decide our kernel choices it has) from /proc/cpuinfo."""
    model, flags = None, set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name") and model is None:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    model = model or platform.processor() or platform.machine()
    return model, [f for f in _CPU_FEATURES if f in flags]


def hardware_line() -> str:
    """'<CPU model> (<n> cores), torch <version>, <threads> thread(s)' for reports."""
    return f"{cpu_info()[0]} ({os.cpu_count()} cores), torch {torch.__version__}, {torch.get_num_threads()} thread(s)"


def render_phantom_folder(work, name: str, n: int, size: int, seed: int):
    """Render phantom eyes seed .. seed+n-1 at ``size`` px into ``work/<name>_seeds_<a>-<b>`` with
    ``retina-fast phantom`` (cubes + masks, as ``retina-fast evaluate`` reads them); returns the folder."""
    from pathlib import Path

    from retina_fast.cli import main

    out = Path(work) / f"{name}_seeds_{seed}-{seed + n - 1}"
    if main(["phantom", "--n", str(n), "--size", str(size), "--seed", str(seed), "--out", str(out),
             "--no-progress"]) != 0:
        raise RuntimeError(f"rendering {out} failed")
    return out


def _sync() -> None:
    if torch.backends.cuda.is_built() and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def interleaved(contenders: dict[str, Callable[[], object]], repeats: int, *, warmup: bool = True,
                keep_going: Callable[[], bool] | None = None) -> dict[str, dict]:
    """Median / min wall time of each callable over ``repeats`` interleaved rounds (device synchronised
    around every call). ``keep_going()`` is asked before each round after the first: a caller with a time
    budget stops early and gets the rounds done so far (``runs`` says how many)."""
    if warmup:
        for fn in contenders.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for r in range(repeats):
        if r and keep_going is not None and not keep_going():
            break
        for name, fn in contenders.items():
            _sync()
            t0 = time.perf_counter()
            fn()
            _sync()
            times[name].append(time.perf_counter() - t0)
    return {name: {"median_s": statistics.median(ts), "min_s": min(ts), "runs": ts} for name, ts in times.items()}


def random_pipeline(preset, device=None, seed: int = 0):
    """A Pipeline with random weights for a preset name, a sweep name or an LDMConfig (speed does not
    depend on the weight values). The modules are created on ``device`` directly (no CPU copy of a
    556 M-parameter U-Net on the way to a GPU)."""
    from retina_fast.engine import Pipeline
    from retina_fast.models.config import LDMConfig, get_preset
    from retina_fast.models.unet import UNet2D
    from retina_fast.models.vqgan import VQGAN
    from retina_fast.schedules import cosine_schedule

    cfg = preset if isinstance(preset, LDMConfig) else get_preset(preset)
    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        vq, un = VQGAN(cfg.vqgan).eval(), UNet2D(cfg.unet).eval()
    vq.requires_grad_(False)
    un.requires_grad_(False)
    from retina_fast.modelzoo import LoadedLDM  # the real type, so a new field never goes missing here

    loaded = LoadedLDM(cfg, vq, un, cosine_schedule(cfg.timesteps), vq.latent_range(), tuple(cfg.vqgan.wavelengths))
    return Pipeline(loaded, f"random-{cfg.name}")


_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def parse_spec(spec: str) -> tuple[str, torch.dtype | None]:
    """``NAME[:DTYPE]`` -> (name, dtype or None); ``plain-bf16`` is ``plain:bf16``; ``cpu@direct`` /
    ``cpu@onednn``: the cpu backend with its convolution library pinned for U-Net and decoder (else measured);
    ``cuda@nchw`` / ``cuda@nhwc``: the cuda backend's U-Net in that memory layout (else its default)."""
    if spec == "plain-bf16":
        return "plain", torch.bfloat16
    name, _, dt = spec.partition(":")
    if dt and dt not in _DTYPES:
        raise ValueError(f"contender {spec!r}: unknown dtype {dt!r}; use one of {', '.join(_DTYPES)}")
    from retina_fast.backends.cpu_pack import CONV_LIBRARIES
    from retina_fast.backends.runners import CUDA_LAYOUTS

    base, at, setting = name.partition("@")
    if at and not ((base == "cpu" and setting in CONV_LIBRARIES) or (base == "cuda" and setting in CUDA_LAYOUTS)):
        raise ValueError(f"contender {spec!r}: only the cpu backend takes a convolution library (cpu@direct, "
                         f"cpu@onednn) and only the cuda backend a layout (cuda@nchw, cuda@nhwc)")
    if name != "plain" and name != "compile":
        from retina_fast import backends

        backends.get(base)  # unknown names raise with the list of known ones
    return name, _DTYPES[dt] if dt else None


@dataclass
class Contender:
    """One row: ``sample`` draws (cubes, latents) like ``Pipeline.sample``; ``runner`` offers the
    denoise / decode of one U-Net call and one decode (fp32 in and out)."""

    spec: str
    kind: str                     # "backend", "plain" or "compile"
    dtype: torch.dtype
    device: torch.device
    pipe: object
    backend: str
    runner: object
    note: str = ""
    extra: dict = field(default_factory=dict)

    def sample(self, n: int, steps: int, *, seed: int = 0, sampler: str = "ddim", batch_size: int | None = None):
        return self.pipe.sample(n, steps, seed=seed, sampler=sampler, backend=self.backend, device=self.device,
                                dtype=None if self.kind != "backend" else self.dtype, batch_size=batch_size,
                                return_latents=True)


def _derived_pipeline(pipe, device: torch.device, dtype: torch.dtype, label: str,
                      wrap_unet: Callable | None = None, wrap_decoder: Callable | None = None):
    """A Pipeline over the same model whose ``torch`` runner on ``device`` runs copies of the U-Net and the
    decoder at ``dtype`` as given by ``wrap_*`` (e.g. ``torch.compile``), under no_grad, fp32 in and out."""
    from retina_fast.backends.runners import _DecodeIndices
    from retina_fast.engine import Pipeline

    loaded = copy.copy(pipe.loaded)
    unet = copy.deepcopy(pipe.loaded.unet).to(device=device, dtype=dtype).eval()
    vqgan = copy.deepcopy(pipe.loaded.vqgan).to(device=device, dtype=dtype).eval()
    unet_fn = wrap_unet(unet) if wrap_unet else unet
    decode_fn = wrap_decoder(_DecodeIndices(vqgan)) if wrap_decoder else vqgan.decode_indices
    loaded.unet, loaded.vqgan = unet, vqgan  # the runner keeps them (codebook, config); denoise is replaced
    derived = Pipeline(loaded, f"{pipe.source} ({label})")
    runner = derived.runner("torch", device, torch.float32)

    @torch.no_grad()
    def denoise(x, t):
        return unet_fn(x.to(dtype), t).float()

    @torch.no_grad()
    def decode_indices(idx):
        return decode_fn(idx).float()

    runner.denoise, runner.decode_indices = denoise, decode_indices
    return derived, runner


def make_contender(pipe, spec: str, device=None, *, default_dtype: torch.dtype | None = None,
                   compile_backend: str = "inductor", compile_mode: str | None = None,
                   compile_decoder: bool = False) -> Contender:
    """Build the contender ``spec`` (module docstring) for ``pipe`` on ``device``. A backend that cannot
    run raises ``BackendUnavailable`` with its reasons."""
    name, dtype = parse_spec(spec)
    dtype = dtype or default_dtype
    if name in ("plain", "compile"):
        dev = torch.device(device or "cpu")
        dtype = dtype or torch.float32
        if name == "plain":
            derived, runner = _derived_pipeline(pipe, dev, dtype, f"eager {dtype_name(dtype)}")
            return Contender(spec, "plain", dtype, dev, derived, "torch", runner,
                             note=f"eager PyTorch {dtype_name(dtype)}")

        def compiled(module):
            return torch.compile(module, backend=compile_backend, mode=compile_mode, dynamic=False)

        label = f"torch.compile {compile_backend}" + (f" {compile_mode}" if compile_mode else "")
        derived, runner = _derived_pipeline(pipe, dev, dtype, f"{label} {dtype_name(dtype)}", compiled,
                                            compiled if compile_decoder else None)
        part = "U-Net and decoder" if compile_decoder else "U-Net; decoder eager"
        return Contender(spec, "compile", dtype, dev, derived, "torch", runner, note=f"{label} ({part})",
                         extra={"compile_backend": compile_backend, "compile_mode": compile_mode,
                                "compile_decoder": compile_decoder})
    base, _, setting = name.partition("@")
    if setting:  # its own runner, in a pipeline of its own (the shared one keeps its measured choice)
        from retina_fast import backends
        from retina_fast.backends.runners import CPURunner, CUDARunner, default_dtype
        from retina_fast.engine import Pipeline

        dev = torch.device(device or ("cuda" if base == "cuda" else "cpu"))
        dt = dtype or default_dtype(base, dev)
        backends.resolve(base, device=dev, dtype=dt)  # one that cannot run here says why, as pipe.runner does
        pipe = Pipeline(pipe.loaded, pipe.source)
        runner = CPURunner(pipe.loaded, dev, dt, convolutions=setting) if base == "cpu" else \
            CUDARunner(pipe.loaded, dev, dt, layout=setting)
        pipe._runners[(base, str(dev), dt)] = runner
        runner.backend = base  # pinned: nothing measured, and the shared runner is not built at all
    else:
        runner = pipe.runner(base, device, dtype)
    note = "; ".join(f"{part}: {getattr(runner, attr)}" for part, attr in (("U-Net", "unet_path"),
                                                                              ("decoder", "decode_path"))
                     if getattr(runner, attr, None))
    return Contender(spec, "backend", runner.dtype, runner.device, pipe, base, runner, note=note)


def plain_bf16_pipeline(pipe, device="cpu"):
    """``pipe`` with its U-Net and decoder run as plain eager PyTorch modules in bf16 (``backend="torch"``)."""
    return make_contender(pipe, "plain:bf16", device).pipe


def relative_l2(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
    return float((a - ref).norm() / ref.norm().clamp_min(1e-30))


def within_tolerance(err: float, dtype: torch.dtype, yardstick: float | None, fp32_tol: float = 1e-4,
                     atol: float = 1e-3) -> tuple[bool, str]:
    """fp32: err <= fp32_tol (a drop-in); reduced precision: err <= 2 * err(plain PyTorch, same dtype) + atol.
    Returns (passed, the rule as text)."""
    if dtype == torch.float32:
        return err <= fp32_tol, f"<= {fp32_tol:g} (fp32 drop-in)"
    if yardstick is None:
        return False, "no plain-PyTorch row at this dtype to judge against"
    bound = 2 * yardstick + atol
    return err <= bound, f"<= 2 x {yardstick:.2e} (plain {dtype_name(dtype)}) + {atol:g} = {bound:.2e}"


def sampling_speedups(model: str = "default", n: int = 8, steps: int = 50, sampler: str = "ddim",
                      backends: tuple[str, ...] = ("cpu",), dtype: torch.dtype | None = None, repeats: int = 3,
                      reference: Callable[..., torch.Tensor] | None = None, pipe=None, device=None,
                      compile_backend: str = "inductor") -> dict:
    """Time ``reference`` (default: the engine's ``torch`` backend) against each contender, same arguments.

    ``pipe`` (e.g. :func:`random_pipeline`) replaces loading ``model``. Reports per row the relative L2 error
    of the cubes against the reference, images/s, speed-up and achieved GFLOP/s (retina_fast.flops)."""
    from retina_fast import engine, flops

    pipe = pipe if pipe is not None else engine.load(model)
    if reference is None:
        def reference(n, steps, seed, sampler):
            return pipe.sample(n, steps, seed=seed, sampler=sampler, backend="torch", device=device)
    contenders = {"reference": lambda: reference(n, steps, seed=0, sampler=sampler)}
    built = {spec: make_contender(pipe, spec, device, default_dtype=dtype, compile_backend=compile_backend)
             for spec in backends}
    for spec, c in built.items():
        contenders[spec] = (lambda c=c: c.sample(n, steps, seed=0, sampler=sampler)[0])
    setup: dict[str, float] = {}
    outputs = {}
    for name, fn in contenders.items():  # first call: compiles / traces; its output is the correctness check
        t0 = time.perf_counter()
        outputs[name] = fn()
        setup[name] = time.perf_counter() - t0
    ref = outputs["reference"]
    timing = interleaved(contenders, repeats)
    per_image = flops.sample_flops(pipe.config, steps)  # one U-Net call per step for every sampler here
    rows = []
    for name in contenders:
        t = timing[name]
        rows.append({"name": name, **t, "first_call_s": setup[name],
                     "speedup_median": timing["reference"]["median_s"] / t["median_s"],
                     "images_per_s": n / t["median_s"], "gflop_per_s": n * per_image / t["median_s"] / 1e9,
                     "relative_l2_error": relative_l2(outputs[name], ref),
                     "note": built[name].note if name in built else "reference"})
    return {"model": str(pipe.source), "n": n, "steps": steps, "sampler": sampler, "repeats": repeats,
            "dtype": str(dtype) if dtype else "backend default", "gflop_per_image": per_image / 1e9,
            "machine": machine(), "rows": rows}


def step_speedups(pipe, batch: int, specs: tuple[str, ...], rounds: int = 5, device=None,
                  compile_backend: str = "inductor", compile_decoder: bool = True, steps: int = 50,
                  log: Callable[[str], None] | None = None) -> dict:
    """One U-Net call and one decode at ``batch`` for the eager fp32 reference and each contender, same
    inputs: correctness once (relative L2 against the reference; a reduced-precision row is judged against
    the ``plain`` row of its dtype, added when not asked for), then interleaved rounds; GFLOP/s from the
    written count and the implied time of a ``steps``-step sample per image."""
    from retina_fast import flops

    cfg = pipe.config
    c, h, w = cfg.latent_shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c, h, w, generator=gen)
    t = torch.randint(0, cfg.timesteps, (batch,), generator=gen)
    x0 = torch.rand(batch, c, h, w, generator=gen) * 2 - 1
    built = {"torch": make_contender(pipe, "torch", device)}
    reduced = {parse_spec(s)[1] for s in specs} - {None, torch.float32}
    have = {parse_spec(s)[1] for s in specs if parse_spec(s)[0] == "plain"}
    specs = tuple(specs) + tuple(f"plain:{dtype_name(d)}" for d in sorted(reduced - have, key=str))  # yardsticks
    for spec in specs:
        if spec != "torch":
            built[spec] = make_contender(pipe, spec, device, compile_backend=compile_backend,
                                         compile_decoder=compile_decoder)
    fns: dict[str, Callable] = {}
    first: dict[str, float] = {}
    outputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for spec, con in built.items():
        r, dev = con.runner, con.device
        xd, td, x0d = x.to(dev), t.to(dev), x0.to(dev)
        fns[f"{spec}|unet"] = (lambda r=r, xd=xd, td=td: r.denoise(xd, td))
        fns[f"{spec}|decode"] = (lambda r=r, x0d=x0d: r.decode(x0d))
        t0 = time.perf_counter()
        r.prepare(batch)  # the cpu backend measures its libraries for this batch (counted in the first call)
        outputs[spec] = (fns[f"{spec}|unet"]().float().cpu(), fns[f"{spec}|decode"]().float().cpu())
        first[spec] = time.perf_counter() - t0
        if log:
            log(f"{cfg.name} B={batch} {spec}: first call (compile/trace + run) {first[spec]:.1f} s")
    ref_eps, ref_cube = outputs["torch"]
    timing = interleaved(fns, rounds, warmup=False)
    unet_f, dec_f = flops.unet_flops(cfg.unet, h, w) * batch, flops.decode_flops(cfg.vqgan) * batch
    yard = {built[s].dtype: relative_l2(outputs[s][0], ref_eps) for s in built if built[s].kind == "plain"}
    rows = []
    for spec, con in built.items():
        tu, td = timing[f"{spec}|unet"], timing[f"{spec}|decode"]
        err = relative_l2(outputs[spec][0], ref_eps)
        ok, rule = within_tolerance(err, con.dtype, yard.get(con.dtype), fp32_tol=1e-4)
        rows.append({"name": spec, "dtype": dtype_name(con.dtype), "note": con.note, "first_call_s": first[spec],
                     "unet_median_ms": tu["median_s"] * 1e3, "unet_min_ms": tu["min_s"] * 1e3,
                     "decode_median_ms": td["median_s"] * 1e3, "decode_min_ms": td["min_s"] * 1e3,
                     "unet_gflop_per_s": unet_f / tu["median_s"] / 1e9,
                     "decode_gflop_per_s": dec_f / td["median_s"] / 1e9,
                     "unet_speedup": timing["torch|unet"]["median_s"] / tu["median_s"],
                     "decode_speedup": timing["torch|decode"]["median_s"] / td["median_s"],
                     "sample_s_per_image": (steps * tu["median_s"] + td["median_s"]) / batch,
                     "unet_relative_l2_error": err, "decode_relative_l2_error": relative_l2(outputs[spec][1], ref_cube),
                     "unet_check": rule, "unet_check_passed": ok, "unet_runs_s": tu["runs"], "decode_runs_s": td["runs"]})
    return {"model": cfg.name, "weights": "random", "batch": batch, "rounds": rounds, "steps_for_sample": steps,
            "latent_shape": list(cfg.latent_shape), "unet_gflop_per_image": unet_f / batch / 1e9,
            "decode_gflop_per_image": dec_f / batch / 1e9, "threads": torch.get_num_threads(),
            "machine": machine(), "rows": rows}


def format_table(result: dict) -> str:
    head = (f"model {result['model']}, n={result['n']}, steps={result['steps']}, sampler={result['sampler']}, "
            f"repeats={result['repeats']}, {result['gflop_per_image']:.1f} GFLOP/image, "
            f"load {result['machine']['load_avg_1min']}")
    lines = [head, "", "| contender | median s | min s | images/s | speed-up | GFLOP/s | first call s "
             "| rel. L2 error vs reference |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['name']} | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['images_per_s']:.2f} | "
                     f"{r['speedup_median']:.2f}x | {r['gflop_per_s']:.1f} | {r['first_call_s']:.1f} | "
                     f"{r['relative_l2_error']:.2e} |")
    return "\n".join(lines)


def format_step_table(results: list[dict]) -> str:
    lines = ["| model | B | contender | U-Net ms | speed-up | GFLOP/s | decode ms | speed-up | GFLOP/s "
             "| s/image (sample) | first call s | U-Net rel. L2 | check |", "|---|" * 13]
    lines[1] = "|" + "---|" * 13
    for res in results:
        for r in res["rows"]:
            lines.append(
                f"| {res['model']} | {res['batch']} | {r['name']} | {r['unet_median_ms']:.1f} | "
                f"{r['unet_speedup']:.2f}x | {r['unet_gflop_per_s']:.0f} | {r['decode_median_ms']:.1f} | "
                f"{r['decode_speedup']:.2f}x | {r['decode_gflop_per_s']:.0f} | {r['sample_s_per_image']:.2f} | "
                f"{r['first_call_s']:.1f} | {r['unet_relative_l2_error']:.1e} | "
                f"{'ok' if r['unet_check_passed'] else 'FAIL ' + r['unet_check']} |")
    return "\n".join(lines)
