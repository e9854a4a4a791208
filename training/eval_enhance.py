"""MAGE-Net ablation: ``python -m retina_fast.training.eval_enhance --runs RUNS --out docs/enhance_eval``.

Test sets (training/enhance_data.py): the degraded phantom test set (eyes never trained on, each of
Cofe-Net's seven degradation combinations twice) and the held-out real half (right half of
``skimage.data.retina()``, the same seven combinations twice, its clean original as ground truth).
Methods: the degraded input; a CLAHE baseline (``skimage.exposure.equalize_adapthist``, clip 0.01,
8×8 contextual regions, on the L channel of CIELAB so colours keep their hue); and the four trained
variants of RUNS — Stage-1 only, MAGE-Net without RSP, MAGE-Net, T-MAGE-Net — each run through
``retina_fast.enhance`` with the ``torch`` (reference) backend and its own residual threshold, chosen by
the shipped rule (``enhance_kinds.choose_residual_threshold``, on that rule's validation seeds; a threshold
recorded in a run's config.json is ignored), so every rung gets the same post-processing; the per-kind
tables and the vessel IoU are also given for the raw networks (threshold 0). Every output is clamped to [0, 1] and
multiplied by the input's field-of-view mask. Metrics: ``retina_fast.metrics.psnr`` / ``ssim`` over the
whole image (all three channels) against the clean image, mean ± std over the test images. Vessel IoU:
the pretrained RSP network (RUNS/rsp) segments the phantom test images (σ(mean logit) > 0.5), IoU with
the phantom's artery|vein mask inside the field of view, for clean, degraded, CLAHE and every variant.

A run ``magenet-long`` (MAGE-Net trained longer), when present, is evaluated as an extra row.

Per degradation kind (training/enhance_kinds.py): the whole real photograph at 512 px, each of the seven
combinations with seeds 0–3 and the clean image itself, PSNR per half; the right half is the held-out
test, and the worst combination must not lose against its input. Model selection uses a separate
validation split that the tables never report: the same protocol with seeds 10 and 11, scored on the
left half only (the real training domain; T-MAGE-Net saw degraded versions of it without their labels).

Writes OUT/ablation.md, OUT/ablation.json, OUT/examples.png and OUT/kinds.png; with ``--ship-to DIR``
also copies the MAGE-Net / T-MAGE-Net run that is best on the validation split (T-MAGE-Net on a tie) to
DIR as a clean checkpoint (``model.safetensors`` + config.json with provenance) with its ``log.csv`` and
a TRAINING.md, and records there the residual threshold chosen for it above -- unless the weights already
in DIR score at least as high on the same validation split (``--replace`` ships regardless).
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retina_fast.checkpoint import config_part, load_checkpoint, save_checkpoint
from retina_fast.metrics import psnr, ssim
from retina_fast.training import enhance_data, enhance_kinds

__all__ = ["VARIANTS", "clahe", "evaluate", "thresholded", "vessel_iou", "ladder_inversions", "choose",
           "incumbent_score", "ship", "saved_again", "note_follow_up", "FOLLOW_UP_LINE",
           "portable_command", "main"]

# run directory name -> row label (the paper's Table 6 ladder)
VARIANTS = {"stage1-only": "Stage-1 only", "no-rsp": "MAGE-Net w/o RSP", "magenet": "MAGE-Net",
            "tmagenet": "T-MAGE-Net", "magenet-long": "MAGE-Net, long run"}
SHIPPABLE = ("T-MAGE-Net", "MAGE-Net", "MAGE-Net, long run")  # in order of preference on a tie


def clahe(x: torch.Tensor, fov: torch.Tensor | None = None) -> torch.Tensor:
    """CLAHE on the L channel of CIELAB; x (N, 3, H, W) in [0, 1] -> same (× fov when given)."""
    from skimage import color, exposure

    out = []
    for img in x.permute(0, 2, 3, 1).numpy().astype(np.float64):
        lab = color.rgb2lab(img)
        lab[..., 0] = exposure.equalize_adapthist(lab[..., 0] / 100.0, clip_limit=0.01) * 100.0
        with warnings.catch_warnings():  # out-of-gamut colours are clipped on purpose
            warnings.simplefilter("ignore", UserWarning)
            out.append(np.clip(color.lab2rgb(lab), 0, 1))
    y = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float()
    return y if fov is None else y * fov


def _fov(x: torch.Tensor) -> torch.Tensor:
    from retina_fast.training.degrade import fov_mask

    return fov_mask(x).float()[:, None]


def _scores(pred: torch.Tensor, target: torch.Tensor) -> dict[str, Any]:
    """PSNR / SSIM per image, their mean ± std, and the PSNR mean over the images whose degradation
    includes illumination (combination i mod 7) and over the spots / blur-only ones."""
    from retina_fast.training.degrade import degradation_combinations

    p, s = psnr(pred, target).double(), ssim(pred, target).double()
    combos = degradation_combinations()
    ill = torch.tensor(["illumination" in combos[i % len(combos)] for i in range(p.shape[0])])
    return {"psnr": p.mean().item(), "psnr_std": p.std().item(), "ssim": s.mean().item(),
            "ssim_std": s.std().item(), "psnr_illumination": p[ill].mean().item(),
            "psnr_spots_blur": p[~ill].mean().item() if (~ill).any() else None,
            "psnr_per_image": p.tolist(), "ssim_per_image": s.tolist()}


@torch.no_grad()
def vessel_iou(rsp, images: torch.Tensor, vessels: torch.Tensor, fov: torch.Tensor) -> dict[str, float]:
    """Mean over images of IoU(σ(mean logit) > 0.5, vessels) inside the FOV; images (N, 3, H, W)."""
    pred = torch.sigmoid(rsp(images).mean) > 0.5
    gt, inside = vessels.bool(), fov.bool()
    inter = (pred & gt & inside).flatten(1).sum(1).double()
    union = ((pred | gt) & inside).flatten(1).sum(1).double().clamp_min(1)
    iou = inter / union
    return {"iou": iou.mean().item(), "iou_std": iou.std().item()}


def _load_rsp(path: Path):
    from retina_fast.training.train_enhance import frozen_rsp

    return frozen_rsp(path)


def portable_command(command: str | None) -> str | None:
    """A recorded training command without the machine's paths: runs started as ``python -m
    retina_fast.training.train_enhance`` recorded the absolute path of train_enhance.py as the program
    (before ``train_enhance.command_of``); an absolute program path becomes its base name."""
    if not command:
        return command
    head, sep, rest = command.partition(" ")
    if Path(head).name == "train_enhance.py":
        return "python -m retina_fast.training.train_enhance" + sep + rest
    return (Path(head).name if head.startswith("/") else head) + sep + rest


def _run_info(path: Path) -> dict[str, Any]:
    prov = load_checkpoint(path, [])[0]["provenance"]
    return {"checkpoint": str(path), "steps": prov.get("steps"), "wall_time_s": prov.get("wall_time_s"),
            "cpu_time_s": prov.get("cpu_time_s"), "hardware": prov.get("hardware"),
            "command": portable_command(prov.get("command"))}


TEST_SEEDS, VAL_SEEDS, KIND_SIZE = (0, 1, 2, 3), (10, 11), 512
THRESHOLD_CACHE = "thresholds-cache.json"  # in the runs directory


def rung_threshold(ck: Path, runs: Path, kind_size: int, backend: str,
                   work_size: int | None = None) -> tuple[float | None, list[dict[str, Any]]]:
    """``enhance_kinds.choose_residual_threshold`` of checkpoint ``ck``, remembered in RUNS/thresholds-cache.json
    under the weights' sha256 and every setting of the rule (the choice is deterministic), so a rung finished
    early can have its threshold chosen while others still train (``--thresholds-only``)."""
    from retina_fast.files import atomic_write

    sha = load_checkpoint(ck, [])[0]["weights"]["model"]["sha256"]
    setting = [sha, kind_size, backend, list(enhance_kinds.THRESHOLD_GRID), list(enhance_kinds.VAL_SEEDS),
               enhance_kinds.MAX_VAL_LOSS_DB]
    if work_size is not None:  # keys of runs evaluated at their own work size stay as they were
        setting.append({"work_size": work_size})
    key = json.dumps(setting)
    path = runs / THRESHOLD_CACHE
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]["threshold"], cache[key]["grid"]
    tau, grid = enhance_kinds.choose_residual_threshold(str(ck), size=kind_size, backend=backend, work_size=work_size)
    try:  # re-read: another process may have added a rung meanwhile
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    cache[key] = {"checkpoint": str(ck), "threshold": tau, "grid": grid}
    atomic_write(path, json.dumps(cache, indent=1))
    return tau, grid


def validation_score(table: dict[str, Any]) -> tuple[bool, float]:
    """(no combination loses more than 1 dB on the left half, mean left-half gain over the combinations)
    of a validation kind table; larger is better (compared as a tuple)."""
    rows = [r for k, r in table["rows"].items() if k != "none"]
    return (min(r["gain_left"] for r in rows) >= -1.0, sum(r["gain_left"] for r in rows) / len(rows))


def evaluate(runs: Path, n_test: int = 14, size: int = 256, backend: str = "torch", *, kind_size: int = KIND_SIZE,
             test_seeds=TEST_SEEDS, val_seeds=VAL_SEEDS, work_size: int | None = None) -> dict[str, Any]:
    """All numbers of the ablation (see the module doc) as a JSON-serialisable dict. ``work_size``: every rung's
    ``enhance(..., work_size=)`` (None: each checkpoint's own, 0: the image's size)."""
    from retina_fast.enhance import enhance

    cache = runs / "data"
    syn = enhance_data.synthetic_test_set(n_test, size, cache_dir=cache)
    real = enhance_data.real_test_set(n_test, size, cache_dir=cache)
    sets = {"phantom": syn.get(range(len(syn))), "real": real.get(range(len(real)))}
    outputs: dict[str, dict[str, torch.Tensor]] = {name: {} for name in sets}
    for name, b in sets.items():
        outputs[name]["Degraded input"] = b["x"]
        outputs[name]["CLAHE (L of LAB)"] = clahe(b["x"], _fov(b["x"]))
    runs_info, thresholds = {}, {}
    raw_phantom: dict[str, torch.Tensor] = {}
    test_in = enhance_kinds.kind_inputs(kind_size, test_seeds)
    val_in = enhance_kinds.kind_inputs(kind_size, val_seeds)
    kinds, kinds_raw, validation = {}, {}, {}
    for run, label in VARIANTS.items():
        ck = runs / run / "final"
        if not (ck / "config.json").is_file():
            continue
        runs_info[label] = _run_info(ck)
        # every rung gets its own residual threshold by the shipped rule (not a threshold recorded in its
        # config.json), so the ladder compares the recipes under one post-processing
        tau, grid = rung_threshold(ck, runs, kind_size, backend, work_size)
        thresholds[label] = {"threshold": tau, "grid": grid}

        def raw(x, ck=str(ck)):  # the network alone, 4 images at a time
            return torch.cat([enhance(x[i:i + 4], model=ck, backend=backend, residual_threshold=0.0,
                                      work_size=work_size) for i in range(0, len(x), 4)])

        for name, b in sets.items():
            r = raw(b["x"])
            outputs[name][label] = thresholded(b["x"], r, tau)
            if name == "phantom":
                raw_phantom[label] = r
        for table, inputs, seeds in ((kinds, test_in, test_seeds), (validation, val_in, val_seeds)):
            r = raw(inputs[1])
            if table is kinds:
                kinds_raw[label] = enhance_kinds.kind_table(None, seeds=seeds, inputs=inputs, outputs=r)
            table[label] = enhance_kinds.kind_table(None, seeds=seeds, inputs=inputs,
                                                    outputs=thresholded(inputs[1], r, tau))
    result: dict[str, Any] = {"test_sets": {}, "runs": runs_info, "backend": backend, "work_size": work_size,
                              "size": size, "n_test": n_test, "kind_size": kind_size,
                              "test_seeds": list(test_seeds), "val_seeds": list(val_seeds),
                              "thresholds": thresholds,
                              "kinds": {k: _public(v) for k, v in kinds.items()},
                              "kinds_raw": {k: _public(v) for k, v in kinds_raw.items()},
                              "validation": {k: {**_public(v), "score": list(validation_score(v))}
                                             for k, v in validation.items()}}
    for name, b in sets.items():
        result["test_sets"][name] = {label: _scores(y, b["y"]) for label, y in outputs[name].items()}
    rsp_ck = runs / "rsp" / "final"
    if (rsp_ck / "config.json").is_file():
        rsp = _load_rsp(rsp_ck)
        b = sets["phantom"]
        seg = {"Clean (ground truth image)": vessel_iou(rsp, b["y"], b["vessels"], b["fov"])}
        for label, y in outputs["phantom"].items():
            seg[label] = vessel_iou(rsp, y, b["vessels"], b["fov"])
        result["vessel_iou_raw"] = {label: vessel_iou(rsp, y, b["vessels"], b["fov"]) for label, y in raw_phantom.items()}
        result["vessel_iou"] = seg
        result["runs"]["RSP pretraining"] = _run_info(rsp_ck)
    result["_outputs"], result["_sets"], result["_kinds"] = outputs, sets, kinds
    return result


def thresholded(x: torch.Tensor, raw: torch.Tensor, tau: float | None) -> torch.Tensor:
    """What ``enhance(x, residual_threshold=tau)`` returns, from its raw output ``raw`` (threshold 0: clamped,
    times the field of view): the change soft-thresholded by ``tau`` (None or 0: ``raw`` itself)."""
    from retina_fast.enhance import shrink_residual

    return shrink_residual(x, raw, tau) * _fov(x) if tau else raw


def _public(table: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in table.items() if not k.startswith("_")}


def _table(result: dict[str, Any]) -> str:
    ts = result["test_sets"]
    seg = result.get("vessel_iou", {})
    def sub(v):
        return "" if v is None else f"{v:.2f}"

    lines = ["| Method | Phantom PSNR (dB) | Phantom SSIM | Real PSNR (dB) | Real SSIM | Real PSNR, illum. / "
             "spots+blur only | Vessel IoU (phantom) |", "|---|---|---|---|---|---|---|"]
    if seg:
        lines.append(f"| Clean image (upper bound) | | | | | | {seg['Clean (ground truth image)']['iou']:.3f} |")
    for label in ts["phantom"]:
        p, r = ts["phantom"][label], ts["real"][label]
        iou = f"{seg[label]['iou']:.3f}" if label in seg else ""
        lines.append(f"| {label} | {p['psnr']:.2f} ± {p['psnr_std']:.2f} | {p['ssim']:.4f} | "
                     f"{r['psnr']:.2f} ± {r['psnr_std']:.2f} | {r['ssim']:.4f} | "
                     f"{sub(r['psnr_illumination'])} / {sub(r['psnr_spots_blur'])} | {iou} |")
    return "\n".join(lines)


LADDER = ("Stage-1 only", "MAGE-Net w/o RSP", "MAGE-Net", "T-MAGE-Net")  # the paper's order, worst to best


def _mean_gain_right(table: dict[str, Any]) -> float:
    rows = [r["gain_right"] for k, r in table["rows"].items() if k != "none"]
    return sum(rows) / len(rows)


def ladder_inversions(result: dict[str, Any], tol_db: float = 0.005) -> list[str]:
    """Adjacent rungs of LADDER (those present) where the better-by-the-paper one scores lower by more than
    ``tol_db``, on the held-out real test set's PSNR and on the mean right-half gain over the seven combinations
    (thresholded outputs); one line each, with the size."""
    present = [k for k in LADDER if k in result["kinds"]]
    real = result["test_sets"]["real"]
    metrics = {"real test-set PSNR": lambda k: real[k]["psnr"],
               "mean right-half gain over the combinations": lambda k: _mean_gain_right(result["kinds"][k])}
    out = []
    for lo, hi in zip(present, present[1:]):
        for name, f in metrics.items():
            if f(hi) < f(lo) - tol_db:
                out.append(f"{hi} < {lo} on the {name} by {f(lo) - f(hi):.2f} dB")
    return out


def _ladder(result: dict[str, Any]) -> str:
    """One row per rung: its residual threshold, then the thresholded / raw (τ = 0) figures."""
    seg, seg_raw = result.get("vessel_iou", {}), result.get("vessel_iou_raw", {})
    lines = ["| Rung | τ | mean gain R, 7 combinations (τ / raw) | worst combination R (τ / raw) | worst L (τ / raw) | "
             "mean illumination gain R (τ / raw) | clean photograph out R (τ / raw) | vessel IoU (τ / raw) |",
             "|---|---|---|---|---|---|---|---|"]
    for label, t in result["kinds"].items():
        r, sm, smr = result["kinds_raw"][label], t["summary"], result["kinds_raw"][label]["summary"]
        tau = result["thresholds"][label]["threshold"]
        iou = (f"{seg[label]['iou']:.3f} / {seg_raw[label]['iou']:.3f}" if label in seg and label in seg_raw else "")
        lines.append(f"| {label} | {'none kept every image' if tau is None else tau} | "
                     f"{_mean_gain_right(t):+.2f} / {_mean_gain_right(r):+.2f} | "
                     f"{sm['worst_combination_gain_right']:+.2f} / {smr['worst_combination_gain_right']:+.2f} | "
                     f"{sm['worst_combination_gain_left']:+.2f} / {smr['worst_combination_gain_left']:+.2f} | "
                     f"{sm['mean_illumination_gain_right']:+.2f} / {smr['mean_illumination_gain_right']:+.2f} | "
                     f"{sm['clean_output_right']:.1f} / {smr['clean_output_right']:.1f} | {iou} |")
    return "\n".join(lines)


def _walltimes(result: dict[str, Any]) -> str:
    def minutes(v):
        return f"{v / 60:.1f} min" if v is not None else "not recorded"

    lines = ["| Run | Steps | Wall time | CPU time of the process | Hardware |", "|---|---|---|---|---|"]
    for label, info in result["runs"].items():
        hw = info.get("hardware") or {}
        lines.append(f"| {label} | {info.get('steps')} | {minutes(info.get('wall_time_s'))} | "
                     f"{minutes(info.get('cpu_time_s'))} | {hw.get('cpu', '?')}, {hw.get('torch_threads', '?')} "
                     f"thread(s), {hw.get('device', '?')} |")
    return "\n".join(lines)


def _examples(result: dict[str, Any], path: Path, rows=(0, 6)) -> None:
    from PIL import Image

    outs, gt = result["_outputs"]["real"], result["_sets"]["real"]["y"]
    tiles = []
    for i in (r for r in rows if r < gt.shape[0]):
        row = [outs[label][i] for label in outs] + [gt[i]]
        tiles.append(torch.cat(row, -1))
    img = torch.cat(tiles, -2).clamp(0, 1).permute(1, 2, 0).numpy()
    Image.fromarray(np.round(img * 255).astype(np.uint8)).save(path)


def write_report(result: dict[str, Any], out: Path, command: str | None = None) -> None:
    """OUT/ablation.md, ablation.json, examples.png, kinds.png; ``command``: the evaluation's command line."""
    out.mkdir(parents=True, exist_ok=True)
    data = {k: v for k, v in result.items() if not k.startswith("_")}
    (out / "ablation.json").write_text(json.dumps(data, indent=1) + "\n")
    _examples(result, out / "examples.png")
    if result.get("_kinds"):
        enhance_kinds.kinds_figure(result["_kinds"], out / "kinds.png")
    real = result["test_sets"]["real"]
    base = real["Degraded input"]["psnr"]
    gains = ", ".join(f"{k} {v['psnr'] - base:+.2f} dB" for k, v in real.items() if k != "Degraded input")
    md = [
        "# MAGE-Net ablation (CPU-scale reproduction)",
        "",
        f"Produced by `{command or 'python -m retina_fast.training.eval_enhance'}`",
        "(the last step of `scripts/train_enhance_ablation.sh`, which runs every training, this evaluation and, with "
        "`--ship-to`, the copy of the MAGE-Net / T-MAGE-Net run best on the validation split to the shipped weights).",
        "",
        *([f"Every model enhances with `work_size={result['work_size']}` (`retina_fast.enhance`): images larger than "
           "that are enhanced on a scaled-down copy and the network's change is resized back.", ""]
          if result.get("work_size") else []),
        f"Test sets: {result['n_test']} degraded phantom eyes never trained on, and the held-out right half of "
        "`skimage.data.retina()` (columns 706–1410; the left half is the unlabelled real training domain) degraded "
        f"{result['n_test']} times with fixed seeds; image i gets Cofe-Net's degradation combination i mod 7. "
        f"Whole fundus at {result['size']} px. PSNR / SSIM over the whole image against the clean image, mean ± std "
        "over images. Model outputs are clamped and multiplied by the input's field-of-view mask; CLAHE = "
        "`equalize_adapthist` (clip 0.01) on the L channel of CIELAB. Vessel IoU: the pretrained RSP network "
        "segmenting each version of the phantom test images (threshold 0.5, inside the field of view).",
        "",
        _table(result),
        "",
        f"Real half, PSNR change over the degraded input: {gains}.",
        "",
        "Training wall times (threads as listed, on a 2-core machine shared with other jobs: two runs usually went "
        "at a time and other jobs could pause them, so wall time overstates the compute). "
        "\"MAGE-Net, long run\" is the same recipe as MAGE-Net with more steps, outside the ablation ladder.",
        "",
        _walltimes(result),
        "",
        "Paper (EyeQ, GPU-scale training) for comparison: Stage-1 22.93 dB → two stages 23.35 → + RSP 23.72 → "
        "+ teacher-student 24.72 (full T-MAGE-Net, SSIM 0.9281); vessel IoU low quality 0.479, MAGE-Net 0.726, "
        "T-MAGE-Net 0.764, clean 0.830. These runs are minutes of CPU training on a phantom, so only the "
        "direction of the differences is comparable, not the values.",
        "",
        "`examples.png`: two real test images; columns = " + ", ".join(result["_outputs"]["real"]) + ", ground truth.",
    ]
    if result.get("kinds"):
        inv = ladder_inversions(result)
        md += ["", "## The ladder, each rung with its own residual threshold", "",
               "Each run's residual threshold τ (`retina_fast.enhance`) is chosen by the shipped rule -- the smallest of "
               f"{', '.join(map(str, enhance_kinds.THRESHOLD_GRID[:2]))}, ..., {enhance_kinds.THRESHOLD_GRID[-1]} at "
               "which no validation image (left half, seven combinations, seeds "
               f"{enhance_kinds.VAL_SEEDS[0]}-{enhance_kinds.VAL_SEEDS[-1]}) loses more than "
               f"{enhance_kinds.MAX_VAL_LOSS_DB} dB -- and every figure above and below uses it (a threshold recorded in "
               "a run's config.json is ignored; the choice of the shipped run uses the same validation images). "
               "Raw = the same network with τ = 0. Held-out right half (R) at "
               f"{result['kind_size']} px, seeds {', '.join(map(str, result['test_seeds']))}; vessel IoU on the phantom "
               "test set.", "", _ladder(result), "",
               "Order of the paper (Stage-1 only ≤ w/o RSP ≤ MAGE-Net ≤ T-MAGE-Net): "
               + ("held on the real test-set PSNR and on the mean right-half gain." if not inv
                  else "inversions: " + "; ".join(inv) + "."),
               "", "## Per degradation kind: does it ever harm?", "",
               f"The whole real photograph at {result['kind_size']} px degraded by each of the seven combinations with "
               f"seeds {', '.join(map(str, result['test_seeds']))} (and the clean photograph itself), enhanced whole; PSNR (dB) against "
               "the clean photograph per half, mean over the seeds. L = left half (optic disc; T-MAGE-Net's unlabelled "
               "real training domain), R = right half (held out). Gain = output − input. Produced by "
               "`training/enhance_kinds.py` (`python -m retina_fast.training.enhance_kinds --model DIR` prints it "
               "for any checkpoint).", "",
               "| Method | worst combination gain, R | worst, L | mean gain over illumination combinations, R | "
               "clean photograph out, L / R |", "|---|---|---|---|---|"]
        for label, t in result["kinds"].items():
            sm = t["summary"]
            none = t["rows"]["none"]
            md.append(f"| {label} | {sm['worst_combination_gain_right']:+.2f} | {sm['worst_combination_gain_left']:+.2f} | "
                      f"{sm['mean_illumination_gain_right']:+.2f} | {none['output_left']:.1f} / {none['output_right']:.1f} |")
        md += ["", enhance_kinds.format_kind_table(result["kinds"]), "",
               "Validation (model selection only; seeds " + ", ".join(map(str, result["val_seeds"])) + ", left half): "
               + ", ".join(f"{k} mean gain {v['score'][1]:+.2f} dB{'' if v['score'][0] else ' (a combination loses > 1 dB)'}"
                           for k, v in result["validation"].items()) + ".", "",
               "`kinds.png`: rows = the clean photograph and each combination (seed 0); columns = degraded input, "
               + ", ".join(result["kinds"]) + ", clean photograph."]
    (out / "ablation.md").write_text("\n".join(md) + "\n")


def _rank(score) -> tuple[bool, float]:
    return bool(score[0]), round(float(score[1]), 2)  # gains within 0.005 dB count as a tie


def choose(result: dict[str, Any]) -> str:
    """The MAGE-Net / T-MAGE-Net label of ``result`` best on the validation split (``validation_score``, then
    T-MAGE-Net on a tie). The held-out test numbers play no part in the choice."""
    val = result["validation"]
    cands = [label for label in SHIPPABLE if label in val]
    if not cands:
        raise ValueError("none of the magenet / tmagenet runs has finished")
    return max(cands, key=lambda k: (*_rank(val[k]["score"]), -SHIPPABLE.index(k)))


def incumbent_score(target: Path, result: dict[str, Any]) -> list | None:
    """``validation_score`` of the weights already in ``target`` (with the residual threshold recorded there;
    the network alone, without its follow-up stages, as the runs are scored), on the validation split of
    ``result``; None when ``target`` holds no enhancer."""
    from retina_fast.enhance import enhance

    if not (target / "config.json").is_file():
        return None
    inputs = enhance_kinds.kind_inputs(result["kind_size"], result["val_seeds"])
    table = enhance_kinds.kind_table(lambda x: enhance(x, model=str(target), backend=result["backend"], then=()),
                                     seeds=result["val_seeds"], inputs=inputs)
    return list(validation_score(table))


def saved_again(doc: dict[str, Any], drop: tuple[str, ...] = ()) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config, provenance) to save a trained MAGE-Net checkpoint's weights again (its config.json ``doc``):
    without the residual threshold and its selection record, which the caller chooses and writes anew, and the
    keys in ``drop``; the training command made portable."""
    config = config_part(doc, ("model_weights", "residual_threshold", *drop))
    prov = {k: v for k, v in doc["provenance"].items() if k != "residual_threshold_selection"}
    prov["command"] = portable_command(prov.get("command"))
    return config, prov


def ship(result: dict[str, Any], runs: Path, target: Path, eval_command: str | None = None,
         incumbent: list | None = None) -> str | None:
    """Copy the run :func:`choose` picks to ``target`` with the residual threshold chosen for it in ``result``
    (none when the grid had none) and a TRAINING.md (``eval_command``: the evaluation's command line); returns
    its label. ``incumbent``: the validation score of the weights in ``target`` (:func:`incumbent_score`);
    they are kept, and None returned, unless the chosen run scores higher."""
    real, val = result["test_sets"]["real"], result["validation"]
    try:
        label = choose(result)
    except ValueError as e:
        raise ValueError(f"{runs}: {e}") from None
    if incumbent is not None and _rank(val[label]["score"]) <= _rank(incumbent):
        return None
    cands = [k for k in SHIPPABLE if k in val]
    run = {v: k for k, v in VARIANTS.items()}[label]
    doc, states = load_checkpoint(runs / run / "final", ["model"])
    config, prov = saved_again(doc)
    others = {k: round(val[k]["score"][1], 2) for k in cands}
    prov["selection"] = (f"{label}: best mean PSNR gain (dB) on the validation split (left half of the real "
                         f"photograph, seeds {', '.join(map(str, result['val_seeds']))}, every combination; runs losing > 1 dB on "
                         f"one ranked last) among {others} (T-MAGE-Net preferred on a tie)"
                         + (f", above the weights shipped before ({incumbent[1]:.2f})" if incumbent is not None else "")
                         + "; see docs/enhance_eval/ablation.md")
    if result.get("work_size") is not None:
        config["work_size"] = result["work_size"]  # the outputs chosen and scored above were made at it
    then = _read_then(target)
    if then:  # the follow-up stages stay (their thresholds were chosen after the weights replaced here)
        config["then"] = then
    if target.exists():
        shutil.rmtree(target)
    save_checkpoint(target, {"model": states["model"]}, config, prov)
    shutil.copy(runs / run / "log.csv", target / "log.csv")
    tau = result["thresholds"][label]["threshold"]
    if tau is not None:
        enhance_kinds.write_residual_threshold(target, tau, result["thresholds"][label]["grid"], enhance_kinds.VAL_SEEDS,
                                               enhance_kinds.MAX_VAL_LOSS_DB, result["backend"], result["kind_size"],
                                               result.get("work_size"), name=str(target))
    info = result["runs"][label]
    hw = info.get("hardware") or {}
    kinds = result["kinds"][label]["summary"]
    md = [f"# {label} (tiny preset): the shipped default enhancement weights", "",
          f"Selected: {prov['selection']}.", "",
          "Reproduce, in order (the commands recorded in the checkpoints; paths as used then):", "", "```bash",
          *_commands(prov),
          eval_command or f"python -m retina_fast.training.eval_enhance --runs {runs} --ship-to {target}",
          "```", "",
          f"- steps: {info.get('steps')}, wall time {info.get('wall_time_s')} s on {hw.get('cpu')} "
          f"({hw.get('cpu_count')} cores, {hw.get('torch_threads')} torch thread(s), {hw.get('device')}); wall time "
          "on a machine shared with other jobs",
          f"- data: {prov.get('data')}",
          "- residual threshold: " + (f"{tau} (`residual_threshold` in config.json), chosen by the rule of "
                                      "`enhance_kinds.choose_residual_threshold` on its validation split; the grid "
                                      "is in `provenance.residual_threshold_selection`" if tau is not None else
                                      "none (no value of the grid kept every validation image)"),
          f"- real-half PSNR {real[label]['psnr']:.2f} dB vs degraded input {real['Degraded input']['psnr']:.2f} dB; "
          f"phantom PSNR {result['test_sets']['phantom'][label]['psnr']:.2f} dB",
          f"- per degradation kind (held-out right half, {result['kind_size']} px, seeds "
          f"{', '.join(map(str, result['test_seeds']))}): worst combination gain "
          f"{kinds['worst_combination_gain_right']:+.2f} dB, mean gain over the illumination combinations "
          f"{kinds['mean_illumination_gain_right']:+.2f} dB",
          "- files: config.json (architecture, provenance, sha256), model.safetensors, log.csv (training log)"]
    (target / "TRAINING.md").write_text("\n".join(md) + "\n")
    if then:
        note_follow_up(target, then[0])
    return label


FOLLOW_UP_LINE = "- follow-up stage: "  # the line of a first stage's TRAINING.md that names its stage


def note_follow_up(first: Path, entry: str | None) -> None:
    """Name ``entry`` (None: no stage) in FIRST's TRAINING.md, when there is one, as its one follow-up line."""
    from retina_fast.files import atomic_write

    md = first / "TRAINING.md"
    if not md.is_file():
        return
    lines = [ln for ln in md.read_text(encoding="utf-8").splitlines() if not ln.startswith(FOLLOW_UP_LINE)]
    if entry is not None:
        lines.append(f"{FOLLOW_UP_LINE}`{entry}` runs on this network's output (config.json `then`; "
                     "`retina_fast.enhance(..., then=())` runs this one alone); its own TRAINING.md says how it was "
                     "made and chosen")
    atomic_write(md, "\n".join(lines) + "\n")


def _read_then(target: Path) -> list[str] | None:
    """The ``then`` list (follow-up stages, ``retina_fast.enhance``) of the weights in ``target``, if any."""
    import json

    try:
        return json.loads((target / "config.json").read_text(encoding="utf-8")).get("then")
    except (OSError, ValueError, AttributeError):
        return None


def _commands(prov: dict[str, Any]) -> list[str]:
    """The training commands behind a checkpoint's provenance: its RSP initialisation's and its frozen
    segmenter's (read from their own checkpoints when these are still there with the recorded sha256; a
    ``#`` comment line otherwise), then its own."""
    out, seen = [], set()
    for key in ("rsp_init", "structure_rsp"):
        rec = prov.get(key) or {}
        path = rec.get("path")
        if not path or path in seen:
            continue
        seen.add(path)
        try:
            doc = load_checkpoint(path, [])[0]
        except (OSError, ValueError):
            out.append(f"# {key}: {path} (its checkpoint is not here to read the command from)")
            continue
        if rec.get("sha256") and doc.get("weights", {}).get("model", {}).get("sha256") != rec["sha256"]:
            out.append(f"# {key}: {path} now holds other weights than the ones used (sha256 differs)")
        elif not doc.get("provenance", {}).get("command"):
            out.append(f"# {key}: {path} (no command recorded in its checkpoint)")
        else:
            out.append(portable_command(doc["provenance"]["command"]))
    return out + [prov.get("command") or "# (no command recorded)"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m retina_fast.training.eval_enhance",
                                description=__doc__.split("\n\n")[0].replace("``", ""))
    p.add_argument("--runs", default="runs/enhance_ablation", help="directory of the ablation runs")
    p.add_argument("--out", default="docs/enhance_eval", help="report directory")
    p.add_argument("--n-test", type=int, default=14, help="images per test set (default 14 = 7 combinations × 2)")
    p.add_argument("--size", type=int, default=256, help="whole-fundus size in px (as in training; default 256)")
    p.add_argument("--backend", default="torch", help="enhance backend (default torch, the reference)")
    p.add_argument("--kind-size", type=int, default=KIND_SIZE, help=f"size of the per-kind check (default {KIND_SIZE})")
    p.add_argument("--work-size", type=int, default=None, metavar="PX",
                   help="enhance every rung with work_size=PX (retina_fast.enhance; 0 = at the image's size) and record "
                        "it in shipped weights (default: each checkpoint's own)")
    p.add_argument("--test-seeds", type=int, nargs="+", default=list(TEST_SEEDS), help="per-kind test seeds (default 0 1 2 3)")
    p.add_argument("--val-seeds", type=int, nargs="+", default=list(VAL_SEEDS), help="validation seeds (default 10 11)")
    p.add_argument("--ship-to", metavar="DIR", help="copy the chosen model here (retina_fast/weights/magenet-tiny)")
    p.add_argument("--replace", action="store_true",
                   help="with --ship-to: replace the weights there even when they score higher on the validation "
                        "split (by default they are kept unless the chosen run beats them)")
    p.add_argument("--thresholds-only", action="store_true",
                   help=f"only choose (and remember in RUNS/{THRESHOLD_CACHE}) the residual threshold of every finished "
                        "run, e.g. while the others still train; no report")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    runs = Path(args.runs)
    from retina_fast.enhance import work_size_option_error

    if work_size_option_error(args.work_size):
        p.error(work_size_option_error(args.work_size))
    if args.replace and not args.ship_to:
        p.error("--replace needs --ship-to DIR (it says whether the weights there may be replaced)")
    if set(args.test_seeds) & set(args.val_seeds):
        p.error(f"--test-seeds and --val-seeds must not overlap (both hold {sorted(set(args.test_seeds) & set(args.val_seeds))})")
    if set(args.test_seeds) & set(enhance_kinds.VAL_SEEDS):
        p.error(f"--test-seeds must not overlap the residual threshold's validation seeds {list(enhance_kinds.VAL_SEEDS)}")
    if args.thresholds_only:
        for run, label in VARIANTS.items():
            ck = runs / run / "final"
            if (ck / "config.json").is_file():
                tau = rung_threshold(ck, runs, args.kind_size, args.backend, args.work_size)[0]
                print(f"{label}: residual threshold {tau}",
                      flush=True)
        return 0
    result = evaluate(runs, args.n_test, args.size, args.backend, kind_size=args.kind_size,
                      test_seeds=args.test_seeds, val_seeds=args.val_seeds, work_size=args.work_size)
    command = "python -m retina_fast.training.eval_enhance " + shlex.join(argv)
    write_report(result, Path(args.out), command)
    if args.ship_to:
        target = Path(args.ship_to)
        incumbent = None if args.replace else incumbent_score(target, result)
        label = ship(result, runs, target, command, incumbent)
        if label is None:
            best = choose(result)
            print(f"{target}: kept; the weights there score {incumbent[1]:.2f} dB on the validation split, "
                  f"{best} {result['validation'][best]['score'][1]:.2f} dB", file=sys.stderr)
            return 0
        tau = result["thresholds"][label]["threshold"]
        print(f"{target}: {label}, residual_threshold {tau}" if tau is not None else
              f"{target}: {label}; no residual threshold of the grid keeps every validation image, none recorded",
              file=sys.stdout if tau is not None else sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
