"""Enhancement data: phantom pairs, the real photograph's halves, crops, caching (tiny sizes)."""
from __future__ import annotations

import pytest
import torch

from retina_fast.training import enhance_data as D
from retina_fast.training.degrade import degrade, fov_mask


@pytest.fixture(scope="module")
def pairs():
    return D.synthetic_pairs(2, 2, 48)


def test_synthetic_pairs_layout(pairs):
    from retina_fast.phantom import render

    assert pairs.inputs.shape == (4, 3, 48, 48) and pairs.inputs.dtype == torch.uint8
    assert pairs.targets.shape == (2, 3, 48, 48) and pairs.source.tolist() == [0, 0, 1, 1]
    ph = render(1, 48)
    assert torch.equal(pairs.vessels[1, 0], ph.masks["artery"] | ph.masks["vein"])
    assert torch.equal(pairs.fov[1, 0], ph.masks["fov"])
    assert torch.equal(pairs.targets[1], (ph.rgb.clamp(0, 1) * 255).round().to(torch.uint8))
    assert not torch.equal(pairs.inputs[0], pairs.inputs[1])  # two different degradations of eye 0
    batch = pairs.get([3, 0])
    assert set(batch) == {"x", "y", "vessels", "fov"}
    assert batch["x"].dtype == torch.float32 and batch["x"].max() <= 1
    assert torch.equal(batch["y"][0], pairs.targets[1].float() / 255)


def test_synthetic_pairs_deterministic_and_seeded(pairs):
    again = D.synthetic_pairs(2, 2, 48)
    for k, v in pairs.tensors().items():
        assert torch.equal(v, getattr(again, k)), k
    y = pairs.targets[0].float() / 255
    expected = degrade(y, seed=(D.SYN_TRAIN, 0, 1), kinds="random", fov_mask=pairs.fov[0, 0])
    assert torch.equal(pairs.inputs[1], (expected * 255).round().to(torch.uint8))


def test_synthetic_test_set_uses_other_eyes_and_cycles_combinations():
    from retina_fast.training.degrade import degradation_combinations

    test = D.synthetic_test_set(3, 40)
    train = D.synthetic_pairs(3, 1, 40)
    assert not torch.equal(test.targets, train.targets)
    y = test.targets[2].float() / 255
    kinds = degradation_combinations()[2]
    expected = degrade(y, seed=(D.SYN_TEST, D.TEST_EYE_OFFSET + 2, 0), kinds=kinds, fov_mask=test.fov[2, 0])
    assert torch.equal(test.inputs[2], (expected * 255).round().to(torch.uint8))


def test_real_halves_are_disjoint_and_sized():
    left, right = D.real_half("left", 64), D.real_half("right", 64)
    assert left.shape == right.shape == (3, 64, 32)
    full = D.real_image()
    assert full.shape == (3, 1411, 1411)
    # The right half is resized from columns 706.. only: changing the left columns cannot change it.
    assert D.SPLIT_COLUMN == 705
    with pytest.raises(ValueError, match="side"):
        D.real_half("top", 64)


def test_degrade_half_is_the_half_of_its_mirrored_whole():
    half = D.real_half("right", 64)
    out = D.degrade_half(half, "right", seed=(1, 2), kinds=("illumination", "blur"))
    whole = torch.cat([half.flip(-1), half], -1)
    ref = degrade(whole, seed=(1, 2), kinds=("illumination", "blur"), fov_mask=fov_mask(whole))[..., 32:]
    assert torch.equal(out, ref)
    assert out.shape == half.shape


def test_real_pools(tmp_path):
    unl = D.real_unlabelled(3, 64, cache_dir=tmp_path)
    test = D.real_test_set(2, 64, cache_dir=tmp_path)
    assert unl.inputs.shape == (3, 3, 64, 32) and test.inputs.shape == (2, 3, 64, 32)
    assert torch.equal(test.targets[0], (D.real_half("right", 64) * 255).round().to(torch.uint8))
    b = test.get([0, 1])
    assert torch.equal(b["y"][0], b["y"][1])  # one ground truth for every degraded version
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    cached = D.real_test_set(2, 64, cache_dir=tmp_path)  # read back from the cache
    assert torch.equal(cached.inputs, test.inputs) and torch.equal(cached.fov, test.fov)


def test_random_crops_align_every_tensor(pairs):
    b = pairs.get([0, 1, 2, 3])
    b["twice"] = b["x"] * 2
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    c1, c2 = D.random_crops(b, 24, g1), D.random_crops(b, 24, g2)
    assert c1["x"].shape == (4, 3, 24, 24) and c1["vessels"].shape == (4, 1, 24, 24)
    assert torch.equal(c1["twice"], c1["x"] * 2)
    for k in c1:
        assert torch.equal(c1[k], c2[k])
    with pytest.raises(ValueError, match="larger"):
        D.random_crops(b, 49, g1)
