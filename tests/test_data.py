"""Datasets: folder reading, band selection / resampling, normalisation, seeded crops and flips."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import retina_fast
from retina_fast.data import Augment, CubeFolderDataset, PhantomDataset, normalize, resample_bands
from retina_fast.io import CubeFormatError, save_cube, save_masks

MODEL_WL = (465.0, 555.0, 640.0, 900.0)


def _ramp(wl, h=12, w=16):
    """A cube whose value in each band is a known linear function of the wavelength."""
    wl = np.asarray(wl, dtype=np.float32)
    base = np.linspace(0.1, 0.5, h * w, dtype=np.float32).reshape(1, h, w)
    return base + (wl[:, None, None] - 450.0) / 1000.0


def test_resample_select_and_interpolate():
    src = (450.0, 465.0, 500.0, 555.0, 600.0, 640.0, 700.0, 900.0)
    cube = _ramp(src)
    sel = resample_bands(cube, src, MODEL_WL, mode="nearest")
    np.testing.assert_array_equal(sel, cube[[1, 3, 5, 7]])
    lin = resample_bands(cube, src, (480.0, 570.0, 800.0), mode="linear")
    np.testing.assert_allclose(lin, _ramp((480.0, 570.0, 800.0)), atol=1e-6)  # exact on a ramp
    auto = resample_bands(cube, src, (466.0, 556.0), mode="auto")       # within tolerance: select
    np.testing.assert_array_equal(auto, cube[[1, 3]])
    auto2 = resample_bands(cube, src, (480.0,), mode="auto")            # else interpolate
    np.testing.assert_allclose(auto2, _ramp((480.0,)), atol=1e-6)
    # Unsorted source wavelengths are fine.
    order = [3, 0, 7, 1, 6, 2, 5, 4]
    lin2 = resample_bands(cube[order], np.asarray(src)[order], (480.0,), mode="linear")
    np.testing.assert_allclose(lin2, auto2, atol=1e-6)


def test_resample_errors_name_the_file():
    cube = _ramp((500.0, 600.0))
    with pytest.raises(CubeFormatError, match=r"f\.npy.*no band within"):
        resample_bands(cube, (500.0, 600.0), (550.0,), mode="nearest", path="f.npy")
    with pytest.raises(CubeFormatError, match=r"f\.npy.*outside"):
        resample_bands(cube, (500.0, 600.0), (700.0,), mode="linear", path="f.npy")
    with pytest.raises(ValueError):
        resample_bands(cube, (500.0, 600.0), (550.0,), mode="cubic")


def test_normalize():
    x = torch.tensor([0.0, 0.5, 1.0])
    assert torch.allclose(normalize(x), torch.tensor([-1.0, 0.0, 1.0]))
    assert torch.allclose(normalize(x, (0.0, 0.5), (0.0, 1.0)), torch.tensor([0.0, 1.0, 2.0]))
    assert normalize(x, out_range=None) is x


@pytest.fixture
def folder(tmp_path):
    """Three cubes in three formats and different band sets, with masks for one."""
    save_cube(tmp_path / "a.npy", _ramp(MODEL_WL), MODEL_WL)
    sub = tmp_path / "sub"
    sub.mkdir()
    wide = (450.0, 465.0, 555.0, 600.0, 640.0, 800.0, 900.0)
    save_cube(sub / "b.h5", _ramp(wide), wide)
    save_cube(tmp_path / "c.tif", _ramp((460.0, 560.0, 700.0, 910.0)), (460.0, 560.0, 700.0, 910.0))
    masks = {"vein": np.zeros((12, 16), bool), "fov": np.ones((12, 16), bool)}
    masks["vein"][:, 0] = True
    save_masks(tmp_path / "a_masks.npz", masks)
    (tmp_path / "notes.txt").write_text("ignored")
    return tmp_path


def test_folder_dataset_bands_and_range(folder):
    ds = CubeFolderDataset(folder, MODEL_WL)
    assert [p.name for p in ds.files] == ["a.npy", "c.tif", "b.h5"]     # sorted paths, no masks
    expected = normalize(torch.from_numpy(_ramp(MODEL_WL)))
    for i in range(3):
        x = ds[i]
        assert x.shape == (4, 12, 16) and x.dtype == torch.float32
        assert torch.allclose(x, expected, atol=1e-5), ds.files[i]   # select / interpolate agree
    assert ds.check() == {"files": 3, "shapes": [(4, 12, 16)]}
    raw = CubeFolderDataset(folder, MODEL_WL, out_range=None)[0]
    assert torch.allclose(raw, torch.from_numpy(_ramp(MODEL_WL)))


def test_folder_dataset_with_masks_and_loader(folder):
    ds = CubeFolderDataset(folder, MODEL_WL, with_masks=True, hflip=True, seed=1)
    idx = [p.name for p in ds.files].index("a.npy")
    x, masks = ds[idx]
    assert masks["vein"].dtype == torch.bool
    # Masks follow the flip of the cube: the vein column sits where the cube's first column went.
    flipped = not torch.allclose(x, normalize(torch.from_numpy(_ramp(MODEL_WL))))
    assert masks["vein"][:, -1 if flipped else 0].all()
    other = [p.name for p in ds.files].index("c.tif")
    with pytest.raises(FileNotFoundError, match="c_masks.npz"):
        ds[other]
    batch = next(iter(DataLoader(CubeFolderDataset(folder, MODEL_WL), batch_size=3)))
    assert batch.shape == (3, 4, 12, 16)


def test_crops_and_flips_are_seeded(folder):
    def items(**kw):
        ds = CubeFolderDataset(folder, MODEL_WL, crop=8, hflip=True, vflip=True, **kw)
        return [ds[i] for i in range(len(ds))], ds

    a, ds = items(seed=5)
    b, _ = items(seed=5)
    c, _ = items(seed=6)
    assert all(x.shape == (4, 8, 8) for x in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    first = [ds[i] for i in range(len(ds))]
    ds.set_epoch(1)
    second = [ds[i] for i in range(len(ds))]
    assert not all(torch.equal(x, y) for x, y in zip(first, second))
    ds.set_epoch(0)
    assert all(torch.equal(x, ds[i]) for i, x in enumerate(first))     # order-independent


def test_augment_covers_all_positions_and_flips():
    aug = Augment(crop=(2, 3), hflip=True, vflip=True, seed=0)
    x = torch.arange(4 * 5, dtype=torch.float32).reshape(1, 4, 5)
    seen = {tuple(aug(x, i).flatten().tolist()) for i in range(400)}
    # 3 x 3 positions x 4 flip combinations, all reachable
    assert len(seen) == 36
    with pytest.raises(CubeFormatError, match="smaller than the crop"):
        Augment(crop=9)(x, 0, path="img.npy")


def test_folder_errors_name_the_file(tmp_path):
    save_cube(tmp_path / "ok.npy", _ramp(MODEL_WL), MODEL_WL)
    np.save(tmp_path / "bad.npy", _ramp((1, 2, 3)))                       # no wavelengths, 3 bands
    ds = CubeFolderDataset(tmp_path, MODEL_WL)
    bad = [p.name for p in ds.files].index("bad.npy")
    with pytest.raises(CubeFormatError, match=r"bad\.npy.*3 bands, expected 4"):
        ds[bad]
    with pytest.raises(CubeFormatError, match=r"bad\.npy"):
        ds.check()
    (tmp_path / "bad.npy").unlink()
    save_cube(tmp_path / "narrow.npz", _ramp((500.0, 600.0)), (500.0, 600.0))
    with pytest.raises(CubeFormatError, match=r"narrow\.npz.*outside"):
        CubeFolderDataset(tmp_path, MODEL_WL).check()
    (tmp_path / "narrow.npz").unlink()
    with pytest.raises(CubeFormatError, match=r"ok\.npy.*expected 10x10"):
        CubeFolderDataset(tmp_path, MODEL_WL, size=10)[0]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no cube files"):
        CubeFolderDataset(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        CubeFolderDataset(tmp_path / "missing")


def test_phantom_dataset():
    ds = PhantomDataset(3, size=64, base_seed=10)
    assert len(ds) == 3
    x = ds[1]
    ph = retina_fast.phantom.render(11, 64)
    assert torch.equal(x, normalize(ph.cube))                           # seed = base_seed + index
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    assert torch.equal(ds[-1], ds[2])
    with pytest.raises(IndexError):
        ds[3]
    x, masks = PhantomDataset(2, size=64, crop=32, hflip=True, with_masks=True)[0]
    assert x.shape == (16, 32, 32) and masks["vein"].shape == (32, 32)
    sub = PhantomDataset(1, size=64, wavelengths=(500.0, 600.0))[0]
    assert sub.shape == (2, 64, 64)
    batch = next(iter(DataLoader(PhantomDataset(4, size=48), batch_size=2)))
    assert batch.shape == (2, 16, 48, 48)
