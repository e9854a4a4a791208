"""Side-by-side timing of sampling backends in one process (``retina-fast bench``).

Method (the device tool's METHOD.md): check correctness first, warm up once (traces graphs, fills
caches), then time every contender ``repeats`` times *interleaved* (so machine load hits all of them
alike) and report medians and minima. Ratios are only meaningful within one run.
"""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from datetime import datetime, timezone
from typing import Callable

import torch


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(__file__), check=False)
        return out.stdout.strip() or None
    except OSError:
        return None


def machine() -> dict:
    gpu = torch.cuda.get_device_name(0) if torch.backends.cuda.is_built() and torch.cuda.is_available() else None
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "gpu": gpu, "load_avg_1min": load, "commit": _commit(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def hardware_line() -> str:
    """'<CPU model> (<n> cores), torch <version>, <threads> thread(s)' for reports."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores), torch {torch.__version__}, {torch.get_num_threads()} thread(s)"


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


def interleaved(contenders: dict[str, Callable[[], object]], repeats: int) -> dict[str, dict]:
    for fn in contenders.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: {"median_s": statistics.median(ts), "min_s": min(ts), "runs": ts} for name, ts in times.items()}


_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}


def plain_bf16_pipeline(pipe):
    """``pipe`` with its U-Net and decoder run as plain eager PyTorch modules in bf16 (``backend="torch"``):
    what PyTorch itself gives at bf16, against which a bf16 backend's error is judged."""
    import copy

    from retina_fast.engine import Pipeline

    loaded = copy.copy(pipe.loaded)
    loaded.unet = copy.deepcopy(pipe.loaded.unet).to(torch.bfloat16)
    loaded.vqgan = copy.deepcopy(pipe.loaded.vqgan).to(torch.bfloat16)
    plain = Pipeline(loaded, f"{pipe.source} (eager bf16)")
    runner = plain.runner("torch", "cpu", torch.float32)
    runner.denoise = lambda x, t: loaded.unet(x.to(torch.bfloat16), t).float()
    runner.decode_indices = lambda idx: loaded.vqgan.decode_indices(idx).float()
    return plain


def sampling_speedups(model: str = "default", n: int = 8, steps: int = 50, sampler: str = "ddim",
                      backends: tuple[str, ...] = ("cpu",), dtype: torch.dtype | None = None, repeats: int = 3,
                      reference: Callable[..., torch.Tensor] | None = None) -> dict:
    """Time ``reference`` (default: the engine's ``torch`` backend) against each backend, same arguments.

    A backend may be written ``name:dtype`` (``cpu:bf16``, ``cpu:fp32``) to pin its dtype; otherwise ``dtype``
    (None: the backend's default) is used. ``plain-bf16`` is the reference loop with the U-Net and decoder in
    eager bf16 (:func:`plain_bf16_pipeline`): the yardstick for a reduced-precision backend's error. Also
    reports each contender's relative L2 error against the reference output."""
    from retina_fast import engine

    pipe = engine.load(model)
    if reference is None:
        def reference(n, steps, seed, sampler):
            return pipe.sample(n, steps, seed=seed, sampler=sampler, backend="torch")
    contenders = {"reference": lambda: reference(n, steps, seed=0, sampler=sampler)}
    for spec in backends:
        if spec == "plain-bf16":
            plain = plain_bf16_pipeline(pipe)
            contenders[spec] = (lambda plain=plain: plain.sample(n, steps, seed=0, sampler=sampler, backend="torch"))
            continue
        name, _, dt = spec.partition(":")
        if dt and dt not in _DTYPES:
            raise ValueError(f"backend spec {spec!r}: unknown dtype {dt!r}; use one of {', '.join(_DTYPES)}")
        pinned = _DTYPES[dt] if dt else dtype
        contenders[spec] = (lambda name=name, pinned=pinned: pipe.sample(n, steps, seed=0, sampler=sampler,
                                                                         backend=name, dtype=pinned))
    outputs = {name: fn() for name, fn in contenders.items()}
    ref = outputs["reference"]
    timing = interleaved(contenders, repeats)
    rows = []
    for name in contenders:
        err = ((outputs[name] - ref).norm() / ref.norm()).item()
        rows.append({"name": name, **{k: v for k, v in timing[name].items()},
                     "speedup_median": timing["reference"]["median_s"] / timing[name]["median_s"],
                     "images_per_s": n / timing[name]["median_s"], "relative_l2_error": err})
    return {"model": str(pipe.source), "n": n, "steps": steps, "sampler": sampler, "repeats": repeats,
            "dtype": str(dtype) if dtype else "backend default", "machine": machine(), "rows": rows}


def format_table(result: dict) -> str:
    head = (f"model {result['model']}, n={result['n']}, steps={result['steps']}, sampler={result['sampler']}, "
            f"repeats={result['repeats']}, load {result['machine']['load_avg_1min']}")
    lines = [head, "", "| contender | median s | min s | images/s | speed-up | rel. L2 error vs reference |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['name']} | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['images_per_s']:.2f} | "
                     f"{r['speedup_median']:.2f}x | {r['relative_l2_error']:.2e} |")
    return "\n".join(lines)
