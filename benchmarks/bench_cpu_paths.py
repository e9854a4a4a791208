"""Where the CPU time of one sampling run goes, and what each execution path buys (one run, interleaved).

    python benchmarks/bench_cpu_paths.py [--batch 8 32] [--out benchmarks/results/cpu-paths.json]

For the shipped default model it times, side by side in one process (warm-up, then interleaved rounds,
medians), one U-Net call and one decode at each batch size along these paths:

* ``eager_fp32``      the reference (``training.reference_sample`` runs exactly this)
* ``frozen_cl_fp32``  channels-last ``torch.jit.freeze`` (the ``cpu`` backend's decoder; its U-Net until 2026-11)
* ``ort_fp32``        the ``onnxruntime`` backend's U-Net session (U-Net only)
* ``eager_cl_bf16``   channels-last bf16 eager (what plain PyTorch gives at bf16)
* ``fused_cl_fp32`` / ``fused_cl_bf16``  the ``cpu`` backend's U-Net (``FusedCPUUNet``: fused C++ norm and
  attention kernels; oneDNN convolutions in fp32, the C++ AVX512-BF16 direct convolution in bf16)
* ``inductor_fp32`` / ``inductor_cl_bf16``  ``torch.compile`` with freezing (``--inductor``; compiling
  takes ~40 s per graph on 2 cores)

and reports the FLOPs per image (``torch.utils.flop_counter``) with the achieved GFLOP/s, plus relative
L2 error against the reference. The numbers explain the engine's ceiling on this CPU: see the README's
Benchmarks section.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc, torch.no_grad():
        fn()
    return float(fc.get_total_flops())


def _interleaved(fns: dict, rounds: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():
        f()
        f()
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


class _Decode(torch.nn.Module):
    def __init__(self, vq) -> None:
        super().__init__()
        self.vq = vq

    def forward(self, idx):
        return self.vq.decode_indices(idx)


def _frozen(module, args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.freeze(torch.jit.trace(module.eval(), args, check_trace=False).eval())


def run(batches: list[int], rounds: int, inductor: bool) -> dict:
    from retina_fast.bench import machine
    from retina_fast.modelzoo import load_ldm

    ldm = load_ldm("default")
    unet, vq = ldm.unet.eval(), ldm.vqgan.eval()
    c, h, w = ldm.config.latent_shape
    rows = []
    unet_cl = copy.deepcopy(unet).to(memory_format=torch.channels_last)
    unet_bf = copy.deepcopy(unet).to(torch.bfloat16).to(memory_format=torch.channels_last)
    vq_cl = copy.deepcopy(vq).to(memory_format=torch.channels_last)
    vq_bf = copy.deepcopy(vq).to(torch.bfloat16).to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(0)
    for b in batches:
        x = torch.randn(b, c, h, w, generator=gen)
        t = torch.randint(0, 1000, (b,), generator=gen)
        idx = torch.randint(0, vq.config.codebook_size, (b, h, w), generator=gen)
        xc, xb = x.contiguous(memory_format=torch.channels_last), None
        xb = xc.to(torch.bfloat16)
        with torch.no_grad():
            unet_fns = {"eager_fp32": lambda: unet(x, t)}
            fz = _frozen(unet_cl, (xc, t))
            unet_fns["frozen_cl_fp32"] = lambda: fz(xc, t)
            try:
                from retina_fast.backends.onnxruntime_backend import cached_onnx, onnxruntime_session

                sess = onnxruntime_session(cached_onnx(unet, "unet", (c, h, w)), threads=torch.get_num_threads())
                feed = {"x": x.numpy(), "t": t.numpy()}
                unet_fns["ort_fp32"] = lambda: torch.from_numpy(sess.run(["eps"], feed)[0])
            except ImportError as e:
                print(f"onnxruntime path skipped: {e}", file=sys.stderr)
            unet_fns["eager_cl_bf16"] = lambda: unet_bf(xb, t)
            from retina_fast.backends.cpu_unet import FusedCPUUNet

            f32, fbf = FusedCPUUNet(unet, torch.float32), FusedCPUUNet(unet, torch.bfloat16)
            unet_fns["fused_cl_fp32"] = lambda: f32(x, t)
            unet_fns["fused_cl_bf16"] = lambda: fbf(x, t)
            dec_fns = {"eager_fp32": lambda: vq.decode_indices(idx)}
            fd = _frozen(_Decode(vq_cl), (idx,))
            dec_fns["frozen_cl_fp32"] = lambda: fd(idx)
            dec_fns["eager_cl_bf16"] = lambda: vq_bf.decode_indices(idx)
            if inductor:
                import torch._inductor.config as icfg

                icfg.freezing = True
                cu32 = torch.compile(copy.deepcopy(unet), dynamic=False)
                cubf = torch.compile(copy.deepcopy(unet_bf), dynamic=False)
                unet_fns["inductor_fp32"] = lambda: cu32(x, t)
                unet_fns["inductor_cl_bf16"] = lambda: cubf(xb, t)
            for part, fns, flops in (("unet", unet_fns, _flops(lambda: unet(x, t))),
                                     ("decode", dec_fns, _flops(lambda: vq.decode_indices(idx)))):
                ref = next(iter(fns.values()))().float()
                errs = {k: float((f().float() - ref).norm() / ref.norm()) for k, f in fns.items()}
                med = _interleaved(fns, rounds)
                for k in fns:
                    rows.append({"part": part, "batch": b, "path": k, "median_ms": med[k] * 1e3,
                                 "speedup_vs_eager_fp32": med["eager_fp32"] / med[k],
                                 "gflop_per_s": flops / med[k] / 1e9, "gflop_per_call": flops / 1e9,
                                 "relative_l2_error": errs[k]})
    return {"model": "default", "rounds": rounds, "machine": machine(), "threads": torch.get_num_threads(),
            "rows": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, nargs="+", default=[8, 32])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--inductor", action="store_true", help="also time torch.compile (slow to compile)")
    p.add_argument("--out", type=Path, help="write the result as JSON here")
    a = p.parse_args(argv)
    res = run(a.batch, a.rounds, a.inductor)
    print(f"{res['machine']['platform']}, {res['threads']} threads, load {res['machine']['load_avg_1min']}")
    print("| part | batch | path | median ms | speed-up | GFLOP/s | rel. L2 |")
    print("|---|---|---|---|---|---|---|")
    for r in res["rows"]:
        print(f"| {r['part']} | {r['batch']} | {r['path']} | {r['median_ms']:.2f} | {r['speedup_vs_eager_fp32']:.2f}x "
              f"| {r['gflop_per_s']:.0f} | {r['relative_l2_error']:.1e} |")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
