"""Model definitions: configs and presets, VQ-GAN / U-Net shapes, odd latent sides, attention references."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from retina_fast.models import (PRESETS, VQGAN, LDMConfig, UNet2D, UNetConfig, VQGANConfig, get_preset,
                                scale_latent, sweep_grid, unscale_latent)
from retina_fast.ops.attention import linear_attention_ref, softmax_attention_ref
from retina_fast.models.layers import GroupNormSiLU, group_count
from retina_fast.models.vqgan import model_to_reflectance, reflectance_to_model


def _params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _meta(cfg: LDMConfig) -> tuple[VQGAN, UNet2D]:
    with torch.device("meta"):
        return VQGAN(cfg.vqgan), UNet2D(cfg.unet)


# Parameter counts (millions) of VQ-GAN (autoencoder, codebook is buffers) and U-Net per preset.
# VQ-GAN with nearest x2 + 3x3 conv upsampling (the default); the source's 4x4 transposed convs give
# tiny 0.33 M and paper 7.07 M (test_transposed_upsampling_parameter_count). tiny: f = 4, VQ base 16.
EXPECTED_PARAMS_M = {"tiny": (0.29, 2.41), "paper-224": (6.32, 556.37), "paper-672": (6.32, 556.37)}


def test_transposed_upsampling_parameter_count():
    for name, expected in (("tiny", 0.33), ("paper-224", 7.07)):
        cfg = dataclasses.replace(get_preset(name).vqgan, upsample="transposed")
        assert _params(VQGAN(cfg)) / 1e6 == pytest.approx(expected, abs=0.01)


def test_config_json_round_trip():
    for cfg in list(PRESETS.values()) + [sweep_grid()["sweep-f16-c256-b128"]]:
        d = json.loads(json.dumps(cfg.to_dict()))
        assert LDMConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match="unknown keys"):
        VQGANConfig.from_dict({"bands": 16, "colour": 3})


def test_config_validation():
    with pytest.raises(ValueError, match="in_channels"):
        LDMConfig(vqgan=VQGANConfig(latent_channels=4), unet=UNetConfig(in_channels=8))
    with pytest.raises(ValueError, match="divisible"):
        VQGANConfig(image_size=100, f=8)
    with pytest.raises(ValueError, match="wavelengths"):
        VQGANConfig(bands=3)
    assert VQGANConfig(f=16, base_channels=32).stage_channels == (32, 64, 128, 256, 512)
    for bad in ((3,), (1, 1), (-1,), (True,), [1]):
        with pytest.raises(ValueError, match="softmax_attn_levels"):
            UNetConfig(channel_mults=(1, 2, 4), softmax_attn_levels=bad)


def test_softmax_attn_levels_pick_the_attention_per_level():
    from retina_fast.models.attention import Attention, LinearAttention

    un = _small_unet(channel_mults=(1, 2, 2), softmax_attn_levels=(1,))
    kinds = [type(lv.attn.fn) for lv in un.downs] + [type(lv.attn.fn) for lv in un.ups]
    assert kinds == [LinearAttention, Attention, LinearAttention, LinearAttention, Attention, LinearAttention]
    tiny = get_preset("tiny")
    cfg = dataclasses.replace(tiny, unet=dataclasses.replace(tiny.unet, softmax_attn_levels=(1,)))
    assert LDMConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))).unet.softmax_attn_levels == (1,)


def test_presets_and_errors():
    tiny = get_preset("tiny")
    assert tiny.vqgan.bands == 16 and tiny.vqgan.image_size >= 128 and tiny.latent_shape == (8, 32, 32)
    p = get_preset("paper-224")
    assert (p.vqgan.image_size, p.vqgan.f, p.vqgan.latent_channels, p.vqgan.codebook_size) == (224, 8, 8, 1024)
    assert (p.unet.base_channels, p.unet.levels) == (512, 3)
    assert get_preset("paper-672").vqgan.image_size == 672
    grid = sweep_grid()
    assert len(grid) == 27
    assert {(c.vqgan.f, c.vqgan.latent_channels, c.unet.base_channels) for c in grid.values()} == {
        (f, c, b) for f in (4, 8, 16) for c in (8, 32, 256) for b in (128, 256, 512)}
    assert get_preset("sweep-f8-c8-b512").unet.base_channels == 512
    with pytest.raises(KeyError, match="tiny.*paper-224.*paper-672"):
        get_preset("huge")


@pytest.mark.parametrize("name", list(PRESETS) + ["sweep-f4-c256-b128", "sweep-f16-c8-b512"])
def test_preset_shapes_meta(name):
    """Every preset builds, and encode -> U-Net -> decode shapes hold at full size (meta tensors: no
    memory, no compute). f = 16 at 224 gives 14x14 latents, padded inside the U-Net."""
    cfg = get_preset(name)
    vq, un = _meta(cfg)
    s = cfg.vqgan.image_size
    x = torch.empty(2, cfg.vqgan.bands, s, s, device="meta")
    z = vq.encode(x)
    assert tuple(z.shape) == (2,) + cfg.latent_shape
    assert un(z, torch.zeros(2, device="meta")).shape == z.shape
    assert vq.decode(z).shape == x.shape
    if name in EXPECTED_PARAMS_M:
        vq_m, un_m = EXPECTED_PARAMS_M[name]
        assert _params(vq) / 1e6 == pytest.approx(vq_m, abs=0.01)
        assert _params(un) / 1e6 == pytest.approx(un_m, abs=0.01)


@pytest.mark.parametrize("name", ["tiny", "paper-224"])
def test_vqgan_forward_small(name):
    torch.manual_seed(0)
    cfg = get_preset(name).vqgan
    vq = VQGAN(cfg)
    x = torch.rand(2, 16, 32, 48) * 2 - 1
    codes_before = vq.codebook.embedding.clone()
    out = vq(x)
    assert not torch.equal(vq.codebook.embedding, codes_before)        # training mode: EMA update
    (out.recon.abs().mean() + out.quant.commit_loss).backward()
    assert all(p.grad is not None for p in vq.parameters())             # straight-through to the encoder
    h, w = 32 // cfg.f, 48 // cfg.f
    assert out.recon.shape == x.shape and out.z.shape == (2, 8, h, w)
    assert out.quant.indices.shape == (2, h, w) and out.quant.indices.dtype == torch.int64
    assert torch.isfinite(out.recon).all()
    vq.eval()
    with torch.no_grad():
        q = vq.quantize(out.z)
        torch.testing.assert_close(vq.decode_indices(q.indices), vq.decode(q.zq_st))
        torch.testing.assert_close(vq.decode_latent(out.z), vq.decode(q.zq_st))
    with pytest.raises(ValueError, match="divisible"):
        vq.encode(torch.zeros(1, 16, 30, 32))


def test_vqgan_groupnorm_groups():
    """32 groups where 32 divides the channels, otherwise the largest divisor below 32."""
    assert group_count(64) == 32 and group_count(16) == 16 and group_count(48) == 24
    vq = VQGAN(VQGANConfig(image_size=32, base_channels=8))
    groups = {m.num_groups for m in vq.modules() if isinstance(m, GroupNormSiLU)}
    assert groups == {16, 32}


def test_latent_scaling():
    vq = VQGAN(VQGANConfig(image_size=32, base_channels=16, codebook_size=64))
    lo, hi = vq.latent_range()
    emb = vq.codebook.embedding
    assert lo == float(emb.min()) and hi == float(emb.max())
    scaled = scale_latent(emb, lo, hi)
    assert float(scaled.min()) == pytest.approx(-1.0) and float(scaled.max()) == pytest.approx(1.0)
    z = torch.randn(2, 8, 3, 3)
    torch.testing.assert_close(unscale_latent(scale_latent(z, lo, hi), lo, hi), z)
    r = torch.rand(1, 16, 4, 4)
    x = reflectance_to_model(r, vq.config)
    assert float(x.min()) >= -1 and float(x.max()) <= 1
    torch.testing.assert_close(model_to_reflectance(x, vq.config), r)


def test_latent_companding_against_math():
    """scale_latent(..., asinh=C): u = asinh(z / C) then linear; unscale_latent inverts it (checked per
    element against Python's math in float64), including tails far outside C."""
    import math

    z = torch.tensor([-40.0, -3.0, -0.2, 0.0, 0.5, 2.2, 45.0], dtype=torch.float64)
    c, lo, hi = 1.5, -4.1, 4.2
    want = [2 * (math.asinh(v / c) - lo) / (hi - lo) - 1 for v in z.tolist()]
    got = scale_latent(z, lo, hi, c)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-12)
    assert float(got.abs().max()) < 1.0  # the tails stay inside the range
    torch.testing.assert_close(unscale_latent(got, lo, hi, c), z, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(scale_latent(z, lo, hi, None), 2 * (z - lo) / (hi - lo) - 1)


def _small_unet(**kw) -> UNet2D:
    cfg = UNetConfig(in_channels=4, base_channels=16, attn_heads=2, attn_head_dim=8, **kw)
    return UNet2D(cfg)


@pytest.mark.parametrize("hw", [(16, 16), (14, 14), (5, 7), (1, 3)])
def test_unet_odd_sides_are_padded_and_cropped(hw):
    torch.manual_seed(0)
    un = _small_unet().eval()
    x = torch.randn(2, 4, *hw)
    with torch.no_grad():
        eps = un(x, torch.tensor([0, 999]))
        eps_f = un(x, torch.tensor([0.0, 999.0]))
    assert eps.shape == x.shape and torch.isfinite(eps).all()
    torch.testing.assert_close(eps, eps_f)


def test_unet_tiny_real_forward_and_time_dependence():
    torch.manual_seed(0)
    un = UNet2D(get_preset("tiny").unet).eval()
    x = torch.randn(1, 8, 16, 16)
    with torch.no_grad():
        a, b = un(x, torch.tensor([10])), un(x, torch.tensor([500]))
        c = un(x, torch.tensor(10))
    assert a.shape == x.shape and not torch.allclose(a, b)
    torch.testing.assert_close(a, c)


def test_unet_gradients_reach_every_parameter():
    torch.manual_seed(0)
    un = _small_unet()
    un(torch.randn(2, 4, 8, 8), torch.tensor([1, 2])).square().mean().backward()
    missing = [n for n, p in un.named_parameters() if p.grad is None]
    assert not missing


def test_attention_refs_match_independent_forms():
    torch.manual_seed(0)
    b, h, n, d = 2, 3, 37, 8
    q, k, v = torch.randn(3, b, h, n, d, dtype=torch.float64).unbind(0)
    torch.testing.assert_close(softmax_attention_ref(q, k, v), F.scaled_dot_product_attention(q, k, v))
    # The source's einsum form on (B, heads, d, N) tensors.
    qs = (q.transpose(-2, -1).softmax(dim=-2)) * d ** -0.5
    ks = k.transpose(-2, -1).softmax(dim=-1)
    context = torch.einsum("bhdn,bhen->bhde", ks, v.transpose(-2, -1))
    out = torch.einsum("bhde,bhdn->bhen", context, qs).transpose(-2, -1)
    torch.testing.assert_close(linear_attention_ref(q, k, v), out)


def test_groupnorm_silu_matches_torch():
    torch.manual_seed(0)
    m = GroupNormSiLU(8, 4, eps=1e-6)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 8, 5, 3)
    ref = F.silu(F.group_norm(x, 4, m.weight, m.bias, 1e-6))
    torch.testing.assert_close(m(x), ref)
    scale, shift = torch.randn(2, 8, 1, 1), torch.randn(2, 8, 1, 1)
    torch.testing.assert_close(m(x, (scale, shift)),
                               F.silu(F.group_norm(x, 4, m.weight, m.bias, 1e-6) * (1 + scale) + shift))
