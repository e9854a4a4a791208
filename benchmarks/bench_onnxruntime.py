"""onnxruntime (CPU execution provider) against the engine's ``cpu`` backend, one run, three networks.

    python benchmarks/bench_onnxruntime.py [--out benchmarks/results/onnxruntime_vs_cpu.json] [--repeats 15]

Workloads (the issue's): U-Net step at batch 4 on tiny latents 8x16x16; VQ-GAN decoder (tiny) at batch 4;
MAGE-Net tiny at 512x512, batch 1; plus the U-Net step at batch 16 (the cpu backend's sampling batch).
Weights are the packaged ``tiny`` model where it exists, else random weights of the same architecture
(speed does not depend on the values).

cpu side: the ``cpu`` backend's runner (per-core shards through frozen TorchScript graphs, channels-last,
U-Net in bf16 on AMX / AVX512-BF16 CPUs, fp32 decoder), and MAGE-Net eager channels-last bf16 (the
enhance engine is not there yet).
onnxruntime side: fp32 graphs from ``retina_fast.export``, all graph optimisations, intra-op threads =
cores. Both sides use the same thread count; their calls alternate so load changes hit both. Each side
is checked once against eager fp32 torch before timing (max abs error, reported).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from retina_fast.backends import cpu_features
from retina_fast.backends.runners import CPURunner, default_dtype
from retina_fast.export import example_inputs, export_onnx, onnxruntime_session, run_onnxruntime


def _loaded_tiny():
    from retina_fast.models import VQGAN, UNet2D
    from retina_fast.models.config import get_preset
    from retina_fast.modelzoo import LoadedLDM, load_ldm, schedule_for

    try:
        return load_ldm("tiny"), "packaged tiny weights"
    except (FileNotFoundError, ValueError):
        torch.manual_seed(0)
        cfg = get_preset("tiny")
        vq, unet = VQGAN(cfg.vqgan).eval(), UNet2D(cfg.unet).eval()
        return LoadedLDM(cfg, vq, unet, schedule_for(cfg), vq.latent_range(), tuple(cfg.vqgan.wavelengths)), \
            "random weights (tiny architecture; no packaged tiny model here)"


def _time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _load() -> str:
    """``uptime`` output (its load averages: 1, 5, 15 minutes)."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return ""


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> int:
    import onnx
    import onnxruntime as ort

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/onnxruntime_vs_cpu.json")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()

    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    loaded, weights = _loaded_tiny()
    dtype = default_dtype("cpu", torch.device("cpu"))
    runner = CPURunner(loaded, torch.device("cpu"), dtype)
    from retina_fast.models.magenet import MAGENET_PRESETS, MAGENet

    torch.manual_seed(0)
    magenet = MAGENet(MAGENET_PRESETS["tiny"]).eval()
    fast_magenet = copy.deepcopy(magenet).to(dtype).to(memory_format=torch.channels_last)

    def cpu_magenet(image):
        return fast_magenet.restore(image.to(dtype).contiguous(memory_format=torch.channels_last)).float()

    lookup = loaded.vqgan.codebook.lookup
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, loaded.config.vqgan.codebook_size, (4, 16, 16), generator=gen)
    # name: (what, source model, per-item ONNX input shape, inputs, cpu-backend callable, torch reference,
    #        inputs -> ONNX inputs, what the cpu side is)
    cases = {
        "unet_step": ("unet", loaded, (8, 16, 16), example_inputs("unet", (8, 16, 16), 4, seed=1), runner.denoise,
                      loaded.unet, lambda *a: a, f"CPURunner.denoise ({str(dtype).replace('torch.', '')})"),
        "unet_step_batch16": ("unet", loaded, (8, 16, 16), example_inputs("unet", (8, 16, 16), 16, seed=1),
                              runner.denoise, loaded.unet, lambda *a: a,
                              f"CPURunner.denoise ({str(dtype).replace('torch.', '')}); the cpu backend's "
                              "default sampling batch (extra point, not in the issue)"),
        "decoder": ("decoder", loaded, (8, 16, 16), (idx,), runner.decode_indices, loaded.vqgan.decode_indices,
                    lambda i: (lookup(i),), "CPURunner.decode_indices (code lookup + decoder, float32)"),
        "magenet": ("magenet", magenet, (3, 512, 512), example_inputs("magenet", (3, 512, 512), 1, seed=1),
                    cpu_magenet, magenet.restore, lambda *a: a,
                    f"eager MAGENet.restore, channels-last {str(dtype).replace('torch.', '')}"),
    }
    results = {}
    load_before = _load()
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for name, (what, model, shape, inputs, cpu_fn, ref_fn, to_onnx, cpu_desc) in cases.items():
            path = export_onnx(model, what, Path(tmp) / f"{what}.onnx", sample_shape=shape)
            session = onnxruntime_session(path, threads=cores)

            def ort_fn(*a, session=session, what=what, to_onnx=to_onnx):
                return run_onnxruntime(session, what, to_onnx(*a))

            ref = ref_fn(*inputs)
            scale = float(ref.abs().max())
            err_ort = float((ort_fn(*inputs) - ref).abs().max())
            err_cpu = float((cpu_fn(*inputs).float() - ref).abs().max())
            for _ in range(args.warmup):
                ort_fn(*inputs)
                cpu_fn(*inputs)
            t_ort, t_cpu = [], []
            for _ in range(args.repeats):  # alternate so that load changes hit both sides
                t_ort += _time(lambda: ort_fn(*inputs), 1)
                t_cpu += _time(lambda: cpu_fn(*inputs), 1)
            med_ort, med_cpu = statistics.median(t_ort), statistics.median(t_cpu)
            batch = inputs[0].shape[0]
            results[name] = {
                "workload": f"{what}, batch {batch}, per-item input {list(shape)}",
                "onnxruntime_ms": {"median": round(1e3 * med_ort, 2), "min": round(1e3 * min(t_ort), 2)},
                "cpu_backend_ms": {"median": round(1e3 * med_cpu, 2), "min": round(1e3 * min(t_cpu), 2)},
                "cpu_backend_is": cpu_desc,
                "onnxruntime_is": "CPUExecutionProvider, ORT_ENABLE_ALL, fp32 graph",
                "speedup_onnxruntime_over_cpu": round(med_cpu / med_ort, 3),
                "onnxruntime_faster": med_ort < med_cpu,
                "max_abs_err_vs_torch_fp32": {"onnxruntime": err_ort, "cpu_backend": err_cpu, "output_scale": scale},
            }
            print(name, json.dumps(results[name]), flush=True)

    report = {
        "what": "onnxruntime CPU EP vs retina_fast cpu backend, same run, alternating calls",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _commit(),
        "machine": {"cpu": _cpu_name(), "cores": cores, "features": cpu_features(), "platform": platform.platform()},
        "uptime": {"before": load_before, "after": _load()},
        "note": "2 shared cores with other jobs running (see load averages); run under nice -n 15",
        "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__, "onnx": onnx.__version__,
                     "python": platform.python_version()},
        "threads": {"torch": torch.get_num_threads(), "onnxruntime_intra_op": cores},
        "weights": weights,
        "repeats": args.repeats,
        "results": results,
        "onnxruntime_backend_added": any(r["onnxruntime_faster"] for r in results.values()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
