"""Report of ``retina-fast evaluate``: ``metrics.json``, ``report.md`` and PNG plots.

Plots (matplotlib ``Figure`` objects on the Agg canvas; pyplot's global state is never touched):

* ``spectra.png``: mean reflectance spectrum inside vein / artery / ONH, real vs synthetic, shaded
  10th-90th percentile of the pooled pixels;
* ``ms_ssim.png``: distributions of the per-pair MS-SSIM within the real and the synthetic set;
* ``nearest_neighbours.png``: the synthetic images closest to a training image (smallest pixel-space
  nearest / second-nearest ratio) beside their nearest training image and the absolute difference;
* ``contact_real.png`` / ``contact_synthetic.png``: band contact sheets of the first images with their
  masks (``retina_fast.preview.contact_sheet``; synthetic masks are the segmenter's).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch

__all__ = ["write_report", "pseudo_colour", "nearest_rows"]

SHEET_ROWS = 4
SHEET_DPI = 80
NN_ROWS = 6
_PSEUDO_NM = (640.0, 555.0, 465.0)


def pseudo_colour(cube: torch.Tensor, wavelengths, nm=_PSEUDO_NM, ref: Optional[torch.Tensor] = None) -> np.ndarray:
    """(16, H, W) cube -> (H, W, 3) image from the bands nearest ``nm``, each stretched to the
    1st-99th percentile of that band in ``ref`` (default: the cube itself; pass the partner of a
    pair so that both use one scale)."""
    wl = np.asarray(wavelengths, dtype=np.float64)
    ref = cube if ref is None else ref
    chans = []
    for target in nm:
        b = int(np.abs(wl - target).argmin())
        band = cube[b].double().numpy()
        lo, hi = np.percentile(ref[b].double().numpy(), [1.0, 99.0])
        chans.append(np.clip((band - lo) / max(hi - lo, 1e-6), 0.0, 1.0))
    return np.stack(chans, -1)


def _figure(w: float, h: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h))


def _plot_spectra(result: dict, path: Path) -> None:
    wl = np.asarray(result["settings"]["wavelengths"], dtype=float)
    fig = _figure(12, 3.6)
    axes = fig.subplots(1, 3)
    for ax, s in zip(axes, ("vein", "artery", "onh")):
        for role, colour in (("real", "tab:blue"), ("synthetic", "tab:orange")):
            sp = result["spectra"][role].get(s)
            if sp is None:
                continue
            ax.plot(wl, sp["mean"], color=colour, marker=".", label=f"{role} ({sp['pixels']} px)")
            ax.fill_between(wl, sp["p10"], sp["p90"], color=colour, alpha=0.2)
        kl = result["spectral_kl"][s]["mean"]
        ax.set_title(f"{s.upper() if s == 'onh' else s}: KL {kl:.4f}" if kl is not None else s, fontsize=10)
        ax.set_xlabel("wavelength (nm)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("reflectance (camera signal)")
    fig.suptitle("mean spectrum per structure (shaded: 10th-90th percentile of pixels)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _plot_ms_ssim(div: dict, path: Path) -> None:
    fig = _figure(6, 3.6)
    ax = fig.subplots()
    v, s = np.asarray(div["val_scores"]), np.asarray(div["syn_scores"])
    bins = np.linspace(min(v.min(), s.min()), max(v.max(), s.max()) + 1e-9, 40)
    ax.hist(v, bins=bins, alpha=0.5, color="tab:blue", label=f"real pairs (mean {v.mean():.4f})")
    ax.hist(s, bins=bins, alpha=0.5, color="tab:orange", label=f"synthetic pairs (mean {s.mean():.4f})")
    ax.axvline(v.mean(), color="tab:blue")
    ax.axvline(s.mean(), color="tab:orange")
    ax.set_xlabel(f"MS-SSIM ({div['scales']} scales)")
    ax.set_ylabel("pairs")
    ax.set_title(f"|Δ| = {div['abs_delta']:.4f}  [{div['ci_low']:.4f}, {div['ci_high']:.4f}]", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def nearest_rows(result: dict) -> list[tuple[int, int]]:
    """(synthetic index, nearest training index) of the pairs ``nearest_neighbours.png`` shows: the
    ``NN_ROWS`` smallest pixel-space nearest / second-nearest ratios."""
    auth = result["authenticity"]["pixel"]
    ratio = np.asarray(auth["ratio_values"], dtype=float)
    return [(int(i), int(auth["nearest_index"][i])) for i in np.argsort(ratio, kind="stable")[:NN_ROWS]]


def _plot_nn(result: dict, rows: list, path: Path) -> None:
    """``rows``: (synthetic index, train index, synthetic cube, train cube, synthetic name, train name) for
    each pair of :func:`nearest_rows`."""
    auth = result["authenticity"]["pixel"]
    wl = result["settings"]["wavelengths"]
    fig = _figure(7.5, 2.4 * len(rows) + 0.4)
    axes = fig.subplots(len(rows), 3, squeeze=False)
    for r, (i, _, syn, tr, syn_name, tr_name) in enumerate(rows):
        panels = [(pseudo_colour(syn, wl), f"synthetic {syn_name}"),
                  (pseudo_colour(tr, wl, ref=syn), f"nearest train {tr_name}"),
                  ((syn - tr).abs().mean(0).numpy(), f"|diff| d={auth['nearest_distance'][i]:.2f} "
                                                     f"ratio={auth['ratio_values'][i]:.3f}")]
        for c, (img, title) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(img, cmap="magma" if c == 2 else None, interpolation="nearest")
            ax.set_title(title, fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("closest synthetic/train pairs (pixel space, smallest nearest/second ratio)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=SHEET_DPI)


def _fmt(x: Optional[float], digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}g}"


def _markdown(result: dict, images: list[str]) -> str:
    st, fd, kid, div = result["settings"], result["hs_fid"], result["kid"], result["ms_ssim_diversity"]
    n = st["n"]
    lines = [
        "# retina-fast evaluate report", "",
        f"- real: `{st['real']}` ({n['real']} images), synthetic: `{st['synthetic']}` ({n['synthetic']} images)",
        f"- train: `{st['train']}` ({n.get('train', 0)} images), val: `{st['val']}` ({n.get('val', 0)} images)",
        f"- image size {st['size'][0]}x{st['size'][1]}, 16 bands; seed {st['seed']}, {st['pairs']} MS-SSIM pairs, "
        f"{st['n_boot']} bootstrap replicates",
        f"- feature extractor: {st['extractor']} ({st['feature_dim']}-d); real masks from {st['real_masks']}, "
        f"synthetic masks from the segmenter", "",
        "## Summary", "",
        "| metric | value | interval (95 %) | note |", "|---|---|---|---|",
        f"| HS-FID | {fd['value']:.4g} | [{fd['ci_low']:.4g}, {fd['ci_high']:.4g}] | bootstrap bias {fd['bias']:+.3g}; "
        f"biased upward at small N, compare at equal N |",
        f"| KID | {kid['mean']:.4g} | ± {kid['std']:.2g} (std) | {kid['subsets']} subsets of {kid['subset_size']} |",
    ]
    for s in ("vein", "artery", "onh"):
        e = result["spectral_kl"][s]
        lines.append(f"| spectral KL {s} | {_fmt(e['mean'])} | | {e['n_real_pixels']} real / "
                     f"{e['n_synthetic_pixels']} synthetic pixels |")
    lines.append(f"| \\|Δ MS-SSIM\\| | {div['abs_delta']:.4g} | [{div['ci_low']:.4g}, {div['ci_high']:.4g}] | "
                 f"real {div['val_mean']:.4f}, synthetic {div['syn_mean']:.4f}; {div['scales']} scales |")
    auth = result["authenticity"]
    if auth is not None:
        for space in ("pixel", "feature"):
            a = auth[space]
            rule = (f"{len(a['percentile_flagged'])} below the val 5th percentile ({_fmt(a['threshold'])})"
                    if auth["percentile_rule"] else "percentile rule skipped (no --val)")
            lines.append(f"| NN authenticity ({space}) | {len(a['flagged'])} flagged | | "
                         f"{len(a['ratio_flagged'])} with ratio < 1/3 (min ratio {a['min_ratio']:.3f}); {rule} |")
    lines += ["", "Lower is better for HS-FID, KID, spectral KL and |Δ MS-SSIM|. Compare against the "
              "real-vs-real baseline computed at the same N and size (docs/eval/).", ""]
    if result.get("segmenter_dice_on_real"):
        lines += ["## Segmenter check (real set, predicted vs mask files)", "",
                  "| " + " | ".join(result["segmenter_dice_on_real"]) + " |",
                  "|" + "---|" * len(result["segmenter_dice_on_real"]),
                  "| " + " | ".join(f"{v:.3f}" for v in result["segmenter_dice_on_real"].values()) + " |", ""]
    if auth is not None and auth["flagged_files"]:
        lines += ["## Flagged synthetic images", "", ", ".join(f"`{f}`" for f in auth["flagged_files"][:50]), ""]
    if result["notes"]:
        lines += ["## Notes", ""] + [f"- {m}" for m in result["notes"]] + [""]
    lines += ["## Plots", ""] + [f"![{p}]({p})" for p in images] + [""]
    lines.append(f"Wall time {st.get('wall_s', 'n/a')} s. Full numbers: `metrics.json`.")
    return "\n".join(lines) + "\n"


def write_report(out: Path, result: dict, div: dict, images: Optional[dict] = None, plots: bool = True) -> Path:
    """Write metrics.json, the plots and report.md to ``out`` (created); returns ``out / report.md``.

    ``result``: the JSON-ready metrics; ``div``: the MS-SSIM diversity result with its per-pair
    ``val_scores`` / ``syn_scores``; ``images`` (needed with ``plots``): {"contact": {role: (cubes
    (k, 16, H, W), one mask dict per cube, k titles)} for "real" and "synthetic", "nearest": the rows of
    :func:`_plot_nn` (empty without an authenticity check)}.
    """
    out.mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    if plots:
        from retina_fast.preview import contact_sheet

        _plot_spectra(result, out / "spectra.png")
        _plot_ms_ssim(div, out / "ms_ssim.png")
        names += ["spectra.png", "ms_ssim.png"]
        if result["authenticity"] is not None:
            _plot_nn(result, images["nearest"], out / "nearest_neighbours.png")
            names.append("nearest_neighbours.png")
        for role in ("real", "synthetic"):
            cubes, row_masks, titles = images["contact"][role]
            contact_sheet(cubes, result["settings"]["wavelengths"], row_masks, out / f"contact_{role}.png",
                          titles=titles, dpi=SHEET_DPI)
            names.append(f"contact_{role}.png")
    (out / "metrics.json").write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    path = out / "report.md"
    path.write_text(_markdown(result, names), encoding="utf-8")
    return path
