"""Per-degradation-kind check of a fundus enhancer on the real photograph: does it ever harm?

Protocol. ``skimage.data.retina()`` resized whole (bilinear, antialiased) to ``size`` px is the clean
image. For every one of the seven non-empty combinations of :func:`retina_fast.training.degrade.degrade`
and every seed s, the whole image is degraded with ``degrade(clean, seed=s, kinds=combination)`` and
enhanced whole; PSNR against the clean image is taken per half: the left half, columns
[0, round(size·705/1411)), holds the optic disc and is the real training domain of T-MAGE-Net; the right
half (the rest) is held out. Both the input's and the output's PSNR are reported, and the gain = output
− input. An eighth row, ``none``, enhances the clean image itself (the enhancer should leave it alone).

Outputs follow :func:`retina_fast.enhance.enhance` (clamped to [0, 1], times the field-of-view mask of
the input), so the numbers are what a user gets.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from retina_fast.metrics import psnr
from retina_fast.training.degrade import degradation_combinations, degrade, kinds_code
from retina_fast.training.enhance_data import SPLIT_COLUMN, _FULL, real_image

__all__ = ["clean_real", "kind_inputs", "kind_table", "format_kind_table", "summary", "kinds_figure", "spot_removal"]

ILLUMINATION = "illumination"


def clean_real(size: int = 512) -> torch.Tensor:
    """The whole real photograph (1, 3, size, size) in [0, 1], rounded to uint8 levels like a photograph."""
    img = F.interpolate(real_image()[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (img.clamp(0, 1) * 255).round() / 255


def kind_inputs(size: int = 512, seeds: Sequence[int] = (0, 1, 2, 3)) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(names, inputs (8·len(seeds), 3, size, size), clean (1, 3, size, size)); names are Cofe-Net codes
    ('001' … '111') or 'none', one per row, seed-major within a name."""
    clean = clean_real(size)
    names, rows = [], []
    for combo in [None, *degradation_combinations()]:
        for s in seeds:
            names.append("none" if combo is None else kinds_code(combo))
            rows.append(clean[0] if combo is None else (degrade(clean, seed=s, kinds=combo)[0] * 255).round() / 255)
    return names, torch.stack(rows), clean


def _half_psnr(x: torch.Tensor, clean: torch.Tensor, split: int) -> tuple[torch.Tensor, torch.Tensor]:
    c = clean.expand_as(x)
    return psnr(x[..., :split], c[..., :split]).double(), psnr(x[..., split:], c[..., split:]).double()


def kind_table(enhance_fn: Callable[[torch.Tensor], torch.Tensor] | None, size: int = 512,
               seeds: Sequence[int] = (0, 1, 2, 3), inputs=None,
               outputs: torch.Tensor | None = None) -> dict[str, Any]:
    """Per combination (and 'none'): mean over seeds of input / output PSNR and gain, left and right half.
    ``enhance_fn`` maps (N, 3, H, W) in [0, 1] to the enhanced images; ``inputs`` = kind_inputs(...) to reuse;
    ``outputs`` = the enhanced images of those inputs, already computed (then ``enhance_fn`` is not called)."""
    names, x, clean = inputs if inputs is not None else kind_inputs(size, seeds)
    split = round(x.shape[-1] * SPLIT_COLUMN / _FULL)
    if outputs is not None:
        if outputs.shape != x.shape:
            raise ValueError(f"outputs must have the inputs' shape {tuple(x.shape)}, got {tuple(outputs.shape)}")
        y = outputs
    else:
        y = torch.cat([enhance_fn(x[i:i + 4]) for i in range(0, len(x), 4)])
    in_l, in_r = _half_psnr(x, clean, split)
    out_l, out_r = _half_psnr(y, clean, split)
    rows: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(names):
        m = torch.tensor([n == name for n in names])
        rows[name] = {"input_left": in_l[m].mean().item(), "input_right": in_r[m].mean().item(),
                      "output_left": out_l[m].mean().item(), "output_right": out_r[m].mean().item(),
                      "gain_left": (out_l[m] - in_l[m]).mean().item(), "gain_right": (out_r[m] - in_r[m]).mean().item(),
                      "worst_gain_right": (out_r[m] - in_r[m]).min().item(),
                      "worst_gain_left": (out_l[m] - in_l[m]).min().item()}
    return {"size": int(x.shape[-1]), "seeds": list(seeds), "split_column": split, "rows": rows,
            "summary": summary(rows), "_outputs": y, "_inputs": x, "_names": names}


def _has_illumination(code: str) -> bool:
    return code != "none" and code[2] == "1"  # Cofe-Net codes: characters (blur, spot, illumination)


def summary(rows: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The issue's acceptance numbers: worst mean gain per combination (right and left), the mean gain over
    the illumination combinations (right), and the clean image's change."""
    degraded = {k: v for k, v in rows.items() if k != "none"}
    ill = [v["gain_right"] for k, v in degraded.items() if _has_illumination(k)]
    return {"worst_combination_gain_right": min(v["gain_right"] for v in degraded.values()),
            "worst_combination_gain_left": min(v["gain_left"] for v in degraded.values()),
            "mean_illumination_gain_right": sum(ill) / len(ill),
            "clean_gain_right": rows["none"]["gain_right"] if "none" in rows else float("nan"),
            "clean_output_right": rows["none"]["output_right"] if "none" in rows else float("nan")}


def _label(code: str) -> str:
    if code == "none":
        return "none (clean input)"
    return " + ".join(k for k, b in zip(("illumination", "spot", "blur"), reversed(code)) if b == "1")


def format_kind_table(tables: dict[str, dict[str, Any]]) -> str:
    """Markdown: one block of rows per method: combination | input dB L / R | output dB L / R | gain L / R."""
    lines = ["| Method | Degradation | Input dB (L / R) | Output dB (L / R) | Gain dB (L / R) |", "|---|---|---|---|---|"]
    for method, t in tables.items():
        for code, r in t["rows"].items():
            out_l = "∞" if r["output_left"] == float("inf") else f"{r['output_left']:.1f}"
            in_l = "∞" if r["input_left"] == float("inf") else f"{r['input_left']:.1f}"
            in_r = "∞" if r["input_right"] == float("inf") else f"{r['input_right']:.1f}"
            gain = ("—" if code == "none" else f"{r['gain_left']:+.1f} / {r['gain_right']:+.1f}")
            lines.append(f"| {method} | {_label(code)} | {in_l} / {in_r} | {out_l} / {r['output_right']:.1f} | {gain} |")
    return "\n".join(lines)


def kinds_figure(tables: dict[str, dict[str, Any]], path, seed_index: int = 0, side: int = 256) -> None:
    """PNG: one row per kind (the clean photograph, then the seven combinations) at the ``seed_index``-th
    seed; columns: the degraded input, each table's output (``kind_table`` results sharing one input set),
    the clean photograph; every tile area-downsized to ``side`` px."""
    import numpy as np
    from PIL import Image

    first = next(iter(tables.values()))
    names, x = first["_names"], first["_inputs"]
    per = len(first["seeds"])
    clean = clean_real(x.shape[-1])[0]
    tiles = []
    for i in range(seed_index, len(names), per):
        row = [x[i]] + [t["_outputs"][i] for t in tables.values()] + [clean]
        tiles.append(torch.cat([F.interpolate(r[None], size=(side, side), mode="area")[0] for r in row], -1))
    img = torch.cat(tiles, -2).clamp(0, 1).permute(1, 2, 0).numpy()
    Image.fromarray(np.round(img * 255).astype(np.uint8)).save(path)


def spot_removal(enhance_fn: Callable[[torch.Tensor], torch.Tensor], size: int = 512,
                 seeds: Sequence[int] = (0, 1, 2)) -> dict[str, Any]:
    """How much of the spots' brightening an enhancer takes away. The real photograph (``clean_real(size)``)
    degraded by spots alone with each seed; inside the disks ``degrade`` drew (radius r/2 before its blur),
    the mean excess of input and output over the clean photograph (all channels, the disks' pixels inside the
    field of view, all seeds); ``removed`` = 1 − excess_out / excess_in (1: spots gone, 0: left, < 0:
    brightened further)."""
    from retina_fast.fov import fov_mask
    from retina_fast.training.degrade import spot_disks

    clean = clean_real(size)
    fov = fov_mask(clean)[0].bool()
    excess_in, excess_out, pixels = 0.0, 0.0, 0
    for s in seeds:
        x, params = degrade(clean, seed=s, kinds=("spot",), return_params=True)
        x = (x * 255).round() / 255  # like kind_inputs: a photograph's uint8 levels
        y = enhance_fn(x)
        m = spot_disks(params[0] if isinstance(params, list) else params, size, size) & fov
        excess_in += (x - clean)[0][:, m].sum().item()
        excess_out += (y - clean)[0][:, m].sum().item()
        pixels += 3 * int(m.sum())
    if pixels == 0 or excess_in <= 0:
        raise ValueError(f"spot_removal: the spots of seeds {list(seeds)} at {size} px brighten nothing inside the "
                         "field of view")
    return {"size": size, "seeds": list(seeds), "pixels": pixels, "excess_in": excess_in / pixels,
            "excess_out": excess_out / pixels, "removed": 1.0 - excess_out / excess_in}


VAL_SEEDS = tuple(range(10, 18))  # validation degradations; the tables' test seeds are 0-3
THRESHOLD_GRID = tuple(round(0.01 * i, 2) for i in range(11))  # 0, 0.01, ..., 0.10
MAX_VAL_LOSS_DB = 0.1


def choose_residual_threshold(model, *, size: int = 512, seeds: Sequence[int] = VAL_SEEDS,
                              grid: Sequence[float] = THRESHOLD_GRID, max_loss_db: float = MAX_VAL_LOSS_DB,
                              backend: str = "auto", work_size: int | None = None, after=None,
                              ) -> tuple[float | None, list[dict[str, Any]]]:
    """The smallest ``residual_threshold`` of ``grid`` at which no validation image -- the left half (never the
    held-out right half) of every combination and seed in ``seeds`` -- loses more than ``max_loss_db`` against
    its input; None if none does. Returns (threshold, one row per grid value: worst per-image left-half gain,
    mean illumination gain (left), mean gain over the combinations (left)). ``model`` runs alone (not its
    follow-up stages); ``after``: a model whose output (with its own threshold and work size, alone) ``model``
    is a follow-up stage of -- the gains are still counted against the degraded input."""
    from retina_fast.enhance import enhance, shrink_residual
    from retina_fast.fov import fov_mask

    inputs = kind_inputs(size, seeds)
    names, x, _ = inputs
    if after is not None:
        pre = torch.cat([enhance(x[i:i + 4], model=after, backend=backend, then=()) for i in range(0, len(x), 4)])
    else:  # what the network is given: the input, deblurred first where the model says so (as enhance does)
        from retina_fast.deblur import deblur
        from retina_fast.enhance import load_enhancer

        settings = load_enhancer(model).deblur
        pre = x if settings is None else deblur(x, fov_mask(x), settings)[0]
    raw = torch.cat([enhance(pre[i:i + 4], model=model, backend=backend, residual_threshold=0.0,
                             work_size=work_size, then=(), deblur=False)
                     for i in range(0, len(x), 4)])  # once; each threshold is applied to the same outputs
    fov = fov_mask(x).float()[:, None]
    rows, chosen = [], None
    for tau in grid:
        out = shrink_residual(pre, raw, tau) * fov  # what enhance(..., residual_threshold=tau) returns
        t = kind_table(None, seeds=seeds, inputs=inputs, outputs=out)["rows"]
        degraded = {k: v for k, v in t.items() if k != "none"}
        row = {"threshold": tau, "worst_image_gain_left": min(v["worst_gain_left"] for v in degraded.values()),
               "mean_illumination_gain_left": sum(v["gain_left"] for k, v in degraded.items() if _has_illumination(k))
               / sum(_has_illumination(k) for k in degraded),
               "mean_gain_left": sum(v["gain_left"] for v in degraded.values()) / len(degraded)}
        rows.append(row)
        if chosen is None and row["worst_image_gain_left"] >= -max_loss_db:
            chosen = tau
    return chosen, rows


def write_residual_threshold(model_dir, threshold: float, rows: list[dict[str, Any]], seeds: Sequence[int],
                             max_loss_db: float, backend: str = "torch", size: int = 512,
                             work_size: int | None = None, name: str | None = None, after: str | None = None) -> None:
    """Record the chosen threshold (and how it was chosen) in ``model_dir/config.json``; ``work_size``, when
    given, is recorded with it (the threshold was chosen on outputs made at that work size). ``name``: how the
    recorded command names the model (default: ``model_dir``); ``after``: the model it was chosen after."""
    import json
    from pathlib import Path

    from retina_fast.enhance import unload_enhancer
    from retina_fast.files import atomic_write

    path = Path(model_dir) / "config.json"
    doc = json.loads(path.read_text())
    doc["residual_threshold"] = threshold
    if work_size is not None:
        doc["work_size"] = work_size
    doc.setdefault("provenance", {})["residual_threshold_selection"] = {
        "rule": f"smallest threshold at which no validation image loses more than {max_loss_db} dB (left half)",
        "validation": f"skimage.data.retina() at {size} px, left half, the seven degradation combinations, seeds "
                      f"{list(seeds)}", "grid": rows,
        "backend": backend,
        "command": f"python -m retina_fast.training.enhance_kinds --model {name or model_dir} --backend {backend} "
                   f"--size {size} --choose-threshold --write"
                   + (f" --work-size {work_size}" if work_size is not None else "")
                   + (f" --after {after}" if after is not None else "")}
    if after is None and doc.get("deblur") is not None:
        doc["provenance"]["residual_threshold_selection"]["deblur"] = (
            f"chosen on the network's inputs after this model's deblurring step ({doc['deblur']}), as enhance runs it")
    if after is not None:
        doc["provenance"]["residual_threshold_selection"]["after"] = (
            f"chosen on the outputs of {after} (its own threshold and work size), gains against the degraded input")
    atomic_write(path, json.dumps(doc, indent=2, allow_nan=False))
    unload_enhancer(str(model_dir))  # a loaded copy in this process would keep the old value


DEBLUR_GRID = (0.005, 0.01, 0.02, 0.04, 0.08)  # λ of retina_fast.deblur
# The smallest λ whose outputs show no rings along the field-of-view rim. Looked at, validation seed 13 (a
# 7 × 7 box) at 1x: concentric rings at 0.005, fainter ones at 0.01, none seen at 0.02. PSNR and SSIM both
# prefer 0.005 (the rings are faint but coherent, so the eye sees what the mean errors do not): the smaller
# values are scored and printed, not chosen.
RING_FREE_LAMBDA = 0.02


def _has_blur(code: str) -> bool:
    return code[0] == "1"  # Cofe-Net codes: bits blur, spot, illumination


def choose_deblur(model, *, size: int = 512, seeds: Sequence[int] = VAL_SEEDS, grid: Sequence[float] = DEBLUR_GRID,
                  max_loss_db: float = MAX_VAL_LOSS_DB, backend: str = "auto",
                  min_lambda: float = RING_FREE_LAMBDA) -> tuple[float | None, list[dict[str, Any]]]:
    """The deblurring λ (``retina_fast.deblur``) of ``grid`` with the highest mean left-half gain over the
    combinations with blur, whole chain (``model`` and its follow-up stages), validation seeds -- among those
    ≥ ``min_lambda`` (RING_FREE_LAMBDA) at which no combination's mean left-half gain falls more than
    ``max_loss_db`` below the chain's without deblurring; None if no λ beats deblurring off. Returns (λ, one row
    per setting, λ None = off, first)."""
    from retina_fast.enhance import enhance

    inputs = kind_inputs(size, seeds)
    rows: list[dict[str, Any]] = []
    for lam in (None, *grid):
        setting = False if lam is None else {"lambda": lam}
        t = kind_table(lambda x, s=setting: enhance(x, model=model, backend=backend, deblur=s), seeds=seeds,
                       inputs=inputs)["rows"]
        gains = {k: v["gain_left"] for k, v in t.items() if k != "none"}
        rows.append({"lambda": lam, "mean_blur_gain_left": sum(g for k, g in gains.items() if _has_blur(k))
                     / sum(_has_blur(k) for k in gains), "gain_left": gains,
                     "worst_image_gain_left": min(v["worst_gain_left"] for k, v in t.items() if k != "none")})
    off = rows[0]
    ok = [r for r in rows[1:] if r["lambda"] >= min_lambda and r["mean_blur_gain_left"] > off["mean_blur_gain_left"]
          and all(r["gain_left"][k] >= g - max_loss_db for k, g in off["gain_left"].items())]
    best = max(ok, key=lambda r: r["mean_blur_gain_left"], default=None)
    return (best["lambda"] if best else None), rows


def write_deblur(model_dir, lam: float, rows: list[dict[str, Any]], seeds: Sequence[int], max_loss_db: float,
                 backend: str, size: int, name: str) -> None:
    """Record ``deblur`` (λ and the other settings at their defaults) and how it was chosen in config.json."""
    import json
    from pathlib import Path

    from retina_fast.deblur import DEFAULTS
    from retina_fast.enhance import unload_enhancer
    from retina_fast.files import atomic_write

    path = Path(model_dir) / "config.json"
    doc = json.loads(path.read_text())
    doc["deblur"] = {**DEFAULTS, "lambda": lam}
    doc.setdefault("provenance", {})["deblur_selection"] = {
        "rule": f"the lambda >= {RING_FREE_LAMBDA} (smaller ones ring along the rim, looked at) with the highest "
                "mean left-half gain over the combinations with blur (whole chain), no combination's mean left-half "
                f"gain more than {max_loss_db} dB below deblurring off",
        "validation": f"skimage.data.retina() at {size} px, left half, the seven degradation combinations, seeds "
                      f"{list(seeds)}", "grid": rows, "backend": backend,
        "command": f"python -m retina_fast.training.enhance_kinds --model {name} --backend {backend} --size {size} "
                   "--choose-deblur --write"}
    atomic_write(path, json.dumps(doc, indent=2, allow_nan=False))
    unload_enhancer(str(model_dir))


def main(argv: list[str] | None = None) -> int:
    """``python -m retina_fast.training.enhance_kinds --model DIR [--size 512] [--seeds 0 1 2 3]``: print the table."""
    import argparse
    import json
    import sys

    from retina_fast.enhance import enhance, resolve_enhancer, work_size_option_error

    p = argparse.ArgumentParser(prog="python -m retina_fast.training.enhance_kinds", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", nargs="+", default=["default"], help="MAGE-Net checkpoint directories or names")
    p.add_argument("--size", type=int, default=512, help="whole-image size in px (default 512)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3], help="degradation seeds (default 0 1 2 3)")
    p.add_argument("--backend", default="auto", help="enhance backend (default auto)")
    p.add_argument("--work-size", type=int, default=None, metavar="PX",
                   help="enhance(..., work_size=PX): the network runs with the shorter side scaled to PX and its "
                        "change is resized back; 0 = at the image's size (default: the checkpoint's work_size); "
                        "with --choose-threshold --write it is recorded with the threshold")
    p.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    p.add_argument("--figure", metavar="PNG", help="also write inputs and outputs of the first seed, one row per kind")
    p.add_argument("--choose-threshold", action="store_true",
                   help=f"choose the residual threshold on the validation split (left half, seeds {VAL_SEEDS[0]}-"
                        f"{VAL_SEEDS[-1]}): the smallest of 0, 0.01, ..., 0.1 at which no image loses more than "
                        f"{MAX_VAL_LOSS_DB} dB; prints the grid")
    p.add_argument("--choose-deblur", action="store_true",
                   help=f"choose the deblurring lambda on the validation split (left half, seeds {VAL_SEEDS[0]}-"
                        f"{VAL_SEEDS[-1]}, whole chain) from {', '.join(map(str, DEBLUR_GRID))} (at least "
                        f"{RING_FREE_LAMBDA}: smaller values ring along the rim); prints the grid")
    p.add_argument("--write", action="store_true",
                   help="with --choose-threshold / --choose-deblur: record it in the model's config.json")
    p.add_argument("--after", metavar="MODEL", default=None,
                   help="with --choose-threshold: the models are follow-up stages of MODEL; choose their threshold "
                        "on its outputs (gains still against the degraded input)")
    p.add_argument("--spots", action="store_true",
                   help="also print how much of the spots' brightening each model removes (spot-only inputs, "
                        "seeds 0-2, inside the spot disks; raw network and with its residual threshold)")
    args = p.parse_args(argv)
    if args.write and not (args.choose_threshold or args.choose_deblur):
        p.error("--write goes with --choose-threshold or --choose-deblur")
    if args.choose_threshold and args.choose_deblur:
        p.error("--choose-threshold and --choose-deblur are separate runs (the threshold first)")
    if args.after is not None and not args.choose_threshold:
        p.error("--after goes with --choose-threshold")
    if work_size_option_error(args.work_size):
        p.error(work_size_option_error(args.work_size))
    if args.choose_threshold:
        for m in args.model:
            tau, rows = choose_residual_threshold(m, size=args.size, backend=args.backend, work_size=args.work_size,
                                                  after=args.after)
            for r in rows:
                print(m, json.dumps(r), flush=True)
            print(f"{m}: residual_threshold {tau}" + ("" if tau is not None else " (none of the grid keeps every "
                                                                               "validation image)"))
            if args.write:
                if tau is None:
                    print(f"{m}: nothing written", file=sys.stderr)
                    return 2
                write_residual_threshold(resolve_enhancer(m), tau, rows, VAL_SEEDS, MAX_VAL_LOSS_DB, args.backend,
                                         args.size, args.work_size, name=m, after=args.after)
        return 0
    if args.choose_deblur:
        for m in args.model:
            lam, rows = choose_deblur(m, size=args.size, backend=args.backend)
            for r in rows:
                print(m, json.dumps(r), flush=True)
            print(f"{m}: deblur lambda {lam}" + ("" if lam is not None else " (deblurring does not help)"))
            if args.write:
                if lam is None:
                    print(f"{m}: nothing written", file=sys.stderr)
                    return 2
                write_deblur(resolve_enhancer(m), lam, rows, VAL_SEEDS, MAX_VAL_LOSS_DB, args.backend, args.size, m)
        return 0
    inputs = kind_inputs(args.size, args.seeds)
    tables = {}
    for m in args.model:
        tables[m] = kind_table(lambda x, m=m: enhance(x, model=m, backend=args.backend, work_size=args.work_size),
                               inputs=inputs)
        print(m, json.dumps(tables[m]["summary"]), flush=True)
        if args.spots:
            for label, tau in (("raw", 0.0), ("with its residual threshold", None)):
                r = spot_removal(lambda x, m=m, tau=tau: enhance(x, model=m, backend=args.backend, residual_threshold=tau,
                                                                 work_size=args.work_size), size=args.size)
                print(f"{m}: spots {label}: excess {r['excess_in']:.3f} -> {r['excess_out']:.3f}, "
                      f"removed {100 * r['removed']:.0f} %", flush=True)
    print(format_kind_table(tables))
    if args.figure:
        kinds_figure(tables, args.figure)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({m: {k: v for k, v in t.items() if not k.startswith("_")} for m, t in tables.items()}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
