"""Paper-size presets on the CPU: one U-Net call and one decode per contender, side by side in one process.

    python benchmarks/bench_presets.py --out benchmarks/results/cpu-2core-presets.json        # paper-224, B = 1, 4
    python benchmarks/bench_presets.py --sweep --batch 1 --out benchmarks/results/cpu-2core-sweep.json

Random weights (speed does not depend on the weight values). For each preset and batch size B it builds
the eager fp32 reference and each contender (default: ``plain:bf16`` -- eager PyTorch at bf16, the
yardstick --, the ``cpu`` backend in fp32 and bf16, ``torch.compile`` (inductor) in fp32 and bf16 with the
U-Net and the decoder compiled: what a PyTorch user tries first), checks each against the reference once
(relative L2 of the U-Net output; bf16 rows within 2x plain bf16's error + 1e-3), then times ``--rounds``
interleaved rounds and reports medians, achieved GFLOP/s from the written FLOP count (retina_fast.flops:
paper-224 110.8 GFLOP per U-Net call and 63.8 per decode per image), the first call's time (torch.compile:
the compile) and the seconds per image a 50-step sample implies. Same code as ``retina-fast bench --part
step --preset NAME`` (retina_fast.bench.step_speedups). The JSON is rewritten after every (preset, B).

Run it on a quiet machine: every figure is a wall-clock median, and a background job skews them.
On the 2-core CPU expect ~2-4 min per compile (U-Net and decoder, per dtype and batch size) at paper size;
``--sweep`` adds the 27 configurations of the source's grid (f x latent channels x U-Net base at 224 px).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["paper-224"], help="preset or sweep names")
    p.add_argument("--sweep", action="store_true", help="add the 27 sweep-grid configurations")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--contenders", default="plain:bf16,cpu,cpu:bf16,compile,compile:bf16")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    a = p.parse_args(argv)

    from retina_fast import bench
    from retina_fast.models.config import get_preset, sweep_grid

    presets = list(a.presets) + (list(sweep_grid()) if a.sweep else [])
    for name in presets:
        get_preset(name)  # unknown names fail before hours of work
    specs = tuple(s for s in a.contenders.split(",") if s)
    for spec in specs:
        bench.parse_spec(spec)
    results = []
    for name in presets:
        pipe = bench.random_pipeline(name)
        for b in a.batch:
            res = bench.step_speedups(pipe, b, specs, a.rounds, compile_backend=a.compile_backend,
                                      log=lambda m: print(m, file=sys.stderr, flush=True))
            results.append(res)
            print(bench.format_step_table([res]), flush=True)
            if a.out:
                a.out.parent.mkdir(parents=True, exist_ok=True)
                a.out.write_text(json.dumps({"threads": torch.get_num_threads(), "results": results}, indent=2) + "\n")
        del pipe
    print()
    print(bench.format_step_table(results))
    return 0 if all(r["unet_check_passed"] for res in results for r in res["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
