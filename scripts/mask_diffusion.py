"""Can the tiny U-Net draw a vessel *tree* at the latent grid at all? A diagnostic for the missing arcades.

    python scripts/mask_diffusion.py --out runs/maskdiff [--side 32] [--steps 4500] [--threads 2]

Every LDM trained so far samples a crackle of short dark segments at 555 nm instead of the phantom's tree of
arcades leaving the optic disc, whatever its width, steps, attention, schedule or loss (docs/recipe_study).
Two explanations are left: (a) the U-Net at this budget cannot lay out a thin, long, branching structure on a
32 x 32 grid, whatever carries it; (b) it could, but not in the VQ-GAN's latents, where the tree is entangled
with the texture and spread over eight channels of codes. This script separates them: the same U-Net
(the ``tiny`` preset's, one input channel), the same schedule, loss (L2 on eps balanced over noise levels),
optimiser, learning rate, batch, EMA and number of steps as the shipped LDM, trained on the phantom's artery +
vein masks of the same 1024 training eyes, average-pooled from 128 px to ``--side`` (32 = the latent grid,
where the tree covers half the pixels). Then 256 DDIM-50 draws are measured with
``retina_fast.metrics.vessel_tree_length`` on a pseudo band (1 - 0.6 x the mask, bilinear back to 128 px,
the phantom's field of view), against the training masks and held-out masks through the same pooling.

If the mask model draws trees as long as the pooled masks' own, the grid and the budget are not the limit, and
the tree should be generated as its own channel first (a two-stage design); if it draws the same crackle, the
limit is the denoiser at this grid and budget (a GPU job). Writes ``RUN/result.json`` and ``RUN/masks.png``
(top: pooled training masks; bottom: draws; both at 128 px).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

BAND = 0          # the pseudo band carrying the vessels
FOV_SEED = 0      # the draws get this eye's field of view


def pooled_masks(seeds, side: int, size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 1, side, side) artery + vein fraction of each cell, and the (N, size, size) fields of view."""
    from retina_fast import phantom

    masks, fovs = [], []
    for s in seeds:
        m = phantom.render(int(s), size, noise=False).masks
        masks.append((m["artery"] | m["vein"]).float()[None, None])
        fovs.append(m["fov"][None])
    return F.adaptive_avg_pool2d(torch.cat(masks), side), torch.cat(fovs)


def pseudo_cubes(frac: torch.Tensor, size: int = 128) -> torch.Tensor:
    """Masks (N, 1, side, side) in [0, 1] -> (N, 4, size, size) cubes whose band 0 is 1 - 0.6 x the mask."""
    up = F.interpolate(frac.clamp(0, 1).float(), size=(size, size), mode="bilinear", align_corners=False)
    return torch.cat([1.0 - 0.6 * up, torch.ones_like(up).expand(-1, 3, -1, -1)], 1)


def tree(frac: torch.Tensor, fov: torch.Tensor) -> np.ndarray:
    from retina_fast.metrics import vessel_tree_length

    return vessel_tree_length(pseudo_cubes(frac), BAND, fov=fov).numpy()


def summary(t: np.ndarray) -> dict:
    return {"n": int(t.size), "mean": float(t.mean()), "median": float(np.median(t)),
            "p90": float(np.percentile(t, 90)), "no_tree": int((t == 0).sum())}


@torch.no_grad()
def draw(unet, schedule, n: int, side: int, steps: int, seed: int) -> torch.Tensor:
    from retina_fast.samplers import plan, sample

    g = torch.Generator().manual_seed(seed)
    out = []
    unet.eval()
    for first in range(0, n, 64):
        x = torch.randn(min(64, n - first), 1, side, side, generator=g)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z = sample(lambda a, t: unet(a, t).float(), x, plan("ddim", schedule, steps))
        out.append((z.float() + 1) / 2)
    return torch.cat(out)


def grid_png(top: torch.Tensor, bottom: torch.Tensor, path: Path) -> None:
    from PIL import Image

    def row(fr):
        up = F.interpolate(fr.clamp(0, 1), size=(128, 128), mode="bilinear", align_corners=False)
        return torch.cat([u[0] for u in up], 1)

    img = torch.cat([row(top), torch.ones(4, top.shape[0] * 128), row(bottom)], 0)
    Image.fromarray((255 * (1 - img.clamp(0, 1))).round().byte().numpy()).save(path)


def train_eps(unet, data: torch.Tensor, schedule, *, steps: int, batch: int, lr: float, seed: int,
              cond: torch.Tensor | None = None, weights: torch.Tensor | None = None, save=None) -> tuple:
    """The shipped LDM recipe's loop on ``data`` (N, C, h, w): eps prediction, L2 balanced over noise levels
    (``BinnedErrorScale``), Adam, grad clip 1, EMA 0.995 from step 200, bf16 autocast. ``cond`` (N, K, h, w):
    extra input channels (the loss is on the first C outputs); ``weights`` (N, 1, h, w): per-entry loss weights
    (mean 1 per sample). ``save(ema_module, step)`` is called every 250 steps and at the end. Returns (EMA
    module, log)."""
    from retina_fast.training.train_ldm import BinnedErrorScale
    from retina_fast.training.trainer import EMA

    abar = schedule.alphas_cumprod.float()
    ema = EMA(unet, 0.995, 200)
    balance = BinnedErrorScale(schedule.num_timesteps)
    opt = torch.optim.Adam(unet.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    c = data.shape[1]
    log, t0 = [], time.time()
    for step in range(steps):
        idx = torch.randint(0, len(data), (batch,), generator=g)
        t = torch.randint(0, schedule.num_timesteps, (batch,), generator=g)
        eps = torch.randn(batch, *data.shape[1:], generator=g)
        ab = abar[t].view(-1, 1, 1, 1)
        zt = ab.sqrt() * data[idx] + (1 - ab).sqrt() * eps
        unet.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pred = unet(zt if cond is None else torch.cat([zt, cond[idx]], 1), t)
        err = pred[:, :c].float() - eps
        loss = balance.loss(err, t, 1, None if weights is None else weights[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        ema.update(unet, step)
        if (step + 1) % 250 == 0:
            mse = float(err.detach().square().mean())
            log.append({"step": step + 1, "mse": mse, "s": round(time.time() - t0, 1)})
            print(f"step {step + 1} mse {mse:.4f} {time.time() - t0:.0f}s", flush=True)
            if save is not None:
                save(ema.module, step + 1)
    if save is not None and steps % 250:
        save(ema.module, steps)
    return ema.module, log


def main(argv=None) -> int:
    from retina_fast.models import UNet2D
    from retina_fast.models.config import get_preset
    from retina_fast.modelzoo import schedule_for

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--side", type=int, default=32)
    p.add_argument("--steps", type=int, default=4500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=8e-4)
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--draws", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(a.seed)
    t0 = time.time()

    data, _ = pooled_masks(range(a.images), a.side)
    x_all = data * 2 - 1
    cfg = get_preset("tiny")
    unet = UNet2D(dataclasses.replace(cfg.unet, in_channels=1))
    schedule = schedule_for(cfg)
    save = lambda m, step: torch.save(m.state_dict(), out / "ema.pt")  # noqa: E731  (every 250 steps: resumable use)
    ema, log = train_eps(unet, x_all, schedule, steps=a.steps, batch=a.batch, lr=a.lr, seed=a.seed, save=save)

    draws = draw(ema, schedule, a.draws, a.side, 50, a.seed)
    fov_one = pooled_masks([FOV_SEED], a.side)[1]
    train_frac, train_fov = data[:a.draws], pooled_masks(range(a.draws), a.side)[1]
    held, held_fov = pooled_masks(range(100000, 100000 + a.draws), a.side)
    res = {
        "command": "python scripts/mask_diffusion.py " + " ".join(f"--{k} {v}" for k, v in vars(a).items()),
        "side": a.side, "steps": a.steps, "train_s": round(time.time() - t0, 1), "log": log,
        "params": sum(p.numel() for p in unet.parameters()),
        "data_std": float(x_all.std()),
        "training_masks": summary(tree(train_frac, train_fov)),
        "training_masks_fov0": summary(tree(train_frac, fov_one.expand(a.draws, -1, -1))),
        "held_out_masks": summary(tree(held, held_fov)),
        "draws_fov0": summary(tree(draws, fov_one.expand(a.draws, -1, -1))),
        "draw_fraction_mean": float(draws.clamp(0, 1).mean()), "data_fraction_mean": float(data.mean()),
    }
    (out / "result.json").write_text(json.dumps(res, indent=1))
    grid_png(train_frac[:12], draws[:12], out / "masks.png")
    print(json.dumps({k: v for k, v in res.items() if k != "log"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
