"""Follow-up enhancement stages (config.json ``then``, ``enhance(..., then=)``, ``retina-fast enhance --then``) and
their shipping tool (``python -m retina_fast.training.enhance_stage``)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from retina_fast import cli
from retina_fast.checkpoint import CheckpointError
from retina_fast.enhance import enhance, load_enhancer, resolve_enhancer, shrink_residual, unload_enhancer
from retina_fast.fov import fov_mask
from retina_fast.modelzoo import WEIGHTS_DIR
from retina_fast.training import enhance_kinds, enhance_stage


@pytest.fixture(scope="module")
def x():
    return enhance_kinds.kind_inputs(64, (0,))[1][:4]  # clean, illumination, spot, illumination + spot


def _config(d):
    return json.loads((d / "config.json").read_text())


def _set_then(d, then):
    doc = _config(d)
    if then is None:
        doc.pop("then", None)
    else:
        doc["then"] = then
    (d / "config.json").write_text(json.dumps(doc))
    unload_enhancer(str(d))


def test_the_shipped_default_is_two_stages():
    first = load_enhancer("default")
    assert first.path == WEIGHTS_DIR / "magenet-tiny"
    assert first.then == (WEIGHTS_DIR / "magenet-spots",)
    spots = load_enhancer("magenet-spots")
    assert spots.then == () and spots.work_size == 256 and 0 <= spots.residual_threshold < 0.1
    sel = spots.meta["provenance"]["residual_threshold_selection"]
    assert "magenet-tiny" in sel["after"] and "--after" in sel["command"]


def test_a_chain_is_its_stages_one_after_the_other_inside_the_inputs_field_of_view(x):
    fov = fov_mask(x).float()[:, None]
    a = enhance(x, backend="torch", then=())
    assert torch.equal(fov_mask(a), fov_mask(x))  # so two separate calls mask the second stage alike
    b = enhance(a, model="magenet-spots", backend="torch", then=())
    got = enhance(x, backend="torch")
    torch.testing.assert_close(got, b, rtol=0, atol=0)
    assert not torch.equal(got, a)
    assert torch.equal(got, got * fov)
    # the first stage alone equals a copy of it without the 'then' entry
    raw = enhance(x, backend="torch", then=(), residual_threshold=0.0)
    torch.testing.assert_close(a, shrink_residual(x, raw, load_enhancer("default").residual_threshold) * fov,
                               rtol=0, atol=0)


def test_call_overrides_apply_to_every_stage(x):
    got = enhance(x, backend="torch", residual_threshold=0.0, work_size=0)
    a = enhance(x, backend="torch", residual_threshold=0.0, work_size=0, then=())
    want = enhance(a, model="magenet-spots", backend="torch", residual_threshold=0.0, work_size=0, then=())
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # an explicit list replaces the checkpoint's own: the shipped first stage twice
    twice = enhance(x, backend="torch", then=["magenet-tiny"])
    once = enhance(x, backend="torch", then=())
    torch.testing.assert_close(twice, enhance(once, backend="torch", then=()), rtol=0, atol=0)


@pytest.mark.parametrize("then", ["magenet-spots", ("magenet-spots",), 3])
def test_then_must_be_a_list_of_models(x, then):
    if isinstance(then, tuple):  # a tuple is fine
        enhance(x[:1], backend="torch", then=then)
        return
    with pytest.raises(TypeError, match="then must be a list or tuple"):
        enhance(x[:1], backend="torch", then=then)


@pytest.fixture
def pair(tmp_path):
    """Copies of the shipped stages side by side: tmp/first (then = ['../spots']) and tmp/spots."""
    first, spots = tmp_path / "first", tmp_path / "spots"
    shutil.copytree(resolve_enhancer("default"), first)
    shutil.copytree(resolve_enhancer("magenet-spots"), spots)
    _set_then(first, ["../spots"])
    return first, spots


def test_a_relative_then_entry_is_looked_up_beside_the_checkpoint(pair, x):
    first, spots = pair
    assert load_enhancer(str(first)).then == (first / "../spots",)
    torch.testing.assert_close(enhance(x, model=str(first), backend="torch"), enhance(x, backend="torch"),
                               rtol=0, atol=0)


@pytest.mark.parametrize("then,needle", [
    ("magenet-spots", "'then' must be a list"),
    ([""], "'then' must be a list"),
    ([3], "'then' must be a list"),
    (["nope"], "follow-up stage 'nope'"),
    (["."], "is this checkpoint itself"),
    (["tiny"], "follow-up stage 'tiny'"),  # a sampling model, not an enhancer
])
def test_a_bad_then_entry_is_named(pair, then, needle):
    first, _ = pair
    _set_then(first, then)
    with pytest.raises(CheckpointError, match=needle) as e:
        load_enhancer(str(first))
    assert str(first / "config.json") in str(e.value)


def test_chains_are_one_level_deep(pair):
    first, spots = pair
    _set_then(spots, ["magenet-tiny"])
    with pytest.raises(CheckpointError, match="lists follow-up stages of its own"):
        load_enhancer(str(first))


@pytest.mark.parametrize("text,needle", [("{not json", "follow-up stage"), ('{"format": "other"}', "follow-up stage")])
def test_a_follow_up_stage_with_a_broken_config_is_named(pair, text, needle):
    """The follow-up stage's config.json is read through the checkpoint reader (format checked), and a broken
    one names both files."""
    first, spots = pair
    (spots / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=needle) as e:
        load_enhancer(str(first))
    assert str(first / "config.json") in str(e.value) and "spots" in str(e.value)


def test_the_cli_runs_the_chain_and_then_none_runs_the_model_alone(tmp_path, x):
    import numpy as np
    from PIL import Image

    img = np.round(x[2].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "a.png")
    for then, out in ((None, "chain"), (["none"], "alone")):
        argv = ["enhance", str(tmp_path / "a.png"), "--out", str(tmp_path / out), "--backend", "torch", "-q"]
        assert cli.main(argv + (["--then", *then] if then else [])) == 0
    chain = np.asarray(Image.open(tmp_path / "chain" / "a.png"))
    alone = np.asarray(Image.open(tmp_path / "alone" / "a.png"))
    want = enhance(img, backend="torch")
    assert np.array_equal(chain, want) and not np.array_equal(chain, alone)
    assert np.array_equal(alone, enhance(img, backend="torch", then=()))


def test_a_broken_stage_is_one_line_and_exit_2_before_any_work(pair, tmp_path, x):
    import numpy as np
    from PIL import Image

    first, _ = pair
    _set_then(first, ["missing-stage"])
    (tmp_path / "in").mkdir()
    Image.fromarray(np.round(x[1].permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(tmp_path / "in" / "a.png")
    for extra in ([], ["--model", "default", "--then", "none", "magenet-spots"]):
        model = [] if extra else ["--model", str(first)]
        r = subprocess.run([sys.executable, "-m", "retina_fast", "enhance", str(tmp_path / "in" / "a.png"), "--out",
                            str(tmp_path / "out"), *model, *extra], capture_output=True, text=True, cwd=tmp_path)
        assert r.returncode == 2, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
        assert ("missing-stage" if not extra else "'none' stands alone") in r.stderr
        assert not (tmp_path / "out").exists()


def test_then_entry_names_packaged_weights_by_name_and_others_by_relative_path(tmp_path):
    assert enhance_stage.then_entry(WEIGHTS_DIR / "magenet-tiny", WEIGHTS_DIR / "magenet-spots") == "magenet-spots"
    assert enhance_stage.then_entry(tmp_path / "a" / "first", tmp_path / "b" / "s") == "../../b/s"


def test_wire_sets_and_removes_the_entry_and_keeps_the_rest(pair):
    first, _ = pair
    before = _config(first)
    md = (first / "TRAINING.md").read_text()
    enhance_stage.wire(first, None)
    assert "then" not in _config(first) and load_enhancer(str(first)).then == ()
    assert (first / "TRAINING.md").read_text().rstrip("\n") == "\n".join(
        ln for ln in md.splitlines() if not ln.startswith(enhance_stage.FOLLOW_UP_LINE))
    enhance_stage.wire(first, "../spots")
    enhance_stage.wire(first, "../spots")  # once, not twice
    assert _config(first) == before
    lines = (first / "TRAINING.md").read_text().splitlines()
    assert [ln for ln in lines if ln.startswith(enhance_stage.FOLLOW_UP_LINE)] == [
        enhance_stage.FOLLOW_UP_LINE + "`../spots` runs on this network's output (config.json `then`; "
        "`retina_fast.enhance(..., then=())` runs this one alone); its own TRAINING.md says how it was made and chosen"]


def test_the_shipped_first_stage_names_its_follow_up_stage_in_training_md():
    lines = (WEIGHTS_DIR / "magenet-tiny" / "TRAINING.md").read_text().splitlines()
    assert [ln for ln in lines if ln.startswith(enhance_stage.FOLLOW_UP_LINE)] == [
        enhance_stage.FOLLOW_UP_LINE + f"`{_config(WEIGHTS_DIR / 'magenet-tiny')['then'][0]}` runs on this "
        "network's output (config.json `then`; `retina_fast.enhance(..., then=())` runs this one alone); its own "
        "TRAINING.md says how it was made and chosen"]


def _identity_checkpoint(d, provenance=None):
    """A MAGE-Net with the shipped architecture whose image heads are zero: out = in (as training starts)."""
    from retina_fast.checkpoint import save_checkpoint
    from retina_fast.models.magenet import MAGENet, MAGENetConfig

    arch = _config(resolve_enhancer("magenet-spots"))["architecture"]
    net = MAGENet(MAGENetConfig.from_dict(arch))
    for conv in (net.stage1.sam.conv2, net.tail):
        torch.nn.init.zeros_(conv.weight)
    save_checkpoint(d, {"model": net}, {"kind": "magenet", "architecture": arch, "preset": "tiny",
                                        "variant": "identity (test)"}, provenance or {"command": "made by a test"})
    return d


def test_enhance_stage_ships_a_run_as_a_follow_up_stage(tmp_path, monkeypatch):
    """End to end at 64 px on networks that start as the identity (fast): copy, threshold chosen after the first
    stage, chain scored, wired, TRAINING.md, the chain then runs it. At 64 px the field-of-view mask alone costs
    an identity 0.2 dB on one validation image, so the rule's limit is raised here."""
    monkeypatch.setattr(enhance_kinds, "MAX_VAL_LOSS_DB", 1.0)
    first = _identity_checkpoint(tmp_path / "first")
    run = tmp_path / "run"
    _identity_checkpoint(run / "final", {"command": "python -m retina_fast.training.train_enhance tmagenet --x"})
    (run / "log.csv").write_text("step,loss\n1,0.5\n")
    target = tmp_path / "stage"
    rc = enhance_stage.main(["--run", str(run), "--after", str(first), "--to", str(target), "--size", "64",
                             "--json", str(tmp_path / "r.json")])
    assert rc == 0
    cfg = _config(target)
    assert cfg["work_size"] == 256 and cfg["residual_threshold"] == 0.0 and "then" not in cfg
    assert (target / "log.csv").is_file() and not (tmp_path / "stage.tmp").exists()
    assert _config(first)["then"] == ["../stage"]
    assert "--after" in cfg["provenance"]["residual_threshold_selection"]["command"]
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["wired"] and doc["then"] == "../stage" and len(doc["threshold_grid"]) == len(enhance_kinds.THRESHOLD_GRID)
    a, c = doc["first stage alone"], doc["first stage, then this stage"]
    assert a["validation_score"] == c["validation_score"]  # identity after identity: the same outputs
    md = (target / "TRAINING.md").read_text()
    assert "Runs after `first`" in md and "train_enhance tmagenet --x" in md
    assert load_enhancer(str(first)).then == (first / "../stage",)
    # a run that scores lower is not wired, and an earlier copy of it is taken out of the chain
    ship = enhance_stage.main
    worse = tmp_path / "worse"
    shutil.copytree(resolve_enhancer("magenet-spots"), worse / "final")
    assert ship(["--run", str(worse), "--after", str(first), "--to", str(target), "--size", "64"]) == 1
    assert "then" not in _config(first)


def test_enhance_stage_refuses_bad_arguments_with_exit_2(pair, tmp_path, capsys):
    first, _ = pair
    assert enhance_stage.main(["--run", str(tmp_path / "nope"), "--after", str(first), "--to",
                               str(tmp_path / "s")]) == 2
    assert "no final/ checkpoint" in capsys.readouterr().err
    run = tmp_path / "run"
    shutil.copytree(first, run / "final")
    assert enhance_stage.main(["--run", str(run), "--after", str(first), "--to", str(first)]) == 2
    assert "is the first stage itself" in capsys.readouterr().err
    assert _config(first)["then"] == ["../spots"]  # nothing changed


def test_a_read_only_array_is_enhanced_without_a_warning(x, monkeypatch):
    """np.asarray(PIL image) is read-only; torch.from_numpy warns on such an array (once per process, so the
    test watches what reaches torch.from_numpy instead of the warning)."""
    import numpy as np

    seen, real = [], torch.from_numpy

    def from_numpy(arr):
        seen.append(arr.flags.writeable)
        return real(arr)

    monkeypatch.setattr(torch, "from_numpy", from_numpy)
    img = np.ascontiguousarray(np.round(x[1].permute(1, 2, 0).numpy() * 255).astype(np.uint8))
    img.flags.writeable = False  # contiguous and read-only, as np.asarray(PIL image) gives
    out = enhance(img, backend="torch", then=())
    assert seen and all(seen) and out.shape == img.shape and out.dtype == np.uint8
