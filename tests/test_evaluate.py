"""``retina-fast evaluate`` end to end on tiny phantom folders, and its bad-input errors."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from retina_fast.cli import main
from retina_fast.evaluate import EvaluationError, evaluate_folders

SIZE = 64
N = 12


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    for name, seed in (("real", 0), ("synthetic", 100), ("train", 200)):
        assert main(["phantom", "--n", str(N), "--size", str(SIZE), "--seed", str(seed),
                     "--out", str(root / name), "--no-progress"]) == 0
    return root


def _copy(folders, tmp_path, name="bad"):
    dst = tmp_path / name
    shutil.copytree(folders / "real", dst)
    return dst


def test_end_to_end_cli(folders, tmp_path, capsys):
    out = tmp_path / "report"
    rc = main(["evaluate", "--real", str(folders / "real"), "--synthetic", str(folders / "synthetic"),
               "--train", str(folders / "train"), "--val", str(folders / "real"), "--out", str(out),
               "--pairs", "40", "--n-boot", "20", "--seed", "3", "--no-progress"])
    assert rc == 0
    assert "HS-FID" in capsys.readouterr().out
    for f in ("report.md", "metrics.json", "spectra.png", "ms_ssim.png", "nearest_neighbours.png",
              "contact_real.png", "contact_synthetic.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    m = json.loads((out / "metrics.json").read_text())
    st = m["settings"]
    assert st["n"] == {"real": N, "synthetic": N, "train": N, "val": N} and st["size"] == [SIZE, SIZE]
    assert st["feature_dim"] == 128 and st["real_masks"] == "files" and st["seed"] == 3
    fd = m["hs_fid"]
    assert fd["value"] >= 0 and fd["ci_low"] <= fd["ci_high"]
    assert set(m["spectral_kl"]) == {"vein", "artery", "onh"}
    assert all(v["mean"] is not None and v["mean"] >= 0 for v in m["spectral_kl"].values())
    div = m["ms_ssim_diversity"]
    assert div["scales"] < 5 and div["pairs"] == 40 and 0 <= div["abs_delta"] <= 1
    assert any("scales" in n for n in m["notes"]), "reduced MS-SSIM scales must be stated"
    auth = m["authenticity"]
    assert auth["percentile_rule"] and len(auth["pixel"]["nearest_distance"]) == N
    assert auth["pixel"]["ratio_flagged"] == [], "distinct phantom eyes are no copies"
    assert set(m["segmenter_dice_on_real"]) == {"artery", "vein", "onh", "fovea"}
    report = (out / "report.md").read_text()
    assert "HS-FID" in report and "spectral KL vein" in report and "![spectra.png](spectra.png)" in report


def test_copies_are_flagged_and_identical_sets(folders):
    res = evaluate_folders(folders / "real", folders / "synthetic", train=folders / "synthetic", pairs=10,
                           n_boot=5, progress=False, plots=False)
    assert res["authenticity"]["pixel"]["ratio_flagged"] == list(range(N))
    assert res["authenticity"]["pixel"]["nearest_index"] == list(range(N))
    assert res["authenticity"]["percentile_rule"] is False
    same = evaluate_folders(folders / "real", folders / "real", pairs=10, n_boot=5, max_images=6,
                            progress=False, plots=False)
    assert same["hs_fid"]["value"] == pytest.approx(0.0, abs=1e-6)
    assert same["ms_ssim_diversity"]["abs_delta"] == pytest.approx(0.0, abs=1e-12)
    assert same["settings"]["n"]["real"] == 6 and same["authenticity"] is None


def _error(capsys, argv):
    rc = main(["evaluate", *argv, "--no-progress", "--no-plots", "--pairs", "5", "--n-boot", "2"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err, err
    return err


def test_missing_folder(folders, tmp_path, capsys):
    missing = tmp_path / "nowhere"
    err = _error(capsys, ["--real", str(folders / "real"), "--synthetic", str(missing), "--out", str(tmp_path / "o")])
    assert str(missing) in err and "no such directory" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    err = _error(capsys, ["--real", str(empty), "--synthetic", str(folders / "real"), "--out", str(tmp_path / "o")])
    assert str(empty) in err and "no cube files" in err


def test_wrong_band_count_names_the_file(folders, tmp_path, capsys):
    bad = _copy(folders, tmp_path)
    target = bad / "phantom_000003.npy"
    np.save(target, np.load(target)[:8])
    target.with_suffix(".json").unlink()
    err = _error(capsys, ["--real", str(bad), "--synthetic", str(folders / "synthetic"), "--out", str(tmp_path / "o")])
    assert str(target) in err and "band" in err


def test_nan_cube_names_the_file(folders, tmp_path, capsys):
    bad = _copy(folders, tmp_path)
    target = bad / "phantom_000005.npy"
    cube = np.load(target)
    cube[2, 10, 10] = np.nan
    np.save(target, cube)
    err = _error(capsys, ["--real", str(folders / "real"), "--synthetic", str(bad), "--out", str(tmp_path / "o")])
    assert str(target) in err and "NaN" in err


def test_size_mismatch_and_bad_options(folders, tmp_path, capsys):
    other = tmp_path / "other"
    assert main(["phantom", "--n", "2", "--size", "48", "--out", str(other), "--no-progress"]) == 0
    err = _error(capsys, ["--real", str(folders / "real"), "--synthetic", str(other), "--out", str(tmp_path / "o")])
    assert str(other) in err and "48x48" in err
    (tmp_path / "file").write_text("x")
    err = _error(capsys, ["--real", str(folders / "real"), "--synthetic", str(folders / "real"),
                          "--out", str(tmp_path / "file")])
    assert "not a directory" in err
    err = _error(capsys, ["--real", str(folders / "real"), "--synthetic", str(folders / "real"),
                          "--val", str(folders / "real"), "--out", str(tmp_path / "o")])
    assert "--val needs --train" in err
    with pytest.raises(EvaluationError, match="max_images >= 2"):
        evaluate_folders(other, other, max_images=1, progress=False, plots=False)


def test_real_without_mask_files_uses_the_segmenter(folders, tmp_path):
    bare = _copy(folders, tmp_path, "bare")
    for f in bare.glob("*_masks.npz"):
        f.unlink()
    res = evaluate_folders(bare, folders / "synthetic", max_images=4, pairs=5, n_boot=5, progress=False,
                           plots=False)
    assert res["settings"]["real_masks"] == "segmenter" and res["segmenter_dice_on_real"] is None
    assert all(v["n_real_pixels"] > 0 for v in res["spectral_kl"].values())
