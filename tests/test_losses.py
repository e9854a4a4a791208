"""VQ-GAN losses: hand-computed values, warm-up gating, PatchGAN shapes, perceptual net from a file."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from retina_fast.models import QuantizeOutput, VQGANConfig
from retina_fast.models.vqgan import VQGANOutput
from retina_fast.training.discriminator import PatchDiscriminator
from retina_fast.training.losses import (VQGANLoss, feature_matching_loss, gan_factor, hinge_d_loss,
                                         hinge_g_loss, l1_loss, spectral_angle)
from retina_fast.training.perceptual import PerceptualLoss, VGGFeatures, default_band_triplets


def test_l1_and_hinge_by_hand():
    assert float(l1_loss(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 4.0]))) == pytest.approx(1.5)
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    # relu(1 - real) = (0, 0.5) -> 0.25; relu(1 + fake) = (0, 1.5) -> 0.75; 0.5 (0.25 + 0.75)
    assert float(hinge_d_loss(real, fake)) == pytest.approx(0.5)
    assert float(hinge_g_loss(fake)) == pytest.approx(0.75)
    fm = feature_matching_loss([torch.ones(2), torch.full((2,), 3.0)], [torch.zeros(2), torch.ones(2)])
    assert float(fm) == pytest.approx(1.5)                              # mean(1, 2)
    assert gan_factor(9, 10) == 0.0 and gan_factor(10, 10) == 1.0


def test_spectral_angle_by_hand():
    # Two bands, three pixels; spectra after the +1 offset: (1,0)|(0,1), (1,0)|(1,1), (2,3)|(4,6).
    x = torch.tensor([[0.0, 0.0, 1.0], [-1.0, -1.0, 2.0]]).view(1, 2, 1, 3)
    y = torch.tensor([[-1.0, 0.0, 3.0], [0.0, 0.0, 5.0]]).view(1, 2, 1, 3)
    expected = (math.pi / 2 + math.pi / 4 + 0.0) / 3
    assert float(spectral_angle(x, y)) == pytest.approx(expected, abs=1e-3)            # plain mean
    # Weighted by the target's norms 1, sqrt(2), sqrt(52).
    w = [1.0, math.sqrt(2), math.sqrt(52)]
    expected_w = (w[0] * math.pi / 2 + w[1] * math.pi / 4) / sum(w)
    assert float(spectral_angle(x, y, weighted=True)) == pytest.approx(expected_w, abs=1e-3)
    same = torch.rand(2, 16, 4, 4)
    assert float(spectral_angle(same, 3 * (same + 1) - 1)) < 1e-3      # scale invariant
    xg = x.clone().requires_grad_(True)
    spectral_angle(xg, xg.detach()).backward()
    assert torch.isfinite(xg.grad).all()


def test_spectral_angle_dark_pixels_do_not_dominate_the_gradient():
    # A bright eye (reflectance ~0.3) with a black border of camera noise around zero: unweighted, the
    # border's angles (noise) carry most of the gradient; weighted by the target's norm they do not.
    g = torch.Generator().manual_seed(0)
    target_r = torch.full((1, 16, 16, 16), 0.3) + 0.01 * torch.randn(1, 16, 16, 16, generator=g)
    target_r[..., :4] = (0.003 * torch.randn(1, 16, 16, 4, generator=g)).clamp(min=0)
    recon_r = (target_r + 0.01 * torch.randn(1, 16, 16, 16, generator=g)).clamp(min=1e-4)
    target, recon = 2 * target_r - 1, 2 * recon_r - 1
    share = {}
    for weighted in (False, True):
        xg = recon.clone().requires_grad_(True)
        spectral_angle(xg, target, weighted=weighted).backward()
        gn2 = xg.grad.pow(2)
        share[weighted] = float(gn2[..., :4].sum() / gn2.sum())
    assert share[False] > 0.9
    assert share[True] < 0.25


class _FixedDisc(nn.Module):
    """logits = mean of the input (one patch); features = [input]."""

    def forward(self, x):
        return x.mean().view(1, 1, 1, 1), [x]


def _out(x: torch.Tensor, recon: torch.Tensor) -> VQGANOutput:
    q = QuantizeOutput(torch.zeros(1), torch.zeros(1, dtype=torch.int64), torch.tensor(0.125), torch.tensor(3.0))
    return VQGANOutput(recon, torch.zeros(1), q)


def test_generator_loss_composition_and_warmup():
    cfg = VQGANConfig(gan_warmup_steps=100)
    loss = VQGANLoss(cfg, discriminator=_FixedDisc())
    x = torch.zeros(1, 16, 2, 2)
    recon = torch.full((1, 16, 2, 2), 0.5)                              # same spectral direction: SAM ~ 0
    before, parts = loss.generator_loss(x, _out(x, recon), step=99)
    assert set(parts) >= {"l1", "sam", "commit", "perplexity", "total"} and "gan" not in parts
    assert float(before) == pytest.approx(4 * 0.5 + 0.125, abs=1e-3)
    after, parts = loss.generator_loss(x, _out(x, recon), step=100)
    # + gan (-mean D(recon) = -0.5) + 4 * fm (|0.5 - 0| = 0.5)
    assert float(after) == pytest.approx(4 * 0.5 + 0.125 - 0.5 + 4 * 0.5, abs=1e-3)
    assert float(parts["gan"]) == pytest.approx(-0.5) and float(parts["fm"]) == pytest.approx(0.5)
    assert loss.discriminator_loss(x, recon, step=99) == (None, {})
    d, dparts = loss.discriminator_loss(x, recon, step=100)
    assert float(d) == pytest.approx(0.5 * (1.0 + 1.5))                # relu(1 - 0) + relu(1 + 0.5)


def test_generator_loss_uses_the_configured_spectral_angle():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 16, 5, 5, generator=g) * 2 - 1
    recon = torch.rand(2, 16, 5, 5, generator=g) * 2 - 1
    for weighted in (False, True):
        loss = VQGANLoss(VQGANConfig(spectral_angle_weighted=weighted), discriminator=_FixedDisc())
        _, parts = loss.generator_loss(x, _out(x, recon), step=0)
        assert float(parts["sam"]) == pytest.approx(float(spectral_angle(recon, x, weighted=weighted)))
    assert float(spectral_angle(recon, x, weighted=True)) != pytest.approx(float(spectral_angle(recon, x)))


def test_patch_discriminator_shapes():
    d = PatchDiscriminator(16, ndf=8, layers=3)
    logits, feats = d(torch.randn(2, 16, 64, 64))
    # pad 2, k 4: 64 -s2-> 33 -s2-> 17 -s2-> 9 -s1-> 10 -head-> 11
    assert logits.shape == (2, 1, 11, 11) and [f.shape[1] for f in feats] == [8, 16, 32, 64]
    gd = PatchDiscriminator(16, ndf=8, layers=3, norm="group")
    assert gd(torch.randn(1, 16, 32, 32))[0].shape == (1, 1, 7, 7)
    with pytest.raises(ValueError, match="norm"):
        PatchDiscriminator(norm="layer")


TINY_VGG = (4, "M", 8)


def test_perceptual_loss_from_user_file(tmp_path):
    torch.manual_seed(0)
    net = VGGFeatures(TINY_VGG)
    path = tmp_path / "vgg.safetensors"
    save_file({**net.state_dict(), "classifier.0.weight": torch.zeros(2, 2)}, str(path))
    loss = PerceptualLoss.from_file(path, bands=16, cfg=TINY_VGG)
    assert loss.triplets == default_band_triplets(16) and len(loss.triplets) == 6
    x = torch.rand(2, 16, 8, 8) * 2 - 1
    assert float(loss(x, x)) == 0.0
    assert float(loss(x, x.flip(-1))) > 0.0
    assert not any(p.requires_grad for p in loss.parameters())


def test_perceptual_loss_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="user-supplied"):
        PerceptualLoss.from_file(tmp_path / "absent.safetensors")
    path = tmp_path / "wrong.safetensors"
    save_file(VGGFeatures((4, "M", 6)).state_dict(), str(path))
    with pytest.raises(ValueError, match="does not match the VGG layout"):
        VGGFeatures.from_file(path, TINY_VGG)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        VGGFeatures.from_file(tmp_path / "junk.safetensors", TINY_VGG)
    with pytest.raises(ValueError, match="perceptual_weight > 0"):
        VQGANLoss(VQGANConfig(perceptual_weight=0.1), discriminator=_FixedDisc())


def test_band_weighted_l1_by_hand():
    x = torch.zeros(1, 2, 1, 2)
    y = torch.tensor([[1.0, 1.0], [2.0, 4.0]]).view(1, 2, 1, 2)   # |err| band 0: 1, 1; band 1: 2, 4
    assert float(l1_loss(x, y)) == pytest.approx(2.0)
    assert float(l1_loss(x, y, (0.5, 1.5))) == pytest.approx((0.5 * 2 + 1.5 * 6) / 4)
    with pytest.raises(ValueError, match="3 band weights for 2 channels"):
        l1_loss(x, y, (1.0, 1.0, 1.0))


def test_band_weights_config_validation_and_use():
    with pytest.raises(ValueError, match="band_loss_weights"):
        VQGANConfig(image_size=32, f=8, band_loss_weights=(1.0,) * 15)
    with pytest.raises(ValueError, match="band_loss_weights"):
        VQGANConfig(image_size=32, f=8, band_loss_weights=(1.0,) * 15 + (0.0,))
    w = tuple(float(i + 1) for i in range(16))
    cfg = VQGANConfig(image_size=32, f=8, band_loss_weights=w)
    assert VQGANConfig.from_dict(cfg.to_dict()).band_loss_weights == w   # JSON round trip
    crit = VQGANLoss(cfg)
    x = torch.zeros(1, 16, 4, 4)
    recon = torch.zeros(1, 16, 4, 4)
    recon[:, 3] = 1.0                                                    # error only in band 3 (weight 4)
    z = torch.zeros(1, 8, 1, 1)
    quant = QuantizeOutput(zq_st=z, indices=torch.zeros(1, 1, 1, dtype=torch.long),
                           commit_loss=torch.zeros(()), perplexity=torch.ones(()))
    _, parts = crit.generator_loss(x, VQGANOutput(recon=recon, z=z, quant=quant), step=0)
    assert float(parts["l1"]) == pytest.approx(4.0 / 16)
