"""The per-degradation-kind enhancement check (training/enhance_kinds.py) and the real-domain augmentation."""
from __future__ import annotations

import math

import pytest
import torch

from retina_fast.metrics import psnr
from retina_fast.training import enhance_data, enhance_kinds
from retina_fast.training.degrade import degrade, parse_kinds


@pytest.fixture(scope="module")
def inputs():
    return enhance_kinds.kind_inputs(64, (0, 1))


def test_inputs_cover_every_combination_and_the_clean_image(inputs):
    names, x, clean = inputs
    assert names == [n for n in ["none", "001", "010", "011", "100", "101", "110", "111"] for _ in (0, 1)]
    assert x.shape == (16, 3, 64, 64) and clean.shape == (1, 3, 64, 64)
    assert torch.equal(x[0], clean[0]) and torch.equal(x[1], clean[0])
    # row 2 + 2k + s is degrade(clean, seed=s, kinds=code) rounded to 8 bits; '001' is illumination alone
    assert parse_kinds("001") == ("illumination",)
    want = (degrade(clean, seed=1, kinds="100")[0] * 255).round() / 255
    assert torch.equal(x[names.index("100") + 1], want)
    assert enhance_kinds._label("001") == "illumination" and enhance_kinds._label("110") == "spot + blur"


def test_gains_against_a_direct_computation(inputs):
    names, x, clean = inputs
    identity = enhance_kinds.kind_table(lambda b: b.clone(), inputs=inputs)
    assert all(r["gain_left"] == 0 and r["gain_right"] == 0 for k, r in identity["rows"].items() if k != "none")
    assert math.isinf(identity["rows"]["none"]["output_right"])
    darker = enhance_kinds.kind_table(lambda b: b * 0.9, inputs=inputs)
    split = darker["split_column"]
    assert split == round(64 * 705 / 1411)
    i = names.index("010")
    rows = slice(i, i + 2)
    c = clean.expand(2, -1, -1, -1)
    want_r = (psnr(x[rows, ..., split:] * 0.9, c[..., split:]) - psnr(x[rows, ..., split:], c[..., split:])).mean()
    assert darker["rows"]["010"]["gain_right"] == pytest.approx(float(want_r), abs=1e-5)
    sm = darker["summary"]
    assert sm["worst_combination_gain_right"] == min(r["gain_right"] for k, r in darker["rows"].items() if k != "none")
    ill = [darker["rows"][k]["gain_right"] for k in ("001", "011", "101", "111")]
    assert sm["mean_illumination_gain_right"] == pytest.approx(sum(ill) / 4)
    assert "| darker | illumination | " in enhance_kinds.format_kind_table({"darker": darker})
    given = enhance_kinds.kind_table(None, inputs=inputs, outputs=x * 0.9)  # precomputed outputs: same table
    assert given["rows"] == darker["rows"]
    with pytest.raises(ValueError, match="inputs' shape"):
        enhance_kinds.kind_table(None, inputs=inputs, outputs=x[:2])


def test_spot_disks_cover_what_the_spots_brightened():
    from retina_fast.training.degrade import spot_disks

    clean = enhance_kinds.clean_real(128)
    x, params = degrade(clean, seed=3, kinds=("spot",), return_params=True)
    m = spot_disks(params[0] if isinstance(params, list) else params, 128, 128)
    assert m.shape == (128, 128) and m.dtype == torch.bool and 0 < int(m.sum()) < 128 * 128 // 4
    yy, xx = torch.meshgrid(torch.arange(128.0), torch.arange(128.0), indexing="ij")
    want = torch.zeros(128, 128, dtype=torch.bool)
    for sp in (params[0] if isinstance(params, list) else params)["spots"]:  # radius r // 2, centre (x, y)
        want |= ((xx - sp["center"][0]) ** 2 + (yy - sp["center"][1]) ** 2).sqrt() <= sp["radius"] // 2
    assert torch.equal(m, want)
    excess = (x - clean)[0].mean(0)
    assert excess[m].mean() > 0.05 > excess[~m].mean() > -0.005  # the disks hold the brightening; outside, its blur
    assert not spot_disks({"kinds": ["blur"]}, 8, 8).any()


def test_spot_removal_is_one_for_the_clean_image_and_zero_for_the_input():
    clean = enhance_kinds.clean_real(96)
    gone = enhance_kinds.spot_removal(lambda x: clean.clone(), size=96, seeds=(0, 1))
    left = enhance_kinds.spot_removal(lambda x: x.clone(), size=96, seeds=(0, 1))
    half = enhance_kinds.spot_removal(lambda x: (x + clean) / 2, size=96, seeds=(0, 1))
    assert gone["removed"] == pytest.approx(1.0) and gone["excess_out"] == pytest.approx(0.0, abs=1e-7)
    assert left["removed"] == pytest.approx(0.0, abs=1e-7) and left["excess_in"] > 0.05
    assert half["removed"] == pytest.approx(0.5, abs=1e-6) and left["pixels"] == half["pixels"] > 0
    # the excess is measured in the disks only: brightening everything else changes nothing
    from retina_fast.training.degrade import spot_disks

    def disks(seed):
        params = degrade(clean, seed=seed, kinds=("spot",), return_params=True)[1]
        return spot_disks(params[0] if isinstance(params, list) else params, 96, 96)

    inside = disks(0) | disks(1)
    brighter_elsewhere = enhance_kinds.spot_removal(lambda x: torch.where(inside, x, (x + 0.2).clamp(0, 1)),
                                                    size=96, seeds=(0, 1))
    assert brighter_elsewhere["removed"] == pytest.approx(0.0, abs=1e-7)


def test_augment_real_is_seeded_keeps_the_surround_black_and_varies():
    half = enhance_data.real_half("left", 64)
    assert torch.equal(enhance_data.augment_real(half, (1, 2), 0.0), half)
    a = enhance_data.augment_real(half, (1, 2), 0.3)
    assert torch.equal(a, enhance_data.augment_real(half, (1, 2), 0.3))
    b = enhance_data.augment_real(half, (1, 3), 0.3)
    assert a.shape == half.shape and not torch.equal(a, b) and not torch.equal(a, half)
    assert float(a[:, :2, :2].max()) == 0.0  # a corner outside the field of view stays black
    ratio = a.sum() / half.sum()
    assert 0.5 < float(ratio) < 2.0  # gains within exp(+-2a) overall


def test_real_unlabelled_augment_is_cached_apart(tmp_path):
    plain = enhance_data.real_unlabelled(2, 48, cache_dir=tmp_path)
    aug = enhance_data.real_unlabelled(2, 48, augment=0.3, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("real-left-*.safetensors"))) == 2
    assert not torch.equal(plain.inputs, aug.inputs)


def test_output_gate_scales_the_final_residual():
    """MAGENetConfig(output_gate=True): final = x + sigmoid(gate(h)) * tail(h); with the gate's logits forced
    to +-30 the output is the ungated model's (gate open) or exactly the input (gate closed)."""
    from retina_fast.models.magenet import MAGENet, MAGENetConfig

    torch.manual_seed(3)
    gated = MAGENet(MAGENetConfig(output_gate=True)).eval()
    plain = MAGENet(MAGENetConfig()).eval()
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if not k.startswith("gate.")})
    x = torch.rand(1, 3, 40, 48)
    with torch.no_grad():
        torch.nn.init.zeros_(gated.gate.weight)
        gated.gate.bias.fill_(30.0)
        torch.testing.assert_close(gated.restore(x), plain.restore(x), rtol=0, atol=1e-6)
        gated.gate.bias.fill_(-30.0)
        torch.testing.assert_close(gated.restore(x), x, rtol=0, atol=1e-6)
        assert (plain.restore(x) - x).abs().max() > 1e-2  # the residual is not trivially zero
