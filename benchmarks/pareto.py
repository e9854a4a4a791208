"""Speed/quality Pareto study: sampling throughput against sample quality for a grid of LDMs and samplers.

Reproduce (tiny scale, 2-core CPU):

    bash scripts/train_pareto_grid.sh
    # = retina-fast train ldm --preset tiny --data phantom --vqgan retina_fast/weights/tiny \\
    #       --out runs/pareto/ldm-b16 --config-json '{"unet": {"base_channels": 16}}' \\
    #       --steps 2000 --batch-size 32 --lr 2e-4 --num-images 1024 --amp bf16   (and b32, b48 likewise)
    #   then
    python benchmarks/pareto.py --models b16=runs/pareto/ldm-b16/final b32=default \
        b32g=runs/pareto/ldm-b32/final b48=runs/pareto/ldm-b48/final --n 256

For every (model, sampler, steps) point: one warm-up call (``--warmup-n`` images, default the timed
call's batch size, same sampler and steps), then one timed ``retina_fast.engine.load(dir).sample(--n,
steps, seed=--seed, sampler=..., backend=--backend)`` call: images/s = n / its wall time. The samples of
that call are evaluated against a held-out real set with the functions ``retina-fast evaluate`` uses:

* HS-FID (features of the shipped structure network, bootstrap interval) and KID;
* |Δ MS-SSIM| diversity (``--pairs`` random pairs per set, same seed for both sets);
* spectral KL (real ‖ synthetic) inside vein, artery, ONH: real masks are the phantom's true masks,
  synthetic masks come from the structure network's segmenter (as in ``retina-fast evaluate``).

The held-out real set is rendered once (``retina_fast.phantom.render``, eyes ``--real-seed`` ..
``--real-seed + n - 1``, default 100000..: disjoint from the training eyes 0..1023) at the model's image
size; its features, masks and pair scores are computed once and shared by all points (and by models of
the same size). A second held-out set (``--floor-seed`` .., default 200000..) scored the same way gives
the real-vs-real floor at this N (``--no-floor`` skips it): FD is biased upward by O(F/N), so values are
comparable only at equal N, and at N = 128 the covariance of the 128-d features is rank-deficient.

Pareto fronts: for each quality metric (lower is better) and for the combined rank (mean over the five
quality metrics of each point's rank, 1 = best), the points not dominated in (images/s max, metric
min), see :func:`pareto_front`.

Writes ``--out-dir`` (default docs/pareto): ``pareto.json`` (all points, fronts, settings, machine,
command, date, wall time), ``pareto.md`` (the table) and ``pareto.png`` (2x3 panels, log images/s).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import torch

from retina_fast.bench import hardware_line

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SAMPLERS = ("ddim:10", "ddim:25", "ddim:50", "dpmpp_2m:10", "dpmpp_2m:20")
KL_STRUCTURES = ("vein", "artery", "onh")
QUALITY = ("hs_fid", "ms_ssim_abs_delta", "kl_vein", "kl_artery", "kl_onh")
LABELS = {"hs_fid": "HS-FID", "ms_ssim_abs_delta": "|Δ MS-SSIM|", "kl_vein": "spectral KL vein",
          "kl_artery": "spectral KL artery", "kl_onh": "spectral KL ONH",
          "combined_rank": "combined rank (mean of 5 ranks)"}
SPEED = "images_per_s"


# ----------------------------------------------------------------------------------------------------
# Pareto front and ranks (pure functions; tests/test_pareto.py)

def _value(p: Mapping, key: str) -> Optional[float]:
    v = p.get(key)
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def pareto_front(points: Sequence[Mapping], maximize: Sequence[str] = (), minimize: Sequence[str] = ()) -> list[int]:
    """Indices (ascending) of the points no other point dominates.

    ``points``: mappings holding every key of ``maximize`` and ``minimize``. q dominates p when q is at
    least as good as p in every key (>= for ``maximize``, <= for ``minimize``) and strictly better in at
    least one. Ties do not dominate: identical points are all on the front. A point with a missing,
    None or non-finite value in any key is never on the front and dominates nothing.
    """
    keys = [(k, 1.0) for k in maximize] + [(k, -1.0) for k in minimize]
    if not keys:
        raise ValueError("pareto_front needs at least one key to maximize or minimize")
    vals: list[Optional[tuple]] = []
    for p in points:
        v = [_value(p, k) for k, _ in keys]
        vals.append(None if any(x is None for x in v) else tuple(s * x for x, (_, s) in zip(v, keys)))
    front = []
    for i, a in enumerate(vals):
        if a is None:
            continue
        if not any(b is not None and j != i and all(y >= x for x, y in zip(a, b)) and
                   any(y > x for x, y in zip(a, b)) for j, b in enumerate(vals)):
            front.append(i)
    return front


def ranks(values: Sequence[Optional[float]]) -> list[float]:
    """Ranks, 1 = smallest; ties share their mean rank; None / non-finite rank last (tied among themselves)."""
    clean = [None if v is None or not math.isfinite(float(v)) else float(v) for v in values]
    order = sorted(range(len(clean)), key=lambda i: (clean[i] is None, clean[i] if clean[i] is not None else 0.0))
    out = [0.0] * len(clean)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and clean[order[j + 1]] == clean[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return out


def combined_rank(points: Sequence[Mapping], keys: Sequence[str] = QUALITY) -> list[float]:
    """Mean over ``keys`` of each point's rank among ``points`` (lower is better; see :func:`ranks`)."""
    per_key = [ranks([_value(p, k) for p in points]) for k in keys]
    return [float(np.mean([r[i] for r in per_key])) for i in range(len(points))]


# ----------------------------------------------------------------------------------------------------
# Evaluation against a held-out real set (computed once)

class RealSet:
    """Held-out phantom eyes with everything the metrics need from the real side, computed once."""

    def __init__(self, seed: int, n: int, size: int, extractor, pairs: int, pair_seed: int) -> None:
        from retina_fast import metrics as M
        from retina_fast.phantom import render

        eyes = [render(seed + i, size) for i in range(n)]
        self.seed, self.n, self.size = seed, n, size
        self.images = torch.stack([e.cube for e in eyes])
        self.masks = {s: torch.stack([e.masks[s] for e in eyes]) for s in KL_STRUCTURES}
        self.wavelengths = tuple(float(w) for w in eyes[0].wavelengths)
        self.features = M.extract_features(self.images, extractor)
        self.pair_index = M.sample_pairs(n, pairs, pair_seed)
        self.pair_scores = M.pairwise_ms_ssim(self.images, self.pair_index, 1.0, 16, weights=M.MS_SSIM_WEIGHTS)


def diversity(real: RealSet, synthetic: torch.Tensor, seed: int, n_boot: int) -> dict:
    """``metrics.ms_ssim_diversity(real, synthetic, pairs, seed, n_boot)`` with the real pair scores reused."""
    from retina_fast import metrics as M

    s = M.pairwise_ms_ssim(synthetic, M.sample_pairs(synthetic.shape[0], len(real.pair_index), seed), 1.0, 16,
                           weights=M.MS_SSIM_WEIGHTS)
    v = real.pair_scores
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", M.MetricWarning)
        ci = M.bootstrap_ci(lambda a, b: abs(float(a.mean()) - float(b.mean())), v.numpy(), s.numpy(),
                            n_boot=n_boot, seed=seed)
    return {"val_mean": float(v.mean()), "syn_mean": float(s.mean()), "abs_delta": ci["value"],
            "ci_low": ci["low"], "ci_high": ci["high"],
            "scales": M.ms_ssim_scales(min(synthetic.shape[-2:]))}


def evaluate(real: RealSet, synthetic: torch.Tensor, extractor, segmenter, *, seed: int, n_boot: int) -> dict:
    """Quality metrics of ``synthetic`` (N, 16, H, W) reflectance against ``real`` (as ``retina-fast evaluate``)."""
    from retina_fast import metrics as M
    from retina_fast.evaluate import kid_subset_size

    if synthetic.shape[1:] != real.images.shape[1:]:
        raise ValueError(f"synthetic images are {tuple(synthetic.shape[1:])}, the real set is "
                         f"{tuple(real.images.shape[1:])}")
    notes = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", M.MetricWarning)
        fs = M.extract_features(synthetic, extractor)
        fr = real.features
        fd = M.bootstrap_ci(M.frechet_distance_from_features, fr, fs, n_boot=n_boot, seed=seed)
        kid = M.kid(fr, fs, subsets=100, subset_size=kid_subset_size(len(fr), len(fs)), seed=seed)
        with torch.no_grad():
            syn_masks = segmenter(synthetic)
        kl = M.spectral_kl(real.images, real.masks, synthetic, syn_masks, structures=KL_STRUCTURES)
        div = diversity(real, synthetic, seed, max(n_boot, 200))
    for w in caught:
        msg = str(w.message).replace("f1: ", "real features: ").replace("f2: ", "synthetic features: ")
        if msg not in notes:
            notes.append(msg)
    out = {"hs_fid": fd["value"], "hs_fid_ci": [fd["low"], fd["high"]], "hs_fid_bias": fd["bias"],
           "kid": kid["mean"], "kid_std": kid["std"], "ms_ssim_abs_delta": div["abs_delta"],
           "ms_ssim_ci": [div["ci_low"], div["ci_high"]], "ms_ssim_real": div["val_mean"],
           "ms_ssim_synthetic": div["syn_mean"], "ms_ssim_scales": div["scales"]}
    for s in KL_STRUCTURES:
        v = kl[s]["mean"]
        out[f"kl_{s}"] = v if math.isfinite(v) else None
        out[f"mask_fraction_{s}"] = float(syn_masks[s].float().mean())
    out["notes"] = notes
    return out


# ----------------------------------------------------------------------------------------------------
# Timing



def parse_models(items: Sequence[str]) -> dict[str, str]:
    """``NAME=DIR`` items -> {name: model}; the shipped ``default`` is added unless some item already is it."""
    from retina_fast.modelzoo import resolve_model

    models: dict[str, str] = {}
    for item in items:
        name, sep, where = item.partition("=")
        if not sep or not name or not where:
            raise SystemExit(f"--models: expected NAME=DIR, got {item!r}")
        if name in models:
            raise SystemExit(f"--models: name {name!r} given twice")
        models[name] = where
    try:
        paths = {n: resolve_model(m).resolve() for n, m in models.items()}
        default = resolve_model("default").resolve()
    except FileNotFoundError as exc:
        raise SystemExit(f"--models: {exc}") from None
    if default not in paths.values():
        models = {"default": "default", **models}
    return models


def parse_samplers(items: Sequence[str]) -> list[tuple[str, int]]:
    """``SAMPLER:STEPS`` items -> [(sampler, steps)]."""
    from retina_fast.samplers import SAMPLERS

    out = []
    for item in items:
        name, sep, steps = item.partition(":")
        if not sep or name not in SAMPLERS or not steps.isdigit() or int(steps) < 1:
            raise SystemExit(f"--samplers: expected SAMPLER:STEPS with SAMPLER in {SAMPLERS}, got {item!r}")
        out.append((name, int(steps)))
    return out


def state_digest(module: torch.nn.Module) -> str:
    """sha256 of a module's state (names, dtypes, shapes, values): identical weights give identical digests
    even when the safetensors files differ in bytes (their header order is not fixed)."""
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        t = v.detach().cpu().contiguous().reshape(-1)
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _model_info(pipe) -> dict:
    doc = getattr(pipe.loaded, "meta", None) or {}
    unet = pipe.loaded.unet
    path = Path(pipe.source).resolve()
    return {"path": str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path),
            "unet_base_channels": pipe.config.unet.base_channels,
            "unet_params": sum(p.numel() for p in unet.parameters()),
            "image_size": pipe.config.vqgan.image_size,
            "vqgan_state_sha256": state_digest(pipe.loaded.vqgan),
            "vqgan_file_sha256": (doc.get("weights", {}).get("vqgan") or {}).get("sha256"),
            "unet_file_sha256": (doc.get("weights", {}).get("unet") or {}).get("sha256"),
            "training": {k: (doc.get("provenance") or {}).get(k) for k in ("data", "steps", "command")}}


def time_point(pipe, n: int, sampler: str, steps: int, *, seed: int, backend: str, warmup_n: Optional[int]) -> dict:
    """Warm up once, then time one ``pipe.sample(n, steps, ...)`` call; returns the samples and timings."""
    from retina_fast import backends
    from retina_fast.engine import auto_batch_size

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", backends.BackendFallbackWarning)
        runner = pipe.runner(backend)
        resolved = backends.resolve(backend).name
    batch = auto_batch_size(runner, n)
    wn = min(n, warmup_n or batch)
    kw = dict(seed=seed, sampler=sampler, backend=backend)
    t0 = time.perf_counter()
    pipe.sample(wn, steps, **kw)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    images = pipe.sample(n, steps, **kw)
    wall = time.perf_counter() - t0
    return {"images": images, "wall_s": wall, "images_per_s": n / max(wall, 1e-12), "warmup_n": wn,
            "warmup_s": warm, "batch_size": batch,
            "backend": {"requested": backend, "resolved": resolved, "runner": type(runner).__name__,
                        "device": str(runner.device), "dtype": str(runner.dtype),
                        "notes": [str(w.message) for w in caught]}}


# ----------------------------------------------------------------------------------------------------
# Outputs

def _fmt(v, spec: str = ".4g") -> str:
    return "n/a" if v is None else format(v, spec)


def markdown(doc: dict) -> str:
    st = doc["settings"]
    pts = doc["points"]
    marks = {"hs_fid": "F", "ms_ssim_abs_delta": "D", "kl_vein": "V", "kl_artery": "A", "kl_onh": "O",
             "combined_rank": "R"}
    mach = doc["machine"]
    backs = sorted({f"`{p['backend']['resolved']}` ({p['backend']['device']}, {p['backend']['dtype']})" for p in pts})
    lines = [
        "# Speed / quality Pareto study", "",
        f"{len(doc['models'])} model(s) x {len(st['samplers'])} sampler settings; n = {st['n']} images per point "
        f"(seed {st['seed']}), timed as one `Pipeline.sample` call after a warm-up, backend {st['backend']} -> "
        f"{', '.join(backs)}; {doc['hardware']}, load {_fmt(mach.get('load_avg_1min'), '.2f')} at start. "
        f"Quality against {st['n']} held-out phantom eyes (seeds {st['real_seed']}..{st['real_seed'] + st['n'] - 1}, "
        f"{st['size']} px); all metrics lower is better; compare only at equal N and size.", "",
        "| model | U-Net params | sampler | steps | images/s | HS-FID [95 % CI] | KID | \\|Δ MS-SSIM\\| | KL vein | "
        "KL artery | KL ONH | comb. rank | on front |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in pts:
        on = "".join(marks[k] for k in marks if p["label"] in doc["fronts"][k]) or "-"
        ci = p["hs_fid_ci"]
        lines.append(
            f"| {p['model']} | {p['unet_params'] / 1e6:.2f} M | {p['sampler']} | {p['steps']} | "
            f"{p['images_per_s']:.3g} | "
            f"{_fmt(p['hs_fid'])} [{_fmt(ci[0], '.3g')}, {_fmt(ci[1], '.3g')}] | {_fmt(p['kid'], '.3g')} | "
            f"{_fmt(p['ms_ssim_abs_delta'])} | {_fmt(p['kl_vein'])} | {_fmt(p['kl_artery'])} | {_fmt(p['kl_onh'])} | "
            f"{p['combined_rank']:.2f} | {on} |")
    fl = doc.get("floor")
    if fl:
        lines.append(f"| real vs real (seeds {st['floor_seed']}..) | | | | | {_fmt(fl['hs_fid'])} | "
                     f"{_fmt(fl['kid'], '.3g')} | "
                     f"{_fmt(fl['ms_ssim_abs_delta'])} | {_fmt(fl['kl_vein'])} | {_fmt(fl['kl_artery'])} | "
                     f"{_fmt(fl['kl_onh'])} | | |")
    lines += ["", "On front: Pareto-optimal in (images/s max, metric min) for F = HS-FID, D = |Δ MS-SSIM|, "
              "V / A / O = spectral KL vein / artery / ONH, R = combined rank (mean of the five per-metric ranks). "
              "Spectral KL uses the phantom's true masks for the real set and the structure network's segmentation "
              "for the samples; n/a = the segmenter found no pixels of that structure in the samples. Real vs real: "
              "a second held-out phantom set scored exactly like the samples (segmented masks), the floor a perfect "
              "generator reaches at this N.", "",
              "| Pareto front | points (fastest first) |", "|---|---|"]
    for k in marks:
        lines.append(f"| {LABELS[k].replace('|', chr(92) + '|')} | {', '.join(doc['fronts'][k])} |")
    lines += ["", "## Models", "", "| model | checkpoint | U-Net base | VQ-GAN weights (state sha256) | training |",
              "|---|---|---|---|---|"]
    for name, m in doc["models"].items():
        tr = m["training"]
        lines.append(f"| {name} | `{m['path']}` | {m['unet_base_channels']} | {m['vqgan_state_sha256'][:12]} | "
                     f"{tr.get('steps')} steps, {tr.get('data')} |")
    if doc["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in doc["notes"]]
    lines += ["", f"Command: `{doc['command']}` — {doc['wall_s']:.0f} s in all, {doc['date']}, commit "
              f"{mach.get('commit')}. Figure: [pareto.png](pareto.png); data: [pareto.json](pareto.json).", ""]
    return "\n".join(lines)


def figure(doc: dict, path: Path) -> None:
    """2x3 panels: each quality metric and the combined rank against images/s (log x), fronts connected."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    pts = doc["points"]
    models = list(doc["models"])
    samplers = sorted({p["sampler"] for p in pts})
    colours = {m: f"C{i % 10}" for i, m in enumerate(models)}
    shapes = {s: "os^Dv<>"[i % 7] for i, s in enumerate(samplers)}
    fig = Figure(figsize=(16, 9.5), constrained_layout=True)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3)
    for ax, key in zip(axes.ravel(), (*QUALITY, "combined_rank")):
        have = [p for p in pts if p.get(key) is not None]
        for p in have:
            ax.scatter(p[SPEED], p[key], color=colours[p["model"]], marker=shapes[p["sampler"]], s=40, zorder=3)
            ax.annotate(f"{p['model']} {p['sampler']}:{p['steps']}", (p[SPEED], p[key]), fontsize=6.5,
                        xytext=(3, 3), textcoords="offset points")
        front = sorted((p for p in pts if p["label"] in doc["fronts"][key]), key=lambda p: p[SPEED])
        if front:
            ax.plot([p[SPEED] for p in front], [p[key] for p in front], "-", color="k", lw=1, zorder=2)
            ax.scatter([p[SPEED] for p in front], [p[key] for p in front], s=140, facecolors="none",
                       edgecolors="k", lw=1.2, zorder=4, label="Pareto front")
        floor = (doc.get("floor") or {}).get(key)
        if floor is not None:
            ax.axhline(floor, color="0.5", ls="--", lw=1, label=f"real vs real ({floor:.3g})")
        ax.set_xscale("log")
        axes_log = [ax.xaxis]
        if key != "combined_rank" and have and all(p[key] > 0 for p in have) and (floor is None or floor > 0):
            ax.set_yscale("log")
            axes_log.append(ax.yaxis)
        for axis in axes_log:
            axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            axis.set_minor_formatter(NullFormatter())
        missing = len(pts) - len(have)
        ax.set_title(LABELS[key] + (f" ({missing} n/a)" if missing else ""), fontsize=10)
        ax.set_xlabel("images / s (log)")
        ax.set_ylabel(LABELS[key] + ", lower is better", fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    handles = [axes[0, 0].scatter([], [], color=colours[m], marker="o", label=m) for m in models]
    handles += [axes[0, 0].scatter([], [], color="0.3", marker=shapes[s], label=s) for s in samplers]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8)
    st = doc["settings"]
    fig.suptitle(f"Speed vs quality: n = {st['n']} per point, {st['size']} px, backend {st['backend']}, "
                 f"{doc['hardware']}", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=[], metavar="NAME=DIR",
                   help="LDM checkpoints (a directory, or a packaged name such as default); the shipped default "
                        "is always included")
    p.add_argument("--samplers", nargs="+", default=list(DEFAULT_SAMPLERS), metavar="SAMPLER:STEPS")
    p.add_argument("--n", type=int, default=128, help="images per point, and the real set's size (default 128)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (all points) and metric seed")
    p.add_argument("--warmup-n", type=int, default=None, help="images of the warm-up call (default: the timed "
                   "call's batch size)")
    p.add_argument("--real-seed", type=int, default=100000)
    p.add_argument("--floor-seed", type=int, default=200000)
    p.add_argument("--no-floor", action="store_true", help="skip the real-vs-real floor")
    p.add_argument("--pairs", type=int, default=500)
    p.add_argument("--n-boot", type=int, default=200)
    p.add_argument("--out-dir", default=str(ROOT / "docs" / "pareto"))
    args = p.parse_args(argv)
    if args.n < 2:
        raise SystemExit("--n must be at least 2")
    from retina_fast import DEFAULT_WAVELENGTHS, engine
    from retina_fast.bench import machine
    from retina_fast.models.structure_net import StructureFeatures, StructureSegmenter, load_structure_net

    t_start = time.time()
    models = parse_models(args.models)
    settings = parse_samplers(args.samplers)
    machine_info = machine()
    net = load_structure_net()
    extractor, segmenter = StructureFeatures(net), StructureSegmenter(net, batch_size=16)
    reals: dict[int, RealSet] = {}
    floors: dict[int, dict] = {}
    points, infos, notes = [], {}, []
    for name, where in models.items():
        pipe = engine.load(where)
        info = infos[name] = _model_info(pipe)
        if tuple(pipe.wavelengths) != tuple(float(w) for w in DEFAULT_WAVELENGTHS):
            raise SystemExit(f"model {name}: wavelengths {pipe.wavelengths} are not the 16 default bands the "
                             f"structure network was trained on")
        size = info["image_size"]
        if size not in reals:
            print(f"real set: {args.n} eyes from seed {args.real_seed} at {size} px", flush=True)
            reals[size] = RealSet(args.real_seed, args.n, size, extractor, args.pairs, args.seed)
            if not args.no_floor:
                other = RealSet(args.floor_seed, args.n, size, extractor, args.pairs, args.seed)
                floors[size] = evaluate(reals[size], other.images, extractor, segmenter, seed=args.seed,
                                        n_boot=args.n_boot)
                print(f"  real-vs-real floor: HS-FID {floors[size]['hs_fid']:.4g}", flush=True)
        for sampler, steps in settings:
            tp = time_point(pipe, args.n, sampler, steps, seed=args.seed, backend=args.backend,
                            warmup_n=args.warmup_n)
            q = evaluate(reals[size], tp.pop("images"), extractor, segmenter, seed=args.seed, n_boot=args.n_boot)
            pt = {"label": f"{name} {sampler}:{steps}", "model": name, "sampler": sampler, "steps": steps,
                  "unet_params": info["unet_params"], "image_size": size, **tp, **q}
            points.append(pt)
            print(f"{pt['label']:<24} {pt['images_per_s']:8.3f} images/s  HS-FID {_fmt(pt['hs_fid'])}  "
                  f"|dMS-SSIM| {_fmt(pt['ms_ssim_abs_delta'])}  KL v/a/o {_fmt(pt['kl_vein'])} / "
                  f"{_fmt(pt['kl_artery'])} / {_fmt(pt['kl_onh'])}", flush=True)
    for r, pt in zip(combined_rank(points), points):
        pt["combined_rank"] = r
    fronts = {}
    for key in (*QUALITY, "combined_rank"):
        idx = pareto_front(points, maximize=[SPEED], minimize=[key])
        fronts[key] = [points[i]["label"] for i in sorted(idx, key=lambda i: -points[i][SPEED])]
    for pt in points:
        pt["on_front"] = [k for k in fronts if pt["label"] in fronts[k]]
    if len({m["vqgan_state_sha256"] for m in infos.values()}) > 1:
        notes.append("the models do not share one VQ-GAN (different VQ-GAN weights): quality differences mix U-Net "
                     "and VQ-GAN effects")
    if len(reals) > 1:
        notes.append("models of different image sizes: their metrics are not comparable with each other")
    if args.n <= 128:
        notes.append(f"N = {args.n} <= 128 (the feature dimension): the feature covariance is rank-deficient and "
                     f"HS-FID is dominated by small-sample bias; read it against the real-vs-real floor, "
                     f"at equal N only")
    for pt in points:
        for msg in pt["notes"] + pt["backend"]["notes"]:
            line = f"{msg} ({pt['label']})"
            if not any(msg in n for n in notes):
                notes.append(line)
    size0 = next(iter(reals))
    doc = {
        "settings": {"n": args.n, "seed": args.seed, "backend": args.backend, "warmup_n": args.warmup_n,
                     "samplers": args.samplers, "real_seed": args.real_seed,
                     "floor_seed": None if args.no_floor else args.floor_seed, "size": size0, "pairs": args.pairs,
                     "n_boot": args.n_boot, "extractor": "StructureFeatures (shipped structure-net)",
                     "feature_dim": int(reals[size0].features.shape[1]),
                     "real_masks": "phantom (true)", "synthetic_masks": "structure-net segmenter",
                     "timing": "one timed Pipeline.sample(n) call after one warm-up call of warmup_n images"},
        "models": infos,
        "points": points,
        "fronts": fronts,
        "floor": floors.get(size0),
        "notes": notes,
        "machine": machine_info,
        "hardware": hardware_line(),
        "command": " ".join(["python benchmarks/pareto.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_s": round(time.time() - t_start, 1),
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pareto.json").write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    (out / "pareto.md").write_text(markdown(doc))
    figure(doc, out / "pareto.png")
    print(f"wrote {out}/pareto.json, pareto.md, pareto.png in {doc['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
