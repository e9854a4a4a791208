"""Cube I/O: round trips with wavelength metadata in every format, and every bad-input case."""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

from retina_fast import io
from retina_fast.io import CubeFormatError, load_cube, save_cube

WL = (465.0, 555.0, 640.0, 900.0)
FORMATS = [".npy", ".npz", ".tif", ".h5"]


@pytest.fixture
def cube():
    rng = np.random.default_rng(0)
    return rng.random((4, 20, 24), dtype=np.float32)


@pytest.mark.parametrize("suffix", FORMATS + [".tiff", ".hdf5"])
def test_round_trip_with_metadata(tmp_path, cube, suffix):
    path = save_cube(tmp_path / f"c{suffix}", cube, WL, metadata={"seed": 3, "note": "x"})
    got = load_cube(path)
    assert got.data.dtype == np.float32 and got.data.shape == cube.shape
    np.testing.assert_array_equal(got.data, cube)
    assert got.wavelengths == WL
    assert got.metadata == {"seed": 3, "note": "x"}
    assert got.path == path


@pytest.mark.parametrize("suffix", FORMATS)
def test_round_trip_torch_and_no_wavelengths(tmp_path, cube, suffix):
    path = save_cube(tmp_path / f"c{suffix}", torch.from_numpy(cube))
    got = load_cube(path)
    np.testing.assert_array_equal(got.data, cube)
    assert got.wavelengths is None


def test_foreign_files_channels_last_and_integers(tmp_path, cube):
    # (H, W, bands) with wavelength metadata: transposed to (bands, H, W).
    np.savez(tmp_path / "hwc.npz", data=np.moveaxis(cube, 0, -1), wavelengths=np.array(WL))
    got = load_cube(tmp_path / "hwc.npz")
    np.testing.assert_array_equal(got.data, cube)
    # Without metadata, channels-last is recognised when the last axis is clearly the smallest.
    np.save(tmp_path / "hwc.npy", np.moveaxis(cube, 0, -1))
    np.testing.assert_array_equal(load_cube(tmp_path / "hwc.npy").data, cube)
    # uint16 / uint8 are scaled to [0, 1].
    np.save(tmp_path / "u16.npy", (cube * 65535).astype(np.uint16))
    np.testing.assert_allclose(load_cube(tmp_path / "u16.npy").data, cube, atol=2e-5)
    np.save(tmp_path / "u8.npy", np.full((4, 16, 16), 255, np.uint8))
    assert load_cube(tmp_path / "u8.npy").data.max() == 1.0
    # float64 and float16 become float32.
    np.save(tmp_path / "f64.npy", cube.astype(np.float64))
    assert load_cube(tmp_path / "f64.npy").data.dtype == np.float32
    # An HDF5 file whose only 3-D dataset has another name.
    import h5py

    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["scalar"] = 1.0
        f["hsi"] = cube
        f["group/hsi"] = cube
    np.testing.assert_array_equal(load_cube(tmp_path / "other.h5").data, cube)
    np.testing.assert_array_equal(load_cube(tmp_path / "other.h5", dataset="group/hsi").data, cube)


def _assert_names(exc_info, path, *words):
    msg = str(exc_info.value)
    assert str(path) in msg, msg
    for w in words:
        assert w.lower() in msg.lower(), msg


def test_wrong_band_count(tmp_path, cube):
    path = save_cube(tmp_path / "c.npy", cube)                  # 4 bands, no wavelengths
    with pytest.raises(CubeFormatError) as e:
        load_cube(path, expected_bands=16)
    _assert_names(e, path, "band", "16")
    # metadata disagreeing with the data
    np.savez(tmp_path / "m.npz", cube=cube, wavelengths=np.array([500.0, 600.0]))
    with pytest.raises(CubeFormatError) as e:
        load_cube(tmp_path / "m.npz")
    _assert_names(e, tmp_path / "m.npz", "4 bands", "2 wavelengths")


@pytest.mark.parametrize("shape", [(20, 24), (2, 4, 20, 24), (4, 3, 24)])
def test_wrong_shape(tmp_path, shape):
    path = tmp_path / "s.npy"
    np.save(path, np.zeros(shape, np.float32))
    with pytest.raises(CubeFormatError) as e:
        load_cube(path)
    _assert_names(e, path)
    assert "shape" in str(e.value) or "small" in str(e.value)


@pytest.mark.parametrize("dtype", [np.int32, np.complex64, bool, np.uint32])
def test_wrong_dtype(tmp_path, cube, dtype):
    path = tmp_path / "d.npy"
    np.save(path, cube.astype(dtype))
    with pytest.raises(CubeFormatError) as e:
        load_cube(path)
    _assert_names(e, path, "dtype")


def test_object_arrays_are_refused(tmp_path):
    path = tmp_path / "o.npy"
    np.save(path, np.array([[["a"]]], dtype=object), allow_pickle=True)
    with pytest.raises(CubeFormatError) as e:
        load_cube(path)                                          # never unpickled
    _assert_names(e, path)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("suffix", FORMATS)
def test_nan_inf(tmp_path, cube, bad, suffix):
    cube = cube.copy()
    cube[1, 2, 3] = bad
    path = save_cube(tmp_path / f"n{suffix}", cube, WL)
    with pytest.raises(CubeFormatError) as e:
        load_cube(path)
    _assert_names(e, path, "non-finite", "NaN" if np.isnan(bad) else "Inf")


@pytest.mark.parametrize("suffix", FORMATS)
def test_truncated_file(tmp_path, cube, suffix):
    path = save_cube(tmp_path / f"t{suffix}", cube, WL)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CubeFormatError) as e:
        load_cube(path)
    _assert_names(e, path)


@pytest.mark.parametrize("suffix", FORMATS)
def test_garbage_and_empty_files(tmp_path, suffix):
    for name, content in (("garbage", b"this is not a cube" * 10), ("empty", b"")):
        path = tmp_path / f"{name}{suffix}"
        path.write_bytes(content)
        with pytest.raises(CubeFormatError) as e:
            load_cube(path)
        _assert_names(e, path)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can read any file")
def test_unreadable_file(tmp_path, cube):
    path = save_cube(tmp_path / "p.npy", cube)
    path.chmod(0)
    try:
        with pytest.raises(CubeFormatError) as e:
            load_cube(path)
        _assert_names(e, path)
    finally:
        path.chmod(0o644)


def test_permission_error_is_reported_with_the_file(tmp_path, cube, monkeypatch):
    # Same check as above for environments running as root: the OS refusal is simulated.
    path = save_cube(tmp_path / "p.npz", cube)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(np, "load", refuse)
    with pytest.raises(CubeFormatError) as e:
        load_cube(path)
    _assert_names(e, path, "permission denied")


def test_missing_file_directory_and_unknown_suffix(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_cube(tmp_path / "nope.npy")
    assert "nope.npy" in str(e.value)
    (tmp_path / "dir.npy").mkdir()
    with pytest.raises(CubeFormatError) as e:
        load_cube(tmp_path / "dir.npy")
    _assert_names(e, tmp_path / "dir.npy", "directory")
    with pytest.raises(CubeFormatError) as e:
        load_cube(tmp_path / "x.png")
    _assert_names(e, tmp_path / "x.png", "format")


def test_bad_wavelength_metadata(tmp_path, cube):
    path = save_cube(tmp_path / "w.npy", cube)
    (tmp_path / "w.json").write_text(json.dumps({"wavelengths": ["a", "b", "c", "d"]}))
    with pytest.raises(CubeFormatError) as e:
        load_cube(path)
    _assert_names(e, path, "wavelength")


def test_save_errors(tmp_path, cube):
    with pytest.raises(ValueError, match="3 wavelengths"):
        save_cube(tmp_path / "a.npy", cube, WL[:3])
    with pytest.raises(ValueError, match="bands, H, W"):
        save_cube(tmp_path / "a.npy", cube[0])
    with pytest.raises(CubeFormatError, match="format"):
        save_cube(tmp_path / "a.jpg", cube)


def test_masks_round_trip(tmp_path):
    masks = {"artery": torch.zeros(8, 8, dtype=torch.bool), "vein": np.eye(8, dtype=bool)}
    path = io.save_masks(tmp_path / "m_masks.npz", masks)
    got = io.load_masks(path)
    assert set(got) == {"artery", "vein"} and got["vein"].dtype == bool
    np.testing.assert_array_equal(got["vein"], np.eye(8, dtype=bool))
    assert not io.is_cube_file(path) and io.is_cube_file(tmp_path / "x.h5")


@pytest.mark.parametrize("package, suffix", [("tifffile", ".tif"), ("h5py", ".h5")])
def test_missing_optional_package_is_named(tmp_path, cube, monkeypatch, package, suffix):
    path = save_cube(tmp_path / f"a{suffix}", cube)
    monkeypatch.setitem(sys.modules, package, None)          # makes "import <package>" fail
    with pytest.raises(ImportError, match=f"pip install {package}"):
        save_cube(tmp_path / f"b{suffix}", cube)
    with pytest.raises(ImportError, match=package):
        load_cube(path)


@pytest.mark.parametrize("suffix", [".npy", ".npz", ".tif", ".h5"])
def test_stacks_round_trip_and_single_cubes_read_as_stacks_of_one(tmp_path, suffix):
    from retina_fast.io import load_cubes, save_cubes

    if suffix == ".tif":
        pytest.importorskip("tifffile")
    if suffix == ".h5":
        pytest.importorskip("h5py")
    rng = np.random.default_rng(1)
    cubes = rng.random((3, 4, 9, 11), dtype=np.float32)
    path = save_cubes(tmp_path / f"s{suffix}", cubes, WL[:4], metadata={"first": 6})
    got = load_cubes(path)
    np.testing.assert_array_equal(got.data, cubes)
    if suffix != ".npy":  # .npy stacks hold the array only
        assert got.wavelengths == tuple(WL[:4]) and got.metadata == {"first": 6}
    assert not list(tmp_path.glob(".*"))  # written atomically: no temporary file left behind
    single = load_cubes(save_cube(tmp_path / f"one{suffix}", cubes[1], WL[:4]))
    np.testing.assert_array_equal(single.data, cubes[1:2])
    with pytest.raises(ValueError, match="stack"):
        save_cubes(tmp_path / f"bad{suffix}", cubes[0])


def test_iter_cubes_streams_files_folders_and_run_directories(tmp_path):
    from retina_fast import shards
    from retina_fast.io import iter_cubes, save_cubes

    rng = np.random.default_rng(2)
    cubes = rng.random((5, 16, 8, 8), dtype=np.float32)
    wl = tuple(float(w) for w in range(450, 930, 30))
    folder = tmp_path / "folder"
    for i, c in enumerate(cubes):
        save_cube(folder / f"c{i}.npy", c, wl)
    stack = save_cubes(tmp_path / "stack.npz", cubes, wl)
    spec = shards.RunSpec(model="m", model_sha256="0", seed=0, n=5, steps=1, sampler="ddim", eta=0.0,
                          backend="cpu", dtype="float32", shard_size=2, format="npy", wavelengths=wl)
    run = tmp_path / "run"
    shards.prepare_run(run, spec, resume=False)
    shards.run_shards(run, spec, lambda first, count: cubes[first:first + count])
    shards.write_manifest(run, spec)
    for source in (folder, stack, run):
        got = list(iter_cubes(source, expected_bands=16))
        assert len(got) == 5
        np.testing.assert_array_equal(np.stack([g.data for g in got]), cubes)
    with pytest.raises(CubeFormatError, match="band count"):
        next(iter_cubes(stack, expected_bands=4))
