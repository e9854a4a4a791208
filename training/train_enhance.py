"""``retina-fast train rsp|magenet|tmagenet``: train MAGE-Net / T-MAGE-Net fundus enhancement or its RSP module.

- ``rsp``: pretrain the RSP module (AG-Net-style vessel segmentation) on phantom vessel masks with
  ``rsp_loss`` (BCE over the 4 side outputs and their mean). Each image of a batch is the degraded
  input or, with probability 1/2, the clean image: MAGE-Net's RSP sees degraded inputs, and the
  evaluation segments clean, degraded and enhanced images with the same network.
- ``magenet``: supervised MAGE-Net on synthetic pairs, ``magenet_loss`` = Σ_stages (Charbonnier +
  0.05·edge) + λ·Σ_4 scales BCE, λ = 0.5; the RSP module starts from ``--rsp-init`` (an ``rsp`` run's
  ``final/``). ``--no-rsp`` / ``--stage1-only`` are the paper's ablations.
- ``tmagenet``: the same supervised loss on a labelled synthetic batch plus, on an unlabelled real batch
  (left half of ``skimage.data.retina()``, degraded), the mean-teacher consistency (every stage and
  every segmentation scale, MSE) weighted by the Gaussian warm-up w(t) = w_max·exp(−5(1 − t/T)²);
  the teacher (EMA of the student, α_t = min(1 − 1/(t+1), α)) sees the real crop, the student a
  Gaussian-noise augment (σ = ``--noise-std``, inside the field of view).

Choices where the paper is silent (both documented in config.json's options): the clean phantoms are
recoloured per pair by per-channel gains exp(U(−a, a)), a = ``--colour-jitter`` (domain randomisation:
the phantom's colour varies little between eyes and differs from real photographs), and the two image
heads (SAM's image conv, the Stage-2 tail) start at zero, so MAGE-Net starts as the identity and learns
corrections (``--no-identity-init`` keeps PyTorch's default init).

Data: training/enhance_data.py (phantom pairs, the real halves). Per step s every random choice (batch
rows, crops, flips, clean/degraded choice, student noise) comes from a generator seeded by (seed, s), so
a resumed run is bit-identical to an uninterrupted one. Adam (β = 0.9, 0.999) with a cosine learning
rate from ``--lr`` to ``--lr-min``. The paper's batch is 16 labelled + 8 unlabelled 256² crops on a GPU;
the CPU defaults are 4 + 2 crops of 128² (the same 2:1 ratio).

RUN holds ``log.csv`` (+ TensorBoard when installed), ``checkpoints/`` (exact resume: model, teacher,
Adam, RNG, wall time) and ``final/`` (``model.safetensors`` + config.json: ``kind`` "magenet" or "rsp",
the architecture, the preset and provenance with the wall time and hardware; for ``tmagenet`` the model
is the EMA teacher and ``student.safetensors`` is kept beside it).
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from retina_fast.checkpoint import CheckpointError, load_checkpoint, load_state_into, save_checkpoint
from retina_fast.models.magenet import MAGENET_PRESETS, MAGENet, MAGENetConfig
from retina_fast.models.rsp import RSPNet
from retina_fast.training import enhance_data
from retina_fast.training.enhance_losses import IMAGE_WEIGHTINGS, PIXEL_LOSSES, magenet_loss, rsp_loss
from retina_fast.training.mean_teacher import MeanTeacher
from retina_fast.training.trainer import (MetricLogger, checkpoint_to_resume, load_train_state, provenance,
                                          require_finite, save_train_state, step_generator)
from retina_fast.training.trainer_setup import resolve_options

__all__ = ["KINDS", "DEFAULTS", "add_arguments", "run", "train", "build_model", "rsp_config", "load_rsp",
           "command_of"]

KINDS = ("rsp", "magenet", "tmagenet")
DEFAULTS: dict[str, Any] = {
    "preset": "tiny", "steps": 600, "batch_size": 4, "unlabelled_batch_size": 2, "crop": 128, "size": 256,
    "eyes": 48, "per_eye": 4, "real_images": 48, "colour_jitter": 0.25, "no_identity_init": False,
    "lr": 1e-3, "lr_min": 1e-5, "seed": 0, "no_rsp": False, "identity_fraction": 0.0,
    "real_augment": 0.0, "real_pairs": 0, "real_pairs_batch_size": 2, "image_weighting": "mean",
    "weighting_from": 0.0,
    "pixel_loss": "charbonnier", "charbonnier_from": 1.0,
    "spot_fraction": 0.0, "blur_fraction": 0.0, "stage1_only": False, "output_gate": False, "gate_bias": 0.0, "rsp_init": None,
    "init": None, "after": None, "real_pair_kinds": None, "structure_weight": 0.0,
    "structure_rsp": None, "ema": 0.999, "consistency_weight": 1.0, "warmup": 0.3,
    "noise_std": 0.05, "log_every": 10, "ckpt_every": 100, "device": None, "threads": None, "data_cache": None,
}
FIELDS = ["loss", "char_s1", "edge_s1", "char_s2", "edge_s2", "seg", "structure", "consistency", "con_weight",
          "ema_alpha", "real_pairs", "lr", "s_per_step"]
_STREAM = 0xE7A
_MUTABLE = ("threads", "data_cache")  # besides trainer_setup.MUTABLE (steps, log/ckpt intervals, device, out)


def add_arguments(p) -> None:
    """Options of ``train rsp|magenet|tmagenet`` (all parse to None when absent; see DEFAULTS)."""
    def d(key: str) -> str:
        return f" (default {DEFAULTS[key]})"

    p.add_argument("--out", required=True, metavar="RUN", help="run directory (log.csv, checkpoints/, final/)")
    p.add_argument("--preset", choices=sorted(MAGENET_PRESETS), help="MAGE-Net preset" + d("preset"))
    p.add_argument("--steps", type=int, help="optimisation steps" + d("steps"))
    p.add_argument("--batch-size", type=int, help="labelled synthetic crops per step" + d("batch_size"))
    p.add_argument("--unlabelled-batch-size", type=int,
                   help="unlabelled real crops per step (tmagenet; the paper uses 16 + 8)" + d("unlabelled_batch_size"))
    p.add_argument("--crop", type=int, help="square crop side in pixels" + d("crop"))
    p.add_argument("--size", type=int, help="whole-fundus size of phantoms and of the real photograph" + d("size"))
    p.add_argument("--eyes", type=int, help="phantom eyes in the training set" + d("eyes"))
    p.add_argument("--per-eye", type=int, help="degraded versions per eye" + d("per_eye"))
    p.add_argument("--colour-jitter", type=float, help="per-channel colour gains exp(U(-a, a)) on the clean phantoms "
                   "(domain randomisation; 0 = off)" + d("colour_jitter"))
    p.add_argument("--no-identity-init", action="store_true", default=None,
                   help="keep PyTorch's default init of the two image heads (default: zero, so MAGE-Net starts as "
                        "the identity)")
    p.add_argument("--identity-fraction", type=float, metavar="P",
                   help="probability that a labelled row's input is its clean target (identity pairs: the network "
                        "learns to leave a good photograph alone)" + d("identity_fraction"))
    p.add_argument("--spot-fraction", type=float, metavar="P",
                   help="probability that a labelled synthetic row's input is its spot-only degradation instead "
                        "of its random combination (more spot-removal examples; not in the paper; an identity pair "
                        "drawn after it still replaces the input)" + d("spot_fraction"))
    p.add_argument("--blur-fraction", type=float, metavar="P",
                   help="probability that a labelled synthetic row's input is its blur-only degradation (as "
                        "--spot-fraction; the two together at most 1)" + d("blur_fraction"))
    p.add_argument("--real-images", type=int, help="degraded versions of the real left half" + d("real_images"))
    p.add_argument("--real-augment", type=float, metavar="A",
                   help="widen the unlabelled real domain: each degraded left half starts from its own variant (zoom "
                        "up to A/2, colour and exposure gains exp(U(-A, A))); 0 = the half itself" + d("real_augment"))
    p.add_argument("--real-pairs", type=int, metavar="N",
                   help="labelled real pairs: N degraded variants of the real left half (zoom / colour / exposure, "
                        "amount --real-augment or 0.2) with their clean variants as targets; 0 = none" + d("real_pairs"))
    p.add_argument("--real-pair-kinds", metavar="KINDS",
                   help="degrade every real pair by these kinds only, comma-separated (illumination, spot, blur; "
                        "default: a random combination each)")
    p.add_argument("--real-pairs-batch-size", type=int,
                   help="real pairs per step, beside the synthetic batch (image losses only: no vessel labels)"
                        + d("real_pairs_batch_size"))
    p.add_argument("--image-weighting", choices=IMAGE_WEIGHTINGS,
                   help="how the rows of a batch weigh in the image losses: 'mean' (the paper: mean L1-type error) "
                        "or 'log' (mean of 0.01*log of each row's error, so a small error on a good photograph "
                        "counts by its ratio, as PSNR does) or 'sqrt' (mean of 0.2*sqrt of each row's error: "
                        "between the two)" + d("image_weighting"))
    p.add_argument("--weighting-from", type=float, metavar="FRACTION",
                   help="use --image-weighting only from this fraction of the steps on, the batch mean before "
                        "(a schedule: large errors such as dark photographs are learnt first, then each row "
                        "counts by its ratio; not in the paper; measured: after the mean's first 25 %% the spot removal "
                        "is not learnt; 0 = from the start)" + d("weighting_from"))
    p.add_argument("--pixel-loss", choices=PIXEL_LOSSES,
                   help="per-pixel form of the image losses: 'charbonnier' (the paper; L1-like, its minimiser the "
                        "median, so an uncertain correction such as a faint spot is not made) or 'l2' (10*squared "
                        "error; the mean: partial corrections; not in the paper) or 'hybrid' (l2 where the "
                        "degradation changed the pixel by more than 0.02, charbonnier elsewhere; not in the paper)"
                   + d("pixel_loss"))
    p.add_argument("--charbonnier-from", type=float, metavar="FRACTION",
                   help="switch the image losses from --pixel-loss to charbonnier after this fraction of the steps "
                        "(a schedule: the mean's partial corrections first, then the median's 'leave it unless "
                        "sure'; not in the paper; 1 = never)" + d("charbonnier_from"))
    p.add_argument("--lr", type=float, help="initial Adam learning rate (cosine decay)" + d("lr"))
    p.add_argument("--lr-min", type=float, help="final learning rate" + d("lr_min"))
    p.add_argument("--seed", type=int, help="seed of initialisation and every per-step choice" + d("seed"))
    p.add_argument("--no-rsp", action="store_true", default=None, help="ablation: MAGE-Net without the RSP module")
    p.add_argument("--stage1-only", action="store_true", default=None, help="ablation: Stage-1 U-Net + SAM only")
    p.add_argument("--output-gate", action="store_true", default=None,
                   help="gate the final residual per pixel (x + sigmoid(g) * delta; not in the paper)")
    p.add_argument("--gate-bias", type=float, metavar="B",
                   help="initial bias of the output gate: sigmoid(B) of the residual passes at the start (0: half "
                        "open, -4: nearly closed, so leaving the photograph alone is the default)" + d("gate_bias"))
    p.add_argument("--rsp-init", metavar="DIR", help="pretrained RSP checkpoint (final/ of a `train rsp` run)")
    p.add_argument("--init", metavar="DIR",
                   help="start from the weights of a magenet / tmagenet run's final/ with the same architecture "
                        "(fine-tuning, or a curriculum in two runs); the learning-rate schedule starts afresh")
    p.add_argument("--after", metavar="MODEL",
                   help="train a follow-up stage (retina_fast.enhance's config.json 'then'): every training input "
                        "(synthetic, spot- / blur-only, real pairs, unlabelled real) is first enhanced, whole, by "
                        "this frozen enhancer (a checkpoint or packaged name; its own threshold and work size, "
                        "alone) once before the first step, so the stage learns on what it will be given")
    p.add_argument("--structure-weight", type=float, metavar="W",
                   help="weight of a vessel-preservation term: a frozen, separately trained segmenter "
                        "(--structure-rsp) segments the enhanced synthetic rows, BCE against their vessel masks "
                        "(not in the paper); 0 = off" + d("structure_weight"))
    p.add_argument("--structure-rsp", metavar="DIR",
                   help="the frozen segmenter of --structure-weight (final/ of a `train rsp` run; use another "
                        "seed than the evaluation's segmenter)")
    p.add_argument("--ema", type=float, help="mean-teacher EMA α (tmagenet)" + d("ema"))
    p.add_argument("--consistency-weight", type=float, help="w_max of the consistency loss" + d("consistency_weight"))
    p.add_argument("--warmup", type=float, help="Gaussian warm-up length as a fraction of --steps" + d("warmup"))
    p.add_argument("--noise-std", type=float, help="student Gaussian-noise augment σ" + d("noise_std"))
    p.add_argument("--log-every", type=int, help="steps between log rows" + d("log_every"))
    p.add_argument("--ckpt-every", type=int, help="steps between checkpoints" + d("ckpt_every"))
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own choice)")
    p.add_argument("--data-cache", metavar="DIR", help="cache the generated training data here (safetensors)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("-q", "--quiet", "--no-progress", dest="no_progress", action="store_true", help="no progress bar")


def run(args) -> int:
    """Entry point: the trainer kind is ``args.model`` (set by ``retina-fast train``) or ``args.kind``."""
    kind = getattr(args, "kind", None) or getattr(args, "model", None)
    if kind not in KINDS:
        raise ValueError(f"unknown enhancement trainer {kind!r}; choose from {KINDS}")
    run_dir = Path(args.out)
    ck = checkpoint_to_resume(run_dir, args.resume)
    saved = load_checkpoint(ck, [])[0]["options"] if ck is not None else None
    given = {k: v for k, v in vars(args).items() if k not in ("func", "model", "command", "kind", "no_progress")}
    local = {k: given.pop(k) for k in _MUTABLE if given.get(k) is not None}  # may change on --resume
    opts = {**resolve_options(argparse.Namespace(**given), {**DEFAULTS, "kind": kind}, saved), **local}
    for key in ("identity_fraction", "real_augment", "real_pairs", "spot_fraction", "blur_fraction"):
        if saved is not None and key not in saved:
            opts[key] = 0  # a run started before the option
    if saved is not None and "image_weighting" not in saved:
        opts["image_weighting"] = "mean"
    if saved is not None and "pixel_loss" not in saved:
        opts["pixel_loss"] = "charbonnier"
    if saved is not None and "charbonnier_from" not in saved:
        opts["charbonnier_from"] = 1.0
    if saved is not None and "weighting_from" not in saved:
        opts["weighting_from"] = 0.0
    for key in ("charbonnier_from", "weighting_from"):
        if not 0.0 <= opts[key] <= 1.0:
            raise ValueError(f"--{key.replace('_', '-')} must be in [0, 1], got {opts[key]}")
    if saved is not None and "structure_weight" not in saved:
        opts["structure_weight"], opts["structure_rsp"] = 0.0, None
    check_structure_options(kind, opts)
    if ck is None and opts.get("init"):
        if opts.get("rsp_init"):
            raise ValueError("--init already holds the RSP module's weights: drop --rsp-init")
        opts["init_sha256"] = init_checkpoint(opts)["weights"]["model"]["sha256"]  # kept with the run's options
    if opts.get("after"):
        if kind == "rsp":
            raise ValueError("--after is an option of magenet / tmagenet, not of `train rsp`")
        sha = after_sha256(opts["after"])
        if opts.get("after_sha256", sha) != sha:
            raise CheckpointError(f"--after {opts['after']}: its weights changed since this run started "
                                  f"(sha256 {opts['after_sha256'][:12]}..., now {sha[:12]}...)")
        opts["after_sha256"] = sha  # kept with the run's options
        if saved is None:  # the first stage's deblurring as the run started (runs from before it: none)
            from retina_fast.enhance import load_enhancer

            opts["after_deblur"] = load_enhancer(opts["after"]).deblur
    for key in ("identity_fraction", "spot_fraction", "blur_fraction"):
        if not 0.0 <= opts[key] <= 1.0:
            raise ValueError(f"--{key.replace('_', '-')} must be in [0, 1], got {opts[key]}")
    if opts["spot_fraction"] + opts["blur_fraction"] > 1.0:
        raise ValueError(f"--spot-fraction + --blur-fraction must be at most 1, got "
                         f"{opts['spot_fraction']} + {opts['blur_fraction']}")
    for key in ("spot_fraction", "blur_fraction"):
        if opts[key] and kind == "rsp":
            raise ValueError(f"--{key.replace('_', '-')} is an option of magenet / tmagenet, not of `train rsp`")
    if not isinstance(opts["real_pairs"], int) or opts["real_pairs"] < 0:
        raise ValueError(f"--real-pairs must be an integer >= 0, got {opts['real_pairs']!r}")
    if opts["real_pairs"] and kind == "rsp":
        raise ValueError("--real-pairs is an option of magenet / tmagenet, not of `train rsp`")
    if real_pair_kinds(opts) is not None and not opts["real_pairs"]:
        raise ValueError("--real-pair-kinds needs --real-pairs N")
    if not 0.0 <= opts["real_augment"] <= 1.0:
        raise ValueError(f"--real-augment must be in [0, 1], got {opts['real_augment']}")
    if saved is not None and saved.get("kind") != kind:
        raise ValueError(f"--resume: {run_dir} is a {saved.get('kind')!r} run, not {kind!r}")
    train(opts, run_dir, ck, progress=not getattr(args, "no_progress", False))
    return 0


def check_structure_options(kind: str, opts: dict[str, Any]) -> None:
    """--structure-weight / --structure-rsp: a finite weight >= 0, a segmenter exactly when it is > 0, and that
    segmenter an RSP checkpoint -- checked before the run directory is made, so a bad path leaves
    nothing behind."""
    w = opts.get("structure_weight") or 0.0
    if not (math.isfinite(w) and w >= 0):
        raise ValueError(f"--structure-weight must be a finite number >= 0, got {w}")
    if w and kind == "rsp":
        raise ValueError("--structure-weight is an option of magenet / tmagenet, not of `train rsp`")
    if w and not opts.get("structure_rsp"):
        raise ValueError("--structure-weight needs --structure-rsp DIR (a `train rsp` run's final/)")
    if opts.get("structure_rsp") and not w:
        raise ValueError("--structure-rsp given without --structure-weight > 0")
    if w:
        rsp_checkpoint(opts["structure_rsp"])


def init_checkpoint(opts: dict[str, Any]) -> dict[str, Any]:
    """config.json of ``--init DIR``: a magenet checkpoint whose architecture is this run's (checked before the
    run directory is made); ``CheckpointError`` for a missing or unreadable one, ``ValueError`` otherwise."""
    path = opts["init"]
    if opts["kind"] == "rsp":
        raise ValueError("--init is an option of magenet / tmagenet; `train rsp` has no MAGE-Net to start")
    doc = load_checkpoint(path, [])[0]
    if doc.get("kind") != "magenet":
        raise ValueError(f"--init {path}: a {doc.get('kind')!r} checkpoint, not a MAGE-Net one")
    own = build_model(opts)[1].to_dict()
    theirs = MAGENetConfig.from_dict(doc["architecture"]).to_dict()
    diff = sorted(k for k in own if own[k] != theirs.get(k))
    if diff:
        raise ValueError(f"--init {path}: its architecture differs from this run's in "
                         + ", ".join(f"{k} ({theirs.get(k)!r} vs {own[k]!r})" for k in diff))
    return doc


def structure_net(opts: dict[str, Any], device) -> RSPNet | None:
    """The frozen segmenter of the vessel-preservation term, or None when the term is off."""
    if not opts.get("structure_weight"):
        return None
    return frozen_rsp(opts["structure_rsp"]).to(device)


def structure_loss(seg_net: RSPNet, image: torch.Tensor, vessels: torch.Tensor) -> torch.Tensor:
    """BCE (``rsp_loss``: 4 sides and their mean) of the frozen ``seg_net`` on an enhanced image against the
    vessel masks: gradients reach the enhancer only. Vessels the output loses, and vessel-like texture it
    paints (the lifted dark areas of illumination-degraded inputs), both cost; the image losses alone are
    nearly blind to either, since vessels are a small part of a photograph's error."""
    return rsp_loss(seg_net(image), vessels)


def rsp_config(cfg: MAGENetConfig) -> dict[str, Any]:
    return {"base": cfg.rsp_base, "gf_radius": cfg.gf_radius, "gf_eps": cfg.gf_eps}


def build_model(opts: dict[str, Any]) -> tuple[torch.nn.Module, MAGENetConfig]:
    """The network of a run: RSPNet for ``rsp``, else MAGE-Net of the preset with the ablation flags."""
    base = MAGENET_PRESETS[opts["preset"]].to_dict()
    cfg = MAGENetConfig.from_dict({**base, "use_rsp": not opts["no_rsp"], "stage1_only": bool(opts["stage1_only"]),
                                   "output_gate": bool(opts.get("output_gate"))})
    if opts["kind"] == "rsp":
        if opts["no_rsp"] or opts["stage1_only"]:
            raise ValueError("--no-rsp / --stage1-only are MAGE-Net ablations, not options of `train rsp`")
        return RSPNet(**rsp_config(cfg)), cfg
    gate_bias = float(opts.get("gate_bias") or 0.0)
    if gate_bias and not cfg.output_gate:
        raise ValueError("--gate-bias sets the output gate's initial bias: it needs --output-gate")
    if not math.isfinite(gate_bias):
        raise ValueError(f"--gate-bias must be a finite number, got {gate_bias}")
    net = MAGENet(cfg)
    if cfg.output_gate:
        torch.nn.init.constant_(net.gate.bias, gate_bias)
    if not opts["no_identity_init"]:
        heads = [net.stage1.sam.conv2] + ([net.tail] if cfg.has_stage2 else [])
        for conv in heads:  # image = conv(features) + input: zero weights make both stages the identity
            torch.nn.init.zeros_(conv.weight)
    return net, cfg


def rsp_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """config.json of the ``rsp`` checkpoint directory ``path`` (the weights are verified when ``load_rsp`` reads
    them); ``CheckpointError`` for a missing or unreadable one, ``ValueError`` for another kind of checkpoint."""
    return _require_rsp(path, load_checkpoint(path, [])[0])


def _require_rsp(path: str | os.PathLike, doc: dict[str, Any]) -> dict[str, Any]:
    if doc.get("kind") != "rsp":
        raise ValueError(f"{path}: a {doc.get('kind')!r} checkpoint, not an RSP one (`retina-fast train rsp`)")
    return doc


def frozen_rsp(path: str | os.PathLike) -> RSPNet:
    """A new RSPNet with the weights of the ``rsp`` checkpoint directory ``path``, in eval mode, no gradients."""
    net = RSPNet(**rsp_checkpoint(path)["architecture"])
    load_rsp(path, net)
    return net.eval().requires_grad_(False)


def load_rsp(path: str | os.PathLike, target: RSPNet) -> dict[str, Any]:
    """Load the weights of an ``rsp`` checkpoint directory into ``target``; returns its config.json."""
    doc, states = load_checkpoint(path, ["model"])
    _require_rsp(path, doc)
    load_state_into(target, states["model"], f"{path}/model.safetensors")
    return doc


def _hardware(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    hw = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        hw["gpu"] = torch.cuda.get_device_name(device)
    return hw


def _lr(opts: dict[str, Any], step: int) -> float:
    t = step / max(opts["steps"] - 1, 1)
    return opts["lr_min"] + 0.5 * (opts["lr"] - opts["lr_min"]) * (1 + math.cos(math.pi * t))


def _load_data(opts: dict[str, Any], progress: bool):
    cache = opts["data_cache"]
    syn = enhance_data.synthetic_pairs(opts["eyes"], opts["per_eye"], opts["size"], colour_jitter=opts["colour_jitter"],
                                       cache_dir=cache, progress=progress)
    real = None
    if opts["kind"] == "tmagenet":
        real = enhance_data.real_unlabelled(opts["real_images"], opts["size"], augment=opts["real_augment"],
                                            cache_dir=cache, progress=progress)
    desc = (f"phantom eyes 0..{opts['eyes'] - 1} at {opts['size']} px, {opts['per_eye']} Cofe-Net degradations "
            f"each (random combination, mode=code), colour gains exp(U(-{opts['colour_jitter']}, "
            f"{opts['colour_jitter']})) per pair")
    single = {}  # kind -> inputs degraded by that kind alone, aligned with syn
    for kind, tag in (("spot", "SYN_SPOT"), ("blur", "SYN_BLUR")):
        if not opts.get(f"{kind}_fraction") or opts["kind"] == "rsp":
            continue
        pool = enhance_data.single_kind_inputs(kind, opts["eyes"], opts["per_eye"], opts["size"],
                                               colour_jitter=opts["colour_jitter"], cache_dir=cache, progress=progress)
        if not (torch.equal(pool.targets, syn.targets) and torch.equal(pool.source, syn.source)):
            raise RuntimeError(f"{kind}-only inputs are not aligned with the synthetic pairs (data cache damaged?)")
        single[kind] = pool
        desc += (f"; with probability {opts[f'{kind}_fraction']} a row's input is its {kind}-only degradation "
                 f"(seeds tagged {tag}) instead")
    if opts["identity_fraction"]:
        desc += f"; identity pairs (input = clean target) with probability {opts['identity_fraction']}"
    if opts["image_weighting"] != "mean":
        desc += f"; image losses weighted per row: {opts['image_weighting']}"
        if opts.get("weighting_from", 0.0) > 0.0:
            desc += f" from step {_first_step(opts, 'weighting_from', 0.0)} on (batch mean before)"
    if opts["pixel_loss"] != "charbonnier":
        desc += f"; image losses per pixel: {opts['pixel_loss']} instead of Charbonnier"
        if opts["charbonnier_from"] < 1.0:
            desc += f", Charbonnier from step {_first_step(opts, 'charbonnier_from', 1.0)} on"
    if opts.get("structure_weight"):
        desc += (f"; vessel-preservation term {opts['structure_weight']} x BCE of a frozen segmenter "
                 f"({opts['structure_rsp']}) on the enhanced synthetic rows")
    if real is not None:
        desc += (f"; unlabelled real: left half (columns 0-704) of skimage.data.retina(), "
                 f"{opts['real_images']} random degradations")
        if opts["real_augment"]:
            desc += f" of augmented variants (zoom, colour and exposure gains, amount {opts['real_augment']})"
    pairs = None
    if opts["real_pairs"] and opts["kind"] != "rsp":
        amount = opts["real_augment"] or 0.2
        kinds = real_pair_kinds(opts)
        pairs = enhance_data.real_pairs(opts["real_pairs"], opts["size"], augment=amount, cache_dir=cache,
                                        progress=progress, kinds=kinds)
        desc += (f"; labelled real pairs: {opts['real_pairs']} variants of the real left half (amount {amount}), "
                 f"{'degraded by ' + ' + '.join(kinds) + ' only' if kinds else 'random degradations'}, "
                 f"{opts['real_pairs_batch_size']} per step")
    if opts.get("after"):
        from retina_fast.enhance import load_enhancer

        first = load_enhancer(opts["after"])  # its weights verified against the sha256 its config.json records
        if first.meta["weights"]["model"]["sha256"] != opts.get("after_sha256"):
            raise CheckpointError(f"--after {opts['after']}: its weights changed since this run started")
        for pool in (syn, *single.values(), pairs, real):
            if pool is not None:
                pool.inputs = through_first_stage(pool.inputs, opts["after"], deblur=opts.get("after_deblur"))
        desc += (f"; every input first enhanced, whole, by the frozen enhancer {opts['after']} (sha256 "
                 f"{opts['after_sha256'][:12]}, residual threshold {first.residual_threshold}, work size "
                 f"{first.work_size}, without its follow-up stages)")
    return syn, (real, pairs, single.get("spot"), single.get("blur")), desc


def real_pair_kinds(opts: dict[str, Any]) -> tuple[str, ...] | None:
    """--real-pair-kinds as a tuple of degradation kinds (None: random combinations); ValueError naming a bad one."""
    text = opts.get("real_pair_kinds")
    if not text:
        return None
    kinds = tuple(k.strip() for k in str(text).split(","))
    if not all(k in enhance_data.DEGRADATION_KINDS for k in kinds):
        raise ValueError(f"--real-pair-kinds: choose from {', '.join(enhance_data.DEGRADATION_KINDS)} "
                         f"(comma-separated), got {text!r}")
    return kinds


def after_sha256(model) -> str:
    """sha256 of the weights of the --after enhancer (its config.json's record, checked when it is loaded)."""
    from retina_fast.checkpoint import read_config
    from retina_fast.enhance import resolve_enhancer

    doc = read_config(resolve_enhancer(model))
    return doc["weights"]["model"]["sha256"]


def through_first_stage(inputs: torch.Tensor, model, batch: int = 8, deblur: dict | None = None) -> torch.Tensor:
    """uint8 images (M, 3, H, W) -> the same enhanced, whole, by ``model`` alone (its own threshold and work size;
    the fp32 reference backend, so every machine makes the same training data), rounded back to uint8;
    ``deblur``: its deblurring settings as the run recorded them (None: none)."""
    from retina_fast.enhance import enhance

    out = torch.empty_like(inputs)
    for i in range(0, len(inputs), batch):
        y = enhance(inputs[i:i + batch].float() / 255.0, model=str(model), backend="torch", then=(),
                    deblur=deblur if deblur is not None else False)
        out[i:i + batch] = (y.clamp(0, 1) * 255).round().to(torch.uint8)
    return out


def _first_step(opts: dict[str, Any], fraction_key: str, default: float) -> int:
    """The first step of a schedule given as a fraction of --steps: --charbonnier-from (image losses Charbonnier
    from there on; default never) or --weighting-from (--image-weighting from there on; default from the start)."""
    return round(opts.get(fraction_key, default) * opts["steps"])


def _step(model, mt, opts, syn, real, step: int, device,
          seg_net: RSPNet | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of one step; all randomness from the (seed, step) generator. ``real`` = (unlabelled pool or None,
    labelled real pairs or None, spot-only and blur-only inputs aligned with ``syn`` or None); ``seg_net`` the
    frozen segmenter of --structure-weight."""
    real, pairs, spots, blurs = (tuple(real) + (None,) * 4)[:4] if isinstance(real, tuple) else (real, None, None, None)
    g = step_generator(opts["seed"], step, _STREAM)
    idx = torch.randint(len(syn), (opts["batch_size"],), generator=g)
    rows = syn.get(idx)
    if spots is not None or blurs is not None:  # drawn only when on, so runs without them keep their random stream
        u = torch.rand(opts["batch_size"], generator=g)  # one draw per row: [0, p_spot) spot, then p_blur blur
        p_spot = opts["spot_fraction"] if spots is not None else 0.0
        for pool, lo, hi in ((spots, 0.0, p_spot), (blurs, p_spot, p_spot + opts.get("blur_fraction", 0.0))):
            if pool is not None:
                use = (u >= lo) & (u < hi)
                rows["x"] = torch.where(use[:, None, None, None], pool.get(idx)["x"], rows["x"])
    b = {k: v.to(device) for k, v in enhance_data.random_crops(rows, opts["crop"], g).items()}
    if opts["kind"] == "rsp":
        clean = (torch.rand(opts["batch_size"], generator=g) < 0.5).to(device)[:, None, None, None]
        loss = rsp_loss(model(torch.where(clean, b["y"], b["x"])), b["vessels"])
        return loss, {"seg": loss.detach(), "total": loss.detach()}
    if opts["identity_fraction"] > 0:
        ident = (torch.rand(opts["batch_size"], generator=g) < opts["identity_fraction"]).to(device)
        b["x"] = torch.where(ident[:, None, None, None], b["y"], b["x"])
    out = model(b["x"])
    pixel = opts["pixel_loss"] if step < _first_step(opts, "charbonnier_from", 1.0) else "charbonnier"
    weighting = opts["image_weighting"] if step >= _first_step(opts, "weighting_from", 0.0) else "mean"
    loss, parts = magenet_loss(out, b["y"], b["vessels"], image_weighting=weighting,
                               pixel=pixel, degraded=b["x"])
    if seg_net is not None:
        st = structure_loss(seg_net, out.final, b["vessels"])
        loss = loss + opts["structure_weight"] * st
        parts.update(structure=st.detach(), total=loss.detach())
    if mt is not None:
        ridx = torch.randint(len(real), (opts["unlabelled_batch_size"],), generator=g)
        rb = enhance_data.random_crops(real.get(ridx), opts["crop"], g)
        noise_g = torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=g)))
        con, _ = mt.consistency(model, rb["x"].to(device), generator=noise_g, mask=rb["fov"].to(device))
        w = mt.weight()
        loss = loss + w * con
        parts.update(consistency=con.detach(), con_weight=torch.tensor(w), total=loss.detach())
    if pairs is not None:  # drawn after everything else, so runs without pairs keep their random stream
        k = opts["real_pairs_batch_size"]
        pb = enhance_data.random_crops(pairs.get(torch.randint(len(pairs), (k,), generator=g)), opts["crop"], g)
        px, py = pb["x"].to(device), pb["y"].to(device)
        if opts["identity_fraction"] > 0:
            ident = (torch.rand(k, generator=g) < opts["identity_fraction"]).to(device)
            px = torch.where(ident[:, None, None, None], py, px)
        real_loss, _ = magenet_loss(model(px), py, None, image_weighting=weighting,
                                    pixel=pixel, degraded=px)
        loss = loss + real_loss
        parts.update(real_pairs=real_loss.detach(), total=loss.detach())
    return loss, parts


def train(opts: dict[str, Any], run_dir: Path, ck: Path | None = None, *, progress: bool = True) -> Path:
    """Train per ``opts`` (DEFAULTS plus ``kind``) into ``run_dir``; returns ``run_dir / "final"``."""
    from tqdm import tqdm

    for key in ("crop", "size", "eyes", "per_eye", "real_images", "unlabelled_batch_size", "real_pairs_batch_size"):
        if not isinstance(opts[key], int) or opts[key] < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be a positive integer, got {opts[key]!r}")
    if opts["crop"] > opts["size"] // 2 and (opts["kind"] == "tmagenet" or opts["real_pairs"]):
        raise ValueError(f"--crop {opts['crop']} must fit in the real half ({opts['size']}×~{opts['size'] // 2} px)")
    if opts["threads"]:
        torch.set_num_threads(int(opts["threads"]))
    device = torch.device(opts["device"] or ("cuda" if torch.cuda.is_available() else "cpu"))
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(opts["seed"])
    model, cfg = build_model(opts)
    rsp_doc = None
    if opts["rsp_init"] and opts["kind"] != "rsp":
        if not cfg.has_rsp:
            raise ValueError("--rsp-init given but the model has no RSP module (--no-rsp / --stage1-only)")
        rsp_doc = load_rsp(opts["rsp_init"], model.rsp)
    if opts.get("init") and ck is None:  # a resumed run's weights come from its checkpoint
        if "init_sha256" not in opts:  # options not checked by resolve_options (a direct call)
            opts["init_sha256"] = init_checkpoint(opts)["weights"]["model"]["sha256"]
        init_doc, init_state = load_checkpoint(opts["init"], ["model"])
        if init_doc["weights"]["model"]["sha256"] != opts["init_sha256"]:
            raise CheckpointError(f"--init {opts['init']}: its weights changed since the options were checked")
        load_state_into(model, init_state["model"], f"{opts['init']}/model.safetensors")
    model.to(device)
    seg_net = structure_net(opts, device)
    opt = torch.optim.Adam(model.parameters(), lr=opts["lr"], betas=(0.9, 0.999))
    mt = None
    if opts["kind"] == "tmagenet":
        mt = MeanTeacher(model, alpha=opts["ema"], w_max=opts["consistency_weight"],
                         ramp_steps=int(round(opts["warmup"] * opts["steps"])), noise_std=opts["noise_std"])
    modules = {"model": model} if mt is None else {"model": model, "teacher": mt.teacher}
    start, wall, cpu = 0, 0.0, 0.0
    if ck is not None:
        doc = load_train_state(ck, modules, {"adam": opt})
        start, wall, cpu = int(doc["step"]), float(doc.get("wall_time_s", 0.0)), float(doc.get("cpu_time_s", 0.0))
        if mt is not None:
            mt.step = int(doc["mean_teacher_step"])
    syn, real, data_desc = _load_data(opts, progress)
    logger = MetricLogger(run_dir, FIELDS, resume_step=start if ck is not None else None)
    total = opts["steps"]
    bar = tqdm(total=total, initial=start, desc=f"train {opts['kind']}", unit="step", disable=not progress)
    t0 = t_last = time.time()
    c0 = time.process_time()
    s_last, acc, n_acc = start, {}, 0
    for step in range(start, total):
        for group in opt.param_groups:
            group["lr"] = _lr(opts, step)
        model.train()
        loss, parts = _step(model, mt, opts, syn, real, step, device, seg_net)
        require_finite(loss, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if mt is not None:
            parts["ema_alpha"] = torch.tensor(mt.update(model))
        for k, v in parts.items():
            acc[k] = acc.get(k, 0.0) + v.detach().float().cpu()
        n_acc += 1
        done = step + 1
        bar.update(1)
        if done % opts["log_every"] == 0 or done == total:
            row = {("loss" if k == "total" else k): float(v) / n_acc for k, v in acc.items()}
            now = time.time()
            row.update(lr=_lr(opts, step), s_per_step=(now - t_last) / max(done - s_last, 1))
            logger.log(done, row)
            bar.set_postfix(loss=f"{row['loss']:.4f}")
            t_last, s_last, acc, n_acc = now, done, {}, 0
        if done % opts["ckpt_every"] == 0 or done == total:
            extra = {"wall_time_s": wall + time.time() - t0, "cpu_time_s": cpu + time.process_time() - c0}
            if mt is not None:
                extra["mean_teacher_step"] = mt.step
            save_train_state(run_dir, done, modules, {"adam": opt}, opts, extra)
    bar.close()
    logger.close()
    wall += time.time() - t0
    cpu += time.process_time() - c0
    return _save_final(run_dir, opts, model, mt, cfg, data_desc, (wall, cpu), rsp_doc, device)


def command_of(argv: list[str]) -> str:
    """The run's command line without machine-specific paths or ``--resume``: ``python -m
    retina_fast.training.train_enhance ARGS`` when started as this module (``sys.argv[0]`` is then the
    absolute path of this file), else the program's base name (``retina-fast train ...``) and its args."""
    prog = Path(argv[0]).name if argv else "retina-fast"
    prog = "python -m retina_fast.training.train_enhance" if prog == "train_enhance.py" else prog
    return " ".join([prog] + [shlex.quote(a) for a in argv[1:] if a != "--resume"])


def _save_final(run_dir, opts, model, mt, cfg, data_desc, times, rsp_doc, device) -> Path:
    extra = {"trainer": opts["kind"], "wall_time_s": round(times[0], 1), "cpu_time_s": round(times[1], 1),
             "hardware": _hardware(device)}
    if rsp_doc is not None:
        extra["rsp_init"] = {"path": str(opts["rsp_init"]),
                             "sha256": rsp_doc["weights"]["model"]["sha256"]}
    if opts.get("init"):
        extra["init"] = {"path": str(opts["init"]), "sha256": opts.get("init_sha256")}
    if opts.get("after"):
        extra["after"] = {"path": str(opts["after"]), "sha256": opts.get("after_sha256")}
    if opts.get("structure_weight"):
        seg_doc = rsp_checkpoint(opts["structure_rsp"])
        extra["structure_rsp"] = {"path": str(opts["structure_rsp"]), "sha256": seg_doc["weights"]["model"]["sha256"]}
    prov = provenance(opts, opts["steps"], data_desc, command_of(sys.argv), run_dir=run_dir, **extra)
    if opts["kind"] == "rsp":
        config = {"kind": "rsp", "architecture": rsp_config(cfg), "preset": opts["preset"],
                  "normalisation": {"input": "RGB float in [0, 1]", "output": "vessel logits (N, 1, H, W)"}}
        return save_checkpoint(run_dir / "final", {"model": model}, config, prov)
    variant = "stage1-only" if cfg.stage1_only else ("no-rsp" if not cfg.use_rsp else "full")
    config = {"kind": "magenet", "architecture": cfg.to_dict(), "preset": opts["preset"],
              "variant": f"{'T-' if mt is not None else ''}MAGE-Net {variant}",
              "normalisation": {"input": "RGB float in [0, 1]", "output": "RGB in [0, 1] after clamping"}}
    modules = {"model": model}
    if mt is not None:
        config["model_weights"] = "EMA teacher (mean teacher); student.safetensors holds the student"
        modules = {"model": mt.teacher, "student": model}
    return save_checkpoint(run_dir / "final", modules, config, prov)


def main(argv: list[str] | None = None) -> int:
    """``python -m retina_fast.training.train_enhance KIND --out RUN ...`` (same as ``retina-fast train KIND``)."""
    p = argparse.ArgumentParser(prog="python -m retina_fast.training.train_enhance",
                                description=__doc__.split("\n\n")[0].replace("``", ""))
    p.add_argument("kind", choices=KINDS)
    add_arguments(p)
    args = p.parse_args(argv)
    try:  # bad values and unusable paths: one line and status 2, as `retina-fast train` does
        return run(args)
    except ValueError as exc:
        p.exit(2, f"{p.prog}: error: {exc}\n")
    except OSError as exc:
        from retina_fast.cli import os_error_text

        p.exit(2, f"{p.prog}: error: {os_error_text(exc)}\n")


if __name__ == "__main__":
    raise SystemExit(main())
