"""``retina-fast train MODEL --out RUN ...``: run one of the reference trainers (retina_fast.training).

``TRAINERS`` maps a model name to the module that trains it; each module exposes
``add_arguments(parser)`` and ``run(args) -> int``, and is imported only when its parser is built, so
new trainers are one entry here. Under ``torchrun`` the same command trains with DDP (gloo on CPU,
NCCL on CUDA); rank 0 writes the run directory.

Examples::

    retina-fast train vqgan --preset tiny --data phantom --out runs/tiny-vqgan --steps 1200
    retina-fast train ldm --preset tiny --data phantom --vqgan runs/tiny-vqgan --out runs/tiny-ldm
    torchrun --nproc-per-node 2 -m retina_fast.cli train ldm ...        # DDP
"""
from __future__ import annotations

import importlib

TRAINERS = {
    "vqgan": "retina_fast.training.train_vqgan",
    "ldm": "retina_fast.training.train_ldm",
    "rsp": "retina_fast.training.train_enhance",
    "magenet": "retina_fast.training.train_enhance",
    "tmagenet": "retina_fast.training.train_enhance",
}


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model (VQ-GAN, latent diffusion, ...) with the reference trainers",
                       description=__doc__.split("\n\n")[0].replace("``", ""))
    models = p.add_subparsers(dest="model", required=True, metavar="MODEL")
    for name, module in TRAINERS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue  # trainer not part of this build yet
        doc = (mod.__doc__ or name).strip().split("\n\n")[0].replace("``", "")
        mp = models.add_parser(name, help=doc.split(":", 1)[-1].strip().split(".")[0], description=doc)
        mod.add_arguments(mp)
        mp.set_defaults(func=_runner(module))


def _runner(module: str):
    def run(args) -> int:
        return int(importlib.import_module(module).run(args) or 0)

    return run
