"""``retina-fast train vqgan``: train the 2D VQ-GAN (autoencoder + EMA codebook) on 16-band cubes.

Per step s (global batch x, B images in model units; under DDP each rank holds B/W of them):

0. once, unless the config already has them (``--normalise band``, the default): per-band mean and std
   of the training data inside the field of view -> ``reflectance_scale`` / ``reflectance_shift``
   (``retina_fast.models.normalisation``), so x_b = (r_b - mean_b) / std_b;
1. at the start of epoch e (``BatchPlan``), once: K-Means on the encoder outputs of the first
   ``kmeans_images`` images of the epoch (``Codebook.kmeans_init``; its epoch is in the state dict, so a
   resumed run never repeats it); EMA statistics are reset to B * h * w rows per step;
2. generator step: L_G (training/losses.py: 4 L1 + SAM + commitment, and after ``gan_warmup_steps``
   hinge GAN + 4 feature matching) -> Adam (``--betas``, default 0.5, 0.9 as the source), gradient norm
   clipped (``--grad-clip``);
3. discriminator step after the warm-up: hinge loss on x and sg(x̂).

Outputs in RUN: ``log.csv`` (+ TensorBoard when installed), ``samples/step_<s>.png`` (inputs above their
reconstructions), ``checkpoints/`` (exact resume) and ``final/`` (``vqgan.safetensors`` + config.json with
``kind: "vqgan"``, the latent range and provenance) which ``train ldm --vqgan`` reads.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from retina_fast.checkpoint import model_config, save_checkpoint
from retina_fast.models import VQGAN, LDMConfig
from retina_fast.models.normalisation import model_to_reflectance, standardised
from retina_fast.training.trainer import (BatchPlan, DistInfo, MetricLogger, command_line, epoch_permutation,
                                          init_distributed, checkpoint_to_resume, load_train_state, provenance,
                                          require_finite, save_train_state, seed_everything, step_generator)
from retina_fast.training.trainer_setup import (add_common_arguments, load_data, resolve_config,
                                                resolve_options)

__all__ = ["add_arguments", "run", "DEFAULTS"]

DEFAULTS: dict[str, Any] = {
    "preset": "tiny", "config_json": None, "data": "phantom", "steps": 1000, "batch_size": 8, "lr": 3e-4,
    "seed": 0, "num_workers": 0, "num_images": 512, "device": None, "amp": "off", "grad_clip": 1.0,
    "log_every": 10, "sample_every": 250, "ckpt_every": 250, "kmeans_images": 64, "disc_norm": "batch",
    "band_weights": "none", "normalise": "band", "betas": [0.5, 0.9],
}
FIELDS = ["epoch", "loss", "l1", "sam", "commit", "gan", "fm", "d_loss", "perplexity", "grad_norm", "lr",
          "s_per_step"]
_KMEANS_STREAM = 0x4B4D


def add_arguments(p) -> None:
    add_common_arguments(p, DEFAULTS)
    p.add_argument("--kmeans-images", type=int, help="images whose encoder outputs K-Means clusters each epoch "
                   f"(default {DEFAULTS['kmeans_images']})")
    p.add_argument("--disc-norm", choices=("batch", "group", "none"),
                   help="discriminator normalisation (default batch, as the source; group is batch-size "
                        "independent)")
    p.add_argument("--betas", type=_betas, metavar="B1,B2",
                   help="Adam betas of generator and discriminator (default 0.5,0.9: the source's GAN setting)")
    p.add_argument("--normalise", choices=("band", "global"),
                   help="model units of the data: band = each band standardised with its mean and std inside "
                        "the field of view of the training data, stored in the config (default); global = the "
                        "source's 2 r - 1 for every band")
    p.add_argument("--band-weights", choices=("none", "std"),
                   help="per-band weights of the L1 term: none, or std = 1/std of each band over the training "
                        "data, normalised to mean 1 (stored in the config; default none)")


def _betas(text: str) -> list[float]:
    try:
        b = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--betas needs two numbers like 0.9,0.99, got {text!r}") from None
    if len(b) != 2 or not all(0.0 <= v < 1.0 for v in b):
        raise argparse.ArgumentTypeError(f"--betas needs two numbers in [0, 1), got {text!r}")
    return b


def run(args) -> int:
    """Entry point of the command (args from ``add_arguments``); also callable in a spawned DDP worker."""
    run_dir = Path(args.out)
    ck = checkpoint_to_resume(run_dir, args.resume)
    saved = None
    if ck is not None:
        from retina_fast.checkpoint import load_checkpoint

        saved = load_checkpoint(ck, [])[0]["options"]
    opts = resolve_options(args, DEFAULTS, saved)
    if saved is not None and "normalise" not in saved:
        opts["normalise"] = "global"  # a run started before the option: keep its 2 r - 1
    info = init_distributed(opts["device"])
    try:
        return _train(opts, info, run_dir, ck)
    finally:
        info.close()


def band_std_weights(data, max_images: int = 256) -> tuple[float, ...]:
    """1/std of each band over (up to ``max_images`` evenly spaced) training images, scaled to mean 1."""
    n = len(data)
    idx = sorted({int(i) for i in torch.linspace(0, n - 1, min(n, max_images))})
    x = torch.cat([data.get(idx[i:i + 32]) for i in range(0, len(idx), 32)])
    std = x.transpose(0, 1).reshape(x.shape[1], -1).double().std(dim=1)
    if not bool(torch.all(std > 0)):
        raise ValueError(f"--band-weights std: band(s) {torch.nonzero(std <= 0).flatten().tolist()} are constant "
                         "over the training data")
    w = 1.0 / std
    return tuple(round(float(v), 6) for v in (w / w.mean()))


def _autocast(opts: dict, device: torch.device):
    if opts["amp"] == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _train(opts: dict, info: DistInfo, run_dir: Path, ck: Path | None) -> int:
    from tqdm import tqdm

    from retina_fast.training.losses import VQGANLoss, hinge_d_loss

    cfg_all = LDMConfig.from_dict(opts["architecture"]) if "architecture" in opts else \
        resolve_config(opts["preset"], opts["config_json"])
    opts["architecture"] = cfg_all.to_dict()
    cfg, dev = cfg_all.vqgan, info.device
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(opts["seed"])
    vq = VQGAN(cfg).to(dev)
    crit = VQGANLoss(cfg, disc_norm=opts["disc_norm"]).to(dev)
    disc = crit.discriminator
    betas = tuple(opts["betas"])
    opt_g = torch.optim.Adam(vq.parameters(), lr=opts["lr"], betas=betas)
    opt_d = torch.optim.Adam(disc.parameters(), lr=opts["lr"], betas=betas)
    start = 0
    if ck is not None:
        start = load_train_state(ck, {"vqgan": vq, "disc": disc}, {"g": opt_g, "d": opt_d})["step"]
    data = load_data(opts["data"], opts["num_images"], cfg, info, run_dir, opts["num_workers"])
    if opts["normalise"] == "band" and not cfg.per_band_normalisation:
        cfg = standardised(cfg, *data.band_statistics())
    if opts["band_weights"] == "std" and cfg.band_loss_weights is None:
        data.config = cfg
        cfg = dataclasses.replace(cfg, band_loss_weights=band_std_weights(data))
    if cfg != cfg_all.vqgan:  # a resumed run reads both back from its saved architecture
        cfg_all = dataclasses.replace(cfg_all, vqgan=cfg)
        opts["architecture"] = cfg_all.to_dict()
        crit.config = vq.config = data.config = cfg
    plan = BatchPlan(len(data), opts["batch_size"], opts["seed"], info.rank, info.world)
    h = cfg.latent_size
    if opts["kmeans_images"] * h * h < cfg.codebook_size or opts["kmeans_images"] > len(data):
        raise ValueError(f"--kmeans-images {opts['kmeans_images']} must be at most the {len(data)} images and give "
                         f"at least {cfg.codebook_size} latent vectors ({h * h} per image)")
    if info.world > 1 and opts["kmeans_images"] % info.world:
        raise ValueError(f"--kmeans-images must be a multiple of the {info.world} processes")
    g_model, d_model = vq, disc
    if info.world > 1:
        ddp = nn.parallel.DistributedDataParallel
        with warnings.catch_warnings():  # torch >= 2.13 renames the flag; the old one keeps its meaning
            warnings.simplefilter("ignore", FutureWarning)
            g_model = ddp(vq, broadcast_buffers=False)  # the codebook keeps its buffers in sync itself
        d_model = ddp(disc)
    logger = MetricLogger(run_dir, FIELDS, info.is_main, resume_step=start if ck is not None else None)
    total = opts["steps"]
    bar = tqdm(total=total, initial=start, desc="train vqgan", unit="step", disable=not info.is_main)
    t_last, s_last, parts = time.time(), start, {}
    step = start
    for step, x in zip(range(start, total), data.batches(plan, start, total, opts["num_workers"])):
        epoch = plan.epoch(step)
        if vq.codebook.needs_kmeans(epoch):
            _kmeans(vq, data, plan, epoch, opts, info)
        x = x.to(dev, non_blocking=True)
        vq.train()
        disc.train()
        with _autocast(opts, dev):
            out = g_model(x)
        disc.requires_grad_(False)  # the generator step must not touch D's parameters (or DDP hooks)
        with _autocast(opts, dev):
            loss_g, parts = crit.generator_loss(x, out._replace(recon=out.recon.float()), step)
        disc.requires_grad_(True)
        require_finite(loss_g, step)
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        parts["grad_norm"] = _clip(vq, opts["grad_clip"])
        opt_g.step()
        if crit.gan_active(step):
            with _autocast(opts, dev):
                logits_real, _ = d_model(x)
                logits_fake, _ = d_model(out.recon.detach())
                loss_d = hinge_d_loss(logits_real.float(), logits_fake.float())
            require_finite(loss_d, step)
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            _clip(disc, opts["grad_clip"])
            opt_d.step()
            parts["d_loss"] = loss_d.detach()
        done = step + 1
        bar.update(1)
        if done % opts["log_every"] == 0 or done == total:
            row = _reduce({k: v for k, v in parts.items() if k != "total"} | {"loss": parts["total"]}, info)
            now = time.time()
            row.update(epoch=epoch, lr=opts["lr"], s_per_step=(now - t_last) / max(done - s_last, 1))
            t_last, s_last = now, done
            logger.log(done, row)
            bar.set_postfix(l1=f"{row['l1']:.4f}", ppl=f"{row['perplexity']:.0f}")
        if info.is_main and opts["sample_every"] and (done % opts["sample_every"] == 0 or done == total):
            _preview(vq, data, run_dir / "samples" / f"step_{done:08d}.png", dev)
        if done % opts["ckpt_every"] == 0 or done == total:
            if info.is_main:
                save_train_state(run_dir, done, {"vqgan": vq, "disc": disc}, {"g": opt_g, "d": opt_d}, opts)
            info.barrier()
    bar.close()
    logger.close()
    if info.is_main:
        cmd = command_line("vqgan", opts, ["out", *DEFAULTS])
        prov = provenance(opts, total, data.description, cmd, run_dir=run_dir, trainer="vqgan")
        config = {**model_config(cfg_all, vq.latent_range()), "kind": "vqgan"}
        save_checkpoint(run_dir / "final", {"vqgan": vq}, config, prov)
    info.barrier()
    return 0


def _clip(module: nn.Module, max_norm: float) -> torch.Tensor:
    params = [p for p in module.parameters() if p.grad is not None]
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))


def _reduce(values: dict[str, Any], info: DistInfo) -> dict[str, float]:
    """Mean of scalar values over ranks (for logging)."""
    keys = sorted(values)
    vec = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    if info.world > 1:
        import torch.distributed as dist

        dist.all_reduce(vec)
        vec /= info.world
    return dict(zip(keys, vec.tolist()))


@torch.no_grad()
def _kmeans(vq: VQGAN, data, plan: BatchPlan, epoch: int, opts: dict, info: DistInfo) -> None:
    """Cluster the encoder outputs of this epoch's first ``kmeans_images`` images (rank shards)."""
    perm = epoch_permutation(plan.n, plan.seed, epoch)[:opts["kmeans_images"]].tolist()
    per = len(perm) // info.world
    mine = perm[info.rank * per:(info.rank + 1) * per]
    vq.eval()
    zs = [vq.encode(data.get(mine[i:i + 16]).to(info.device)) for i in range(0, len(mine), 16)]
    rows_per_step = plan.global_batch * vq.config.latent_size ** 2
    vq.codebook.kmeans_init(torch.cat(zs), epoch=epoch, rows_per_step=rows_per_step,
                            generator=step_generator(plan.seed, epoch, _KMEANS_STREAM))


@torch.no_grad()
def _preview(vq: VQGAN, data, path: Path, dev: torch.device, n: int = 2) -> None:
    """Rows: input i, reconstruction i (reflectance), for the first ``n`` images of the dataset."""
    from retina_fast.preview import contact_sheet

    vq.eval()
    x = data.get(list(range(min(n, len(data))))).to(dev)
    recon = vq.decode_latent(vq.encode(x))
    rows = torch.stack([x, recon], 1).flatten(0, 1)
    cubes = model_to_reflectance(rows, vq.config).cpu()
    titles = [f"{kind} {i}" for i in range(x.shape[0]) for kind in ("input", "recon")]
    contact_sheet(cubes, vq.config.wavelengths, path=path, titles=titles)
