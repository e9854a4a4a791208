"""Frozen TorchScript graphs against torch.compile and torch.export (AOTInductor) for the two networks the
``cpu`` backend still runs as frozen graphs: the fp32 VQ-GAN decoder (its fallback where the direct convolutions
cannot run) and the MAGE-Net enhancer. One process, warm-up, then interleaved rounds; medians.

    python benchmarks/bench_compile.py [--rounds 7] [--size 512] [--skip-export] [--out results.json]

Every contender is checked against eager fp32 before timing (max abs difference printed). Compile times are
reported separately (they are paid once per input shape).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings

import torch

from retina_fast.backends.cpu_enhance import enhance_table
from retina_fast.bench import interleaved
from retina_fast.backends.graphs import FrozenGraphs, fast_copy
from retina_fast.ops.table import use_table


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


class _Restore(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.restore(x)


class _Decode(torch.nn.Module):
    def __init__(self, vq):
        super().__init__()
        self.vq = vq

    def forward(self, zq):
        return self.vq.decode(zq)


def contenders(module: torch.nn.Module, x: torch.Tensor, table, skip_export: bool) -> tuple[dict, dict]:
    """name -> callable, and name -> one-time build seconds."""
    import torch._inductor.config as icfg

    fns, build = {"eager": lambda: module(x)}, {}
    frozen = FrozenGraphs(module, table=table, warmup=2)
    _, build["frozen_torchscript"] = _timed(lambda: frozen(x))
    fns["frozen_torchscript"] = lambda: frozen(x)
    icfg.freezing = True
    with use_table(table):
        compiled = torch.compile(module, fullgraph=False)
        _, build["torch_compile"] = _timed(lambda: compiled(x))
    fns["torch_compile"] = lambda: compiled(x)
    if not skip_export:
        try:
            with use_table(table):
                ep = torch.export.export(module, (x,))
            path, build["export_aoti"] = _timed(lambda: torch._inductor.aoti_compile_and_package(ep))
            runner = torch._inductor.aoti_load_package(path)
            fns["export_aoti"] = lambda: runner(x)
        except Exception as exc:  # recorded, not hidden: the JSON says why this contender is missing
            build["export_aoti"] = f"failed: {type(exc).__name__}: {exc}"[:300]
    return fns, build


def run(name: str, module: torch.nn.Module, x: torch.Tensor, table, rounds: int, skip_export: bool) -> dict:
    with torch.no_grad():
        ref = module.float()(x.float()) if x.dtype != torch.float32 else module(x)
        fns, build = contenders(module, x, table, skip_export)
        err = {k: float((f().float() - ref.float()).abs().max()) for k, f in fns.items()}
        med = {k: v["median_s"] for k, v in interleaved(fns, rounds).items()}
    out = {"median_s": med, "speedup_over_eager": {k: med["eager"] / v for k, v in med.items()},
           "max_abs_vs_eager_fp32": err, "build_s": build}
    print(name, json.dumps(out, indent=1), flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8, help="decoder batch")
    ap.add_argument("--skip-export", action="store_true")
    ap.add_argument("--only", choices=["decoder", "enhancer"], default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    import retina_fast
    from retina_fast.enhance import CPURunner, load_enhancer

    results = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    if args.only in (None, "decoder"):
        vq = retina_fast.load("default").loaded.vqgan
        dec = _Decode(fast_copy(vq, torch.float32, channels_last=True))
        c, h, w = vq.config.latent_channels, *retina_fast.load("default").config.latent_shape[1:]
        zq = vq.codebook.lookup(torch.randint(0, vq.config.codebook_size, (args.batch, h, w)))
        zq = zq.contiguous(memory_format=torch.channels_last)
        results["decoder_fp32"] = run("decoder fp32", dec, zq, None, args.rounds, args.skip_export)
    if args.only in (None, "enhancer"):
        net = load_enhancer("default").model
        x = torch.rand(1, 3, args.size, args.size).contiguous(memory_format=torch.channels_last)
        for dtype in (torch.float32,):  # the frozen graph serves the fp32 path (bf16 has its own fused C++ path)
            m = _Restore(CPURunner(net, torch.device("cpu"), dtype).fast)  # the runner's copy (bf16: RSP in fp32)
            results[f"enhancer_{str(dtype)[6:]}"] = run(f"enhancer {dtype}", m, x.to(dtype), enhance_table(),
                                                         args.rounds, args.skip_export)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
