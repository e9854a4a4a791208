"""``retina-fast bench``: sample with each backend against the reference sampler, in one run."""
from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="speed-up table: backends vs training.reference_sample, one run")
    p.add_argument("--model", default="default")
    p.add_argument("--num-images", "--n", dest="n", type=int, default=8, help="images per contender")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm", "dpmpp_2m"])
    p.add_argument("--backends", default="cpu",
                   help="comma-separated, e.g. cpu,cuda; name:dtype pins a dtype (cpu:fp32,cpu:bf16); plain-bf16 = eager PyTorch at bf16")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None, help="also write the result as JSON here")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from retina_fast import bench
    from retina_fast.training import reference_sample

    dtype = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]

    from retina_fast.modelzoo import load_ldm

    ldm = load_ldm(args.model)  # loaded once, like the engine's pipeline: timing excludes loading

    def reference(n, steps, seed, sampler):
        return reference_sample(n, steps, seed=seed, sampler=sampler, model=ldm)

    result = bench.sampling_speedups(args.model, args.n, args.steps, args.sampler,
                                     tuple(b for b in args.backends.split(",") if b), dtype, args.repeats,
                                     reference=reference)
    print(bench.format_table(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)
    return 0
