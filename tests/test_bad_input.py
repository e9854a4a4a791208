"""Bad input, CLI and API: every case gets one line naming the problem, exit status 2 on the command line
(no traceback), and leaves every file that existed before exactly as it was (no partial or temporary
files either). The CLI cases run in-process through ``retina_fast.cli.main`` (what the console script
calls); tests/test_newcomer_defects.py covers the invocation forms in fresh interpreters."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from retina_fast import backends, cli, engine
from retina_fast.checkpoint import CheckpointError

from _newcomer import snapshot
from _small_model import save_small_checkpoint


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A workspace as a user has it: a model, a finished run, photos, an earlier enhance output."""
    ws = tmp_path_factory.mktemp("ws")
    model = save_small_checkpoint(ws / "model")
    assert cli.main(["sample", "--n", "2", "--steps", "2", "--model", str(model), "--out", str(ws / "run"),
                     "--backend", "torch", "--quiet"]) == 0
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(20, 230, (40, 40, 3), dtype=np.uint8)).save(ws / "a.png")
    Image.fromarray(rng.integers(20, 230, (8, 8, 3), dtype=np.uint8)).save(ws / "small.png")
    (ws / "sub").mkdir()
    Image.fromarray(rng.integers(20, 230, (40, 40, 3), dtype=np.uint8)).save(ws / "sub" / "a.jpg")
    (ws / "bad.png").write_bytes(b"not an image")
    (ws / "notes.txt").write_text("notes")
    (ws / "file").write_text("keep me")
    assert cli.main(["enhance", str(ws / "a.png"), "--out", str(ws / "enh"), "--no-progress"]) == 0
    shutil.copytree(ws / "run", ws / "badrun")
    (ws / "badrun" / "run.json").write_text('{"model": ')
    shutil.copytree(ws / "run", ws / "unfinished")
    (ws / "unfinished" / "manifest.json").unlink()
    shutil.copytree(model, ws / "badmodel")
    doc = json.loads((ws / "badmodel" / "config.json").read_text())
    doc["latent_range"]["max"] = "@inf"
    (ws / "badmodel" / "config.json").write_text(json.dumps(doc).replace('"@inf"', "Infinity"))
    return ws


@pytest.fixture
def ws(template, tmp_path):
    dst = tmp_path / "ws"
    shutil.copytree(template, dst, symlinks=True)
    return dst


SAMPLE = ["sample", "--model", "{ws}/model", "--backend", "torch", "--quiet", "--steps", "2"]
CLI_CASES = {
    # sample
    "sample n 0": (SAMPLE + ["--n", "0", "--out", "{ws}/new"], ["--n"]),
    "sample steps 0": (SAMPLE + ["--n", "1", "--steps", "0", "--out", "{ws}/new"], ["--steps"]),
    "sample steps > T": (SAMPLE + ["--n", "1", "--steps", "5000", "--out", "{ws}/new"], ["steps must be in [1, 1000]"]),
    "sample eta nan": (SAMPLE + ["--n", "1", "--eta", "nan", "--out", "{ws}/new"], ["--eta"]),
    "sample eta < 0": (SAMPLE + ["--n", "1", "--eta", "-1", "--out", "{ws}/new"], ["--eta"]),
    "sample batch 0": (SAMPLE + ["--n", "1", "--batch-size", "0", "--out", "{ws}/new"], ["--batch-size"]),
    "sample seed > 64 bit": (SAMPLE + ["--n", "1", "--seed", str(2**70), "--out", "{ws}/new"], ["--seed"]),
    "sample shard 0": (SAMPLE + ["--n", "1", "--shard-size", "0", "--out", "{ws}/new"], ["--shard-size"]),
    "sample out is a file": (SAMPLE + ["--n", "1", "--out", "{ws}/file"], ["file", "not a directory"]),
    "sample out under a file": (SAMPLE + ["--n", "1", "--out", "{ws}/file/x"], ["file/x", "Not a directory"]),
    "sample model missing": (["sample", "--n", "1", "--model", "{ws}/nope", "--out", "{ws}/new"], ["nope"]),
    "sample model is an enhancer": (["sample", "--n", "1", "--model", "magenet-tiny", "--out", "{ws}/new"],
                                    ["magenet-tiny", "not a sampling model"]),
    "sample model bad config": (["sample", "--n", "1", "--model", "{ws}/badmodel", "--out", "{ws}/new"],
                                ["badmodel/config.json", "latent_range.max must be a finite number"]),
    "sample unknown backend": (SAMPLE + ["--n", "1", "--backend", "nope", "--out", "{ws}/new"],
                               ["unknown backend 'nope'"]),
    "sample backend unusable": (SAMPLE + ["--n", "1", "--backend", "cuda", "--out", "{ws}/new"], ["cuda"]),
    "sample run exists": (SAMPLE + ["--n", "2", "--out", "{ws}/run"], ["already holds a run", "--resume"]),
    "sample resume other n": (SAMPLE + ["--n", "3", "--out", "{ws}/run", "--resume"], ["n: 2 -> 3"]),
    "sample resume bad run.json": (SAMPLE + ["--n", "2", "--out", "{ws}/badrun", "--resume"],
                                   ["badrun/run.json", "not valid JSON"]),
    "sample bad option": (["sample", "--n", "1", "--out", "{ws}/new", "--colour", "red"], ["unrecognized arguments"]),
    "sample missing --out": (["sample", "--n", "1"], ["--out"]),
    # enhance
    "enhance input missing": (["enhance", "{ws}/nope.png", "--out", "{ws}/enh"], ["nope.png: no such file"]),
    "enhance not an image": (["enhance", "{ws}/bad.png", "--out", "{ws}/enh"], ["bad.png", "cannot read image"]),
    "enhance extension": (["enhance", "{ws}/notes.txt", "--out", "{ws}/enh"], ["notes.txt", "unsupported extension"]),
    "enhance overwrites input": (["enhance", "{ws}/a.png", "--out", "{ws}"], ["a.png", "overwrite"]),
    "enhance out is a file": (["enhance", "{ws}/a.png", "--out", "{ws}/file"], ["file", "not a directory"]),
    "enhance out under a file": (["enhance", "{ws}/a.png", "--out", "{ws}/file/x"], ["Not a directory"]),
    "enhance batch 0": (["enhance", "{ws}/a.png", "--out", "{ws}/enh", "--batch-size", "0"], ["--batch-size"]),
    "enhance tile 10": (["enhance", "{ws}/a.png", "--out", "{ws}/enh", "--tile", "10"], ["--tile"]),
    "enhance model missing": (["enhance", "{ws}/a.png", "--out", "{ws}/enh2", "--model", "{ws}/nope"], ["nope"]),
    "enhance model is a sampler": (["enhance", "{ws}/a.png", "--out", "{ws}/enh2", "--model", "tiny"],
                                   ["'ldm' checkpoint, not a MAGE-Net model"]),
    "enhance unknown backend": (["enhance", "{ws}/a.png", "--out", "{ws}/enh2", "--backend", "nope"],
                                ["unknown backend 'nope'"]),
    "enhance device meta": (["enhance", "{ws}/a.png", "--out", "{ws}/enh2", "--device", "meta"], ["meta"]),
    "enhance device garbage": (["enhance", "{ws}/a.png", "--out", "{ws}/enh2", "--device", "gpu0"],
                               ["not a device name"]),
    "enhance image too small": (["enhance", "{ws}/small.png", "--out", "{ws}/enh2"], ["small.png", "smaller than"]),
    "enhance stems collide": (["enhance", "{ws}/a.png", "{ws}/sub/a.jpg", "--out", "{ws}/enh2"], ["share the name"]),
    # evaluate
    "evaluate real missing": (["evaluate", "--real", "{ws}/nope", "--synthetic", "{ws}/run", "--out", "{ws}/rep"],
                              ["nope", "no such directory"]),
    "evaluate unfinished run": (["evaluate", "--real", "{ws}/run", "--synthetic", "{ws}/unfinished", "--out",
                                 "{ws}/rep"], ["unfinished"]),
    "evaluate max-images 1": (["evaluate", "--real", "{ws}/run", "--synthetic", "{ws}/run", "--out", "{ws}/rep",
                               "--max-images", "1"], ["--max-images"]),
    "evaluate out is a file": (["evaluate", "--real", "{ws}/run", "--synthetic", "{ws}/run", "--out", "{ws}/file"],
                               ["not a directory"]),
    # phantom, degrade
    "phantom n 0": (["phantom", "--n", "0", "--out", "{ws}/ph"], ["--n"]),
    "phantom size 8": (["phantom", "--n", "1", "--size", "8", "--out", "{ws}/ph"], ["--size"]),
    "phantom out is a file": (["phantom", "--n", "1", "--out", "{ws}/file"], ["not a directory"]),
    "degrade seed -1": (["degrade", "{ws}/a.png", "--out", "{ws}/deg", "--seed", "-1"], ["--seed"]),
    "degrade bad kind": (["degrade", "{ws}/a.png", "--out", "{ws}/deg", "--kinds", "rain"], ["rain"]),
    "degrade input missing": (["degrade", "{ws}/nope.png", "--out", "{ws}/deg"], ["nope.png"]),
    "degrade out is a file": (["degrade", "{ws}/a.png", "--out", "{ws}/file"], ["file"]),
    # export, bench, train
    "export model missing": (["export", "onnx", "--what", "unet", "--model", "{ws}/nope", "--out", "{ws}/x.onnx"],
                             ["nope"]),
    "export out under a file": (["export", "onnx", "--what", "unet", "--model", "{ws}/model", "--out",
                                 "{ws}/file/x.onnx"], ["file"]),
    "bench model missing": (["bench", "--n", "1", "--steps", "1", "--model", "{ws}/nope"], ["nope"]),
    # a CUDA contender where torch has no usable GPU (the CI machines; skipped where one is)
    "bench cuda without a GPU": (["bench", "--n", "1", "--steps", "1", "--model", "{ws}/model", "--backends",
                                 "cpu,cuda@nhwc"], ["cuda"]),
    "train vqgan out is a file": (["train", "vqgan", "--preset", "tiny", "--data", "phantom", "--out", "{ws}/file",
                                   "--steps", "1"], ["file"]),
    "train ldm vqgan missing": (["train", "ldm", "--preset", "tiny", "--data", "phantom", "--vqgan", "{ws}/nope",
                                 "--out", "{ws}/t", "--steps", "1"], ["nope"]),
    "train vqgan data missing": (["train", "vqgan", "--preset", "tiny", "--data", "{ws}/nope", "--out", "{ws}/t",
                                  "--steps", "1"], ["nope"]),
    "unknown command": (["paint"], ["invalid choice"]),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_bad_input(case, ws, capsys):
    argv, needles = CLI_CASES[case]
    if "cuda" in case and torch.cuda.is_available():
        pytest.skip("a CUDA GPU is usable here")
    argv = [a.replace("{ws}", str(ws)) for a in argv]
    before = snapshot(ws)
    capsys.readouterr()
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code == 2, f"exit {code}: {err}"
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"not one line:\n{err}"
    for needle in needles:
        assert needle.replace("{ws}", str(ws)) in lines[0], f"{needle!r} not in {lines[0]!r}"
    after = snapshot(ws)
    changed = sorted(k for k in before if after.get(k) != before[k])
    added = sorted(k for k in after if k not in before and after[k] != "dir")
    assert not changed and not added, f"changed {changed}, added {added}"


# --------------------------------------------------------------------------------------------------- API
@pytest.fixture(scope="module")
def pipe(template):
    return engine.load(str(template / "model"))


SAMPLE_API = {
    "n 0": (dict(n=0), ValueError, "n must be a positive int"),
    "n True": (dict(n=True), TypeError, "n must be an int, got bool"),
    "n 1.5": (dict(n=1.5), TypeError, "n must be an int"),
    "steps 0": (dict(steps=0), ValueError, "steps"),
    "steps True": (dict(steps=True), TypeError, "steps must be an int"),
    "steps > T": (dict(steps=5000), ValueError, "steps must be in [1, 1000]"),
    "seed 1.5": (dict(seed=1.5), TypeError, "seed must be an int"),
    "seed > 64 bit": (dict(seed=2**70), ValueError, "seed must be a 64-bit integer"),
    "eta nan": (dict(eta=float("nan")), ValueError, "eta must be a finite number >= 0, got nan"),
    "eta inf": (dict(eta=float("inf")), ValueError, "eta must be a finite number"),
    "eta -1": (dict(eta=-1.0), ValueError, "eta must be a finite number >= 0"),
    "batch 0": (dict(batch_size=0), ValueError, "got 0 (None means automatic)"),
    "batch -1": (dict(batch_size=-1), ValueError, "batch_size must be a positive int"),
    "batch True": (dict(batch_size=True), TypeError, "batch_size must be an int or None"),
    "first_index -1": (dict(first_index=-1), ValueError, "first_index"),
    "device cuda": (dict(device="cuda"), backends.BackendUnavailable, "device cuda: "),
    "device cuda:7": (dict(device="cuda:7"), backends.BackendUnavailable, "device cuda:7"),
    "device meta": (dict(device="meta"), backends.BackendUnavailable, "run on cpu or cuda, not meta"),
    "device garbage": (dict(device="gpu0"), ValueError, "not a device name"),
    "dtype str": (dict(dtype="bf16"), TypeError, "dtype must be a torch.dtype"),
    "dtype int64": (dict(dtype=torch.int64), backends.BackendUnavailable, "int64"),
    "backend unknown": (dict(backend="nope"), ValueError, "unknown backend 'nope'"),
    "sampler unknown": (dict(sampler="euler"), ValueError, "unknown sampler 'euler'"),
}


@pytest.mark.parametrize("case", list(SAMPLE_API))
def test_sample_api_bad_input(case, pipe):
    kwargs, exc_type, needle = SAMPLE_API[case]
    kwargs = {"n": 1, "steps": 2, "backend": "torch", **kwargs}
    if torch.cuda.is_available() and kwargs.get("device") == "cuda":
        pytest.skip("a CUDA GPU is present: device='cuda' is valid here")
    with pytest.raises(exc_type) as info:
        pipe.sample(**kwargs)
    msg = str(info.value)
    assert needle in msg and "\n" not in msg, msg


@pytest.mark.parametrize("model,needle", [("magenet-tiny", "not a sampling model"), ("nope", "'nope'"),
                                          ("structure-net", "not a sampling model")])
def test_sample_api_bad_model(model, needle):
    with pytest.raises((FileNotFoundError, CheckpointError)) as info:
        engine.sample(1, 2, model=model)
    assert needle in str(info.value) and "\n" not in str(info.value)


ENHANCE_API = {
    "empty batch": (lambda: torch.rand(0, 3, 64, 64), {}, ValueError, "empty input"),
    "empty numpy": (lambda: np.zeros((0, 64, 64, 3), np.uint8), {}, ValueError, "empty input"),
    "empty list": (lambda: [], {}, ValueError, "no images given"),
    "wrong shape": (lambda: torch.rand(3, 64), {}, ValueError, "expected a tensor (3, H, W)"),
    "int tensor": (lambda: torch.zeros(3, 32, 32, dtype=torch.uint8), {}, ValueError, "must be float"),
    "nan": (lambda: torch.full((3, 32, 32), float("nan")), {}, ValueError, "NaN"),
    "out of range": (lambda: torch.full((3, 32, 32), 2.0), {}, ValueError, "must be in [0, 1]"),
    "too small": (lambda: torch.rand(3, 8, 8), {}, ValueError, "at least 16"),
    "tile 10": (lambda: torch.rand(3, 32, 32), {"tile": 10}, ValueError, "tile must be"),
    "batch 0": (lambda: torch.rand(3, 32, 32), {"batch_size": 0}, ValueError, "batch_size must be >= 1"),
    "batch True": (lambda: torch.rand(3, 32, 32), {"batch_size": True}, TypeError, "batch_size must be an int"),
    "device meta": (lambda: torch.rand(3, 32, 32), {"device": "meta"}, backends.BackendUnavailable, "meta"),
    "backend unknown": (lambda: torch.rand(3, 32, 32), {"backend": "nope"}, ValueError, "unknown backend 'nope'"),
    "model sampler": (lambda: torch.rand(3, 32, 32), {"model": "tiny"}, CheckpointError, "not a MAGE-Net model"),
    "not an image": (lambda: "photo.png", {}, TypeError, "expected a torch tensor, numpy array or PIL image"),
}


@pytest.mark.parametrize("case", list(ENHANCE_API))
def test_enhance_api_bad_input(case):
    from retina_fast.enhance import enhance

    make, kwargs, exc_type, needle = ENHANCE_API[case]
    with pytest.raises(exc_type) as info:
        enhance(make(), **kwargs)
    msg = str(info.value)
    assert needle in msg and "\n" not in msg, msg


def test_dataset_of_a_missing_or_damaged_run(template, tmp_path):
    from retina_fast import shards
    from retina_fast.synthetic import SyntheticRetinaDataset

    with pytest.raises(FileNotFoundError, match="no manifest"):
        SyntheticRetinaDataset(tmp_path / "nope")
    run = tmp_path / "run"
    shutil.copytree(template / "run", run)
    (run / "manifest.json").write_text('{"shards": [{"file": "../../etc/passwd"}]}')
    with pytest.raises(shards.BadRunFile, match="manifest.json: shard 0"):
        SyntheticRetinaDataset(run)
