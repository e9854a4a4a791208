"""``python -m retina_fast.training.enhance_stage --run RUN --after FIRST --to DIR``: ship a trained MAGE-Net run
as a follow-up stage of the enhancer in FIRST (config.json ``then``, see ``retina_fast.enhance``).

Why stages: at the ``tiny`` size one network trained on the batch mean of its rows' losses lifts badly lit
photographs (+8.6 dB) but leaves light spots, and one trained with each row counted by the log of its loss removes
the spots (87 %) but lifts dark photographs only +3.6 dB; no weighting between the two, and no schedule, keeps both
(docs/enhance_eval/no_harm_study.md). Run one after the other, each does its own part.

Steps:
1. copy RUN's final weights (the EMA teacher for T-MAGE-Net) and provenance to DIR (written beside it, then moved);
2. choose DIR's residual threshold by the shipped rule (``enhance_kinds.choose_residual_threshold``) on FIRST's
   outputs, with DIR run at ``--work-size`` (recorded in DIR);
3. score FIRST alone and FIRST followed by DIR on the validation split (left half of the real photograph,
   ``eval_enhance.validation_score``: every combination at seeds 10 and 11) and wire DIR into FIRST's ``then``
   only when the chain scores at least as high (``--force``: regardless); also reported: the spots removed with
   the validation seeds 10-17 (whole image; the mean gain hardly sees spots, whose left-half rows are mild);
4. write DIR/TRAINING.md and, with ``--json``, every number: per-kind tables of both on the held-out right half
   (seeds 0-3), the spots removed, and with ``--rsp RUNS/rsp/final`` the ablation's two test sets (PSNR / SSIM,
   ``eval_enhance``) and that segmenter's vessel IoU on the degraded phantom test images.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from retina_fast.training import enhance_kinds
from retina_fast.training.eval_enhance import (FOLLOW_UP_LINE, KIND_SIZE, TEST_SEEDS, VAL_SEEDS, _load_rsp, _rank,
                                               _scores, note_follow_up, saved_again, validation_score, vessel_iou)

__all__ = ["copy_stage", "evaluate_chain", "wire", "then_entry", "main", "FOLLOW_UP_LINE"]


def copy_stage(run: Path, target: Path) -> None:
    """RUN's final weights and provenance -> ``target`` (a MAGE-Net checkpoint without a threshold yet)."""
    from retina_fast.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
    from retina_fast.files import atomic_write

    doc, _ = load_checkpoint(run / "final", ["model"])  # checks the weights against their sha256
    if doc.get("kind") != "magenet":
        raise ValueError(f"{run / 'final'}: a {doc.get('kind')!r} checkpoint, not a MAGE-Net one")
    config, prov = saved_again(doc, ("work_size", "then"))
    tmp = target.with_name(target.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    save_checkpoint(tmp, {}, config, prov)  # config.json; the weights are the run's own bytes, copied:
    record = doc["weights"]["model"]  # their sha256 stays the one the run recorded
    shutil.copy(run / "final" / record["file"], tmp / record["file"])
    if hashlib.sha256((tmp / record["file"]).read_bytes()).hexdigest() != record["sha256"]:
        raise CheckpointError(f"{run / 'final' / record['file']}: changed while it was being copied")
    meta = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
    meta["weights"] = {"model": record}
    atomic_write(tmp / "config.json", json.dumps(meta, indent=2, allow_nan=False) + "\n")
    if (run / "log.csv").is_file():
        shutil.copy(run / "log.csv", tmp / "log.csv")
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)


def then_entry(first: Path, target: Path) -> str:
    """How FIRST's config.json names ``target``: its packaged name when both are packaged weights, else the
    path relative to FIRST."""
    from retina_fast.modelzoo import WEIGHTS_DIR

    if first.resolve().parent == WEIGHTS_DIR and target.resolve().parent == WEIGHTS_DIR:
        return target.name
    return os.path.relpath(target.resolve(), first.resolve())


def wire(first: Path, entry: str | None) -> None:
    """Set (``entry``) or remove (None) FIRST's follow-up stage in its config.json, atomically, and the line
    that names it in FIRST's TRAINING.md (``eval_enhance.note_follow_up``), so a reader of either sees the chain."""
    from retina_fast.enhance import unload_enhancer
    from retina_fast.files import atomic_write

    path = first / "config.json"
    doc = json.loads(path.read_text(encoding="utf-8"))
    if entry is None:
        doc.pop("then", None)
    else:
        doc["then"] = [entry]
    atomic_write(path, json.dumps(doc, indent=2, allow_nan=False))
    unload_enhancer(str(first))
    note_follow_up(first, entry)


def evaluate_chain(first: Path, target: Path, backend: str = "auto", rsp: Path | None = None,
                   size: int = KIND_SIZE) -> dict[str, Any]:
    """FIRST alone and FIRST followed by ``target`` (each with its own threshold and work size): validation
    score, per-kind tables on the held-out half, spots removed and (with ``rsp``) vessel IoU."""
    from retina_fast.enhance import enhance

    def alone(x):
        return enhance(x, model=str(first), backend=backend, then=())

    def chained(x):
        return enhance(x, model=str(first), backend=backend, then=[str(target)])

    out: dict[str, Any] = {}
    val_in = enhance_kinds.kind_inputs(size, VAL_SEEDS)
    test_in = enhance_kinds.kind_inputs(size, TEST_SEEDS)
    for name, fn in (("first stage alone", alone), ("first stage, then this stage", chained)):
        val = enhance_kinds.kind_table(fn, seeds=VAL_SEEDS, inputs=val_in)
        test = enhance_kinds.kind_table(fn, seeds=TEST_SEEDS, inputs=test_in)
        out[name] = {"validation_score": list(validation_score(val)), "summary": test["summary"],
                     "rows": test["rows"], "spots_removed": enhance_kinds.spot_removal(fn, size=size)["removed"],
                     "validation_spots_removed": enhance_kinds.spot_removal(fn, size=size,
                                                                            seeds=enhance_kinds.VAL_SEEDS)["removed"]}
        out[name]["_outputs"] = test["_outputs"]
    out["_test_inputs"] = test_in
    if rsp is not None:  # the ablation's two test sets (eval_enhance) and the segmenter's vessel IoU
        from retina_fast.training import enhance_data

        cache = rsp.parent.parent / "data"
        sets = {"phantom": enhance_data.synthetic_test_set(14, 256, cache_dir=cache),
                "real": enhance_data.real_test_set(14, 256, cache_dir=cache)}
        sets = {k: v.get(range(len(v))) for k, v in sets.items()}
        ys = {name: {"degraded input": b["x"], "first stage alone": alone(b["x"]),
                     "first stage, then this stage": chained(b["x"])} for name, b in sets.items()}
        out["test_sets"] = {name: {k: {m: v for m, v in _scores(y, sets[name]["y"]).items() if "per_image" not in m}
                                   for k, y in ys[name].items()} for name in sets}
        net, b = _load_rsp(rsp), sets["phantom"]
        out["vessel_iou"] = {k: vessel_iou(net, y, b["vessels"], b["fov"])["iou"] for k, y in ys["phantom"].items()}
    return out


def _training_md(target: Path, first: Path, entry: str, tau: float | None, work_size: int, ev: dict[str, Any],
                 command: str, wired: bool) -> str:
    doc = json.loads((target / "config.json").read_text(encoding="utf-8"))
    prov = doc.get("provenance", {})
    a, c = ev["first stage alone"], ev["first stage, then this stage"]
    lines = [f"# {target.name}: a follow-up enhancement stage ({doc.get('variant', 'MAGE-Net')}, "
             f"{doc.get('preset', '?')} preset)", "",
             f"Runs after `{first.name}` (its config.json: `\"then\": [\"{entry}\"]`)" if wired else
             f"Not wired into `{first.name}`: the chain scored lower on the validation split.", "",
             "Reproduce (the commands recorded in the checkpoints; paths as used then):", "", "```bash",
             prov.get("command") or "# (no training command recorded)", command, "```", "",
             f"- steps: {prov.get('steps')}, wall time {prov.get('wall_time_s')} s on "
             f"{(prov.get('hardware') or {}).get('cpu')} ({(prov.get('hardware') or {}).get('cpu_count')} cores)",
             f"- data: {prov.get('data')}",
             f"- work size {work_size}; residual threshold {tau}, chosen by the rule of "
             "`enhance_kinds.choose_residual_threshold` on the first stage's outputs (validation split, left half)",
             f"- validation score (mean left-half gain, seeds {', '.join(map(str, VAL_SEEDS))}): first stage alone "
             f"{a['validation_score'][1]:.2f} dB, with this stage {c['validation_score'][1]:.2f} dB; spots removed "
             f"with the validation seeds ({enhance_kinds.VAL_SEEDS[0]}-{enhance_kinds.VAL_SEEDS[-1]}, whole image) "
             f"{100 * a['validation_spots_removed']:.0f} % -> {100 * c['validation_spots_removed']:.0f} %",
             "- held-out right half, seeds 0-3 (alone -> with this stage): worst combination "
             f"{a['summary']['worst_combination_gain_right']:+.2f} -> {c['summary']['worst_combination_gain_right']:+.2f} dB"
             f", mean illumination gain {a['summary']['mean_illumination_gain_right']:+.2f} -> "
             f"{c['summary']['mean_illumination_gain_right']:+.2f} dB, spot-only gain {a['rows']['010']['gain_right']:+.2f}"
             f" -> {c['rows']['010']['gain_right']:+.2f} dB, spots removed {100 * a['spots_removed']:.0f} % -> "
             f"{100 * c['spots_removed']:.0f} %"]
    if "vessel_iou" in ev:
        v, ts = ev["vessel_iou"], ev["test_sets"]
        for name, what in (("phantom", "14 degraded phantom test eyes"), ("real", "the real right half degraded 14 "
                                                                                 "times")):
            t = ts[name]
            lines.append(f"- PSNR on {what} (256 px, the ablation's test set): input {t['degraded input']['psnr']:.2f}"
                         f" dB, first stage {t['first stage alone']['psnr']:.2f}, with this stage "
                         f"{t['first stage, then this stage']['psnr']:.2f}")
        lines.append(f"- vessel IoU on the degraded phantom test images: input {v['degraded input']:.3f}, first stage "
                     f"{v['first stage alone']:.3f}, with this stage {v['first stage, then this stage']:.3f}")
    lines.append("- files: config.json (architecture, provenance, sha256), model.safetensors, log.csv (training log)")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from retina_fast.enhance import resolve_enhancer, work_size_option_error

    p = argparse.ArgumentParser(prog="python -m retina_fast.training.enhance_stage",
                                description=__doc__.split("\n\n")[0].replace("``", ""))
    p.add_argument("--run", required=True, metavar="RUN", help="a finished train_enhance magenet|tmagenet run")
    p.add_argument("--after", required=True, metavar="FIRST", help="the enhancer it follows (a checkpoint directory "
                   "or packaged name; its config.json gets the 'then' entry)")
    p.add_argument("--to", required=True, metavar="DIR", help="where the stage's weights go "
                   "(e.g. retina_fast/weights/magenet-spots)")
    p.add_argument("--work-size", type=int, default=256, metavar="PX", help="the stage's work size (default 256)")
    p.add_argument("--backend", default="auto", help="enhance backend (default auto)")
    p.add_argument("--size", type=int, default=KIND_SIZE, metavar="PX",
                   help=f"the real photograph's size for the threshold and the tables (default {KIND_SIZE})")
    p.add_argument("--rsp", metavar="DIR", default=None, help="the ablation's RSP segmenter (RUNS/rsp/final): adds "
                   "its vessel IoU and the ablation's two test sets (cached in RUNS/data)")
    p.add_argument("--force", action="store_true", help="wire the stage even when the chain scores lower")
    p.add_argument("--json", metavar="FILE", help="write the numbers here")
    p.add_argument("--figure", metavar="PNG", help="inputs, first stage, chain and clean photograph per kind (seed 0)")
    args = p.parse_args(argv)
    if work_size_option_error(args.work_size):
        p.error(work_size_option_error(args.work_size))
    run, target = Path(args.run), Path(args.to)
    try:
        first = resolve_enhancer(args.after)
        if not (run / "final" / "config.json").is_file():
            raise FileNotFoundError(f"{run}: no final/ checkpoint (is the run finished?)")
        if target.resolve() == first.resolve():
            raise ValueError(f"--to {target} is the first stage itself")
        rsp = Path(args.rsp) if args.rsp else None
        if rsp is not None and not (rsp / "config.json").is_file():
            raise FileNotFoundError(f"--rsp {rsp}: no config.json")
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    copy_stage(run, target)
    tau, rows = enhance_kinds.choose_residual_threshold(str(target), backend=args.backend,
                                                        work_size=args.work_size, after=str(first), size=args.size,
                                                        max_loss_db=enhance_kinds.MAX_VAL_LOSS_DB)
    for r in rows:
        print(json.dumps(r), flush=True)
    if tau is None:
        print(f"{target}: no threshold of the grid keeps every validation image; not wired", file=sys.stderr)
        return 1
    enhance_kinds.write_residual_threshold(target, tau, rows, enhance_kinds.VAL_SEEDS, enhance_kinds.MAX_VAL_LOSS_DB,
                                           args.backend, args.size, args.work_size, name=str(target), after=str(first))
    ev = evaluate_chain(first, target, args.backend, rsp, args.size)
    a, c = ev["first stage alone"], ev["first stage, then this stage"]
    wired = args.force or _rank(c["validation_score"]) >= _rank(a["validation_score"])
    entry = then_entry(first, target)
    if wired:
        wire(first, entry)
    elif entry in (json.loads((first / "config.json").read_text(encoding="utf-8")).get("then") or []):
        wire(first, None)  # an earlier copy of this stage was wired; the new one is not
    command = "python -m retina_fast.training.enhance_stage " + " ".join(sys.argv[1:] if argv is None else argv)
    (target / "TRAINING.md").write_text(_training_md(target, first, entry, tau, args.work_size, ev, command, wired))
    print(f"{target}: residual threshold {tau}; validation {a['validation_score'][1]:.2f} -> "
          f"{c['validation_score'][1]:.2f} dB; " + (f"wired: {first}/config.json then = [{entry!r}]" if wired else
                                                     "not wired (the chain scores lower)"))
    if args.figure:
        names, x, _ = ev["_test_inputs"]
        tables = {k: {"_names": names, "_inputs": x, "_outputs": ev[k]["_outputs"], "seeds": list(TEST_SEEDS)}
                  for k in ("first stage alone", "first stage, then this stage")}
        enhance_kinds.kinds_figure(tables, args.figure)
    if args.json:
        public = {k: ({kk: vv for kk, vv in v.items() if not kk.startswith("_")} if isinstance(v, dict) else v)
                  for k, v in ev.items() if not k.startswith("_")}
        public.update({"residual_threshold": tau, "work_size": args.work_size, "wired": wired, "then": entry,
                       "threshold_grid": rows, "command": command})
        Path(args.json).write_text(json.dumps(public, indent=1))  # a clean row's gain is -inf (as enhance_kinds --json)
    return 0 if wired else 1


if __name__ == "__main__":
    raise SystemExit(main())
