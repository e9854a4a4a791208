"""Train the 16-band retinal structure network (``retina_fast.models.structure_net``) on phantom eyes.

    OMP_NUM_THREADS=1 nice -n 15 python -m retina_fast.training.train_structure --out runs/structure \\
        --ship retina_fast/weights/structure-net

Data: phantom eyes (``retina_fast.phantom.render``) with their artery / vein / ONH / fovea masks. Eye
``k`` of the run has seed ``--train-seed + k``; each is rendered at a random side in ``--sizes``
(inclusive range, default 128-224: the same eye at a different resolution, vessels 1-6 px wide).
A pool of ``--pool`` eyes is kept in memory (float16) and ``--refresh`` of them are replaced by new
eyes every step, so a run sees pool + refresh x steps distinct eyes. Every sample is a random
``--crop`` window with random horizontal / vertical flips and a global gain x U[1 - g, 1 + g]
(``--gain-jitter``). All draws come from ``numpy.random.default_rng([seed, step])``: a run is a pure
function of its options (at a fixed torch build and thread count).

Loss: BCE with logits + soft Dice (1 - 2 sum(p t) / (sum p + sum t), per structure over the batch,
averaged over structures), one sigmoid per structure (overlapping masks, see the model's docstring).
AdamW (weight decay 1e-4), linear warm-up then cosine decay to 3 % of ``--lr``, gradient clipping 1.0.

Input normalisation: per-band mean / std of the first ``--pool`` training eyes (all pixels), stored in
the network's buffers. Validation: ``--val-n`` held-out eyes (seeds ``--val-seed`` + i, disjoint from
the training seeds) every ``--eval-every`` steps at 160 px; at the end Dice / IoU per structure at 128
and 224 px on ``--final-n`` held-out eyes. Outputs in ``--out``: ``log.csv`` (per-step losses and
validation scores), ``heldout.json`` (final scores), ``structure-net/`` (the checkpoint); with
``--ship DIR`` the checkpoint and ``training_log.csv`` are also written to DIR.
No resume (a run takes minutes); single process (the phantom renderer is CPU-bound anyway).
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from retina_fast.models.structure_net import (STRUCTURES, StructureNet, StructureNetConfig,
                                              save_structure_net)
from retina_fast.phantom import render
from retina_fast.training.trainer import MetricLogger, provenance

__all__ = ["DEFAULTS", "dice_iou", "heldout_scores", "phantom_fingerprint", "train", "main"]

DEFAULTS = {
    "steps": 1500, "batch_size": 8, "crop": 128, "sizes": (128, 224), "lr": 3e-3, "warmup": 50,
    "pool": 256, "refresh": 2, "gain_jitter": 0.1, "seed": 0, "train_seed": 1_000_000,
    "val_seed": 2_000_000, "val_n": 8, "final_n": 32, "eval_every": 100, "log_every": 10,
    "channels": (16, 32, 64, 128), "threads": 1,
}


def _masks_tensor(masks: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return torch.stack([torch.as_tensor(masks[s]) for s in STRUCTURES]).to(torch.bool)


def _render(seed: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    ph = render(int(seed), int(size))
    return ph.cube.to(torch.float16), _masks_tensor(ph.masks)


def dice_iou(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Dice and IoU of bool masks (any shape), pooled over all elements; 1.0 when both are empty."""
    p, t = pred.bool(), target.bool()
    inter, ps, ts = float((p & t).sum()), float(p.sum()), float(t.sum())
    union = ps + ts - inter
    return {"dice": 1.0 if ps + ts == 0 else 2 * inter / (ps + ts), "iou": 1.0 if union == 0 else inter / union}


@torch.no_grad()
def heldout_scores(net: StructureNet, seeds: Sequence[int], size: int, batch: int = 8) -> dict:
    """Per-structure Dice / IoU of ``net`` on phantom eyes ``seeds`` rendered at ``size``:
    "dice"/"iou" pooled over all pixels of the set and "dice_mean" (mean over images whose mask
    is not empty)."""
    net.eval()
    preds, targets = [], []
    for start in range(0, len(seeds), batch):
        phs = [render(int(s), size) for s in seeds[start:start + batch]]
        x = torch.stack([p.cube for p in phs])
        m = net.predict_masks(x)
        preds.append(torch.stack([m[s] for s in net.config.structures], 1))
        targets.append(torch.stack([_masks_tensor(p.masks) for p in phs]))
    pred, target = torch.cat(preds), torch.cat(targets)
    out = {}
    for k, s in enumerate(net.config.structures):
        pooled = dice_iou(pred[:, k], target[:, k])
        per = [dice_iou(pred[i, k], target[i, k])["dice"] for i in range(len(seeds)) if target[i, k].any()]
        out[s] = {"dice": pooled["dice"], "iou": pooled["iou"],
                  "dice_mean": float(np.mean(per)) if per else float("nan")}
    return out


def phantom_fingerprint() -> str:
    """sha256 (first 16 hex digits) of phantom eye 0 at 64 px: changes whenever the phantom renderer
    changes, i.e. when the structure network should be retrained."""
    import hashlib

    ph = render(0, 64)
    h = hashlib.sha256(ph.cube.numpy().tobytes())
    for name in STRUCTURES:
        h.update(ph.masks[name].numpy().tobytes())
    return h.hexdigest()[:16]


def _loss(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    t = target.float()
    bce = F.binary_cross_entropy_with_logits(logits, t)
    p = torch.sigmoid(logits)
    inter = (p * t).sum(dim=(0, 2, 3))
    dice = 1.0 - (2.0 * inter + 1.0) / (p.sum(dim=(0, 2, 3)) + t.sum(dim=(0, 2, 3)) + 1.0)
    return bce, dice.mean()


def _lr(step: int, opts: Mapping) -> float:
    if step < opts["warmup"]:
        return opts["lr"] * (step + 1) / opts["warmup"]
    frac = (step - opts["warmup"]) / max(1, opts["steps"] - opts["warmup"])
    return opts["lr"] * (0.03 + 0.97 * 0.5 * (1.0 + math.cos(math.pi * frac)))


def _batch(pool_x: list, pool_m: list, rng: np.random.Generator, opts: Mapping) -> tuple[torch.Tensor, torch.Tensor]:
    c = opts["crop"]
    xs, ms = [], []
    for i in rng.choice(len(pool_x), size=opts["batch_size"], replace=len(pool_x) < opts["batch_size"]):
        x, m = pool_x[i], pool_m[i]
        h, w = x.shape[-2:]
        top, left = int(rng.integers(0, h - c + 1)), int(rng.integers(0, w - c + 1))
        x, m = x[:, top:top + c, left:left + c].float(), m[:, top:top + c, left:left + c]
        if rng.random() < 0.5:
            x, m = x.flip(-1), m.flip(-1)
        if rng.random() < 0.5:
            x, m = x.flip(-2), m.flip(-2)
        g = 1.0 + opts["gain_jitter"] * (2.0 * rng.random() - 1.0)
        xs.append((x * g).clamp(0.0, 1.0))
        ms.append(m)
    return torch.stack(xs), torch.stack(ms)


def train(opts: Mapping, out: Path, ship: Path | None = None, progress: bool = True) -> dict:
    """Run the training described in the module docstring; returns the held-out scores."""
    from tqdm import tqdm

    torch.set_num_threads(int(opts["threads"]))
    torch.manual_seed(opts["seed"])
    out.mkdir(parents=True, exist_ok=True)
    lo, hi = opts["sizes"]
    if opts["crop"] > lo:
        raise ValueError(f"--crop {opts['crop']} is larger than the smallest size {lo}")
    t0 = time.time()
    size_rng = np.random.default_rng([opts["seed"], 7])
    next_eye = 0

    def new_eye() -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal next_eye
        eye = _render(opts["train_seed"] + next_eye, int(size_rng.integers(lo, hi + 1)))
        next_eye += 1
        return eye

    pool = [new_eye() for _ in tqdm(range(opts["pool"]), desc="render pool", disable=not progress)]
    pool_x, pool_m = [p[0] for p in pool], [p[1] for p in pool]
    flat = torch.cat([x.float().flatten(1) for x in pool_x], dim=1)
    net = StructureNet(StructureNetConfig(channels=tuple(opts["channels"])))
    net.set_normalisation(flat.mean(1).tolist(), flat.std(1).tolist())
    del flat
    decay = [p for n, p in net.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in net.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 1e-4}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=opts["lr"])
    val_seeds = [opts["val_seed"] + i for i in range(opts["val_n"])]
    fields = ["loss", "bce", "dice_loss", "lr", "wall_s"] + [f"val_dice_{s}" for s in STRUCTURES]
    log = MetricLogger(out, fields)
    bar = tqdm(range(opts["steps"]), desc="train structure-net", disable=not progress)
    for step in bar:
        rng = np.random.default_rng([opts["seed"], step])
        for j in rng.choice(len(pool_x), size=opts["refresh"], replace=False):
            pool_x[j], pool_m[j] = new_eye()
        x, m = _batch(pool_x, pool_m, rng, opts)
        lr = _lr(step, opts)
        for g in opt.param_groups:
            g["lr"] = lr
        net.train()
        bce, dl = _loss(net(x), m)
        loss = bce + dl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        row = {"loss": loss.item(), "bce": bce.item(), "dice_loss": dl.item(), "lr": lr, "wall_s": time.time() - t0}
        last = step + 1 == opts["steps"]
        if (step + 1) % opts["eval_every"] == 0 or last:
            scores = heldout_scores(net, val_seeds, 160)
            row.update({f"val_dice_{s}": scores[s]["dice"] for s in STRUCTURES})
        if (step + 1) % opts["log_every"] == 0 or last or "val_dice_artery" in row:
            log.log(step + 1, row)
            bar.set_postfix(loss=f"{row['loss']:.3f}")
    log.close()
    train_wall = time.time() - t0
    final_seeds = [opts["val_seed"] + 1000 + i for i in range(opts["final_n"])]
    heldout = {str(size): heldout_scores(net, final_seeds, size) for size in (128, 224)}
    result = {"heldout": heldout, "heldout_seeds": [final_seeds[0], final_seeds[-1]],
              "phantom_fingerprint": phantom_fingerprint(),
              "train_wall_s": round(train_wall, 1), "eyes_seen": next_eye,
              "threads": int(opts["threads"]), "feature_dim": net.feature_dim}
    (out / "heldout.json").write_text(json.dumps(result, indent=1))
    prov = provenance({k: list(v) if isinstance(v, tuple) else v for k, v in opts.items()}, opts["steps"],
                      f"retina_fast.phantom eyes, seeds {opts['train_seed']}..{opts['train_seed'] + next_eye - 1}",
                      wall_s=round(train_wall, 1), heldout=heldout,
                      phantom_fingerprint=result["phantom_fingerprint"])
    save_structure_net(out / "structure-net", net, prov)
    if ship is not None:
        save_structure_net(ship, net, prov)
        shutil.copyfile(out / "log.csv", ship / "training_log.csv")
        (ship / "heldout.json").write_text(json.dumps(result, indent=1))
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m retina_fast.training.train_structure",
                                description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="run directory (log.csv, heldout.json, structure-net/)")
    p.add_argument("--ship", help="also write the checkpoint here (e.g. retina_fast/weights/structure-net)")
    p.add_argument("-q", "--quiet", "--no-progress", dest="no_progress", action="store_true", help="no progress bar")
    for key, value in DEFAULTS.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, tuple):
            p.add_argument(flag, type=int, nargs=len(value) if key == "sizes" else "+", default=value,
                           help=f"default {' '.join(map(str, value))}")
        else:
            p.add_argument(flag, type=type(value), default=value, help=f"default {value}")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    opts = {k: getattr(args, k) for k in DEFAULTS}
    opts["sizes"], opts["channels"] = tuple(opts["sizes"]), tuple(opts["channels"])
    result = train(opts, Path(args.out), Path(args.ship) if args.ship else None, not args.no_progress)
    print(json.dumps(result["heldout"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
