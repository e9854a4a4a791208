"""``retina-fast bench``: contenders against the reference, side by side in one run.

``--part sample`` (default) times whole sampling runs against ``training.reference_sample`` (or, with
``--preset``, against the ``torch`` backend on random weights); ``--part step`` times one U-Net call and
one decode at batch ``--n`` (paper-size models, where a whole 50-step run per contender and round takes
minutes on a CPU) and reports achieved GFLOP/s and the implied seconds per sampled image.
"""
from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="speed-up table: backends (and torch.compile) vs the reference, one run")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default="default", help="packaged name or checkpoint directory")
    src.add_argument("--preset", default=None,
                     help="random weights of a preset or sweep configuration instead (paper-224, paper-672, "
                          "sweep-f8-c8-b512, ...): speed does not depend on the weight values")
    p.add_argument("--part", default="sample", choices=["sample", "step"],
                   help="sample: whole sampling runs; step: one U-Net call + one decode at batch --n")
    p.add_argument("--num-images", "--n", dest="n", type=int, default=8, help="images (sample) or batch size (step)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (step: used for s/image)")
    p.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm", "dpmpp_2m"], help="sampling method")
    p.add_argument("--backends", default="cpu",
                   help="comma-separated contenders NAME[:DTYPE]: a backend (cpu, cpu:bf16, onnxruntime, cuda; "
                        "cpu@direct / cpu@onednn pin the cpu backend's convolution library, cuda@nchw / "
                        "cuda@nhwc the cuda backend's layout), "
                        "plain:DTYPE (eager PyTorch at DTYPE; plain-bf16), compile[:DTYPE] (torch.compile)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="precision of backends named without one")
    p.add_argument("--repeats", type=int, default=3, help="interleaved timed rounds")
    p.add_argument("--device", default=None, help="cpu or cuda (default: the backends' own)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend for compile rows")
    p.add_argument("--json", default=None, help="also write the result as JSON here")
    p.set_defaults(func=run)


def run(args) -> int:
    from retina_fast import backends
    from retina_fast.errors import UserError

    try:
        return _run(args)
    except backends.BackendUnavailable as exc:  # e.g. cuda contenders on a CPU-only machine: one line, exit 2
        raise UserError(str(exc)) from None


def _run(args) -> int:
    import torch

    from retina_fast import bench

    if args.n < 1 or args.steps < 1 or args.repeats < 1:
        raise ValueError("--n, --steps and --repeats must be >= 1")
    dtype = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    specs = tuple(b for b in args.backends.split(",") if b)
    for spec in specs:
        bench.parse_spec(spec)  # unknown names / dtypes fail before any model is built
    if args.preset:
        from retina_fast.models.config import get_preset

        try:
            get_preset(args.preset)
        except KeyError as exc:
            raise ValueError(exc.args[0]) from None
    if args.part == "step":
        pipe = bench.random_pipeline(args.preset, args.device) if args.preset else _loaded(args.model)
        result = bench.step_speedups(pipe, args.n, specs, args.repeats, args.device,
                                     compile_backend=args.compile_backend, steps=args.steps)
        print(bench.format_step_table([result]))
    elif args.preset:
        pipe = bench.random_pipeline(args.preset, args.device)
        result = bench.sampling_speedups(n=args.n, steps=args.steps, sampler=args.sampler, backends=specs,
                                         dtype=dtype, repeats=args.repeats, pipe=pipe, device=args.device,
                                         compile_backend=args.compile_backend)
        print(bench.format_table(result))
    else:
        from retina_fast.modelzoo import load_ldm
        from retina_fast.training import reference_sample

        ldm = load_ldm(args.model)  # loaded once, like the engine's pipeline: timing excludes loading

        def reference(n, steps, seed, sampler):
            return reference_sample(n, steps, seed=seed, sampler=sampler, model=ldm)

        result = bench.sampling_speedups(args.model, args.n, args.steps, args.sampler, specs, dtype,
                                         args.repeats, reference=reference, compile_backend=args.compile_backend)
        print(bench.format_table(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)
    return 0


def _loaded(model: str):
    from retina_fast import engine

    return engine.load(model)
