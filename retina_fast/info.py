"""What is installed, what was built, and which backends can run here (``retina-fast info``)."""
from __future__ import annotations

import os
import platform

import torch

from retina_fast import __version__, _ext, backends


def _gpus() -> list[dict]:
    if not (torch.backends.cuda.is_built() and torch.cuda.is_available()):
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                    "memory_gib": round(p.total_memory / 2**30, 1)})
    return out


def collect() -> dict:
    from retina_fast import kernels

    ext = _ext.build_info()
    if _ext.has_cuda():
        count, err = _ext.require().cuda_device_count()
        ext["cuda_runtime_devices"] = count if not err else f"0 ({err})"
    table = []
    for b in backends.all_backends():
        devices = [d for d in b.devices if d == "cpu" or (d == "cuda" and _gpus())] or list(b.devices[:1])
        reasons = b.not_supported_reasons(devices[0])
        table.append({"name": b.name, "usable": not reasons, "device": devices[0], "description": b.description,
                      "reasons": reasons})
    try:
        default_auto = backends.resolve("auto").name
    except backends.BackendUnavailable as exc:
        default_auto = f"none ({exc})"
    return {
        "retina_fast": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": kernels.version if kernels.available else f"not available ({kernels.load_error})",
        "extension": "loaded" if _ext.available() else f"not loaded ({_ext.load_error})",
        "extension_build": ext,
        "cpu": {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), **backends.cpu_features()},
        "gpus": _gpus(),
        "backends": table,
        "auto": default_auto,
    }


def format_info(data: dict) -> str:
    lines = [f"retina_fast {data['retina_fast']}  (python {data['python']}, {data['platform']})",
             f"torch {data['torch']}  cuda {data['torch_cuda']}  triton {data['triton']}",
             f"extension: {data['extension']}"]
    for key, value in data["extension_build"].items():
        lines.append(f"  {key}: {value}")
    cpu = data["cpu"]
    lines.append("cpu: " + ", ".join(f"{k}={v}" for k, v in cpu.items()))
    lines.append("gpus: " + (", ".join(f"{g['index']}: {g['name']} (sm {g['capability']}, {g['memory_gib']} GiB)"
                                      for g in data["gpus"]) or "none"))
    lines.append("backends:")
    width = max(len(b["name"]) for b in data["backends"])
    for b in data["backends"]:
        state = "usable" if b["usable"] else "unusable"
        why = b["description"] if b["usable"] else "; ".join(b["reasons"])
        lines.append(f"  {b['name']:<{width}}  {state:<8}  {b['device']:<4}  {why}")
    lines.append(f"auto -> {data['auto']}")
    return "\n".join(lines)
