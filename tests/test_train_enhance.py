"""Enhancement trainers: tiny few-step runs of rsp / magenet / tmagenet, checkpoints, exact resume, CLI."""
from __future__ import annotations

import argparse
import contextlib
import csv
import json

import pytest
import torch

from retina_fast.checkpoint import CheckpointError, load_checkpoint
from retina_fast.training import train_enhance as T

TINY = ["--size", "48", "--crop", "24", "--eyes", "2", "--per-eye", "1", "--batch-size", "2",
        "--unlabelled-batch-size", "1", "--real-images", "2", "--log-every", "1", "--no-progress", "--threads", "1"]


def _args(kind: str, *extra: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    T.add_arguments(p)
    args = p.parse_args([*TINY, *extra])
    args.model = kind  # what `retina-fast train KIND` sets
    return args


@pytest.fixture(scope="module")
def rsp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "rsp"
    assert T.run(_args("rsp", "--out", str(out), "--steps", "2")) == 0
    return out


def test_rsp_run_writes_final_and_log(rsp_run):
    doc, states = load_checkpoint(rsp_run / "final")
    assert doc["kind"] == "rsp" and set(doc["architecture"]) == {"base", "gf_radius", "gf_eps"}
    assert doc["provenance"]["steps"] == 2 and doc["provenance"]["wall_time_s"] >= 0
    assert "cpu" in doc["provenance"]["hardware"]
    rows = list(csv.DictReader(open(rsp_run / "log.csv")))
    assert [r["step"] for r in rows] == ["1", "2"] and float(rows[0]["seg"]) > 0


def test_magenet_starts_from_pretrained_rsp(rsp_run, tmp_path):
    from retina_fast.models.magenet import MAGENet

    net = MAGENet()
    T.load_rsp(rsp_run / "final", net.rsp)
    _, states = load_checkpoint(rsp_run / "final")
    for k, v in net.rsp.state_dict().items():
        assert torch.equal(v, states["model"][k])
    out = tmp_path / "mage"
    T.run(_args("magenet", "--out", str(out), "--steps", "1", "--rsp-init", str(rsp_run / "final")))
    doc = load_checkpoint(out / "final", [])[0]
    assert doc["kind"] == "magenet" and doc["variant"] == "MAGE-Net full"
    assert doc["provenance"]["rsp_init"]["sha256"] == load_checkpoint(rsp_run / "final", [])[0]["weights"]["model"]["sha256"]
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert all(float(rows[0][k]) > 0 for k in ("char_s1", "edge_s1", "char_s2", "edge_s2", "seg"))


@pytest.mark.parametrize("flag,use_rsp,stage1", [("--no-rsp", False, False), ("--stage1-only", True, True)])
def test_ablation_flags(tmp_path, flag, use_rsp, stage1):
    T.run(_args("magenet", "--out", str(tmp_path / "r"), "--steps", "1", flag))
    doc = load_checkpoint(tmp_path / "r" / "final", [])[0]
    assert doc["architecture"]["use_rsp"] is use_rsp and doc["architecture"]["stage1_only"] is stage1


def test_bad_option_combinations(tmp_path, rsp_run):
    with pytest.raises(ValueError, match="ablations"):
        T.run(_args("rsp", "--out", str(tmp_path / "a"), "--steps", "1", "--no-rsp"))
    with pytest.raises(ValueError, match="no RSP"):
        T.run(_args("magenet", "--out", str(tmp_path / "b"), "--steps", "1", "--no-rsp",
                    "--rsp-init", str(rsp_run / "final")))
    with pytest.raises(ValueError, match="not an RSP"):
        T.run(_args("magenet", "--out", str(tmp_path / "c"), "--steps", "1", "--rsp-init", str(_magenet_ckpt(tmp_path))))
    with pytest.raises(ValueError, match="no checkpoint"):
        T.run(_args("magenet", "--out", str(tmp_path / "d"), "--steps", "1", "--resume"))


def _magenet_ckpt(tmp_path):
    out = tmp_path / "m1"
    T.run(_args("magenet", "--out", str(out), "--steps", "1", "--stage1-only"))
    return out / "final"


@contextlib.contextmanager
def _stopped_after_checkpoint(monkeypatch, stop_step: int):
    """Inside: a run is interrupted (KeyboardInterrupt) right after writing its checkpoint of ``stop_step``."""
    real_save = T.save_train_state

    def save_then_stop(run_dir, step, *a, **k):
        path = real_save(run_dir, step, *a, **k)
        if step == stop_step:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(T, "save_train_state", save_then_stop)
    try:
        yield
    finally:
        monkeypatch.setattr(T, "save_train_state", real_save)


def test_tmagenet_resume_is_bit_identical(tmp_path, rsp_run, monkeypatch):
    extra = ["--steps", "4", "--ckpt-every", "2", "--rsp-init", str(rsp_run / "final")]
    T.run(_args("tmagenet", "--out", str(tmp_path / "straight"), *extra))

    with pytest.raises(KeyboardInterrupt), _stopped_after_checkpoint(monkeypatch, 2):
        T.run(_args("tmagenet", "--out", str(tmp_path / "split"), *extra))
    with pytest.raises(ValueError, match="already holds a run"):
        T.run(_args("tmagenet", "--out", str(tmp_path / "split"), *extra))
    with pytest.raises(ValueError, match="differ"):
        T.run(_args("tmagenet", "--out", str(tmp_path / "split"), *extra, "--resume", "--lr", "0.5"))
    T.run(_args("tmagenet", "--out", str(tmp_path / "split"), *extra, "--resume"))
    a_doc, a = load_checkpoint(tmp_path / "straight" / "final")
    b_doc, b = load_checkpoint(tmp_path / "split" / "final")
    assert set(a) == {"model", "student"} and a_doc["variant"] == "T-MAGE-Net full"
    for name in a:
        for k in a[name]:
            assert torch.equal(a[name][k], b[name][k]), (name, k)
    rows_a = list(csv.DictReader(open(tmp_path / "straight" / "log.csv")))
    rows_b = list(csv.DictReader(open(tmp_path / "split" / "log.csv")))
    assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows_b]
    assert float(rows_a[-1]["ema_alpha"]) == pytest.approx(0.75)  # min(1 - 1/(t+1), α) at t = 3
    assert 0 < float(rows_a[0]["con_weight"]) < float(rows_a[-1]["con_weight"]) <= 1.0


def test_registered_in_train_cli():
    from retina_fast.cli import build_parser

    for kind in ("rsp", "magenet", "tmagenet"):
        args = build_parser().parse_args(["train", kind, "--out", "x", "--steps", "3"])
        assert args.model == kind and args.steps == 3


def test_kind_is_required():
    with pytest.raises(ValueError, match="unknown enhancement trainer"):
        T.run(argparse.Namespace(out="x", resume=False, model="vqgan"))


def test_eval_report_and_ship(tmp_path, rsp_run, capsys):
    """The whole ablation pipeline at toy scale: four variants, evaluation, report, shipped copy."""
    from retina_fast.training import enhance_kinds, eval_enhance

    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "rsp").symlink_to(rsp_run, target_is_directory=True)
    for name, kind, flags in (("stage1-only", "magenet", ["--stage1-only"]), ("no-rsp", "magenet", ["--no-rsp"]),
                              ("magenet", "magenet", []), ("tmagenet", "tmagenet", [])):
        T.run(_args(kind, "--out", str(runs / name), "--steps", "1", *flags))
    # a threshold recorded in a run's config.json must not be what the ladder uses (each rung gets its own)
    for run in ("magenet", "tmagenet"):
        cfg = runs / run / "final" / "config.json"
        doc = json.loads(cfg.read_text())
        cfg.write_text(json.dumps({**doc, "residual_threshold": 0.9}))
    argv = ["--runs", str(runs), "--out", str(tmp_path / "doc"), "--n-test", "2", "--size", "48",
            "--kind-size", "64", "--test-seeds", "0", "--val-seeds", "10", "--ship-to", str(tmp_path / "ship")]
    eval_enhance.main(argv)
    md = (tmp_path / "doc" / "ablation.md").read_text()
    for label in ("Degraded input", "CLAHE", "Stage-1 only", "MAGE-Net w/o RSP", "| MAGE-Net |", "T-MAGE-Net"):
        assert label in md
    assert (tmp_path / "doc" / "examples.png").is_file() and (tmp_path / "doc" / "ablation.json").is_file()
    assert "Per degradation kind" in md and (tmp_path / "doc" / "kinds.png").is_file()
    assert "## The ladder, each rung with its own residual threshold" in md and "Order of the paper" in md
    assert "Produced by `python -m retina_fast.training.eval_enhance " + " ".join(argv) + "`" in md
    res = json.loads((tmp_path / "doc" / "ablation.json").read_text())
    rungs = {"Stage-1 only", "MAGE-Net w/o RSP", "MAGE-Net", "T-MAGE-Net"}
    assert set(res["kinds"]) == set(res["validation"]) == set(res["kinds_raw"]) == set(res["thresholds"]) == rungs
    for label, th in res["thresholds"].items():  # chosen by the shipped rule, never the recorded 0.9
        tau, seeds = th["threshold"], (10, 11, 12, 13, 14, 15, 16, 17)
        assert th["grid"] == enhance_kinds.choose_residual_threshold(
            str(runs / {v: k for k, v in eval_enhance.VARIANTS.items()}[label] / "final"), size=64, seeds=seeds,
            backend="torch")[1]
        assert tau is None or tau in enhance_kinds.THRESHOLD_GRID
        kept = [r["worst_image_gain_left"] >= -enhance_kinds.MAX_VAL_LOSS_DB for r in th["grid"]]
        assert tau == (th["grid"][kept.index(True)]["threshold"] if any(kept) else None)
    from retina_fast.enhance import enhance
    from retina_fast.metrics import psnr
    from retina_fast.training import enhance_data

    b = enhance_data.real_test_set(2, 48, cache_dir=runs / "data").get(range(2))
    y = enhance(b["x"], model=str(runs / "magenet" / "final"), backend="torch",
                residual_threshold=res["thresholds"]["MAGE-Net"]["threshold"] or 0.0)
    assert psnr(y, b["y"]).double().tolist() == pytest.approx(res["test_sets"]["real"]["MAGE-Net"]["psnr_per_image"])
    # the per-kind table of a rung is its raw outputs soft-thresholded by its τ (τ = 0: identical)
    for label in rungs:
        assert res["kinds"][label]["seeds"] == [0] and res["validation"][label]["seeds"] == [10]
        if not res["thresholds"][label]["threshold"]:
            assert res["kinds"][label]["rows"] == res["kinds_raw"][label]["rows"]
    assert len(res["kinds"]["MAGE-Net"]["rows"]) == 8  # the clean photograph + seven combinations
    doc, states = load_checkpoint(tmp_path / "ship")
    assert set(states) == {"model"} and "selection" in doc["provenance"]
    assert (tmp_path / "ship" / "TRAINING.md").is_file() and (tmp_path / "ship" / "log.csv").is_file()
    training_md = (tmp_path / "ship" / "TRAINING.md").read_text()
    assert "```bash" in training_md and doc["provenance"]["command"] in training_md
    assert "python -m retina_fast.training.eval_enhance " + " ".join(argv) in training_md
    assert "- residual threshold: " in training_md
    shipped = doc["provenance"]["selection"].split(":")[0]
    assert doc.get("residual_threshold") == res["thresholds"][shipped]["threshold"]  # never the recorded 0.9
    val = {k: v["score"] for k, v in res["validation"].items() if k in ("MAGE-Net", "T-MAGE-Net")}
    best = max(val, key=lambda k: (val[k][0], round(val[k][1], 2), k == "T-MAGE-Net"))
    assert doc["provenance"]["selection"].startswith(best + ":")  # chosen on validation, not on the test half
    # its residual threshold chosen on the threshold's validation split and recorded (None: none of the grid held)
    sel = doc["provenance"].get("residual_threshold_selection")
    if "residual_threshold" in doc:
        assert sel["grid"][0]["threshold"] == 0.0 and doc["residual_threshold"] in [r["threshold"] for r in sel["grid"]]
        assert "seeds [10, 11, 12, 13, 14, 15, 16, 17]" in sel["validation"]
    else:
        assert sel is None
    with pytest.raises(SystemExit):  # test seeds among the threshold's own validation seeds
        eval_enhance.main([*argv[:-2], "--test-seeds", "12"])
    # the thresholds are remembered per weights and rule settings; a remembered one is used as is
    cache_file = runs / eval_enhance.THRESHOLD_CACHE
    cache = json.loads(cache_file.read_text())
    assert len(cache) == 4 and sorted(v["checkpoint"] for v in cache.values()) == sorted(
        str(runs / r / "final") for r in ("stage1-only", "no-rsp", "magenet", "tmagenet"))
    key = next(k for k, v in cache.items() if v["checkpoint"] == str(runs / "magenet" / "final"))
    cache[key]["threshold"] = 0.05
    cache_file.write_text(json.dumps(cache))
    assert eval_enhance.rung_threshold(runs / "magenet" / "final", runs, 64, "torch")[0] == 0.05
    capsys.readouterr()
    assert eval_enhance.main(["--runs", str(runs), "--kind-size", "64", "--thresholds-only"]) == 0
    assert "MAGE-Net: residual threshold 0.05" in capsys.readouterr().out.splitlines()
    # shipping again onto weights that score at least as high keeps them (and says so); --replace ships anyway
    res_full = eval_enhance.evaluate(runs, 2, 48, kind_size=64, test_seeds=(0,), val_seeds=(10,))
    label = eval_enhance.choose(res_full)
    inc = eval_enhance.incumbent_score(tmp_path / "ship", res_full)
    table = enhance_kinds.kind_table(lambda x: enhance(x, model=str(tmp_path / "ship"), backend="torch"), size=64,
                                     seeds=(10,))
    assert inc == list(eval_enhance.validation_score(table))
    assert eval_enhance.incumbent_score(tmp_path / "nothing", res_full) is None
    better = [inc[0], inc[1] + 1.0]
    before = (tmp_path / "ship" / "model.safetensors").read_bytes()
    assert eval_enhance.ship(res_full, runs, tmp_path / "ship", None, incumbent=better) is None
    assert (tmp_path / "ship" / "model.safetensors").read_bytes() == before
    worse = [res_full["validation"][label]["score"][0], res_full["validation"][label]["score"][1] - 1.0]
    assert eval_enhance.ship(res_full, runs, tmp_path / "ship2", None, incumbent=worse) == label
    assert "above the weights shipped before" in load_checkpoint(tmp_path / "ship2")[0]["provenance"]["selection"]
    # weights with a follow-up stage ('then'): scored alone, like the runs, and the stage stays when replaced
    from retina_fast.enhance import unload_enhancer

    cfg2 = tmp_path / "ship2" / "config.json"

    def set_then(then):
        d = json.loads(cfg2.read_text())
        d.pop("then", None)
        cfg2.write_text(json.dumps({**d, **({"then": then} if then else {})}))
        unload_enhancer(str(tmp_path / "ship2"))

    alone = eval_enhance.incumbent_score(tmp_path / "ship2", res_full)
    set_then(["magenet-spots"])
    assert eval_enhance.incumbent_score(tmp_path / "ship2", res_full) == alone
    assert eval_enhance.ship(res_full, runs, tmp_path / "ship2", None, incumbent=worse) == label
    assert load_checkpoint(tmp_path / "ship2")[0]["then"] == ["magenet-spots"]
    assert "\n" + eval_enhance.FOLLOW_UP_LINE + "`magenet-spots` runs on" in (tmp_path / "ship2" / "TRAINING.md").read_text()
    capsys.readouterr()
    assert eval_enhance.main(argv) == 0  # the same runs again: the shipped copy is one of them, a tie: kept
    assert "kept; the weights there score" in capsys.readouterr().err
    assert eval_enhance.main([*argv, "--replace"]) == 0
    with pytest.raises(SystemExit) as exc:  # --replace alone would be silently meaningless
        eval_enhance.main(["--runs", str(runs), "--out", str(tmp_path / "r"), "--replace"])
    assert exc.value.code == 2 and "--replace needs --ship-to" in capsys.readouterr().err
    # --work-size: every rung enhances at it, its thresholds are remembered apart, the shipped copy records it
    assert eval_enhance.main([*argv[:-2], "--out", str(tmp_path / "doc3"), "--ship-to", str(tmp_path / "ship3"),
                              "--work-size", "32"]) == 0
    res3 = json.loads((tmp_path / "doc3" / "ablation.json").read_text())
    assert res3["work_size"] == 32 and "`work_size=32`" in (tmp_path / "doc3" / "ablation.md").read_text()
    assert len(json.loads(cache_file.read_text())) == 8
    assert res3["kinds_raw"]["MAGE-Net"] != res["kinds_raw"]["MAGE-Net"]
    assert load_checkpoint(tmp_path / "ship3")[0]["work_size"] == 32
    with pytest.raises(SystemExit) as exc:
        eval_enhance.main([*argv, "--work-size", "8"])
    assert exc.value.code == 2 and "--work-size must be 0 or >= 16" in capsys.readouterr().err


def test_thresholded_is_what_enhance_returns_with_that_threshold(tmp_path):
    from retina_fast.enhance import enhance
    from retina_fast.training import enhance_kinds, eval_enhance

    model = tmp_path / "m"
    assert T.run(_args("magenet", "--out", str(model), "--steps", "2", "--lr", "0.05")) == 0
    x = enhance_kinds.kind_inputs(64, (0,))[1]
    raw = enhance(x, model=str(model / "final"), backend="torch", residual_threshold=0.0)
    assert eval_enhance.thresholded(x, raw, None) is raw and eval_enhance.thresholded(x, raw, 0.0) is raw
    for tau in (0.01, 0.05):
        want = enhance(x, model=str(model / "final"), backend="torch", residual_threshold=tau)
        got = eval_enhance.thresholded(x, raw, tau)
        assert torch.allclose(got, want, atol=1e-6) and not torch.equal(got, raw)


def test_reproduction_commands_include_the_rsp_runs_behind_a_checkpoint(rsp_run, tmp_path):
    from retina_fast.training import eval_enhance

    rsp_command = load_checkpoint(rsp_run / "final", [])[0]["provenance"]["command"]
    prov = {"rsp_init": {"path": str(rsp_run / "final")}, "structure_rsp": {"path": str(tmp_path / "gone")},
            "command": "python -m retina_fast.training.train_enhance magenet --out X"}
    lines = eval_enhance._commands(prov)
    assert lines[0] == eval_enhance.portable_command(rsp_command)
    assert lines[1].startswith("# structure_rsp: ") and "not here" in lines[1]
    assert lines[2] == prov["command"] and len(lines) == 3
    assert eval_enhance._commands({}) == ["# (no command recorded)"]


def test_ladder_inversions_name_the_rung_and_the_size():
    from retina_fast.training import eval_enhance

    def kinds(gain):
        return {"rows": {"none": {"gain_right": 0.0}, "001": {"gain_right": gain}, "010": {"gain_right": gain}}}

    res = {"test_sets": {"real": {"Stage-1 only": {"psnr": 20.0}, "MAGE-Net w/o RSP": {"psnr": 21.0},
                                  "MAGE-Net": {"psnr": 20.5}, "T-MAGE-Net": {"psnr": 22.0}}},
           "kinds": {"Stage-1 only": kinds(1.0), "MAGE-Net w/o RSP": kinds(0.5), "MAGE-Net": kinds(2.0),
                     "T-MAGE-Net": kinds(3.0)}}
    assert eval_enhance.ladder_inversions(res) == [
        "MAGE-Net w/o RSP < Stage-1 only on the mean right-half gain over the combinations by 0.50 dB",
        "MAGE-Net < MAGE-Net w/o RSP on the real test-set PSNR by 0.50 dB"]
    del res["kinds"]["MAGE-Net w/o RSP"]  # a missing rung: its neighbours are compared
    assert eval_enhance.ladder_inversions(res) == []


def test_identity_pairs_and_real_augment_options(tmp_path, rsp_run, monkeypatch):
    """--identity-fraction 1 turns every labelled input into its clean target; --real-augment widens the
    real pool; both recorded in the options and the data description; bad values rejected."""
    g_args = _args("magenet", "--out", str(tmp_path / "x"), "--identity-fraction", "1.0")
    opts = {**T.DEFAULTS, **{k: v for k, v in vars(g_args).items() if v is not None}, "kind": "magenet"}
    syn, real, desc = T._load_data(opts, progress=False)
    assert "identity pairs" in desc and real == (None, None, None, None)
    seen = {}

    class Spy(torch.nn.Module):
        def forward(self, x):
            seen["x"] = x
            raise StopIteration

    with pytest.raises(StopIteration):
        T._step(Spy(), None, opts, syn, None, 0, torch.device("cpu"))
    g = T.step_generator(opts["seed"], 0, T._STREAM)
    idx = torch.randint(len(syn), (opts["batch_size"],), generator=g)
    from retina_fast.training import enhance_data

    crops = enhance_data.random_crops(syn.get(idx), opts["crop"], g)
    assert torch.equal(seen["x"], crops["y"]) and not torch.equal(crops["x"], crops["y"])
    out = tmp_path / "t"
    assert T.run(_args("tmagenet", "--out", str(out), "--steps", "1", "--real-augment", "0.2",
                       "--identity-fraction", "0.5")) == 0
    doc, _ = load_checkpoint(out / "final")
    assert doc["provenance"]["options"]["real_augment"] == 0.2 and "augmented variants" in doc["provenance"]["data"]
    out = tmp_path / "p"
    assert T.run(_args("magenet", "--out", str(out), "--steps", "2", "--real-pairs", "2", "--real-pairs-batch-size", "1",
                       "--identity-fraction", "0.5")) == 0
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert all(float(r["real_pairs"]) > 0 for r in rows)  # the real pairs' image loss is logged every step
    doc, _ = load_checkpoint(out / "final")
    assert "labelled real pairs: 2 variants of the real left half" in doc["provenance"]["data"]
    out = tmp_path / "w"
    assert T.run(_args("magenet", "--out", str(out), "--steps", "1", "--image-weighting", "sqrt")) == 0
    doc, _ = load_checkpoint(out / "final")  # "log" runs in the non-finite-loss test below
    assert doc["provenance"]["options"]["image_weighting"] == "sqrt"
    assert "image losses weighted per row: sqrt" in doc["provenance"]["data"]
    out = tmp_path / "l2"
    assert T.run(_args("magenet", "--out", str(out), "--steps", "1", "--pixel-loss", "l2")) == 0
    doc, _ = load_checkpoint(out / "final")
    assert doc["provenance"]["options"]["pixel_loss"] == "l2"
    assert "image losses per pixel: l2 instead of Charbonnier" in doc["provenance"]["data"]
    out = tmp_path / "hybrid"
    assert T.run(_args("magenet", "--out", str(out), "--steps", "1", "--pixel-loss", "hybrid")) == 0
    assert load_checkpoint(out / "final")[0]["provenance"]["options"]["pixel_loss"] == "hybrid"
    out = tmp_path / "switch"
    seen = []
    real_loss = T.magenet_loss
    monkeypatch.setattr(T, "magenet_loss",
                        lambda *a, **k: seen.append((k["pixel"], k["image_weighting"])) or real_loss(*a, **k))
    assert T.run(_args("magenet", "--out", str(out), "--steps", "4", "--pixel-loss", "l2",
                       "--charbonnier-from", "0.5", "--image-weighting", "log", "--weighting-from", "0.75")) == 0
    assert seen == [("l2", "mean"), ("l2", "mean"), ("charbonnier", "mean"), ("charbonnier", "log")]
    doc, _ = load_checkpoint(out / "final")
    assert "image losses per pixel: l2 instead of Charbonnier, Charbonnier from step 2 on" in doc["provenance"]["data"]
    assert "image losses weighted per row: log from step 3 on (batch mean before)" in doc["provenance"]["data"]
    for flag in ("--charbonnier-from", "--weighting-from"):
        with pytest.raises(ValueError, match=flag):
            T.run(_args("magenet", "--out", str(tmp_path / "bad"), "--steps", "1", flag, "1.5"))
    with pytest.raises(SystemExit) as exc:  # the module's own entry point: one line, status 2, nothing made
        T.main(["magenet", "--out", str(tmp_path / "bad"), "--charbonnier-from", "1.5"])
    assert exc.value.code == 2 and not (tmp_path / "bad").exists()
    for flag, bad in (("--identity-fraction", "1.5"), ("--real-augment", "-0.1"), ("--real-pairs", "-1")):
        with pytest.raises(ValueError, match=flag):
            T.run(_args("magenet", "--out", str(tmp_path / "bad"), "--steps", "1", flag, bad))


def test_gate_bias_sets_the_output_gates_initial_opening(tmp_path):
    net, cfg = T.build_model({**T.DEFAULTS, "kind": "magenet", "preset": "tiny", "output_gate": True,
                              "gate_bias": -4.0})
    assert cfg.output_gate and torch.all(net.gate.bias == -4.0) and torch.all(net.gate.weight == 0)
    half, _ = T.build_model({**T.DEFAULTS, "kind": "magenet", "preset": "tiny", "output_gate": True})
    assert torch.all(half.gate.bias == 0)
    with pytest.raises(ValueError, match="needs --output-gate"):
        T.build_model({**T.DEFAULTS, "kind": "magenet", "preset": "tiny", "gate_bias": -4.0})
    with pytest.raises(ValueError, match="finite"):
        T.build_model({**T.DEFAULTS, "kind": "magenet", "preset": "tiny", "output_gate": True,
                       "gate_bias": float("nan")})
    out = tmp_path / "g"
    assert T.run(_args("magenet", "--out", str(out), "--steps", "1", "--output-gate", "--gate-bias", "-4")) == 0
    doc, _ = load_checkpoint(out / "final")
    assert doc["provenance"]["options"]["gate_bias"] == -4.0


def test_structure_term_trains_the_enhancer_through_a_frozen_segmenter(tmp_path, rsp_run):
    """--structure-weight adds W x BCE of the frozen --structure-rsp segmenter on the enhanced synthetic rows:
    the term is the segmenter's rsp_loss on the final image, it is logged, the segmenter stays frozen, its
    weights' hash is recorded, and bad combinations are named."""
    from retina_fast.training.enhance_losses import rsp_loss

    seg = T.structure_net({"structure_weight": 1.0, "structure_rsp": str(rsp_run / "final")}, torch.device("cpu"))
    assert not seg.training and not any(p.requires_grad for p in seg.parameters())
    x = torch.rand(2, 3, 24, 24, requires_grad=True)
    vessels = (torch.rand(2, 1, 24, 24) > 0.8).float()
    st = T.structure_loss(seg, x, vessels)
    assert torch.allclose(st, rsp_loss(seg(x), vessels))
    st.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # the gradient reaches the image

    out = tmp_path / "s"
    assert T.run(_args("magenet", "--out", str(out), "--steps", "2", "--structure-weight", "0.5",
                       "--structure-rsp", str(rsp_run / "final"))) == 0
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert all(float(r["structure"]) > 0 for r in rows)
    assert float(rows[0]["loss"]) > float(rows[0]["char_s2"])
    doc, _ = load_checkpoint(out / "final")
    sha = load_checkpoint(rsp_run / "final", [])[0]["weights"]["model"]["sha256"]
    assert doc["provenance"]["structure_rsp"]["sha256"] == sha
    assert "vessel-preservation term 0.5" in doc["provenance"]["data"]
    plain = tmp_path / "p"  # without the term: nothing logged under "structure"
    T.run(_args("magenet", "--out", str(plain), "--steps", "1"))
    assert list(csv.DictReader(open(plain / "log.csv")))[0]["structure"] == ""
    for flags, msg in ((["--structure-weight", "1"], "needs --structure-rsp"),
                       (["--structure-rsp", str(rsp_run / "final")], "without --structure-weight"),
                       (["--structure-weight", "nan", "--structure-rsp", str(rsp_run / "final")], "finite"),
                       (["--structure-weight", "1", "--structure-rsp", str(_magenet_ckpt(tmp_path))], "not an RSP")):
        with pytest.raises(ValueError, match=msg):
            T.run(_args("magenet", "--out", str(tmp_path / "bad"), "--steps", "1", *flags))
    with pytest.raises(CheckpointError, match="does not exist"):  # a wrong path: refused before the run directory exists
        T.run(_args("magenet", "--out", str(tmp_path / "bad"), "--steps", "1", "--structure-weight", "1",
                    "--structure-rsp", str(tmp_path / "missing")))
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ValueError, match="not of `train rsp`"):
        T.run(_args("rsp", "--out", str(tmp_path / "bad2"), "--steps", "1", "--structure-weight", "1",
                    "--structure-rsp", str(rsp_run / "final")))


def test_spot_fraction_swaps_inputs_for_their_spot_only_degradation(tmp_path):
    """--spot-fraction P: with probability P a labelled synthetic row's input is its spot-only degradation
    (a pool aligned row for row with the synthetic pairs: same targets, inputs only brightened); P = 0 draws
    nothing, so other runs keep their random stream; bad values and `train rsp` are refused."""
    from retina_fast.training import enhance_data

    syn = enhance_data.synthetic_pairs(2, 2, 64, colour_jitter=0.25, cache_dir=tmp_path / "c")
    spots = enhance_data.spot_inputs(2, 2, 64, colour_jitter=0.25, cache_dir=tmp_path / "c")
    assert torch.equal(spots.targets, syn.targets) and torch.equal(spots.source, syn.source)
    assert not torch.equal(spots.inputs, syn.inputs)
    s = spots.get(range(len(spots)))
    inside = s["fov"].bool().expand_as(s["x"])
    assert (s["x"] - s["y"])[inside].min() >= -1.5 / 255  # spots only brighten (up to uint8 rounding)
    assert (s["x"] - s["y"])[inside].max() > 0.05

    opts = {**T.DEFAULTS, **{k: v for k, v in vars(_args("magenet", "--out", "x", "--spot-fraction", "1.0")).items()
                              if v is not None}, "kind": "magenet"}
    syn, real, desc = T._load_data(opts, progress=False)
    assert "spot-only degradation" in desc and real[2] is not None
    seen = {}

    class Spy(torch.nn.Module):
        def forward(self, x):
            seen["x"] = x
            raise StopIteration

    opts["batch_size"] = 8
    for fraction, step in ((1.0, 0), (0.0, 0), (0.5, 0), (0.5, 1), (0.5, 2)):
        with pytest.raises(StopIteration):
            T._step(Spy(), None, {**opts, "spot_fraction": fraction}, syn, real if fraction else None, step,
                    torch.device("cpu"))
        g = T.step_generator(opts["seed"], step, T._STREAM)
        idx = torch.randint(len(syn), (opts["batch_size"],), generator=g)
        use = torch.rand(opts["batch_size"], generator=g) < fraction if fraction else torch.zeros(8, dtype=torch.bool)
        rows = syn.get(idx)
        rows["x"] = torch.where(use[:, None, None, None], real[2].get(idx)["x"], rows["x"])  # row by row
        assert torch.equal(seen["x"], enhance_data.random_crops(rows, opts["crop"], g)["x"])
        if fraction == 0.5 and step == 2:
            assert use.any() and not use.all()  # both kinds of row in one batch (seeded: fixed)
    for bad in ("-0.1", "1.5"):
        with pytest.raises(ValueError, match="--spot-fraction must be in"):
            T.run(_args("magenet", "--out", str(tmp_path / "bad"), "--spot-fraction", bad))
    with pytest.raises(ValueError, match="not of `train rsp`"):
        T.run(_args("rsp", "--out", str(tmp_path / "bad"), "--spot-fraction", "0.5"))
    assert not (tmp_path / "bad").exists()
    out = tmp_path / "run"
    assert T.run(_args("magenet", "--out", str(out), "--steps", "1", "--spot-fraction", "0.5")) == 0
    doc, _ = load_checkpoint(out / "final")
    assert doc["provenance"]["options"]["spot_fraction"] == 0.5 and "spot-only" in doc["provenance"]["data"]


def test_blur_fraction_swaps_inputs_for_their_blur_only_degradation(tmp_path):
    """--blur-fraction P: like --spot-fraction, from a blur-only pool; with both, one uniform draw per row
    splits the rows ([0, p_spot) spot-only, [p_spot, p_spot + p_blur) blur-only, the rest their random
    combination), so a spot-only run keeps its stream; the two together above 1 are refused."""
    from retina_fast.training import enhance_data

    blur = enhance_data.single_kind_inputs("blur", 2, 2, 256, cache_dir=tmp_path / "c")
    syn = enhance_data.synthetic_pairs(2, 2, 256, cache_dir=tmp_path / "c")
    assert torch.equal(blur.targets, syn.targets) and torch.equal(blur.source, syn.source)
    b = blur.get(range(len(blur)))
    d = (b["x"] - b["y"]).abs().flatten(1).amax(1)
    assert (d > 0.02).any()  # some rows are blurred (at 256 px Cofe-Net's kernel is 1 px wide in ~40 % of draws)
    assert torch.allclose(b["x"].mean((1, 2, 3)), b["y"].mean((1, 2, 3)), atol=3 / 255)  # a blur keeps the mean
    with pytest.raises(ValueError, match="not 'illumination'"):
        enhance_data.single_kind_inputs("illumination", 2, 2, 64)

    opts = {**T.DEFAULTS, **{k: v for k, v in vars(_args("magenet", "--out", "x", "--spot-fraction", "0.3",
                                                          "--blur-fraction", "0.4")).items() if v is not None},
            "kind": "magenet", "batch_size": 16}
    syn, real, desc = T._load_data(opts, progress=False)
    assert "spot-only degradation" in desc and "blur-only degradation" in desc
    spots, blurs = real[2], real[3]
    seen = {}

    class Spy(torch.nn.Module):
        def forward(self, x):
            seen["x"] = x
            raise StopIteration

    for ps, pb, step in ((0.3, 0.4, 0), (0.3, 0.4, 1), (0.0, 1.0, 0), (0.3, 0.0, 2)):
        data = (real[0], real[1], spots if ps else None, blurs if pb else None)
        with pytest.raises(StopIteration):
            T._step(Spy(), None, {**opts, "spot_fraction": ps, "blur_fraction": pb}, syn, data, step,
                    torch.device("cpu"))
        g = T.step_generator(opts["seed"], step, T._STREAM)
        idx = torch.randint(len(syn), (16,), generator=g)
        u = torch.rand(16, generator=g)
        rows = syn.get(idx)
        rows["x"] = torch.where((u < ps)[:, None, None, None], spots.get(idx)["x"], rows["x"])
        rows["x"] = torch.where(((u >= ps) & (u < ps + pb))[:, None, None, None], blurs.get(idx)["x"], rows["x"])
        assert torch.equal(seen["x"], enhance_data.random_crops(rows, opts["crop"], g)["x"])
    with pytest.raises(ValueError, match="at most 1"):
        T.run(_args("magenet", "--out", str(tmp_path / "bad"), "--spot-fraction", "0.6", "--blur-fraction", "0.5"))
    with pytest.raises(ValueError, match="--blur-fraction is an option of magenet"):
        T.run(_args("rsp", "--out", str(tmp_path / "bad"), "--blur-fraction", "0.5"))
    assert not (tmp_path / "bad").exists()


def test_init_starts_from_a_checkpoint_of_the_same_architecture(tmp_path, rsp_run):
    """--init DIR: the run's first weights are DIR's (zero steps of training would return them), the
    provenance names DIR by sha256 (kept through --resume), and a wrong checkpoint is refused before the run
    directory is made."""
    from retina_fast.models.magenet import MAGENet, MAGENetConfig

    src = _magenet_ckpt(tmp_path)  # Stage-1 only, trained 1 step
    src_doc, src_states = load_checkpoint(src)
    loaded = []
    real_load = T.load_state_into

    def spy(module, state, source="checkpoint"):
        real_load(module, state, source)
        if isinstance(module, MAGENet):
            loaded.append({k: v.clone() for k, v in module.state_dict().items()})

    T.load_state_into = spy
    try:
        out = tmp_path / "ft"
        T.run(_args("tmagenet", "--out", str(out), "--steps", "2", "--ckpt-every", "1", "--stage1-only",
                    "--init", str(src)))
    finally:
        T.load_state_into = real_load
    assert len(loaded) == 1 and all(torch.equal(loaded[0][k], v) for k, v in src_states["model"].items())
    doc, states = load_checkpoint(out / "final")
    assert doc["provenance"]["init"] == {"path": str(src), "sha256": src_doc["weights"]["model"]["sha256"]}
    assert any(not torch.equal(states["student"][k], v) for k, v in src_states["model"].items())  # it trained
    # the identity init would have zeroed the image head: the started weights are the checkpoint's instead
    assert MAGENetConfig.from_dict(doc["architecture"]).stage1_only
    for bad, message in (([], "architecture differs from this run's in stage1_only"),
                         (["--stage1-only", "--rsp-init", str(rsp_run / "final")], "drop --rsp-init")):
        with pytest.raises(ValueError, match=message):
            T.run(_args("magenet", "--out", str(tmp_path / "bad"), "--steps", "1", "--init", str(src), *bad))
        assert not (tmp_path / "bad").exists()
    with pytest.raises(ValueError, match="not a MAGE-Net one"):
        T.run(_args("magenet", "--out", str(tmp_path / "bad"), "--steps", "1", "--init", str(rsp_run / "final")))
    with pytest.raises(CheckpointError):
        T.run(_args("magenet", "--out", str(tmp_path / "bad"), "--steps", "1", "--init", str(tmp_path / "none")))
    with pytest.raises(ValueError, match="option of magenet"):
        T.run(_args("rsp", "--out", str(tmp_path / "bad"), "--steps", "1", "--init", str(src)))
    assert not (tmp_path / "bad").exists()


def test_init_run_resumes_without_its_source(tmp_path, monkeypatch):
    """A resumed --init run takes its weights from its own checkpoint: the source may be gone by then, and the
    provenance still names it by the sha256 recorded at the start."""
    import shutil

    src = _magenet_ckpt(tmp_path)
    sha = load_checkpoint(src, [])[0]["weights"]["model"]["sha256"]
    extra = ["--steps", "2", "--ckpt-every", "1", "--stage1-only", "--init", str(src)]
    with pytest.raises(KeyboardInterrupt), _stopped_after_checkpoint(monkeypatch, 1):
        T.run(_args("magenet", "--out", str(tmp_path / "r"), *extra))
    shutil.rmtree(src)
    T.run(_args("magenet", "--out", str(tmp_path / "r"), *extra, "--resume"))
    assert load_checkpoint(tmp_path / "r" / "final", [])[0]["provenance"]["init"]["sha256"] == sha


def test_init_source_is_checked_once_and_its_checked_weights_are_loaded(tmp_path, monkeypatch):
    """A fresh --init run reads DIR's config once for the check, and loads only the weights the check saw: a
    source replaced between the check and the load is refused, naming it."""
    import copy

    src = _magenet_ckpt(tmp_path)
    real, calls = T.init_checkpoint, []

    def counted(opts):
        calls.append(opts["init"])
        return real(opts)

    monkeypatch.setattr(T, "init_checkpoint", counted)
    extra = ["--steps", "1", "--stage1-only", "--init", str(src)]
    assert T.run(_args("magenet", "--out", str(tmp_path / "a"), *extra)) == 0
    assert calls == [str(src)]

    def seen_other_weights(opts):  # the check read a source that has changed on disk since
        doc = copy.deepcopy(real(opts))
        doc["weights"]["model"]["sha256"] = "0" * 64
        return doc

    monkeypatch.setattr(T, "init_checkpoint", seen_other_weights)
    with pytest.raises(CheckpointError, match="changed since the options were checked"):
        T.run(_args("magenet", "--out", str(tmp_path / "b"), *extra))


def test_a_non_finite_loss_stops_the_run_before_its_update(tmp_path, monkeypatch):
    """A NaN loss (as log weighting with an L2 term gave before LOG_FLOOR) stops the run with the step named,
    before the update: the checkpoints hold the finite weights of the steps before it."""
    from retina_fast.training.trainer import latest_checkpoint

    real_step = T._step

    def nan_at_third(model, mt, opts, syn, real, step, *a, **k):
        loss, parts = real_step(model, mt, opts, syn, real, step, *a, **k)
        return (loss * float("nan") if step == 2 else loss), parts

    monkeypatch.setattr(T, "_step", nan_at_third)
    with pytest.raises(FloatingPointError, match="step 3: the training loss is nan"):
        T.run(_args("magenet", "--out", str(tmp_path / "r"), "--steps", "4", "--ckpt-every", "1", "--stage1-only"))
    ck = latest_checkpoint(tmp_path / "r")
    assert ck.name == "step_00000002"
    _, states = load_checkpoint(ck, ["model"])
    assert all(torch.isfinite(v).all() for v in states["model"].values())
    monkeypatch.setattr(T, "_step", real_step)  # exact rows under L2 + log weighting now train finitely
    T.run(_args("magenet", "--out", str(tmp_path / "ok"), "--steps", "2", "--stage1-only", "--identity-fraction",
                "1", "--pixel-loss", "l2", "--image-weighting", "log"))
    rows = list(csv.DictReader(open(tmp_path / "ok" / "log.csv")))
    assert all(r["loss"] not in ("nan", "inf", "-inf") for r in rows)


def test_after_trains_a_follow_up_stage_on_the_first_stages_outputs(tmp_path, monkeypatch):
    """--after MODEL: every input pool (synthetic, spot-only, real pairs, unlabelled real) is replaced by MODEL's
    whole-image outputs (alone, the fp32 reference backend, rounded to uint8) before the first step; targets stay;
    the provenance names MODEL with its sha256; a MODEL whose weights changed is refused on resume."""
    from retina_fast.enhance import enhance

    first = _magenet_ckpt(tmp_path)
    extra = ["--out", "x", "--after", str(first), "--spot-fraction", "0.5", "--real-pairs", "2"]
    opts = {**T.DEFAULTS, **{k: v for k, v in vars(_args("tmagenet", *extra)).items() if v is not None},
            "kind": "tmagenet", "after_sha256": T.after_sha256(first)}
    syn, real, desc = T._load_data(opts, progress=False)
    syn0, real0, desc0 = T._load_data({**opts, "after": None}, progress=False)
    assert "first enhanced, whole, by the frozen enhancer" in desc and "frozen enhancer" not in desc0
    for got, pool in ((syn, syn0), (real[0], real0[0]), (real[1], real0[1]), (real[2], real0[2])):
        want = enhance(pool.inputs.float() / 255, model=str(first), backend="torch", then=())
        assert torch.equal(got.inputs, (want * 255).round().to(torch.uint8))
        assert not torch.equal(got.inputs, pool.inputs)  # the first stage changes them
        if pool.targets is not None:
            assert torch.equal(got.targets, pool.targets)
    out = tmp_path / "r"
    run = ["--steps", "2", "--ckpt-every", "1", "--stage1-only", "--after", str(first)]
    with pytest.raises(KeyboardInterrupt), _stopped_after_checkpoint(monkeypatch, 1):
        T.run(_args("magenet", "--out", str(out), *run))
    doc = json.loads((first / "config.json").read_text())
    sha = doc["weights"]["model"]["sha256"]
    doc["weights"]["model"]["sha256"] = "0" * 64  # as if other weights had been put there since
    (first / "config.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="changed since this run started"):
        T.run(_args("magenet", "--out", str(out), *run, "--resume"))
    doc["weights"]["model"]["sha256"] = sha
    (first / "config.json").write_text(json.dumps(doc))
    T.run(_args("magenet", "--out", str(out), *run, "--resume"))
    prov = load_checkpoint(out / "final", [])[0]["provenance"]
    assert prov["after"] == {"path": str(first), "sha256": sha}
    with pytest.raises(ValueError, match="--after is an option of magenet"):
        T.run(_args("rsp", "--out", str(tmp_path / "bad"), "--after", str(first)))
    with pytest.raises(FileNotFoundError, match="nope"):
        T.run(_args("magenet", "--out", str(tmp_path / "bad"), "--after", str(tmp_path / "nope")))
    assert not (tmp_path / "bad").exists()


def test_after_records_the_first_stages_deblurring_and_uses_it_as_recorded(tmp_path, monkeypatch):
    """A first stage with a deblurring step (config.json ``deblur``): the run records the settings when it starts
    and makes its training inputs with them; options without the record (runs from before it) use none."""
    from retina_fast.enhance import enhance, unload_enhancer

    first = _magenet_ckpt(tmp_path)
    doc = json.loads((first / "config.json").read_text())
    doc["deblur"] = {"lambda": 0.04}
    (first / "config.json").write_text(json.dumps(doc))
    unload_enhancer(str(first))
    out = tmp_path / "r"
    run = ["--steps", "2", "--ckpt-every", "1", "--stage1-only", "--after", str(first)]
    with pytest.raises(KeyboardInterrupt), _stopped_after_checkpoint(monkeypatch, 1):
        T.run(_args("magenet", "--out", str(out), *run))
    opts = load_checkpoint(out / "checkpoints" / "step_00000001", [])[0]["options"]
    assert opts["after_deblur"] == {"lambda": 0.04, "native_width": 1.5, "min_agreement": 0.85}
    x = torch.zeros(2, 3, 64, 64, dtype=torch.uint8)
    x[:, :, 8:56, 8:56] = 120
    x[:, 1, 30:34, :] = 40
    blurred = (torch.nn.functional.avg_pool2d(x.float(), 5, 1, 2) * (x.amax(1, keepdim=True) > 0)).round().to(torch.uint8)
    made = []
    for setting, want in ((opts["after_deblur"], opts["after_deblur"]), (None, False)):
        made.append(T.through_first_stage(blurred, first, deblur=setting))
        ref = enhance(blurred.float() / 255, model=str(first), backend="torch", then=(), deblur=want)
        assert torch.equal(made[-1], (ref * 255).round().to(torch.uint8))
    assert not torch.equal(made[0], made[1])  # the square's 5-px blur is seen and undone


def test_real_pair_kinds_degrade_every_real_pair_by_those_kinds_only(tmp_path):
    """--real-pair-kinds blur: every labelled real pair is its left-half variant blurred (a blur keeps the mean,
    an illumination change would not), cached apart from the random pairs; bad values are refused."""
    from retina_fast.training import enhance_data

    rnd = enhance_data.real_pairs(6, 256, cache_dir=tmp_path / "c")
    blur = enhance_data.real_pairs(6, 256, cache_dir=tmp_path / "c", kinds=("blur",))
    assert torch.equal(rnd.targets, blur.targets) and not torch.equal(rnd.inputs, blur.inputs)
    b = blur.get(range(6))
    assert torch.allclose(b["x"].mean((1, 2, 3)), b["y"].mean((1, 2, 3)), atol=3 / 255)
    assert len(list((tmp_path / "c").iterdir())) == 2
    with pytest.raises(ValueError, match="real pair kinds must be among"):
        enhance_data.real_pairs(2, 64, kinds=("fog",))
    opts = {**T.DEFAULTS, **{k: v for k, v in vars(_args("magenet", "--out", "x", "--real-pairs", "2",
                                                          "--real-pair-kinds", "blur")).items() if v is not None},
            "kind": "magenet"}
    _, real, desc = T._load_data(opts, progress=False)
    assert "degraded by blur only" in desc and len(real[1]) == 2
    for extra, needle in ((["--real-pair-kinds", "blur"], "needs --real-pairs"),
                          (["--real-pairs", "2", "--real-pair-kinds", "blur,fog"], "choose from")):
        with pytest.raises(ValueError, match=needle):
            T.run(_args("magenet", "--out", str(tmp_path / "bad"), *extra))
    assert not (tmp_path / "bad").exists()
