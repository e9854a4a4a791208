"""The written FLOP formula (retina_fast.flops) against torch's FlopCounterMode on the real modules."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from retina_fast import flops
from retina_fast.models.config import get_preset
from retina_fast.models.unet import UNet2D
from retina_fast.models.vqgan import VQGAN


def _counted(fn) -> int:
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        fn()
    return fc.get_total_flops()


def _variants():
    yield get_preset("tiny")
    yield get_preset("paper-224")
    for name in ("sweep-f4-c32-b128", "sweep-f16-c256-b256", "sweep-f8-c8-b512"):  # f16: 14x14 latents, padded
        yield get_preset(name)
    cfg = get_preset("tiny")
    yield dataclasses.replace(cfg, vqgan=dataclasses.replace(cfg.vqgan, upsample="transposed", dec_res_blocks=2))
    yield dataclasses.replace(cfg, name="tiny-softmax", unet=dataclasses.replace(cfg.unet, softmax_attn_levels=(0, 1)))


@pytest.mark.parametrize("cfg", list(_variants()), ids=lambda c: f"{c.name}-{c.vqgan.upsample}")
def test_formula_matches_flop_counter(cfg):
    with torch.device("meta"):  # shapes only: paper-size models cost no memory or time
        unet, vq = UNet2D(cfg.unet).eval(), VQGAN(cfg.vqgan).eval()
    c, h, w = cfg.latent_shape
    for batch in (1, 3):
        x = torch.zeros(batch, c, h, w, device="meta")
        t = torch.zeros(batch, dtype=torch.long, device="meta")
        idx = torch.zeros(batch, h, w, dtype=torch.long, device="meta")
        assert flops.unet_flops(cfg.unet, h, w) * batch == _counted(lambda: unet(x, t))
        assert flops.decode_flops(cfg.vqgan) * batch == _counted(lambda: vq.decode_indices(idx))


def test_paper_224_figures():
    cfg = get_preset("paper-224")
    assert round(flops.unet_flops(cfg.unet, 28, 28) / 1e9, 1) == 110.8
    assert round(flops.decode_flops(cfg.vqgan) / 1e9, 1) == 63.8
    per_image = flops.sample_flops(cfg, 50)
    assert per_image == 50 * flops.unet_flops(cfg.unet, 28, 28) + flops.decode_flops(cfg.vqgan) + 2 * 784 * 1024 * 8
