"""Trainers (``retina-fast train vqgan|ldm``): exact resume, DDP equivalence, checkpoints, CLI errors.

Everything runs on a tiny model (32x32x16 images, f = 8, 32 codes, U-Net base 16) for a few steps. The
epoch is 2 steps long (8 images, batch 4), so K-Means runs at steps 0, 2, 4 and resume crosses it;
the GAN starts at step 2.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from retina_fast.cli import main
from retina_fast.modelzoo import load_ldm
from retina_fast.schedules import cosine_schedule
from retina_fast.training import reference_sample

TINY_JSON = json.dumps({
    "vqgan": {"image_size": 32, "f": 8, "base_channels": 8, "latent_channels": 4, "codebook_size": 32,
              "disc_channels": 8, "gan_warmup_steps": 2, "kmeans_iters": 5, "dec_res_blocks": 1},
    "unet": {"base_channels": 16, "channel_mults": [1, 2], "attn_heads": 2, "attn_head_dim": 8},
})
COMMON = ["--config-json", TINY_JSON, "--batch-size", "4", "--num-images", "8", "--log-every", "1",
          "--sample-every", "0", "--ckpt-every", "2", "--device", "cpu"]
VQ = ["train", "vqgan", *COMMON, "--kmeans-images", "4"]


def _ldm_args(vq_run) -> list[str]:
    return ["train", "ldm", *COMMON, "--vqgan", str(vq_run), "--ema-start", "1", "--sample-steps", "3"]


def _state(run, step: int, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step_{step:08d}" / f"{name}.safetensors"))


def _assert_same(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=lambda m: f"{k}: {m}")


def _assert_close_adam(a: dict, b: dict, lr: float) -> None:
    """Weights after a few Adam steps from slightly differently rounded gradients: Adam's m / sqrt(v) is
    ~sign(g) early on, so a weight whose gradient is at rounding level (e.g. a conv bias right before a
    GroupNorm) may move by up to 2 lr more or less per step; all but 1 % of all weights agree to 1e-5."""
    assert a.keys() == b.keys()
    far = total = 0
    for k in a:
        diff = (a[k].double() - b[k].double()).abs()
        assert diff.max() <= 2 * lr, f"{k}: max |diff| {float(diff.max()):.3g}"
        far, total = far + int((diff > 1e-5).sum()), total + diff.numel()
    assert far <= 0.01 * total, f"{far} of {total} weights differ by more than 1e-5"


def _losses(run, column: str = "loss") -> list[float]:
    import csv

    with open(run / "log.csv", newline="") as fh:
        return [float(r[column]) for r in csv.DictReader(fh) if r[column]]


@pytest.fixture(scope="module")
def vq_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("train") / "vq"
    assert main([*VQ, "--out", str(run), "--steps", "4"]) == 0
    return run


@pytest.fixture(scope="module")
def ldm_run(vq_run):
    run = vq_run.parent / "ldm"
    assert main([*_ldm_args(vq_run), "--out", str(run), "--steps", "4", "--sample-every", "4"]) == 0
    return run


def test_vqgan_resume_is_exact(vq_run, tmp_path):
    run = tmp_path / "vq"
    assert main([*VQ, "--out", str(run), "--steps", "2"]) == 0
    assert main([*VQ, "--out", str(run), "--steps", "4", "--resume"]) == 0
    for name in ("vqgan", "disc", "optim_g", "optim_d", "rng"):
        _assert_same(_state(run, 4, name), _state(vq_run, 4, name))
    assert (run / "log.csv").read_text().count("\n") == 5      # header + 4 rows, no duplicates
    assert int(_state(run, 4, "vqgan")["codebook.kmeans_epoch"]) == 1


def test_ldm_resume_is_exact_and_final_loads(ldm_run, vq_run, tmp_path):
    run = tmp_path / "ldm"
    args = _ldm_args(vq_run)
    assert main([*args, "--out", str(run), "--steps", "2"]) == 0
    assert main([*args, "--out", str(run), "--steps", "4", "--resume"]) == 0
    for name in ("unet", "ema", "optim_unet", "rng"):
        _assert_same(_state(run, 4, name), _state(ldm_run, 4, name))
    ldm = load_ldm(ldm_run / "final")
    assert ldm.config.latent_shape == (4, 4, 4) and ldm.meta["kind"] == "ldm"
    prov = ldm.meta["provenance"]
    assert prov["steps"] == 4 and "phantom" in prov["data"] and "retina-fast train ldm" in prov["command"]
    assert prov["vqgan"]["sha256"] == json.loads((vq_run / "final" / "config.json").read_text())[
        "weights"]["vqgan"]["sha256"]
    # --latent-quantile 0.005 (the default): the latent range is the 0.5 % / 99.5 % quantiles of the cached
    # training latents (torch.quantile as the independent reference), not the codebook's min / max
    (cache,) = (ldm_run / "cache").glob("latents_raw_*.safetensors")
    flat = load_file(str(cache))["latents"].flatten().double()
    want = torch.quantile(flat, torch.tensor([0.005, 0.995], dtype=torch.float64), interpolation="nearest")
    torch.testing.assert_close(torch.tensor(ldm.latent_range, dtype=torch.float64), want, rtol=0, atol=1e-6)
    assert ldm.latent_asinh is None and ldm.clip_x0 is True
    # the recorded commands parse again (lists such as --betas written as the CLI reads them)
    import shlex

    from retina_fast.cli import build_parser
    for cmd in (prov["command"], prov["vqgan"]["command"]):
        argv = shlex.split(cmd)[1:]
        build_parser(argv).parse_args(argv)
    ema = _state(ldm_run, 4, "ema")
    for k, v in ldm.unet.state_dict().items():
        assert torch.equal(v, ema[k])
    cubes = reference_sample(2, steps=3, model=ldm_run / "final")
    assert cubes.shape == (2, 16, 32, 32) and 0 <= cubes.min() and cubes.max() <= 1
    assert (ldm_run / "samples" / "step_00000004.png").stat().st_size > 1000
    header = (ldm_run / "log.csv").read_text().splitlines()[0]
    assert header.startswith("step,epoch,loss")


def test_ldm_trains_on_a_folder_of_cubes(vq_run, tmp_path):
    """--data DIR (the user's own cubes): nothing is rendered, so the run directory has no cache folder yet
    when the latents are cached (this failed after encoding, at the first save)."""
    import numpy as np

    data = tmp_path / "cubes"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        np.save(data / f"eye_{i}.npy", rng.uniform(0.01, 0.6, (16, 32, 32)).astype(np.float32))
    run = tmp_path / "ldm"
    assert main([*_ldm_args(vq_run), "--data", str(data), "--out", str(run), "--steps", "2"]) == 0
    assert (run / "final" / "config.json").is_file() and list((run / "cache").glob("latents_raw_*"))
    prov = json.loads((run / "final" / "config.json").read_text())["provenance"]
    assert str(data) in prov["data"] and "8 cubes" in prov["data"]


def test_ldm_on_a_packaged_model_keeps_the_vqgan_chain(ldm_run, tmp_path):
    """--vqgan naming a sampling checkpoint (an LDM final/, as when the shipped U-Net is retrained on the
    shipped VQ-GAN): the provenance names that LDM run and keeps its record of the VQ-GAN's own training."""
    run = tmp_path / "ldm2"
    assert main([*_ldm_args(ldm_run / "final"), "--out", str(run), "--steps", "1", "--sample-every", "0"]) == 0
    doc = json.loads((ldm_run / "final" / "config.json").read_text())
    first = doc["provenance"]
    rec = json.loads((run / "final" / "config.json").read_text())["provenance"]["vqgan"]
    assert rec["path"] == str(ldm_run / "final") and rec["sha256"] == doc["weights"]["vqgan"]["sha256"]
    assert rec["taken_from_ldm"] == {"steps": first["steps"], "command": first["command"]}
    assert rec["vqgan"] == first["vqgan"] and "retina-fast train vqgan" in rec["vqgan"]["command"]


def test_cli_errors(vq_run, tmp_path, capsys):
    assert main([*VQ, "--out", str(vq_run), "--steps", "4"]) == 2          # would clobber a run
    assert "--resume" in capsys.readouterr().err
    assert main([*VQ, "--out", str(vq_run), "--steps", "4", "--resume", "--batch-size", "2"]) == 2
    assert "batch-size" in capsys.readouterr().err
    assert main([*VQ, "--out", str(tmp_path / "a"), "--resume"]) == 2
    assert main([*VQ, "--out", str(tmp_path / "b"), "--data", str(tmp_path / "missing")]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert main(["train", "ldm", *COMMON, "--out", str(tmp_path / "c")]) == 2
    assert "--vqgan" in capsys.readouterr().err
    assert main([*VQ, "--out", str(tmp_path / "d"), "--steps", "0"]) == 2
    assert main([*VQ, "--out", str(tmp_path / "e"), "--preset", "huge"]) == 2
    assert "unknown preset" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "vqgan" in capsys.readouterr().out


def _ddp_worker(rank: int, world: int, init_file: str, argv: list[str]) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        assert main(argv) == 0
    finally:
        dist.destroy_process_group()


def _spawn(argv: list[str], init_file) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(init_file), argv), nprocs=2, join=True)


@pytest.mark.slow
def test_ddp_two_processes_match_one(vq_run, ldm_run, tmp_path):
    """2 gloo processes x 2 images == 1 process x 4 images (same global batch), for both trainers.
    The discriminator uses GroupNorm here: BatchNorm statistics depend on the per-rank batch.
    The gradient all-reduce sums in another order, so weights agree as ``_assert_close_adam`` describes
    and the logged losses agree to float32 rounding. The VQ-GAN runs with --normalise global: with this
    tiny random model one latent vector of the per-band-normalised data sits within rounding of two codes
    and flips its EMA assignment between the two summation orders (a tie, not a DDP difference); both
    runs store identical per-band statistics (test_vqgan_stores_per_band_normalisation_of_its_data)."""
    one, two = tmp_path / "one", tmp_path / "two"
    vq = [*VQ, "--steps", "4", "--disc-norm", "group", "--normalise", "global"]
    assert main([*vq, "--out", str(one)]) == 0
    _spawn([*vq, "--out", str(two)], tmp_path / "init_vq")
    for name in ("vqgan", "disc"):
        _assert_close_adam(_state(one, 4, name), _state(two, 4, name), lr=3e-4)
    for column in ("l1", "loss", "d_loss"):
        assert _losses(two, column) == pytest.approx(_losses(one, column), rel=1e-5)
    _spawn([*VQ, "--steps", "1", "--out", str(tmp_path / "band")], tmp_path / "init_band")
    band = json.loads((tmp_path / "band" / "final" / "config.json").read_text())["normalisation"]
    assert band["per_band"] and band == json.loads((vq_run / "final" / "config.json").read_text())["normalisation"]
    _spawn([*_ldm_args(vq_run), "--steps", "4", "--out", str(tmp_path / "ldm2")], tmp_path / "init_ldm")
    for name in ("unet", "ema"):
        _assert_close_adam(_state(ldm_run, 4, name), _state(tmp_path / "ldm2", 4, name), lr=1e-4)
    assert _losses(tmp_path / "ldm2") == pytest.approx(_losses(ldm_run), rel=1e-5)


def test_vqgan_band_weights_std(tmp_path):
    """--band-weights std stores 1/std per band (mean 1) of the training data in the run's architecture."""
    import json

    from safetensors.torch import load_file

    run = tmp_path / "bw"
    assert main([*VQ, "--out", str(run), "--steps", "1", "--band-weights", "std", "--normalise", "global"]) == 0
    cfg = json.loads((run / "final" / "config.json").read_text())
    w = torch.tensor(cfg["architecture"]["vqgan"]["band_loss_weights"], dtype=torch.float64)
    imgs = 2 * load_file(str(next((run / "cache").glob("*.safetensors"))))["images"].double() - 1  # model units
    std = imgs.transpose(0, 1).reshape(16, -1).std(dim=1)
    expected = (1 / std) / (1 / std).mean()
    torch.testing.assert_close(w, expected, atol=1e-5, rtol=0)
    assert float(w.max() / w.min()) > 1.5          # the phantom's bands differ in spread


def test_vqgan_stores_per_band_normalisation_of_its_data(vq_run, tmp_path):
    """--normalise band (the default): the final config standardises each band with the training data's
    mean and std inside the field of view; --normalise global keeps 2 r - 1."""
    from retina_fast.checkpoint import load_checkpoint
    from retina_fast.data import PhantomDataset
    from retina_fast.models import LDMConfig
    from retina_fast.models.normalisation import band_statistics

    doc, _ = load_checkpoint(vq_run / "final", [])
    cfg = LDMConfig.from_dict(doc["architecture"]).vqgan
    assert cfg.per_band_normalisation and doc["normalisation"]["per_band"]
    r = torch.stack([PhantomDataset(8, 32, out_range=None)[i] for i in range(8)])
    mean, std = band_statistics([r.half().float()])  # the trainer caches the phantoms as float16
    torch.testing.assert_close(torch.tensor(cfg.reflectance_scale), 1 / torch.tensor(std), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(cfg.reflectance_shift), -torch.tensor(mean) / torch.tensor(std),
                               rtol=1e-5, atol=1e-6)
    run = tmp_path / "global"
    assert main([*VQ, "--out", str(run), "--steps", "1", "--normalise", "global", "--betas", "0.9,0.99"]) == 0
    doc, _ = load_checkpoint(run / "final", [])
    assert doc["normalisation"]["reflectance_scale"] == 2.0 and doc["normalisation"]["per_band"] is False
    assert main([*VQ, "--out", str(run), "--steps", "2", "--resume", "--betas", "0.5,0.9"]) == 2


def test_ldm_logsnr_shift_auto(vq_run, tmp_path, capsys):
    """--logsnr-shift auto: D = -log(var) of the scaled (clamped) training latents, recorded in config.json and
    in the reproducing command as a number; the loaded schedule is the shifted one; bad values exit 2."""
    import math

    from retina_fast.models.vqgan import scale_latent

    run = tmp_path / "ldm"
    assert main([*_ldm_args(vq_run), "--out", str(run), "--steps", "2", "--logsnr-shift", "auto"]) == 0
    ldm = load_ldm(run / "final")
    (cache,) = (run / "cache").glob("latents_raw_*.safetensors")
    lo, hi = ldm.latent_range
    scaled = scale_latent(load_file(str(cache))["latents"], lo, hi).clamp(-1, 1).double()
    want = -math.log(float(scaled.var()))
    assert abs(ldm.config.logsnr_shift - want) < 1e-4
    doc = json.loads((run / "final" / "config.json").read_text())
    assert f"--logsnr-shift {ldm.config.logsnr_shift}" in doc["provenance"]["command"]
    assert ldm.schedule.alphas_cumprod[500] > cosine_schedule(1000).alphas_cumprod[500]
    with pytest.raises(SystemExit) as bad:
        main([*_ldm_args(vq_run), "--out", str(tmp_path / "bad"), "--steps", "1", "--logsnr-shift", "nan"])
    assert bad.value.code == 2 and "--logsnr-shift" in capsys.readouterr().err


def test_ldm_loss_l2(vq_run, tmp_path, capsys):
    """--loss l2: the same first step (same init, latents, t and eps) logs the mean squared error where l1
    logs the mean absolute error, so by Jensen l2 >= l1^2 and the two differ; the choice is in the reproducing
    command and a resume cannot change it."""
    import csv

    losses = {}
    for kind in ("l1", "l2"):
        run = tmp_path / kind
        assert main([*_ldm_args(vq_run), "--out", str(run), "--steps", "2", "--loss", kind]) == 0
        with open(run / "log.csv") as f:
            losses[kind] = float(next(csv.DictReader(f))["loss"])
        doc = json.loads((run / "final" / "config.json").read_text())
        assert f"--loss {kind}" in doc["provenance"]["command"]
    assert losses["l2"] >= losses["l1"] ** 2 and abs(losses["l2"] - losses["l1"]) > 1e-3, losses
    assert main([*_ldm_args(vq_run), "--out", str(tmp_path / "l2"), "--steps", "3", "--resume",
                 "--loss", "l1"]) == 2
    assert "--loss" in capsys.readouterr().err


def test_ldm_loss_l2_balanced_resumes_exactly_and_scales_by_bin(vq_run, tmp_path):
    """--loss l2-balanced: each bin's running mean square is in the train state (a 2 + 2 step resume equals 4
    straight steps, weights and scales), the visited bins hold positive values and the others stay at 1, and the
    objective divides each sample's mean square by its bin's RMS (checked against a direct computation)."""
    from retina_fast.training.train_ldm import BinnedErrorScale

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = [*_ldm_args(vq_run), "--loss", "l2-balanced"]
    assert main([*args, "--out", str(straight), "--steps", "4"]) == 0
    assert main([*args, "--out", str(resumed), "--steps", "2"]) == 0
    assert main([*_ldm_args(vq_run), "--out", str(resumed), "--steps", "4", "--resume"]) == 0
    for name in ("unet", "loss_scale"):
        _assert_same(_state(straight, 4, name), _state(resumed, 4, name))
    ms, seen = _state(straight, 4, "loss_scale")["mean_square"], _state(straight, 4, "loss_scale")["seen"]
    assert int(seen.sum()) == 16 and bool((ms[seen > 0] > 0).all()) and bool((ms[seen == 0] == 1).all())

    scale = BinnedErrorScale(1000, bins=4, decay=0.5)
    err = torch.randn(3, 2, 4, 4)
    t = torch.tensor([0, 999, 10])  # bins 0, 3, 0
    got = scale.loss(err, t)
    per = err.square().flatten(1).mean(1)
    first = per[[0, 2]].mean()
    assert torch.allclose(scale.mean_square[[0, 3]], torch.stack([first, per[1]]).double())
    want = torch.stack([per[0] / first.sqrt(), per[1] / per[1].sqrt(), per[2] / first.sqrt()]).mean()
    assert torch.allclose(got, want)
    scale.loss(err[:1], t[:1])  # a second visit of bin 0 mixes by the decay
    assert torch.allclose(scale.mean_square[0], (0.5 * first + 0.5 * per[0]).double())


def test_ldm_vessel_weight_masks_weights_and_refusals(vq_run, tmp_path, capsys):
    """--vessel-weight W: the vessel fractions are the renders' artery | vein average-pooled to the latent grid,
    the weights are 1 + (W - 1) * fraction scaled to mean 1 per sample, W = 1 leaves the objective as it was, the
    choice is in the reproducing command, and bad values or non-phantom data are refused with the reason."""
    import torch.nn.functional as F

    from retina_fast import phantom
    from retina_fast.models.config import VQGANConfig
    from retina_fast.training.train_ldm import _entry_weights, latent_vessel_fraction

    class Main:
        is_main = True

        def barrier(self):
            pass

    cfg = VQGANConfig(image_size=32, f=4, base_channels=8, latent_channels=4, codebook_size=8)
    frac = latent_vessel_fraction(3, cfg, Main(), tmp_path / "m")
    assert frac.shape == (3, 1, 8, 8) and frac.dtype == torch.float32
    m = phantom.render(2, 32).masks
    want = F.avg_pool2d((m["artery"] | m["vein"]).float()[None, None], 4)[0]
    assert torch.equal(frac[2], want) and 0 < float(frac.mean()) < 1
    assert torch.equal(latent_vessel_fraction(3, cfg, Main(), tmp_path / "m"), frac)  # from the cache
    w = _entry_weights(frac, 5.0)
    assert torch.allclose(w.mean(dim=(1, 2, 3)), torch.ones(3))
    raw = 1 + 4 * frac  # proportional to the unnormalised weights in every sample
    assert torch.allclose(w / raw, (w / raw).flatten(1)[:, :1, None, None].expand_as(w))
    assert torch.equal(_entry_weights(frac, 1.0), torch.ones(3, 1, 8, 8))

    run = tmp_path / "vw"
    assert main([*_ldm_args(vq_run), "--out", str(run), "--steps", "2", "--loss", "l2-balanced",
                 "--vessel-weight", "4"]) == 0
    doc = json.loads((run / "final" / "config.json").read_text())
    assert "--vessel-weight 4" in doc["provenance"]["command"] and "1 + 3 x (vessel" in doc["provenance"]["data"]
    for bad, needle in ((["--vessel-weight", "0.5"], "--vessel-weight must be"),
                        (["--vessel-weight", "nan"], "--vessel-weight must be"),
                        (["--vessel-weight", "2", "--data", str(tmp_path)], "needs --data phantom")):
        capsys.readouterr()
        assert main([*_ldm_args(vq_run), "--out", str(tmp_path / "bad"), "--steps", "1", *bad]) == 2
        assert needle in capsys.readouterr().err


def test_ldm_latent_asinh_range_and_config(vq_run, tmp_path, capsys):
    """--latent-asinh C: the range is the companded quantiles (asinh is monotone, so asinh(q(z) / C)), the
    scaled training latents are scale_latent(z, lo, hi, C), and config.json carries latent_asinh."""
    import math

    run = tmp_path / "ldm"
    assert main([*_ldm_args(vq_run), "--out", str(run), "--steps", "2", "--latent-asinh", "0.5",
                 "--latent-quantile", "0.01"]) == 0
    ldm = load_ldm(run / "final")
    assert ldm.latent_asinh == 0.5 and json.loads((run / "final" / "config.json").read_text())["latent_asinh"] == 0.5
    (cache,) = (run / "cache").glob("latents_raw_*.safetensors")
    flat = load_file(str(cache))["latents"].flatten().double()
    q = torch.quantile(flat, torch.tensor([0.01, 0.99], dtype=torch.float64), interpolation="nearest")
    want = torch.tensor([math.asinh(float(v) / 0.5) for v in q], dtype=torch.float64)
    torch.testing.assert_close(torch.tensor(ldm.latent_range, dtype=torch.float64), want, rtol=0, atol=1e-6)
    assert main([*_ldm_args(vq_run), "--out", str(tmp_path / "bad"), "--steps", "1", "--latent-asinh", "-1"]) == 2
    assert "--latent-asinh must be a finite number >= 0" in capsys.readouterr().err


def test_ldm_latent_whiten_fits_once_and_is_stored(vq_run, tmp_path, capsys):
    """--latent-whiten S: the map is fitted on the scaled training latents (their channel covariance becomes
    S^2 I), stored in config.json and the train state (a resumed run keeps it), and honoured by load_ldm."""
    from retina_fast.models.vqgan import LatentWhitening, scale_latent

    run = tmp_path / "ldm"
    args = [*_ldm_args(vq_run), "--out", str(run), "--latent-whiten", "0.05", "--latent-quantile", "0"]
    assert main([*args, "--steps", "2"]) == 0
    doc = json.loads((run / "final" / "config.json").read_text())
    ldm = load_ldm(run / "final")
    assert ldm.latent_whiten is not None and doc["latent_whiten"] == ldm.latent_whiten.to_dict()
    assert "latents whitened (std 0.05" in doc["provenance"]["data"] and "--latent-whiten 0.05" in \
        doc["provenance"]["command"]
    (cache,) = (run / "cache").glob("latents_raw_*.safetensors")
    scaled = scale_latent(load_file(str(cache))["latents"].double(), *ldm.latent_range).clamp(-1, 1)
    y = ldm.latent_whiten.apply(scaled)
    torch.testing.assert_close(ldm.unet_latents(load_file(str(cache))["latents"].double()), y.clamp(-1, 1))
    c = y.shape[1]
    torch.testing.assert_close(torch.cov(y.transpose(0, 1).reshape(c, -1)), 0.0025 * torch.eye(c, dtype=y.dtype),
                               rtol=0, atol=1e-6)
    assert main([*args, "--steps", "3", "--resume"]) == 0
    assert json.loads((run / "final" / "config.json").read_text())["latent_whiten"] == doc["latent_whiten"]
    assert isinstance(LatentWhitening(**doc["latent_whiten"]), LatentWhitening)
    for bad in ("-0.1", "nan", "2"):
        capsys.readouterr()
        assert main([*_ldm_args(vq_run), "--out", str(tmp_path / "bad"), "--steps", "1", "--latent-whiten", bad]) == 2
        assert "--latent-whiten must be a number in [0, 1]" in capsys.readouterr().err


def test_provenance_names_the_code_a_run_started_with(tmp_path, monkeypatch):
    """A commit made while a run trains (or before it is resumed) does not change the commit its final
    provenance names: every train-state checkpoint carries the first one's code."""
    from retina_fast.training import trainer as TR

    net = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(net.parameters())
    states = iter([{"git_commit": "a" * 40, "git_dirty": False}, {"git_commit": "b" * 40, "git_dirty": True}])
    monkeypatch.setattr(TR, "code_state", lambda: next(states))
    TR.save_train_state(tmp_path, 1, {"m": net}, {"o": opt}, {})
    TR.save_train_state(tmp_path, 2, {"m": net}, {"o": opt}, {})  # the tree is at "b" now
    assert TR.run_code_state(tmp_path) == {"git_commit": "a" * 40, "git_dirty": False}
    prov = TR.provenance({}, 2, "data", "cmd", run_dir=tmp_path)
    assert (prov["git_commit"], prov["git_dirty"]) == ("a" * 40, False)
    monkeypatch.setattr(TR, "code_state", lambda: {"git_commit": "c" * 40, "git_dirty": None})
    assert TR.provenance({}, 2, "data", "cmd")["git_commit"] == "c" * 40  # no run: the tree's now
    assert TR.run_code_state(tmp_path / "none") is None
