"""``retina-fast phantom``: files, round trip through the folder dataset, preview, bad input."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import retina_fast
from retina_fast.cli import main
from retina_fast.data import CubeFolderDataset
from retina_fast.io import load_cube, load_masks


@pytest.mark.parametrize("fmt, ext", [("npy", ".npy"), ("tiff", ".tif"), ("h5", ".h5"), ("npz", ".npz")])
def test_phantom_writes_cubes_masks_and_manifest(tmp_path, capsys, fmt, ext):
    out = tmp_path / "ph"
    assert main(["phantom", "--n", "2", "--size", "64", "--out", str(out), "--format", fmt,
                 "--seed", "5"]) == 0
    assert "phantom" in capsys.readouterr().err                       # the tqdm progress bar
    manifest = json.loads((out / "manifest.json").read_text())
    assert [item["seed"] for item in manifest["items"]] == [5, 6]
    assert manifest["wavelengths"] == list(map(float, retina_fast.DEFAULT_WAVELENGTHS))
    item = manifest["items"][1]
    cube = load_cube(out / item["cube"])
    assert item["cube"].endswith(ext) and cube.data.shape == (16, 64, 64)
    assert cube.wavelengths == tuple(map(float, retina_fast.DEFAULT_WAVELENGTHS))
    expected = retina_fast.phantom.render(6, 64)
    np.testing.assert_array_equal(cube.data, expected.cube.numpy())
    masks = load_masks(out / item["masks"])
    assert set(masks) == set(expected.masks)
    assert np.array_equal(masks["vein"], expected.masks["vein"].numpy())
    assert Image.open(out / item["rgb"]).size == (64, 64)
    ds = CubeFolderDataset(out, with_masks=True)
    assert len(ds) == 2 and ds[0][0].shape == (16, 64, 64)
    assert not (out / "preview.png").exists()


def test_phantom_preview(tmp_path):
    out = tmp_path / "p"
    assert main(["phantom", "--n", "2", "--size", "64", "--out", str(out), "--preview",
                 "--no-progress"]) == 0
    img = Image.open(out / "preview.png")
    assert img.size[0] > 600 and img.size[1] > 150
    assert np.asarray(img.convert("L")).std() > 10                    # not blank


@pytest.mark.parametrize("args, words", [
    (["--n", "0"], "--n"),
    (["--size", "8"], "--size"),
    (["--seed", "-1"], "--seed"),
])
def test_phantom_bad_input(tmp_path, capsys, args, words):
    assert main(["phantom", "--out", str(tmp_path / "o"), "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    assert "retina-fast phantom: error:" in err and words in err
    assert len(err.strip().splitlines()) == 1


def test_phantom_out_is_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["phantom", "--out", str(f), "--n", "1", "--size", "64"]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_phantom_missing_optional_package(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "h5py", None)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "h5py" else object())
    assert main(["phantom", "--out", str(tmp_path / "o"), "--n", "1", "--size", "64",
                 "--format", "h5"]) == 2
    assert "h5py" in capsys.readouterr().err


def test_phantom_bad_format_and_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["phantom", "--out", "x", "--format", "png"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["phantom", "--help"])
    assert e.value.code == 0
    assert "--format" in capsys.readouterr().out


def test_top_level_help_and_version_import_no_command_nor_torch():
    """--help and --version list the commands without importing them (or torch): under half a second."""
    import subprocess
    import sys

    import retina_fast

    code = ("import sys, contextlib, io\nfrom retina_fast import cli\nfor a in (['--help'], ['--version']):\n"
            "    buf = io.StringIO()\n    with contextlib.redirect_stdout(buf):\n        try:\n"
            "            cli.main(a)\n        except SystemExit:\n            pass\n    print(buf.getvalue().strip().splitlines()[-1])\n"
            "print('torch' in sys.modules, [m for m in sys.modules if m.startswith('retina_fast.commands.')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    lines = out.strip().splitlines()
    assert lines[-2] == f"retina-fast {retina_fast.__version__}"
    assert lines[-1] == "False []"
