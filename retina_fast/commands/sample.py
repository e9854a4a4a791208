"""``retina-fast sample``: a production sampling run — shards, manifest, --resume, torchrun ranks."""
from __future__ import annotations

import hashlib
from pathlib import Path

DTYPES = {"auto": None, "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def add_parser(sub) -> None:
    p = sub.add_parser("sample", help="draw synthetic 16-band cubes into shards with a manifest",
                       description="Draw N images with the latent diffusion model. Image i depends only on "
                                   "(seed, i): runs split over torchrun ranks or resumed give the same set.")
    p.add_argument("--num-images", "--n", dest="n", type=int, required=True,
                   help="number of images (under torchrun write --num-images: torchrun takes --n as its own)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps")
    p.add_argument("--seed", type=int, default=0, help="image i depends only on (seed, i)")
    p.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm", "dpmpp_2m"], help="sampling method")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    p.add_argument("--spacing", default=None, choices=["linspace", "trimmed", "logsnr"],
                   help="timestep spacing (default: the sampler's own: trimmed for ddim / ddpm, logsnr for "
                        "dpmpp_2m; linspace gives the DDIM / DDPM images of versions before 2026-12-04); recorded "
                        "in run.json and kept on --resume")
    p.add_argument("--model", default="default", help="packaged model name or checkpoint directory")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--format", default="npy", choices=["npy", "tiff", "h5"], help="shard file format")
    p.add_argument("--backend", default="auto", help="auto, torch, cpu, onnxruntime or cuda")
    p.add_argument("--dtype", default="auto", choices=list(DTYPES), help="compute precision (auto: the backend's best)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per batch (default: automatic); recorded in run.json and kept on --resume where "
                        "the backend's images depend on the batch size")
    p.add_argument("--shard-size", type=int, default=64, help="images per shard file")
    p.add_argument("--resume", action="store_true", help="finish an interrupted run in --out")
    p.add_argument("--preview", action="store_true", help="write preview.png of the first images")
    p.add_argument("-q", "--quiet", "--no-progress", dest="quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _config_sha(path: Path) -> str:
    return hashlib.sha256((path / "config.json").read_bytes()).hexdigest()


def _check_args(args) -> None:
    import math

    from retina_fast.errors import UserError

    if args.n < 1 or args.steps < 1 or args.shard_size < 1:
        raise UserError("--n, --steps and --shard-size must be positive")
    if not math.isfinite(args.eta) or args.eta < 0:
        raise UserError(f"--eta must be a finite number >= 0, got {args.eta}")
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not -(2**63) <= args.seed < 2**64:
        raise UserError(f"--seed must be a 64-bit integer, got {args.seed}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    if args.format != "npy":
        import importlib.util

        needs = {"tiff": "tifffile", "h5": "h5py"}[args.format]
        if importlib.util.find_spec(needs) is None:
            raise UserError(f"--format {args.format} needs the optional package '{needs}' (pip install {needs})")


def run(args) -> int:
    _check_args(args)
    import torch
    from tqdm import tqdm

    from retina_fast import _env, backends, engine, samplers, shards
    from retina_fast.checkpoint import CheckpointError
    from retina_fast.errors import UserError
    from retina_fast.modelzoo import resolve_model

    rank, world = _env.dist_env()
    device = None
    if world > 1:
        import torch.distributed as dist

        use_cuda = torch.backends.cuda.is_built() and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(_env.local_rank())
            device = f"cuda:{_env.local_rank()}"
        dist.init_process_group("nccl" if use_cuda else "gloo")
    model_dir = resolve_model(args.model)
    try:
        pipe = engine.load(str(model_dir))
    except CheckpointError as exc:
        raise UserError(str(exc)) from None
    dtype = getattr(torch, DTYPES[args.dtype]) if DTYPES[args.dtype] else None
    try:
        spacing = samplers.resolve_spacing(args.sampler, args.spacing)
        samplers.plan(args.sampler, pipe.loaded.schedule, args.steps, eta=args.eta, spacing=spacing)  # e.g. --steps above T
        runner = pipe.runner(args.backend, device, dtype)
    except (backends.BackendUnavailable, ValueError) as exc:
        raise UserError(str(exc)) from None
    out = Path(args.out)

    def make_spec(batch_size, convolutions):
        return shards.RunSpec(
            model=str(model_dir), model_sha256=_config_sha(model_dir), seed=args.seed, n=args.n, steps=args.steps,
            sampler=args.sampler, eta=args.eta, spacing=spacing, backend=runner.backend,
            dtype=str(runner.dtype).replace("torch.", ""), shard_size=args.shard_size, format=args.format,
            wavelengths=tuple(float(w) for w in pipe.wavelengths), batch_size=batch_size,
            convolutions=convolutions)

    # Where the backend cannot promise that image i is the same in any batch, the batch size is part of
    # the run: fixed once (the automatic choice can depend on free GPU memory), recorded in run.json, and
    # taken from there on --resume and by the other torchrun ranks when --batch-size is not given.
    # Rank 0 alone checks (or creates) the run directory, then tells the others; they only verify that
    # the run.json it wrote matches their settings. (Checking concurrently was a race: a rank that looked
    # after rank 0 had written run.json saw "already holds a run".)
    # The cpu backend measures its convolution libraries for the run's batch size: the run records them, a
    # resumed run and the other ranks take rank 0's record (runs written before the field keep null).
    error, batch, record, convs = None, args.batch_size, None, getattr(runner, "convolutions", None)
    if rank == 0:
        try:
            existing = shards.load_spec(out) if args.resume and out.is_dir() else None
            if existing is not None and existing.spacing is None:
                existing = _record_legacy_spacing(out, existing, args.spacing)
            # the batch this run would use; recorded below only where the runner is not batch invariant
            planned = batch or (existing.batch_size if existing else None) or engine.auto_batch_size(
                runner, min(args.n, args.shard_size))
            if convs is not None:
                # a new run: the runner's own choice, measured for the run's batch (an earlier --resume in this
                # process may have pinned it: a fresh choice is made here); a cpu run written before the field
                # existed ran the direct kernels (this CPU has them: the runner has a fused U-Net)
                if existing is None:
                    runner.unpin()
                    convs = runner.prepare(min(planned, args.n, args.shard_size))
                else:
                    convs = existing.convolutions
                runner.use_convolutions(shards.convolutions_by_part(convs))
            invariant = bool(getattr(runner, "batch_invariant", False))
            if not invariant:
                if batch is None:
                    batch = planned
                # a run.json written before the batch size was recorded (null) is resumed as it was written
                legacy = existing is not None and existing.batch_size is None and args.batch_size is None
                record = None if legacy else batch
            shards.prepare_run(out, make_spec(record, convs), resume=args.resume, rank=0)
        except (shards.RunError, OSError) as exc:
            error = str(exc) if isinstance(exc, shards.RunError) else _os_error(exc)
    if world > 1:
        status = [error, batch, record, convs]
        dist.broadcast_object_list(status, src=0)
        error, record, convs = status[0], status[2], status[3]
        if rank != 0 and convs is not None and getattr(runner, "convolutions", None) is not None:
            runner.use_convolutions(shards.convolutions_by_part(convs))  # every rank computes as rank 0 does
        if args.batch_size is None:
            batch = status[1]
        if error is None and rank != 0:
            try:
                shards.prepare_run(out, make_spec(record, convs), resume=True, rank=rank)
            except shards.RunError as exc:
                error = f"rank {rank}: {exc}"
    if error is not None:
        raise UserError(error)
    spec = make_spec(record, convs)
    todo = shards.pending_images(out, spec, rank, world)
    bar = tqdm(total=todo, unit="img", desc=f"sample r{rank}" if world > 1 else "sample",
               disable=args.quiet, dynamic_ncols=True)

    def produce(first: int, count: int):
        return pipe.sample(count, args.steps, seed=args.seed, sampler=args.sampler, eta=args.eta, spacing=spacing,
                           backend=args.backend, device=device, dtype=dtype, batch_size=batch,
                           first_index=first, progress=bar.update).numpy()

    written = shards.run_shards(out, spec, produce, rank=rank, world=world)
    bar.close()
    if world > 1:
        dist.barrier()
    if rank == 0:
        manifest = shards.write_manifest(out, spec)
        if args.preview:
            from retina_fast.files import atomic_path
            from retina_fast.preview import contact_sheet

            first = shards.read_shard(spec.shard_path(out, 0))[:4]
            with atomic_path(out / "preview.png") as tmp:
                contact_sheet(first, spec.wavelengths, path=tmp, titles=[f"image {i}" for i in range(len(first))])
        print(f"{spec.n} images in {len(spec.shards())} shards -> {manifest} "
              f"({len(written)} shards written by rank 0 in this call)")
    if world > 1:
        dist.destroy_process_group()
    return 0


def _record_legacy_spacing(out: Path, existing, given: str | None):
    """A run.json written before the spacing was recorded: its images used DDIM / DDPM from t = T - 1
    ("linspace") if written before 2026-12-04, from t = 989 ("trimmed") after, and nothing in the directory
    says which, so the user must; the answer is written into run.json (the --resume check then holds)."""
    import dataclasses

    from retina_fast.files import atomic_write
    from retina_fast.shards import RunError, spec_json

    if given is None:
        raise RunError(f"{out / 'run.json'} was written before retina-fast recorded the timestep spacing; resume "
                       f"with --spacing linspace if the run was started before 2026-12-04 (DDIM / DDPM from "
                       f"t = T - 1), --spacing trimmed if after (for dpmpp_2m: --spacing logsnr)")
    existing = dataclasses.replace(existing, spacing=given)
    atomic_write(out / "run.json", spec_json(existing))
    return existing


def _os_error(exc: OSError) -> str:
    from retina_fast.cli import os_error_text

    return os_error_text(exc)
