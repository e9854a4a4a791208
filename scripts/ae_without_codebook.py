"""Diagnostic for issue #4 (retinal vessels missing): train the VQ-GAN with its codebook bypassed.

    python scripts/ae_without_codebook.py --preset tiny --data phantom --out runs/ae-novq --steps 1500 ...

Same command-line options as ``retina-fast train vqgan``; the only change is that the decoder receives
the encoder's continuous output (``Codebook.forward`` still runs for its bookkeeping -- EMA, restarts,
the logged perplexity -- but its straight-through codes and commitment loss are replaced by z and 0).
Then ``python scripts/vessel_contrast.py --continuous NAME=runs/ae-novq`` shows how much vessel contrast
an autoencoder of this architecture and budget keeps without quantisation (its ``NAME~`` row): if it keeps
far more than the VQ-GAN, the codebook is the bottleneck; if not, the encoder/decoder or the losses are.
"""
from __future__ import annotations

import sys

from retina_fast.models import codebook

_forward = codebook.Codebook.forward


def _passthrough(self, z):
    out = _forward(self, z)
    return out._replace(zq_st=z, commit_loss=out.commit_loss * 0.0)


codebook.Codebook.forward = _passthrough

if __name__ == "__main__":
    from retina_fast.cli import main

    sys.exit(main(["train", "vqgan", *sys.argv[1:]]))
