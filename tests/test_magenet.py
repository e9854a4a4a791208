"""MAGE-Net and RSP networks: shapes at odd sizes, ablation flags, building blocks, config."""
from __future__ import annotations

import pytest
import torch

from retina_fast.models.magenet import (CAB, MAGENET_PRESETS, ChannelAttention, MAGENet, MAGENetConfig,
                                        MAGENetOutput)
from retina_fast.ops.channel_attention import channel_attention_ref
from retina_fast.models.rsp import (RSPNet, box_filter, crop_to, pad_to_multiple, weighted_guided_filter)

SMALL = dict(channels=8, scale_channels=4, cabs_per_fab=1, rsp_base=4, rsp_channels=2)


def _n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("flags", [{}, {"use_rsp": False}, {"stage1_only": True}])
def test_shapes_at_odd_size_and_ablation_flags(flags):
    cfg = MAGENetConfig(**SMALL, **flags)
    model = MAGENet(cfg).eval()
    x = torch.rand(2, 3, 67, 93)
    with torch.no_grad():
        out = model(x)
    assert isinstance(out, MAGENetOutput)
    assert out.stage1.shape == x.shape and out.final.shape == x.shape
    if flags.get("stage1_only"):
        assert out.stage2 is None and out.rsp is None and len(out.stages) == 1 and model.rsp is None
    else:
        assert out.stage2.shape == x.shape and len(out.stages) == 2
    if cfg.has_rsp:
        assert len(out.rsp.sides) == 4 and all(s.shape == (2, 1, 67, 93) for s in out.rsp.sides)
        torch.testing.assert_close(out.rsp.mean, torch.stack(out.rsp.sides).mean(0))
        assert [f.shape[-1] for f in out.rsp.features] == [12, 24, 48, 96]  # 93 padded to 96
    else:
        assert out.rsp is None and out.seg == []
    torch.testing.assert_close(model.restore(x), out.final)


def test_parameter_counts_follow_ablations():
    full, no_rsp, s1 = (_n_params(MAGENet(MAGENetConfig(**f))) for f in ({}, {"use_rsp": False}, {"stage1_only": True}))
    assert s1 < no_rsp < full
    assert full < 1_000_000  # the default is CPU-trainable
    assert _n_params(MAGENet(MAGENET_PRESETS["large"])) > 10 * full


def test_residual_output_and_batch_independence():
    model = MAGENet(MAGENetConfig(**SMALL)).eval()
    x = torch.rand(3, 3, 24, 40)
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(model(x[1:2]).final, out.final[1:2], atol=1e-5, rtol=1e-5)
        model.tail.weight.zero_()
        model.stage1.sam.conv2.weight.zero_()
        out = model(x)
    torch.testing.assert_close(out.stage2, x)  # tail conv 0 -> output is the input (residual)
    torch.testing.assert_close(out.stage1, x)


def test_gradients_reach_every_parameter():
    model = MAGENet(MAGENetConfig(**SMALL))
    out = model(torch.rand(1, 3, 16, 24))
    (out.final.square().mean() + out.stage1.mean() + sum(s.mean() for s in out.seg)).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing


def test_channel_attention_ref_by_hand():
    x = torch.rand(2, 8, 5, 7)
    w1, w2 = torch.randn(2, 8), torch.randn(8, 2)
    pooled = x.mean(dim=(2, 3))
    expected = x.clone()
    for n in range(2):
        hidden = [max(0.0, float(sum(w1[j, c] * pooled[n, c] for c in range(8)))) for j in range(2)]
        for c in range(8):
            z = sum(w2[c, j] * hidden[j] for j in range(2))
            expected[n, c] *= torch.sigmoid(torch.tensor(float(z)))
    torch.testing.assert_close(channel_attention_ref(x, w1, w2), expected)
    torch.testing.assert_close(channel_attention_ref(x, w1[:, :, None, None], w2[:, :, None, None]), expected)
    ca = ChannelAttention(8)
    assert ca.down.weight.shape == (2, 8, 1, 1) and ca.down.bias is None
    torch.testing.assert_close(ca(x), channel_attention_ref(x, ca.down.weight, ca.up.weight))
    cab = CAB(8)
    assert cab(x).shape == x.shape


def test_box_and_guided_filter_by_hand():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    b = box_filter(x, 1)
    assert float(b[0, 0, 0, 0]) == pytest.approx((0 + 1 + 4 + 5) / 4)  # clipped window at the corner
    assert float(b[0, 0, 1, 1]) == pytest.approx(sum([0, 1, 2, 4, 5, 6, 8, 9, 10]) / 9)
    guide = torch.rand(1, 2, 8, 8)
    src = 2 * guide + 1  # exactly linear in the guide: a = 2, b = 1 (up to ε)
    a, bb = weighted_guided_filter(guide, src, torch.rand(1, 1, 8, 8) + 0.5, 1, 1e-8)
    torch.testing.assert_close(a * guide + bb, src, atol=1e-3, rtol=1e-3)
    xp, size = pad_to_multiple(torch.rand(1, 3, 13, 9), 8)
    assert xp.shape[-2:] == (16, 16) and crop_to(xp, size).shape[-2:] == (13, 9)


def test_rsp_standalone_any_size():
    net = RSPNet(base=4).eval()
    with torch.no_grad():
        out = net(torch.rand(1, 3, 37, 50))
    assert len(out.sides) == 4 and all(s.shape == (1, 1, 37, 50) for s in out.sides)
    assert [f.shape[1] for f in out.features] == [32, 16, 8, 4]
    assert out.mean.shape == (1, 1, 37, 50)


def test_config_roundtrip_and_validation():
    cfg = MAGENetConfig(channels=24, scale_channels=12, use_rsp=False)
    d = cfg.to_dict()
    assert MAGENetConfig.from_dict(d) == cfg and d["channels"] == 24
    assert not MAGENetConfig(stage1_only=True).has_rsp and not MAGENetConfig(stage1_only=True).has_stage2
    with pytest.raises(ValueError):
        MAGENetConfig.from_dict({**d, "bogus": 1})
    with pytest.raises(ValueError):
        MAGENetConfig(channels=0)
    with pytest.raises(ValueError):
        MAGENetConfig(num_fabs=4)
    with pytest.raises(ValueError):
        MAGENet(MAGENetConfig(**SMALL))(torch.rand(3, 16, 16))
