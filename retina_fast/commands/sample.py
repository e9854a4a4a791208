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
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm", "dpmpp_2m"])
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    p.add_argument("--model", default="default", help="packaged model name or checkpoint directory")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--format", default="npy", choices=["npy", "tiff", "h5"])
    p.add_argument("--backend", default="auto")
    p.add_argument("--dtype", default="auto", choices=list(DTYPES))
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--shard-size", type=int, default=64, help="images per shard file")
    p.add_argument("--resume", action="store_true", help="finish an interrupted run in --out")
    p.add_argument("--preview", action="store_true", help="write preview.png of the first images")
    p.add_argument("-q", "--quiet", "--no-progress", dest="quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _config_sha(path: Path) -> str:
    return hashlib.sha256((path / "config.json").read_bytes()).hexdigest()


def run(args) -> int:
    import torch
    from tqdm import tqdm

    from retina_fast import _env, backends, engine, shards
    from retina_fast.cli import UserError
    from retina_fast.modelzoo import resolve_model

    if args.n < 1 or args.steps < 1 or args.shard_size < 1:
        raise UserError("--n, --steps and --shard-size must be positive")
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
    pipe = engine.load(str(model_dir))
    dtype = getattr(torch, DTYPES[args.dtype]) if DTYPES[args.dtype] else None
    try:
        runner = pipe.runner(args.backend, device, dtype)
    except backends.BackendUnavailable as exc:
        raise UserError(str(exc)) from None
    spec = shards.RunSpec(
        model=str(model_dir), model_sha256=_config_sha(model_dir), seed=args.seed, n=args.n, steps=args.steps,
        sampler=args.sampler, eta=args.eta, backend=runner.backend, dtype=str(runner.dtype).replace("torch.", ""),
        shard_size=args.shard_size, format=args.format, wavelengths=tuple(float(w) for w in pipe.wavelengths))
    out = Path(args.out)
    # Rank 0 alone checks (or creates) the run directory, then tells the others; they only verify that
    # the run.json it wrote matches their settings. (Checking concurrently was a race: a rank that looked
    # after rank 0 had written run.json saw "already holds a run".)
    error = None
    if rank == 0:
        try:
            shards.prepare_run(out, spec, resume=args.resume, rank=0)
        except shards.RunMismatch as exc:
            error = str(exc)
    if world > 1:
        status = [error]
        dist.broadcast_object_list(status, src=0)
        error = status[0]
        if error is None and rank != 0:
            try:
                shards.prepare_run(out, spec, resume=True, rank=rank)
            except shards.RunMismatch as exc:
                error = f"rank {rank}: {exc}"
    if error is not None:
        raise UserError(error)
    todo = shards.pending_images(out, spec, rank, world)
    bar = tqdm(total=todo, unit="img", desc=f"sample r{rank}" if world > 1 else "sample",
               disable=args.quiet, dynamic_ncols=True)

    def produce(first: int, count: int):
        return pipe.sample(count, args.steps, seed=args.seed, sampler=args.sampler, eta=args.eta,
                           backend=args.backend, device=device, dtype=dtype, batch_size=args.batch_size,
                           first_index=first, progress=bar.update).numpy()

    written = shards.run_shards(out, spec, produce, rank=rank, world=world)
    bar.close()
    if world > 1:
        dist.barrier()
    if rank == 0:
        manifest = shards.write_manifest(out, spec)
        if args.preview:
            from retina_fast.preview import contact_sheet

            first = shards.read_shard(spec.shard_path(out, 0))[:4]
            contact_sheet(first, spec.wavelengths, path=out / "preview.png",
                          titles=[f"image {i}" for i in range(len(first))])
        print(f"{spec.n} images in {len(spec.shards())} shards -> {manifest} "
              f"({len(written)} shards written by rank 0 in this call)")
    if world > 1:
        dist.destroy_process_group()
    return 0
