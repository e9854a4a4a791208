"""``retina-fast train ldm``: train the latent diffusion U-Net on the latents of a frozen VQ-GAN.

Latents: every training image is encoded once by the frozen VQ-GAN (``--vqgan``: a ``train vqgan`` run
directory or its ``final/``), continuous pre-quantisation output z, cached in ``RUN/cache/``, and scaled
by two constants (lo, hi) to z' = 2 (z - lo) / (hi - lo) - 1. (lo, hi) are the ``--latent-quantile`` q
and 1 - q quantiles of every latent entry of the training data (default q = 0.005), stored in the
checkpoint's ``latent_range``; q = 0 takes the codebook's min and max instead (runs started before the
option). Why not the codebook range: a few rarely used codes sit at |z| ~ 30 while the data's latents
have a standard deviation of ~2, so the codebook range leaves z' a standard deviation of ~0.08, and
the diffusion sees almost no signal at most noise levels (signal-to-noise ratio ~0.006 at
abar = 0.5); the quantile range gives ~0.28. Chen (2023), "On the importance of noise scheduling for
diffusion models", arXiv:2301.10972, and Rombach et al. (2022) rescale latents for the same reason.
``--latent-clip on`` (the default, and the shipped model's recipe) clamps the scaled training latents to
[-1, 1], where the samplers clamp their x0 prediction. That costs something: the optic disc's bright cup
lives in the tails, and clamping the shipped VQ-GAN's latents to the 0.5 % quantiles raises the spectral
KL inside the ONH of its reconstructions from 0.06 to 1.02 (docs/recipe_study/README.md). ``--latent-clip
off`` keeps the tails (config.json ``latent_clip`` false: the samplers do not clamp x0), but without the
clamp the eps-predicting U-Net's early x0 estimates run away: after 1000 steps its samples had no field
of view at all, where the clamped run's already showed eyes. Clamping x0 at the data's own scaled range
(about +-3.5 here) instead of +-1 is the next thing to try.
``--latent-whiten S`` (S > 0) then maps the scaled latents' channels by a fixed whitening matrix so every
channel direction has standard deviation S (``retina_fast.models.vqgan.LatentWhitening``, fitted once on the
training latents, stored in config.json ``latent_whiten``; clamped to [-1, 1] again with ``--latent-clip
on``), so that directions of low variance -- where the shipped VQ-GAN keeps the retinal vessels -- are not
resolved only in the last, low-noise steps.

Per step s with global batch z'_0 (B, C, h, w), t ~ U{0 .. T-1} and eps ~ N(0, I), both drawn for the
whole global batch from a generator seeded by (seed, s) (so neither resume nor the DDP split changes
them)::

    z'_t = sqrt(abar_t) z'_0 + sqrt(1 - abar_t) eps,    L = mean |UNet(z'_t, t) - eps|     (cosine schedule)

(``--loss l2``: the mean squared error instead. The L1 loss is the source implementation's; its minimiser is
the per-entry posterior median of eps, not the posterior mean that DDIM's update assumes -- for a sparse
structure such as a thin vessel, present at a latent entry with posterior probability below 1/2, the median
is "no vessel". Saharia et al. 2022 (Palette, arXiv:2111.05826) report that L1 trades sample diversity for
conservative outputs, L2 keeps the diversity.)

Adam, gradient norm clipping, EMA of the weights (``--ema-decay`` 0.995; a plain copy for the first
``--ema-start`` steps). Outputs in RUN: ``log.csv``, ``samples/step_<s>.png`` (EMA model, DDIM, fixed
seed), ``checkpoints/`` (exact resume) and ``final/``: a sampling checkpoint (vqgan + EMA unet,
``retina_fast.modelzoo.load_ldm`` loads it) with the latent range and provenance in config.json.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from retina_fast.checkpoint import load_checkpoint, load_state_into, model_config, save_checkpoint
from retina_fast.models import VQGAN, LDMConfig, UNet2D
from retina_fast.models.vqgan import LatentWhitening, diffusion_latents
from retina_fast.modelzoo import LoadedLDM, schedule_for
from retina_fast.schedules import MAX_LOGSNR_SHIFT, check_logsnr_shift
from retina_fast.training.trainer import (EMA, BatchPlan, DistInfo, MetricLogger, command_line, init_distributed,
                                          checkpoint_to_resume, load_train_state, provenance, save_train_state,
                                          require_finite, seed_everything, step_generator)
from retina_fast.training.trainer_setup import (DataSource, add_common_arguments, load_data, resolve_config,
                                                resolve_options)

__all__ = ["add_arguments", "run", "DEFAULTS", "load_vqgan"]

DEFAULTS: dict[str, Any] = {
    "preset": "tiny", "config_json": None, "data": "phantom", "steps": 5000, "batch_size": 32, "lr": 1e-4,
    "seed": 0, "num_workers": 0, "num_images": 2048, "device": None, "amp": "off", "grad_clip": 1.0,
    "log_every": 25, "sample_every": 1000, "ckpt_every": 500, "vqgan": None, "ema_decay": 0.995,
    "ema_start": 200, "sample_steps": 50, "latent_quantile": 0.005, "latent_clip": "on",
    "latent_asinh": 0.0, "logsnr_shift": 0.0, "loss": "l1", "vessel_weight": 1.0, "latent_whiten": 0.0,
}
FIELDS = ["epoch", "loss", "grad_norm", "lr", "s_per_step"]
LOSSES = ("l1", "l2", "l2-balanced")


class BinnedErrorScale(nn.Module):
    """Running RMS of the eps error per timestep bin, for ``--loss l2-balanced``.

    Under L1 every entry's gradient has magnitude 1 whatever its noise level; under L2 it is proportional to the
    error, which is largest at low noise (where eps is hardest to predict), so L2 moves training weight towards
    low noise levels -- and measured here, away from the global layout (more failed draws). Dividing each
    sample's squared error by its bin's running RMS error (an exponential moving average of the mean squared
    error, no gradient) gives every entry a gradient of magnitude ~1 again, as under L1, while the weight is a
    function of t alone, so the minimiser at each t stays the posterior mean E[eps | z_t]. (Karras et al. 2024,
    "Analyzing and improving the training dynamics of diffusion models", arXiv:2312.02696, balance the noise
    levels' losses with a learnt per-level scale; this is the fixed-rule counterpart, scaled to L1's gradient.)
    Buffers are part of the train state, so a resumed run continues with the same scales."""

    def __init__(self, timesteps: int, bins: int = 20, decay: float = 0.99) -> None:
        super().__init__()
        self.timesteps, self.decay = timesteps, decay
        self.register_buffer("mean_square", torch.ones(bins, dtype=torch.float64))
        self.register_buffer("seen", torch.zeros(bins, dtype=torch.float64))

    def bins(self, t: torch.Tensor) -> torch.Tensor:
        return (t.long() * self.mean_square.numel()) // self.timesteps

    def loss(self, err: torch.Tensor, t: torch.Tensor, world: int = 1, weight: torch.Tensor | None = None
             ) -> torch.Tensor:
        """Mean over the batch of mean(err^2) / RMS_bin(t); updates the bins from the global batch first.
        ``weight`` (broadcastable to ``err``, mean 1 per sample) weighs the entries of each sample's mean."""
        sq = err.square() if weight is None else weight * err.square()
        per = sq.flatten(1).mean(1)  # (B,) (weighted) mean squared error per sample
        b = self.bins(t)
        with torch.no_grad():
            bins = self.seen.numel()
            n = torch.bincount(b.cpu(), minlength=bins).double()
            tot = torch.bincount(b.cpu(), weights=per.detach().cpu().double(), minlength=bins)
            if world > 1:
                both = torch.stack([n, tot]).to(err.device)
                torch.distributed.all_reduce(both)
                n, tot = both.cpu()
            hit = n > 0
            batch_ms = tot[hit] / n[hit]
            first = self.seen[hit] == 0
            self.mean_square[hit] = torch.where(first, batch_ms,
                                                self.decay * self.mean_square[hit] + (1 - self.decay) * batch_ms)
            self.seen += n
        scale = self.mean_square.sqrt().to(per.device, per.dtype)[b]
        return (per / scale).mean()


def add_arguments(p) -> None:
    add_common_arguments(p, DEFAULTS)
    p.add_argument("--vqgan", metavar="RUN_DIR", help="trained VQ-GAN: a 'train vqgan' run directory or its final/")
    p.add_argument("--ema-decay", type=float, help=f"EMA decay of the weights (default {DEFAULTS['ema_decay']})")
    p.add_argument("--ema-start", type=int, help=f"steps before the EMA starts averaging (default "
                   f"{DEFAULTS['ema_start']})")
    p.add_argument("--sample-steps", type=int, help="DDIM steps of the preview samples (default 50)")
    p.add_argument("--latent-quantile", type=float, metavar="Q",
                   help="latent scaling range: the Q and 1-Q quantiles of the training latents; 0 = the "
                        f"codebook's min and max (default {DEFAULTS['latent_quantile']})")
    p.add_argument("--latent-clip", choices=("on", "off"),
                   help="on: clamp the scaled training latents to [-1, 1] and have the samplers clamp their x0 "
                        "prediction there; off: keep the tails beyond the range, no x0 clamp (default on)")
    p.add_argument("--latent-asinh", type=float, metavar="C",
                   help="compand the latents, u = asinh(z / C), before the linear scaling (tails kept inside the "
                        "range); 0 = linear (default 0)")
    p.add_argument("--latent-whiten", type=float, metavar="S",
                   help="after the scaling, map the latent channels by a fixed whitening matrix fitted on the "
                        "training latents (ZCA), every channel direction with standard deviation S; 0 = off "
                        "(default 0)")
    p.add_argument("--logsnr-shift", type=_shift_arg, metavar="D",
                   help="shift the cosine schedule's log signal-to-noise ratio by D nats (config.json "
                        "logsnr_shift); 'auto': D = -log(variance of the scaled training latents), the SNRs of "
                        "unit-variance data (default 0)")
    p.add_argument("--loss", choices=LOSSES,
                   help="loss on the predicted noise: l1 = mean |pred - eps| (the source implementation's choice), "
                        "l2 = mean (pred - eps)^2 (Ho et al. 2020's simple loss, whose minimiser is the posterior "
                        "mean E[eps | z_t] that DDIM and the probability-flow ODE assume; l1's is the per-entry "
                        "posterior median), l2-balanced = l2 with each timestep bin's squared error divided by "
                        "that bin's running RMS error (l1's balance between noise levels, l2's minimiser) "
                        "(default l1)")
    p.add_argument("--vessel-weight", type=float, metavar="W",
                   help="weigh the loss on each latent pixel by 1 + (W - 1) v, v the fraction of its f x f image "
                        "patch covered by a retinal vessel of the training eye (phantom data only: the renders' "
                        "artery / vein masks); each sample's weights are normalised to mean 1 (default 1: off)")


def _shift_arg(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return check_logsnr_shift(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a finite number in [-{MAX_LOGSNR_SHIFT:g}, "
                                         f"{MAX_LOGSNR_SHIFT:g}] or 'auto', got {text}") from None


def load_vqgan(path: str | Path) -> tuple[VQGAN, dict]:
    """A trained VQ-GAN (eval, frozen) and its config.json from a run directory, its ``final/`` or one of its
    training checkpoints (``checkpoints/step_N``, whose architecture sits in the saved options)."""
    path = Path(path)
    if (path / "final" / "config.json").is_file():
        path = path / "final"
    if not (path / "config.json").is_file():
        raise ValueError(f"--vqgan {path}: no config.json here or in final/ (train it with 'retina-fast train "
                         f"vqgan' first)")
    doc, states = load_checkpoint(path, ["vqgan"])
    arch = doc.get("architecture") or doc.get("options", {}).get("architecture")
    if not isinstance(arch, dict) or "vqgan" not in arch:
        raise ValueError(f"--vqgan {path}: config.json names no VQ-GAN architecture (kind {doc.get('kind')!r})")
    vq = VQGAN(LDMConfig.from_dict(arch).vqgan)
    load_state_into(vq, states["vqgan"], str(path / "vqgan.safetensors"))
    return vq.eval().requires_grad_(False), {**doc, "path": str(path)}


def vqgan_record(vq_doc: dict, sha256: str) -> dict:
    """Where the VQ-GAN came from, for the LDM's provenance. ``--vqgan`` may name a sampling checkpoint (an
    LDM's ``final/`` or a packaged model): then its own provenance is the LDM run's, and the VQ-GAN's record
    is the one that LDM stored, kept whole so the chain back to the VQ-GAN's training run is not lost."""
    prov = vq_doc.get("provenance", {})
    if vq_doc.get("kind") == "ldm":
        return {"path": vq_doc["path"], "sha256": sha256, "taken_from_ldm": {"steps": prov.get("steps"),
                "command": prov.get("command")}, "vqgan": prov.get("vqgan")}
    return {"path": vq_doc["path"], "sha256": sha256, "steps": prov.get("steps"), "command": prov.get("command")}


def run(args) -> int:
    """Entry point of the command (args from ``add_arguments``); also callable in a spawned DDP worker."""
    run_dir = Path(args.out)
    ck = checkpoint_to_resume(run_dir, args.resume)
    saved = load_checkpoint(ck, [])[0]["options"] if ck is not None else None
    opts = resolve_options(args, DEFAULTS, saved)
    if not opts.get("vqgan"):
        raise ValueError("train ldm needs --vqgan RUN_DIR (a trained VQ-GAN)")
    if not 0.0 <= opts["ema_decay"] < 1.0:
        raise ValueError(f"--ema-decay must be in [0, 1), got {opts['ema_decay']}")
    if saved is not None and "latent_quantile" not in saved:
        opts["latent_quantile"] = 0.0  # a run started before the option: keep the codebook range
    if saved is not None and "latent_clip" not in saved:
        opts["latent_clip"] = "on"  # a run started before the option: latents clamped, x0 clipped
    if saved is not None and "latent_asinh" not in saved:
        opts["latent_asinh"] = 0.0  # a run started before the option: linear scaling
    if saved is not None and "logsnr_shift" not in saved:
        opts["logsnr_shift"] = 0.0  # a run started before the option: the plain cosine schedule
    if saved is not None and "loss" not in saved:
        opts["loss"] = "l1"  # a run started before the option
    if saved is not None and "vessel_weight" not in saved:
        opts["vessel_weight"] = 1.0  # a run started before the option
    if saved is not None and "latent_whiten" not in saved:
        opts["latent_whiten"] = 0.0  # a run started before the option
    if not (math.isfinite(opts["latent_whiten"]) and 0.0 <= opts["latent_whiten"] <= 1.0):
        raise ValueError(f"--latent-whiten must be a number in [0, 1], got {opts['latent_whiten']}")
    if not (math.isfinite(opts["vessel_weight"]) and opts["vessel_weight"] >= 1.0):
        raise ValueError(f"--vessel-weight must be a finite number >= 1, got {opts['vessel_weight']}")
    if opts["vessel_weight"] != 1.0 and opts["data"] != "phantom":
        raise ValueError("--vessel-weight needs --data phantom (the vessel masks come from the phantom's renders)")
    if not (math.isfinite(opts["latent_asinh"]) and opts["latent_asinh"] >= 0.0):
        raise ValueError(f"--latent-asinh must be a finite number >= 0, got {opts['latent_asinh']}")
    if not 0.0 <= opts["latent_quantile"] < 0.5:
        raise ValueError(f"--latent-quantile must be in [0, 0.5), got {opts['latent_quantile']}")
    info = init_distributed(opts["device"])
    try:
        return _train(opts, info, run_dir, ck)
    finally:
        info.close()


def _config(opts: dict, vq_doc: dict) -> LDMConfig:
    """The preset (+ override) with the trained VQ-GAN's architecture."""
    if "architecture" in opts:
        return LDMConfig.from_dict(opts["architecture"])
    base = resolve_config(opts["preset"], opts["config_json"])
    vq_cfg = LDMConfig.from_dict(vq_doc["architecture"]).vqgan
    if base.unet.in_channels != vq_cfg.latent_channels:
        raise ValueError(f"the VQ-GAN has {vq_cfg.latent_channels} latent channels but the preset's U-Net takes "
                         f"{base.unet.in_channels}")
    return LDMConfig(vqgan=vq_cfg, unet=base.unet, timesteps=base.timesteps, schedule=base.schedule,
                     cosine_s=base.cosine_s, max_beta=base.max_beta, prediction=base.prediction, name=base.name,
                     logsnr_shift=base.logsnr_shift)


@torch.no_grad()
def encode_latents(vq: VQGAN, data: DataSource, device: torch.device, batch: int = 32) -> torch.Tensor:
    """Continuous (unscaled) latents (N, C, h, w) float32 of every image of ``data``."""
    from tqdm import tqdm

    out = []
    for i in tqdm(range(0, len(data), batch), desc="encode latents", unit="batch", leave=False):
        x = data.get(list(range(i, min(i + batch, len(data))))).to(device)
        out.append(vq.encode(x).float().cpu())
    return torch.cat(out)


def latent_range(vq: VQGAN, latents: torch.Tensor, q: float) -> tuple[float, float]:
    """(lo, hi): the q and 1 - q quantiles of every entry of ``latents`` (unscaled), or the codebook's
    (min, max) for q = 0. Exact order statistics (kthvalue), so a resumed run gets the same numbers."""
    if q == 0.0:
        return vq.latent_range()
    flat = latents.flatten().float()
    n = flat.numel()
    k_lo, k_hi = max(1, round(q * (n - 1)) + 1), min(n, round((1.0 - q) * (n - 1)) + 1)
    lo, hi = float(flat.kthvalue(k_lo).values), float(flat.kthvalue(k_hi).values)
    if not hi > lo:
        raise ValueError(f"--latent-quantile {q}: the latents' quantiles {lo} and {hi} leave no range")
    return lo, hi


def _latents(opts: dict, vq: VQGAN, vq_doc: dict, info: DistInfo, run_dir: Path
             ) -> tuple[torch.Tensor, tuple[float, float], LatentWhitening | None, str]:
    """Scaled (companded with ``--latent-asinh``, whitened with ``--latent-whiten``), clamped training latents,
    the scaling constants (lo, hi), the whitening (None without) and the data's description."""
    data = load_data(opts["data"], opts["num_images"], vq.config, info, run_dir, opts["num_workers"])
    sha = vq_doc["weights"]["vqgan"]["sha256"]
    cache = run_dir / "cache" / f"latents_raw_{sha[:16]}_n{len(data)}.safetensors"
    if info.is_main and not cache.is_file():
        lat = encode_latents(vq, data, info.device)
        cache.parent.mkdir(parents=True, exist_ok=True)  # --data DIR: nothing was rendered (and cached) before
        tmp = cache.with_suffix(".tmp")
        save_file({"latents": lat}, str(tmp), metadata={"vqgan_sha256": sha, "data": data.description})
        tmp.replace(cache)
    info.barrier()
    raw = load_file(str(cache))["latents"]
    asinh = opts["latent_asinh"] or None
    if opts.get("latent_range") is None:
        rng = latent_range(vq, raw, opts["latent_quantile"])
        opts["latent_range"] = [math.asinh(v / asinh) for v in rng] if asinh else list(rng)
    lo, hi = opts["latent_range"]
    clip = opts["latent_clip"] == "on"
    whiten, desc = None, data.description
    if opts["latent_whiten"]:
        base = diffusion_latents(raw, lo, hi, asinh, clip=clip)
        if opts.get("latent_whiten_map") is None:  # fitted once, on the scaled latents; a resumed run reads it back
            opts["latent_whiten_map"] = LatentWhitening.fit(base, opts["latent_whiten"]).to_dict()
        whiten = LatentWhitening(**opts["latent_whiten_map"])
        if clip:
            beyond = float((whiten.apply(base).abs() > 1.0).double().mean())
            desc += (f"; latents whitened (std {opts['latent_whiten']:g} per channel direction, "
                     f"{100 * beyond:.4f} % clamped)")
    scaled = diffusion_latents(raw, lo, hi, asinh, clip=clip, whiten=whiten)
    return scaled, (lo, hi), whiten, desc


def latent_vessel_fraction(n: int, vq_config, info: DistInfo, run_dir: Path) -> torch.Tensor:
    """(n, 1, h, w) float32 in [0, 1]: for each latent pixel of phantom eyes 0..n-1 (the ``--data phantom``
    training set) the fraction of its f x f image patch covered by an artery or vein (the render's masks,
    average-pooled by the VQ-GAN's f; at 128 px, f = 4: mean 0.18 inside the field of view, where 52 % of the
    latent pixels touch a vessel -- so a touch-or-not mask would weigh half the eye). Cached (float16: exact,
    multiples of 1/f^2)."""
    from tqdm import tqdm

    from retina_fast import phantom

    size, f = vq_config.image_size, vq_config.f
    cache = run_dir / "cache" / f"vessel_latent_fraction_s{size}_f{f}_n{n}.safetensors"
    if info.is_main and not cache.is_file():
        masks = []
        for i in tqdm(range(n), desc="vessel masks", unit="eye", leave=False):
            m = phantom.render(i, size, wavelengths=vq_config.wavelengths, noise=False).masks
            masks.append((m["artery"] | m["vein"])[None, None].float())
        pooled = torch.nn.functional.avg_pool2d(torch.cat(masks), f).half()
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        save_file({"masks": pooled}, str(tmp))
        tmp.replace(cache)
    info.barrier()
    return load_file(str(cache))["masks"].float()


def _entry_weights(fraction: torch.Tensor, weight: float) -> torch.Tensor:
    """(B, 1, h, w) loss weights 1 + (weight - 1) * vessel fraction, scaled to mean 1 per sample (so a sample's
    share of the batch loss does not depend on how much vessel it holds)."""
    w = 1.0 + (weight - 1.0) * fraction
    return w / w.mean(dim=(1, 2, 3), keepdim=True)


def _train(opts: dict, info: DistInfo, run_dir: Path, ck: Path | None) -> int:
    from tqdm import tqdm

    dev = info.device
    run_dir.mkdir(parents=True, exist_ok=True)
    vq, vq_doc = load_vqgan(opts["vqgan"])
    if ck is not None and opts.get("vqgan_sha256") not in (None, vq_doc["weights"]["vqgan"]["sha256"]):
        raise ValueError(f"--vqgan {opts['vqgan']}: the VQ-GAN weights changed since this run started")
    opts["vqgan_sha256"] = vq_doc["weights"]["vqgan"]["sha256"]
    cfg = _config(opts, vq_doc)
    opts["architecture"] = cfg.to_dict()
    vq.to(dev)
    latents, (lo, hi), whiten, data_desc = _latents(opts, vq, vq_doc, info, run_dir)
    vessel_frac = None
    if opts["vessel_weight"] != 1.0:
        vessel_frac = latent_vessel_fraction(len(latents), vq.config, info, run_dir)
        data_desc += f"; loss weighted 1 + {opts['vessel_weight'] - 1:g} x (vessel fraction of each latent pixel)"
    if opts["logsnr_shift"] == "auto":  # resolved once; a resumed run reads the number back
        opts["logsnr_shift"] = round(-math.log(float(latents.double().var())), 4)
    if opts["logsnr_shift"] != cfg.logsnr_shift:
        cfg = dataclasses.replace(cfg, logsnr_shift=float(opts["logsnr_shift"]))
        opts["architecture"] = cfg.to_dict()
    schedule = schedule_for(cfg)
    abar = schedule.alphas_cumprod.to(torch.float32)
    seed_everything(opts["seed"])
    unet = UNet2D(cfg.unet).to(dev)
    ema = EMA(unet, opts["ema_decay"], opts["ema_start"])
    state = {"unet": unet, "ema": ema.module}
    balance = None
    if opts["loss"] == "l2-balanced":
        balance = BinnedErrorScale(schedule.num_timesteps)
        state["loss_scale"] = balance
    opt = torch.optim.Adam(unet.parameters(), lr=opts["lr"])
    start = 0
    if ck is not None:
        start = load_train_state(ck, state, {"unet": opt})["step"]
    model = nn.parallel.DistributedDataParallel(unet) if info.world > 1 else unet
    plan = BatchPlan(len(latents), opts["batch_size"], opts["seed"], info.rank, info.world)
    per = opts["batch_size"] // info.world
    mine = slice(info.rank * per, (info.rank + 1) * per)
    logger = MetricLogger(run_dir, FIELDS, info.is_main, resume_step=start if ck is not None else None)
    total = opts["steps"]
    amp = torch.autocast(dev.type, dtype=torch.bfloat16) if opts["amp"] == "bf16" else contextlib.nullcontext()
    bar = tqdm(total=total, initial=start, desc="train ldm", unit="step", disable=not info.is_main)
    t_last, s_last, loss_sum, n_sum = time.time(), start, 0.0, 0
    for step in range(start, total):
        z0 = latents[plan.local_indices(step)].to(dev)
        g = step_generator(opts["seed"], step, 1)
        t = torch.randint(0, schedule.num_timesteps, (opts["batch_size"],), generator=g)[mine]
        eps = torch.randn((opts["batch_size"],) + tuple(latents.shape[1:]), generator=g)[mine]
        t, eps = t.to(dev), eps.to(dev)
        a = abar.to(dev)[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        unet.train()
        with amp:
            pred = model(zt, t)
        err = pred.float() - eps
        w = None if vessel_frac is None else _entry_weights(vessel_frac[plan.local_indices(step)].to(dev),
                                                             opts["vessel_weight"])
        if opts["loss"] == "l2-balanced":
            objective = balance.loss(err, t, info.world, w)
            loss = err.detach().square().mean()  # logged: the plain mean squared error
        else:
            per_entry = err.abs() if opts["loss"] == "l1" else err.square()
            loss = per_entry.mean()  # logged: unweighted
            objective = loss if w is None else (w * per_entry).mean()
        require_finite(objective, step)
        opt.zero_grad(set_to_none=True)
        objective.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(unet.parameters(), opts["grad_clip"] or float("inf"))
        opt.step()
        ema.update(unet, step)
        loss_sum, n_sum = loss_sum + float(loss.detach()), n_sum + 1
        done = step + 1
        bar.update(1)
        if done % opts["log_every"] == 0 or done == total:
            vals = torch.tensor([loss_sum / n_sum, float(gnorm)], dtype=torch.float64)
            if info.world > 1:
                torch.distributed.all_reduce(vals)
                vals /= info.world
            now = time.time()
            logger.log(done, {"epoch": plan.epoch(step), "loss": vals[0], "grad_norm": vals[1], "lr": opts["lr"],
                              "s_per_step": (now - t_last) / (done - s_last)})
            bar.set_postfix(loss=f"{float(vals[0]):.4f}")
            t_last, s_last, loss_sum, n_sum = now, done, 0.0, 0
        if info.is_main and opts["sample_every"] and (done % opts["sample_every"] == 0 or done == total):
            ldm = LoadedLDM(cfg, vq, ema.module, schedule, (lo, hi), tuple(cfg.vqgan.wavelengths),
                            clip_x0=opts["latent_clip"] == "on", latent_asinh=opts["latent_asinh"] or None,
                            latent_whiten=whiten)
            _preview(ldm, run_dir / "samples" / f"step_{done:08d}.png", opts["sample_steps"])
        if done % opts["ckpt_every"] == 0 or done == total:
            if info.is_main:
                save_train_state(run_dir, done, state, {"unet": opt}, opts)
            info.barrier()
    bar.close()
    logger.close()
    if info.is_main:
        cmd = command_line("ldm", opts, ["out", *DEFAULTS])
        prov = provenance(opts, total, data_desc, cmd, run_dir=run_dir, trainer="ldm",
                          vqgan=vqgan_record(vq_doc, opts["vqgan_sha256"]))
        config = {**model_config(cfg, (lo, hi)), "kind": "ldm", "latent_clip": opts["latent_clip"] == "on",
                  "latent_asinh": opts["latent_asinh"] or None}
        if whiten is not None:
            config["latent_whiten"] = whiten.to_dict()
        save_checkpoint(run_dir / "final", {"vqgan": vq, "unet": ema.module}, config, prov)
    info.barrier()
    return 0


def _preview(ldm: LoadedLDM, path: Path, steps: int, n: int = 4) -> None:
    """``n`` samples of the EMA model (reference sampler, DDIM, seed 0)."""
    from retina_fast.preview import contact_sheet
    from retina_fast.training.reference import sample_loaded

    cubes = sample_loaded(ldm, n, min(steps, ldm.schedule.num_timesteps), seed=0)
    contact_sheet(cubes, ldm.wavelengths, path=path, titles=[f"sample {i}" for i in range(n)])
