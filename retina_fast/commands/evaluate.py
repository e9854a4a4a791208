"""``retina-fast evaluate``: compare a folder of synthetic cubes with real ones and write a report.

Computes HS-FID (+ bootstrap interval, KID), spectral KL inside vein / artery / ONH, the MS-SSIM
diversity gap and, with ``--train``, a nearest-neighbour authenticity check (``--val``: the
5th-percentile rule). Writes ``REPORT/report.md``, ``REPORT/metrics.json`` and PNG plots. Each DIR
is a folder of cube files readable by ``retina_fast.io`` (``.npy .npz .tif .h5``, e.g. written by
``retina-fast phantom``) or a finished ``retina-fast sample`` run directory (its shards, checked
against the manifest); ``<stem>_masks.npz`` next to a real cube gives
its masks, otherwise the shipped structure network segments it. See ``retina_fast.evaluate``.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "evaluate",
        help="quality report of synthetic cubes vs real ones (HS-FID, spectral KL, diversity, authenticity)",
        description=__doc__.splitlines()[0].split(": ", 1)[1],
    )
    p.add_argument("--real", required=True, metavar="DIR", help="folder of real (held-out) cubes")
    p.add_argument("--synthetic", required=True, metavar="DIR",
                   help="folder of synthetic cubes, or a retina-fast sample run directory")
    p.add_argument("--train", metavar="DIR", help="training cubes: nearest-neighbour authenticity check")
    p.add_argument("--val", metavar="DIR", help="held-out real cubes for the 5th-percentile rule (with --train; "
                                                "may be the --real folder)")
    p.add_argument("--out", required=True, metavar="REPORT", help="report folder (created)")
    p.add_argument("--max-images", type=int, metavar="N", help="use at most the first N files of each folder")
    p.add_argument("--pairs", type=int, default=500, metavar="P", help="MS-SSIM pairs per set (default 500)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed of pairs and bootstrap (default 0)")
    p.add_argument("--n-boot", type=int, default=200, metavar="B", help="bootstrap replicates (default 200)")
    p.add_argument("--structure-net", metavar="DIR",
                   help="structure network checkpoint (default: the shipped retina_fast/weights/structure-net)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("-q", "--quiet", "--no-progress", dest="quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def _check_args(args) -> None:
    from retina_fast.errors import UserError

    if args.max_images is not None and args.max_images < 2:
        raise UserError(f"--max-images must be at least 2, got {args.max_images}")
    if args.pairs < 1:
        raise UserError(f"--pairs must be at least 1, got {args.pairs}")
    if args.n_boot < 2:
        raise UserError(f"--n-boot must be at least 2, got {args.n_boot}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    if args.val and not args.train:
        raise UserError("--val needs --train (it sets the threshold of the authenticity check)")
    if args.structure_net and not Path(args.structure_net).is_dir():
        raise UserError(f"--structure-net {args.structure_net}: no such directory")


def run(args) -> int:
    _check_args(args)
    from retina_fast.checkpoint import CheckpointError
    from retina_fast.errors import UserError
    from retina_fast.evaluate import EvaluationError, evaluate_folders

    extractor = segmenter = None
    try:
        if args.structure_net:
            from retina_fast.models.structure_net import (StructureFeatures, StructureSegmenter,
                                                          load_structure_net)

            net = load_structure_net(args.structure_net)
            extractor, segmenter = StructureFeatures(net), StructureSegmenter(net)
        result = evaluate_folders(args.real, args.synthetic, args.train, args.val, args.out,
                                  max_images=args.max_images, pairs=args.pairs, seed=args.seed,
                                  n_boot=args.n_boot, extractor=extractor, segmenter=segmenter,
                                  progress=not args.quiet, plots=not args.no_plots)
    except (EvaluationError, CheckpointError) as exc:
        raise UserError(str(exc)) from exc
    fd, div, kl = result["hs_fid"], result["ms_ssim_diversity"], result["spectral_kl"]
    print(f"HS-FID {fd['value']:.4g} [{fd['ci_low']:.4g}, {fd['ci_high']:.4g}]  "
          f"|dMS-SSIM| {div['abs_delta']:.4g}  spectral KL "
          + " ".join(f"{s} {kl[s]['mean']:.4g}" if kl[s]["mean"] is not None else f"{s} n/a" for s in kl))
    auth = result["authenticity"]
    if auth is not None:
        print(f"authenticity: {len(auth['flagged'])} of {result['settings']['n']['synthetic']} synthetic "
              f"images flagged")
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0
