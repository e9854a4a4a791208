"""The diagnostic scripts run as a user runs them (fresh interpreter, from another directory)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from _small_model import save_small_checkpoint

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("skimage")


def _run(args, cwd):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_ldm_vessel_profile_runs_on_a_checkpoint(tmp_path):
    ck = save_small_checkpoint(tmp_path / "ck")
    out = _run([str(ROOT / "scripts" / "ldm_vessel_profile.py"), str(ck), "--eyes", "2", "--samples", "2",
                "--sensitivity", "--json", str(tmp_path / "p.json")], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    (res,) = json.loads((tmp_path / "p.json").read_text()).values()
    rows, share = res["rows"], res["latent_vessels"]
    assert 0 < share["variance_share"] < 1 and share["delta_rms_at_vessels"] > 0 and share["high_pass_vessels"] > 0
    assert 0 < share["latent_px_touching_vessels"] <= 1 and "vessels in the latents" in out.stdout
    names = [r["row"] for r in rows]
    assert names[:2] == ["phantom", "autoencoder"] and names[-1] == "samples" and len(names) == 24
    assert names[11:23] == ["noise 0.075", "noise 0.15", "noise 0.3", "blur 0.25", "blur 0.5", "blur 1",
                            "x0 10", "direct 10", "x0 20", "direct 20", "x0 40", "direct 40"]
    starts = [r for r in rows if r["row"].startswith("t=")]
    assert all(0 <= r["abar"] <= 1 and r["tree"] >= 0 for r in starts)
    assert [r["abar"] for r in starts] == sorted((r["abar"] for r in starts), reverse=True)
    assert "eff. SNR" in out.stdout
    bad = _run([str(ROOT / "scripts" / "ldm_vessel_profile.py"), str(ck), "--eyes", "0"], tmp_path)
    assert bad.returncode == 2 and "--eyes" in bad.stderr


def test_latent_directions_on_a_checkpoint(tmp_path):
    """Spectra in ascending order, shares in [0, 1], the whitened share reported; bad counts exit 2."""
    ck = save_small_checkpoint(tmp_path / "ck")
    out = _run([str(ROOT / "scripts" / "latent_directions.py"), str(ck), "--train", "4", "--eyes", "3",
                "--json", str(tmp_path / "d.json")], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads((tmp_path / "d.json").read_text())
    ev, gen = r["channel_variance_eigenvalues"], r["vessel_share_along_directions"]
    assert ev == sorted(ev) and ev[0] > 0 and gen == sorted(gen) and 0 <= gen[0] and gen[-1] <= 1
    assert 0 < r["vessel_share"] < 1 and 0 < r["vessel_share_whitened"] < 1 and "after whitening" in out.stdout
    bad = _run([str(ROOT / "scripts" / "latent_directions.py"), str(ck), "--eyes", "1"], tmp_path)
    assert bad.returncode == 2 and "--eyes" in bad.stderr


def test_bench_before_after_refuses_unknown_workloads(tmp_path):
    out = _run([str(ROOT / "benchmarks" / "bench_before_after.py"), "--before", ".", "--after", ".",
                "--workloads", "train"], tmp_path)
    assert out.returncode == 2 and "unknown workload" in out.stderr


def test_ldm_expert_handoff_of_a_model_to_itself_changes_nothing(tmp_path):
    """Handing over to the same model at one of its own DDIM timesteps is plain DDIM: every row equal."""
    ck = save_small_checkpoint(tmp_path / "ck")
    script = str(ROOT / "scripts" / "ldm_expert_handoff.py")
    out = _run([script, str(ck), str(ck), "--n", "2", "--out", str(tmp_path / "h")], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads((tmp_path / "h" / "rows.json").read_text())
    assert [r["row"] for r in rows][::len(rows) - 1] == ["first only", "second only"] and len(rows) == 7
    assert len({r["median"] for r in rows}) == 1 and len(list((tmp_path / "h").glob("*.png"))) == 7
    bad = _run([script, str(ck), str(ck), "--n", "0"], tmp_path)
    assert bad.returncode == 2 and "--n" in bad.stderr


def test_train_tiny_ldm_gpu_script_on_cpu_with_a_relative_run(tmp_path):
    """scripts/train_tiny_ldm_gpu.sh as a user runs it from another directory with a relative RUN (it changes to
    the repository root, so RUN must be resolved first), shrunk by its environment knobs to a CPU smoke run:
    final/ lands under the caller's directory, loads, and records the shipped recipe's options, with the options
    given after DEVICE on top (an override here: --lr)."""
    from retina_fast.modelzoo import load_ldm

    env = {**os.environ, "PYTHON": sys.executable, "STEPS": "2", "BATCH": "4", "EYES": "8",
           "WORKERS": "0", "CKPT": "1"}
    out = subprocess.run(["bash", str(ROOT / "scripts" / "train_tiny_ldm_gpu.sh"), "rel/run", "600", "cpu",
                          "--lr", "3e-4"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    final = tmp_path / "rel" / "run" / "final"
    assert "at step 2" in out.stdout and not (ROOT / "rel").exists()
    doc = json.loads((final / "config.json").read_text())
    assert doc["provenance"]["steps"] == 2 and "--lr 0.0003" in doc["provenance"]["command"]
    assert "--latent-asinh 1.0" in doc["provenance"]["command"] and "--num-images 8" in doc["provenance"]["command"]
    assert load_ldm(final).latent_asinh == 1.0


def test_tree_lengths_pairs_models_over_the_same_draws(tmp_path):
    ck = save_small_checkpoint(tmp_path / "ck")
    out = _run([str(ROOT / "scripts" / "tree_lengths.py"), f"a={ck}", f"b={ck}", "--n", "3", "--steps", "2",
                "--phantom", "2", "--json", str(tmp_path / "t.json")], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads((tmp_path / "t.json").read_text())["rows"]
    assert set(rows) == {"phantom", "a", "b"} and rows["phantom"]["n"] == 2  # 32-px eyes: no tree at that size
    assert len(rows["a"]["lengths"]) == 3 and rows["a"]["lengths"] == rows["b"]["lengths"]  # same model, same draws
    assert rows["b"]["paired"] == {"mean": 0.0, "ci_low": 0.0, "ci_high": 0.0, "against": "a"}
    assert "paired" not in rows["a"]
    bad = _run([str(ROOT / "scripts" / "tree_lengths.py"), "nomodel"], tmp_path)
    assert bad.returncode == 2 and "NAME=MODEL" in bad.stderr


def test_tree_lengths_reads_cube_folders_with_noise_and_its_floor(tmp_path):
    """cubes:DIR rows (phantom eyes written as files), the noise column and the noise floor: the same eyes give
    the same lengths as the phantom row; noisier files a higher noise figure and floor; a short folder exits 2."""
    import numpy as np

    from retina_fast import io
    from retina_fast.phantom import render

    for name, scale in (("eyes", 0.0), ("noisy", 0.3)):
        (tmp_path / name).mkdir()
        g = np.random.default_rng(1)
        for i in range(3):
            cube = render(100000 + i, 128).cube.numpy()
            io.save_cube(tmp_path / name / f"c{i}.npy", cube * (1 + scale * g.standard_normal(cube.shape)))
    tl = str(ROOT / "scripts" / "tree_lengths.py")
    for extra in ([], ["--pair-folders"]):
        out = _run([tl, "e=cubes:eyes", "n=cubes:noisy", "--n", "3", "--phantom", "3", "--noise-floor",
                    "--json", str(tmp_path / "t.json"), *extra], tmp_path)
        assert out.returncode == 0, out.stderr[-2000:]
        rows = json.loads((tmp_path / "t.json").read_text())["rows"]
        assert ("paired" in rows["n"]) == bool(extra)  # folders pair only when told they hold the same draws
    assert rows["e"]["median"] == rows["phantom"]["median"] > 200 and rows["e"]["noise"] == rows["phantom"]["noise"]
    assert rows["e"]["arcade_median"] == rows["phantom"]["arcade_median"] > 0.8 * rows["e"]["median"]
    assert rows["e"]["branch_median"] == rows["phantom"]["branch_median"] > 0 and len(rows["n"]["branch_lengths"]) == 3
    assert 0.05 < rows["e"]["noise"] < 0.2 < rows["n"]["noise"] and rows["n"]["paired"]["against"] == "e"
    assert rows["e"]["noisy"] == 0 and rows["n"]["noisy"] == 3 and len(rows["n"]["noise_values"]) == 3
    assert rows["e"]["noise_floor"] < rows["n"]["noise_floor"] and rows["e"]["noise_floor"] < 0.5 * rows["e"]["median"]
    bad = _run([tl, "e=cubes:eyes", "--n", "4"], tmp_path)
    assert bad.returncode == 2 and "3 cube files, --n asks for 4" in bad.stderr and "Traceback" not in bad.stderr
    bad = _run([tl, "e=cubes:nowhere", "--n", "4"], tmp_path)
    assert bad.returncode == 2 and "cubes:nowhere: not a folder" in bad.stderr


def test_mask_diffusion_and_the_mask_conditioned_ldm_run_end_to_end(tmp_path):
    """scripts/mask_diffusion.py (stage 1: vessel masks at the latent grid) and
    scripts/mask_conditioned_ldm.py (stage 2 on the shipped VQ-GAN) at toy budgets, as a user runs them."""
    md, mc = str(ROOT / "scripts" / "mask_diffusion.py"), str(ROOT / "scripts" / "mask_conditioned_ldm.py")
    out = _run([md, "--out", "masks", "--steps", "2", "--images", "8", "--draws", "4", "--threads", "1"], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads((tmp_path / "masks" / "result.json").read_text())
    # the measure sees the pooled training masks' tree (the phantom's eyes all have one) and counts draws
    assert res["training_masks"]["median"] > 50 and res["training_masks"]["no_tree"] == 0
    assert res["draws_fov0"]["n"] == 4 and 0 < res["data_fraction_mean"] < 0.5
    assert (tmp_path / "masks" / "masks.png").is_file() and (tmp_path / "masks" / "ema.pt").is_file()
    out = _run([mc, "train", "--out", "cond", "--steps", "2", "--images", "8"], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    out = _run([mc, "sample", "--out", "cond", "--masks", "masks", "--n", "2", "--save", "2"], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads((tmp_path / "cond" / "samples_drawn.json").read_text())
    assert res["n"] == 2 and res["masks"] == "drawn"
    assert sorted(p.name for p in (tmp_path / "cond" / "cubes_drawn").iterdir()) == ["sample_0000.npz",
                                                                                    "sample_0001.npz"]
    # conditioned on the full-resolution mask (16 channels at the latent grid): real masks only
    assert _run([mc, "train", "--out", "full", "--steps", "2", "--images", "8", "--cond", "full"],
                tmp_path).returncode == 0
    out = _run([mc, "sample", "--out", "full", "--masks", "real", "--n", "2", "--save", "0"], tmp_path)
    assert out.returncode == 0 and json.loads((tmp_path / "full" / "samples_real.json").read_text())["cond"] == "full"
    out = _run([mc, "sample", "--out", "full", "--masks", "masks", "--n", "2"], tmp_path)
    assert out.returncode == 2 and "use --masks real" in out.stderr
    out = _run([mc, "probe", "--out", "full", "--n", "2"], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads((tmp_path / "full" / "probe.json").read_text())["rows"]
    assert [r["t"] for r in rows] == [600, 300, 100] and all(0 < v < 4 for r in rows for k, v in r.items() if k != "t")


def test_latent_vessel_painter_runs_end_to_end(tmp_path):
    """scripts/latent_vessel_painter.py: data, painter, joint LDM and sample at toy budgets, as a user runs them;
    the data's vessel-free latents decode without a tree and the autoencoder's with one (the painter's frame)."""
    lp = str(ROOT / "scripts" / "latent_vessel_painter.py")
    out = _run([lp, "data", "--out", "p", "--images", "4", "--held-out", "3"], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    for sub, extra in (("painter", ["--steps", "2", "--eyes", "3"]), ("joint", ["--steps", "2"]),
                       ("sample", ["--n", "2"]), ("maps", ["--steps", "2"]), ("bare", ["--steps", "2"]),
                       ("sample", ["--n", "2", "--design", "two-stage"]),
                       ("maps", ["--steps", "2", "--mask", "pooled"]),
                       ("maps", ["--steps", "2", "--mask", "pooled", "--init", "p/maps_pooled.pt", "--lr", "1e-4"]),
                       ("upsample", ["--steps", "2", "--eyes", "3"]),
                       ("sample", ["--n", "2", "--design", "two-stage", "--maps", "pooled"]),
                       ("sample", ["--n", "2", "--design", "two-stage", "--maps", "pooled", "--map-sampler", "ddpm",
                                   "--map-steps", "3"]),
                       ("sample", ["--n", "2", "--design", "two-stage", "--maps", "real"]),
                       ("sample", ["--n", "2", "--design", "two-stage", "--maps", "real", "--gain", "2"]),
                       ("calibrate", ["--eyes", "3", "--gains", "1,2", "--save-cubes", "c2"]),
                       ("plain", ["--steps", "2", "--gain", "1.5"]),
                       ("sample", ["--n", "2", "--design", "plain", "--gain", "1.5"]),
                       ("sample", ["--n", "2", "--design", "two-stage", "--maps", "upsampled", "--save-cubes", "c"])):
        out = _run([lp, sub, "--out", "p", "--threads", "1", *extra], tmp_path)
        assert out.returncode == 0, (sub, out.stderr[-2000:])
    res = json.loads((tmp_path / "p" / "painter_full.json").read_text())
    assert res["mask"] == "full" and res["held_out_eyes"] == 3 and len(res["log"]) == 1 and res["log"][0]["step"] == 2
    assert res["rows"]["vessel-free"]["median"] == 0 and res["rows"]["autoencoder"]["median"] > 50
    assert "painter --out p" in res["command"]
    res = json.loads((tmp_path / "p" / "samples_full.json").read_text())
    assert set(res["rows"]) == {"joint draws, unpainted", "joint draws, painted", "drawn map",
                                "held-out eyes' maps"} and res["n"] == 2
    assert res["rows"]["held-out eyes' maps"]["median"] > 50 and res["rows"]["held-out eyes' maps"]["n"] == 3
    assert 0 <= res["mask_vessel_fraction"] <= 1 and 0.05 < res["held_out_vessel_fraction"] < 0.3
    from PIL import Image

    assert Image.open(tmp_path / "p" / "samples_full.png").size == (2 * 128, 3 * 128)  # 2 draws; three rows
    two = json.loads((tmp_path / "p" / "samples_full_two_stage.json").read_text())
    assert two["design"] == "two-stage" and set(two["rows"]) == set(res["rows"]) and two["n"] == 2
    assert two["rows"]["held-out eyes' maps"] == res["rows"]["held-out eyes' maps"]  # the same reference row
    up = json.loads((tmp_path / "p" / "samples_full_two_stage_pooled_maps.json").read_text())
    assert up["maps"] == "pooled" and up["rows"]["drawn map"]["n"] == 2
    real = json.loads((tmp_path / "p" / "samples_full_two_stage_real_maps.json").read_text())
    assert real["rows"]["drawn map"]["n"] == 2 and real["mask_vessel_fraction"] > 0.05  # the held-out eyes' maps
    gained = json.loads((tmp_path / "p" / "samples_full_two_stage_real_maps_gain2.json").read_text())
    assert gained["gain"] == 2 and real["gain"] == 1 and "--gain 2" in gained["command"]
    assert gained["rows"]["joint draws, unpainted"] == real["rows"]["joint draws, unpainted"]  # the same draws
    plain = json.loads((tmp_path / "p" / "samples_plain_gain1.5.json").read_text())
    assert plain["design"] == "plain" and plain["gain"] == 1.5 and plain["rows"]["draws"]["n"] == 2
    assert "plain --out p" in json.loads((tmp_path / "p" / "plain_gain1.5.json").read_text())["command"]
    assert Image.open(tmp_path / "p" / "samples_plain_gain1.5.png").size == (2 * 128, 2 * 128)  # two rows of draws
    cal = json.loads((tmp_path / "p" / "calibrate_full.json").read_text())
    assert cal["eyes"] == 3 and cal["spectrum_gain"] in (1, 2) and set(cal["rows"]) == {
        "phantom eyes", "autoencoder", "vessel-free", "gain 1", "gain 2"}
    eyes, ae, bare = cal["rows"]["phantom eyes"], cal["rows"]["autoencoder"], cal["rows"]["vessel-free"]
    assert eyes["vessel_spectrum_error"] == 0 and eyes["visible_l1_fov"] == 0 and eyes["contrast_555"] > 0.1
    assert ae["contrast_555"] > bare["contrast_555"] + 0.03 and ae["tree_median"] > bare["tree_median"]
    assert cal["rows"]["gain 1"] != cal["rows"]["gain 2"] and cal["visible_bands_nm"][-1] == 600
    assert sorted(d.name for d in (tmp_path / "c2").iterdir()) == ["autoencoder", "gain1", "gain2"]
    assert len(list((tmp_path / "c2" / "gain2").glob("*.npy"))) == 3
    assert json.loads((tmp_path / "p" / "maps_pooled.json").read_text())["init"] == "p/maps_pooled.pt"
    ddpm = json.loads((tmp_path / "p" / "samples_full_two_stage_pooled_maps_ddpm3.json").read_text())
    assert "--map-sampler ddpm" in ddpm["command"] and ddpm["rows"]["drawn map"]["n"] == 2
    ups = json.loads((tmp_path / "p" / "samples_full_two_stage_upsampled_maps.json").read_text())
    assert ups["maps"] == "upsampled" and ups["n"] == 2 and "--save-cubes c" in ups["command"]
    from retina_fast import io

    for name in ("painted", "unpainted"):  # the draws as cubes, for retina-fast evaluate
        files = sorted((tmp_path / "c" / name).glob("*.npy"))
        assert len(files) == 2 and io.load_cube(files[0]).data.shape == (16, 128, 128), (name, files)
    res = json.loads((tmp_path / "p" / "upsample.json").read_text())
    assert 0 <= res["log"][-1]["held_out_dice"] <= 1 and res["rows"]["held-out maps"]["median"] > 50
    assert json.loads((tmp_path / "p" / "maps_full.json").read_text())["log"] == [] and "bare --out p" in json.loads(
        (tmp_path / "p" / "bare_full.json").read_text())["command"]
    out = _run([lp, "sample", "--out", "p", "--mask", "pooled", "--n", "1"], tmp_path)  # nothing trained for it
    assert out.returncode == 2 and "painter_pooled.pt: not found" in out.stderr and "Traceback" not in out.stderr
    bad = _run([lp, "sample", "--out", "p", "--n", "0"], tmp_path)
    assert bad.returncode == 2 and "--n must be >= 1" in bad.stderr
    bad = _run([lp, "sample", "--out", "p", "--gain", "0"], tmp_path)
    assert bad.returncode == 2 and "--gain must be > 0" in bad.stderr
    bad = _run([lp, "calibrate", "--out", "p", "--gains", "1,x"], tmp_path)
    assert bad.returncode == 2 and "not a comma-separated list of numbers: '1,x'" in bad.stderr
    bad = _run([lp, "sample", "--out", "p", "--maps", "pooled"], tmp_path)
    assert bad.returncode == 2 and "--maps pooled goes with --design two-stage --mask full" in bad.stderr
    bad = _run([lp, "sample", "--out", "p", "--design", "two-stage", "--maps", "real", "--map-steps", "9"], tmp_path)
    assert bad.returncode == 2 and "--map-sampler and --map-steps set stage 1's sampler" in bad.stderr
    before = sorted((tmp_path / "c" / "painted").iterdir())
    bad = _run([lp, "sample", "--out", "p", "--design", "two-stage", "--save-cubes", "c"], tmp_path)
    assert bad.returncode == 2 and "c/painted already holds files" in bad.stderr
    bad = _run([lp, "calibrate", "--out", "p", "--gains", "2", "--save-cubes", "c2"], tmp_path)
    assert bad.returncode == 2 and "c2/autoencoder already holds files" in bad.stderr
    (tmp_path / "q").mkdir()  # held-out latents of other eyes than the phantom's held-out ones: refused, not compared
    for src, dst in (("train.pt", "held_out.pt"), ("painter_full.pt", "painter_full.pt")):
        (tmp_path / "q" / dst).write_bytes((tmp_path / "p" / src).read_bytes())
    bad = _run([lp, "calibrate", "--out", "q", "--eyes", "2", "--gains", "1"], tmp_path)
    assert bad.returncode == 2 and "does not hold the phantom's held-out eyes 6000.." in bad.stderr, bad.stderr[-500:]
    assert "Traceback" not in bad.stderr and not (tmp_path / "q" / "calibrate_full.json").exists()
    assert sorted((tmp_path / "c" / "painted").iterdir()) == before  # nothing written over
    kept = tmp_path / "kept.pt"  # a trained model linked in as OUT/NAME.pt: refused, not written through
    (tmp_path / "p" / "maps_pooled.pt").rename(kept)
    (tmp_path / "p" / "maps_pooled.pt").symlink_to(kept)
    before = kept.read_bytes()
    bad = _run([lp, "maps", "--out", "p", "--mask", "pooled", "--steps", "1", "--threads", "1"], tmp_path)
    assert bad.returncode == 2 and "maps_pooled.pt is a symbolic link" in bad.stderr and kept.read_bytes() == before


def test_decoder_capacity_fits_latents_through_the_frozen_decoder(tmp_path):
    """scripts/decoder_capacity.py, as a user runs it: the eyes themselves are the reference row, the fitted
    latents lower the L1 of their continuous decode, and every row carries the vessel measures."""
    out = _run([str(ROOT / "scripts" / "decoder_capacity.py"), "--eyes", "1", "--steps", "3", "--lr", "0.01",
                "--threads", "1", "--json", "cap.json"], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads((tmp_path / "cap.json").read_text())
    rows = res["rows"]
    assert res["eyes"] == 1 and [e["step"] for e in res["log"]] == [3] and "--steps 3" in res["command"]
    assert rows["phantom eyes"]["l1_465_600_fov"] < 1e-6 and rows["phantom eyes"]["contrast_555"] > 0.1
    fit, enc = rows["fitted latents, continuous"], rows["encoder's latents, continuous"]
    assert fit["l1_465_600_fov"] < enc["l1_465_600_fov"] and 0.03 < enc["contrast_555"] < 0.15
    bad = _run([str(ROOT / "scripts" / "decoder_capacity.py"), "--steps", "0"], tmp_path)
    assert bad.returncode == 2 and "--steps must be >= 1" in bad.stderr


def test_decoder_finetune_trains_the_decoder_alone_into_a_loadable_model(tmp_path):
    """scripts/decoder_finetune.py at a toy budget, as a user runs it: the evaluation rows at step 0 and the end, a
    model directory whose decoder changed while the encoder, codebook and U-Net did not, and refusals (exit 2)."""
    import torch

    from retina_fast.checkpoint import load_checkpoint
    from retina_fast.modelzoo import resolve_model

    script = str(ROOT / "scripts" / "decoder_finetune.py")
    out = _run([script, "--out", "ft", "--eyes", "8", "--steps", "2", "--eval-every", "2", "--eval-eyes", "2",
                "--vessel-weight", "5", "--grad-weight", "1", "--gan-start", "1", "--threads", "1"], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "ft" / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 2] and all(0.03 < r["c555"] < 0.2 and r["l1"] < 0.05 for r in rows)
    assert rows[0]["tree_555"] > 50 and {"arcade_555", "branch_555"} <= set(rows[0])  # the 555 nm structure
    _, new = load_checkpoint(tmp_path / "ft" / "final")
    _, old = load_checkpoint(resolve_model("default"))
    assert all(torch.equal(new["unet"][k], v) for k, v in old["unet"].items())
    frozen = [k for k in old["vqgan"] if k.startswith(("encoder.", "pre_quant.", "codebook."))]
    assert frozen and all(torch.equal(new["vqgan"][k], old["vqgan"][k]) for k in frozen)
    assert any(not torch.equal(new["vqgan"][k], old["vqgan"][k]) for k in old["vqgan"] if k.startswith("decoder."))
    import retina_fast

    assert retina_fast.load(str(tmp_path / "ft" / "final")).sample(1, 2, seed=0).shape == (1, 16, 128, 128)
    assert (tmp_path / "ft" / "recon_555.png").is_file()
    for bad_args, msg in ((["--out", "ft"], "exists: choose another --out"),
                          (["--out", "g", "--vessel-weight", "0.5"], "--vessel-weight must be >= 1"),
                          (["--out", "g", "--model", str(tmp_path / "none")], "neither a packaged ldm model")):
        bad = _run([script, *bad_args], tmp_path)
        assert bad.returncode == 2 and msg in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "g").exists()  # refused before anything is written
