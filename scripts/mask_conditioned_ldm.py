"""Two stages for the vessel tree: a latent diffusion model conditioned on a vessel mask, the mask drawn first.

    python scripts/mask_conditioned_ldm.py train --out runs/maskcond [--steps 3000] [--threads 1]
    python scripts/mask_conditioned_ldm.py sample --out runs/maskcond --masks runs/maskdiff32 [--n 256]
    python scripts/mask_conditioned_ldm.py probe --out runs/maskcond [--n 16]

A prototype of the two-stage design of vessel-mask-conditioned fundus synthesis (e.g. "Generation of
Structurally Realistic Retinal Fundus Images with Diffusion Models": artery / vein masks first, the image
conditioned on them), on the shipped model's VQ-GAN and latent scaling, to measure whether it gives samples
a vessel tree where every unconditional LDM so far gave a crackle (docs/recipe_study).

``train``: the shipped LDM recipe (U-Net preset ``tiny``, L2 on eps balanced over noise levels, vessel weight
5, lr 8e-4, batch 32, EMA 0.995 from step 200, bf16 autocast, grad clip 1) with one change: the U-Net also
sees the eye's artery + vein mask at the latent grid, scaled to [-1, 1] -- ``--cond pooled``: the fraction of
each 4 x 4 patch, one channel; ``--cond full``: the 128-px mask as 16 channels (``condition``); the loss is on
the eight latent channels. Phantom eyes 0..1023 at 128 px, as shipped.

``sample``: masks from ``scripts/mask_diffusion.py``'s model (stage 1, DDIM-50, seed 0) or held-out eyes'
own masks (``--masks real``), then DDIM-50 of stage 2 with the mask fixed, decoded by the shipped VQ-GAN;
``retina_fast.metrics.vessel_tree_length`` at 555 nm (as ``scripts/tree_lengths.py``). Writes
``OUT/samples_<masks>.json``, ``OUT/samples_<masks>.png`` (555 nm of 8 draws over their masks) and the first
``--save`` cubes as ``OUT/cubes_<masks>/sample_*.npz`` (for ``retina-fast evaluate``).

``probe``: whether stage 2 uses the mask at all -- its x0 estimate from noised held-out latents with the eye's
own mask, with none and with another eye's (``probe`` below).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

BAND_555 = 5
IMAGES = 1024
SIDE = 128


def shipped():
    import retina_fast

    return retina_fast.load("default")


def training_set(pipe, images: int = IMAGES) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled, clamped latents (N, 8, 32, 32) of phantom eyes 0..1023 as the shipped LDM saw them, and
    their vessel fractions (N, 1, 32, 32)."""
    from retina_fast.data import PhantomDataset
    from retina_fast.models.normalisation import reflectance_to_model

    from mask_diffusion import pooled_masks

    vq = pipe.loaded.vqgan.eval()
    ds = PhantomDataset(images, SIDE, wavelengths=vq.config.wavelengths, out_range=None)
    raw = []
    with torch.no_grad():
        for first in range(0, images, 32):
            r = torch.stack([ds[i] for i in range(first, min(first + 32, images))]).float()
            raw.append(vq.encode(reflectance_to_model(r, vq.config)).float())
    z = pipe.loaded.unet_latents(torch.cat(raw))
    frac, _ = pooled_masks(range(images), z.shape[-1])
    return z, frac


def condition(seeds, side: int, res: str, frac: torch.Tensor | None = None) -> torch.Tensor:
    """The U-Net's extra input, in [-1, 1]: ``pooled`` -- the vessel fraction of each latent pixel's patch
    (N, 1, side, side); ``full`` -- the 128-px mask itself, each latent pixel's f x f patch as f² channels
    (``pixel_unshuffle``: (N, f², side, side)), so the condition says where in the patch a vessel runs."""
    from mask_diffusion import pooled_masks

    if res == "pooled":
        return (frac if frac is not None else pooled_masks(seeds, side)[0]) * 2 - 1
    full, _ = pooled_masks(seeds, SIDE)
    return F.pixel_unshuffle(full, SIDE // side) * 2 - 1


def unet_for(pipe, cond_channels: int = 1):
    from retina_fast.models import UNet2D

    cfg = dataclasses.replace(pipe.config.unet, in_channels=pipe.config.unet.in_channels + cond_channels)
    return UNet2D(cfg)


def train(a) -> int:
    from retina_fast.training.train_ldm import _entry_weights

    from mask_diffusion import train_eps

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = shipped()
    z, frac = training_set(pipe, a.images)
    cond = condition(range(a.images), z.shape[-1], a.cond, frac)
    torch.manual_seed(a.seed)
    save = lambda m, step: torch.save({"ema": m.state_dict(), "step": step, "cond": a.cond},  # noqa: E731
                                      out / "ema.pt")
    _, log = train_eps(unet_for(pipe, cond.shape[1]), z, pipe.loaded.schedule, steps=a.steps, batch=a.batch,
                       lr=a.lr, seed=a.seed, cond=cond, weights=_entry_weights(frac, a.vessel_weight), save=save)
    (out / "train.json").write_text(json.dumps({"command": _command(a), "log": log}, indent=1))
    return 0


@torch.no_grad()
def sample(a) -> int:
    from retina_fast.backends.runners import Runner
    from retina_fast.metrics import vessel_tree_length
    from retina_fast.models import UNet2D
    from retina_fast.models.config import get_preset
    from retina_fast.modelzoo import schedule_for
    from retina_fast.samplers import plan
    from retina_fast.samplers import sample as run_loop

    from mask_diffusion import draw, pooled_masks

    out = Path(a.out)
    pipe = shipped()
    side = pipe.config.latent_shape[-1]
    state = torch.load(out / "ema.pt")
    cond_res = state.get("cond", "pooled")
    if a.masks == "real":
        frac, _ = pooled_masks(range(100000, 100000 + a.n), side)
        cond = condition(range(100000, 100000 + a.n), side, cond_res, frac)
        label = "real"
    elif cond_res != "pooled":
        print(f"{out}: conditioned on full-resolution masks; stage 1 draws pooled ones: use --masks real",
              file=sys.stderr)
        return 2
    else:
        mcfg = dataclasses.replace(get_preset("tiny").unet, in_channels=1)
        mask_unet = UNet2D(mcfg)
        mask_unet.load_state_dict(torch.load(Path(a.masks) / "ema.pt"))
        frac = draw(mask_unet, schedule_for(get_preset("tiny")), a.n, side, 50, a.seed).clamp(0, 1)
        cond = frac * 2 - 1
        label = "drawn"
    unet = unet_for(pipe, cond.shape[1])
    unet.load_state_dict(state["ema"])
    unet.eval()
    coefs = plan("ddim", pipe.loaded.schedule, 50)
    runner = Runner(pipe.loaded, torch.device("cpu"), torch.float32)
    g = torch.Generator().manual_seed(a.seed + 1)
    cubes = []
    for first in range(0, a.n, 32):
        m = cond[first:first + 32]
        x = torch.randn(len(m), *pipe.config.latent_shape, generator=g)
        c = x.shape[1]
        z0 = run_loop(lambda v, t: unet(torch.cat([v, m], 1), t)[:, :c], x, coefs)
        cubes.append(runner.decode(z0.clamp(-1, 1)))
    cubes = torch.cat(cubes)
    t = vessel_tree_length(cubes, BAND_555).numpy()
    res = {"command": _command(a), "cond": cond_res, "masks": label, "n": int(t.size), "mean": float(t.mean()),
           "median": float(np.median(t)), "p90": float(np.percentile(t, 90)), "no_tree": int((t == 0).sum())}
    if a.save:  # for retina-fast evaluate --synthetic OUT/cubes_<masks>
        from retina_fast.io import save_cube

        (out / f"cubes_{label}").mkdir(exist_ok=True)
        for i, cube in enumerate(cubes[:a.save]):
            save_cube(out / f"cubes_{label}" / f"sample_{i:04d}.npz", cube, pipe.wavelengths)
    (out / f"samples_{label}.json").write_text(json.dumps(res, indent=1))
    _figure(cubes[:8], frac[:8], out / f"samples_{label}.png")
    print(json.dumps(res, indent=1))
    return 0


@torch.no_grad()
def probe(a) -> int:
    """How much stage 2 uses its condition: held-out eyes' latents noised to t, the U-Net's x0 estimate with
    the eye's own mask, with no vessels (all -1) and with another eye's mask, and the shipped unconditional
    U-Net's on the same noised latents; mean squared error against the clean latents. Prints one row per t
    and writes OUT/probe.json."""
    from retina_fast.data import PhantomDataset
    from retina_fast.models.normalisation import reflectance_to_model

    out = Path(a.out)
    pipe = shipped()
    vq = pipe.loaded.vqgan.eval()
    seeds = range(100000, 100000 + a.n)
    ds = PhantomDataset(a.n, SIDE, base_seed=100000, wavelengths=vq.config.wavelengths, out_range=None)
    r = torch.stack([ds[i] for i in range(a.n)]).float()
    z0 = pipe.loaded.unet_latents(vq.encode(reflectance_to_model(r, vq.config)).float())
    state = torch.load(out / "ema.pt")
    cond = condition(seeds, z0.shape[-1], state.get("cond", "pooled"))
    unet = unet_for(pipe, cond.shape[1])
    unet.load_state_dict(state["ema"])
    unet.eval()
    abar = pipe.loaded.schedule.alphas_cumprod.float()
    g = torch.Generator().manual_seed(a.seed)
    rows = []
    for t in (600, 300, 100):
        ab = abar[t]
        zt = ab.sqrt() * z0 + (1 - ab).sqrt() * torch.randn(z0.shape, generator=g)
        row = {"t": t}
        for name, c in (("own mask", cond), ("no vessels", -torch.ones_like(cond)),
                        ("another eye's mask", torch.roll(cond, 1, 0))):
            eps = unet(torch.cat([zt, c], 1), torch.full((a.n,), t))[:, :z0.shape[1]]
            x0 = ((zt - (1 - ab).sqrt() * eps) / ab.sqrt()).clamp(-1, 1)
            row[name] = float((x0 - z0).square().mean())
        x0 = ((zt - (1 - ab).sqrt() * pipe.loaded.unet(zt, torch.full((a.n,), t))) / ab.sqrt()).clamp(-1, 1)
        row["shipped U-Net (no mask input)"] = float((x0 - z0).square().mean())
        rows.append(row)
        print("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    (out / "probe.json").write_text(json.dumps({"command": _command(a), "eyes": a.n, "rows": rows}, indent=1))
    return 0


def _figure(cubes: torch.Tensor, frac: torch.Tensor, path: Path) -> None:
    from PIL import Image

    band = cubes[:, BAND_555]
    band = band / band.flatten(1).quantile(0.99, dim=1).clamp_min(1e-6).view(-1, 1, 1)
    masks = 1 - F.interpolate(frac.float(), size=band.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    img = torch.cat([torch.cat(list(band.clamp(0, 1)), 1), torch.cat(list(masks.clamp(0, 1)), 1)], 0)
    Image.fromarray((255 * img).round().byte().numpy()).save(path)


def _command(a) -> str:
    return "python scripts/mask_conditioned_ldm.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" if k != "what" else v for k, v in vars(a).items())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["train", "sample", "probe"])
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=8e-4)
    p.add_argument("--vessel-weight", type=float, default=5.0)
    p.add_argument("--cond", default="pooled", choices=["pooled", "full"],
                   help="train: the mask as each latent pixel's vessel fraction, or at full resolution")
    p.add_argument("--masks", default="real", help="'real' (held-out eyes' masks) or a mask_diffusion.py run")
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--images", type=int, default=IMAGES, help="training eyes 0..images-1")
    p.add_argument("--save", type=int, default=64, help="sample: the first SAVE cubes into OUT/cubes_<masks>/")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    return {"train": train, "sample": sample, "probe": probe}[a.what](a)


if __name__ == "__main__":
    raise SystemExit(main())
