"""Blur read off the field-of-view edge and undone (``retina_fast.deblur``), as the enhancer's first step
(config.json ``deblur``, ``enhance(..., deblur=)``, ``retina-fast enhance --deblur``)."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from retina_fast import deblur as D
from retina_fast.checkpoint import CheckpointError
from retina_fast.enhance import enhance, load_enhancer, resolve_enhancer, unload_enhancer
from retina_fast.fov import fov_mask
from retina_fast.metrics import psnr
from retina_fast.training import enhance_kinds
from retina_fast.training.degrade import degrade, gaussian_blur


def _disc(h: int, w: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A fundus-like test image: a textured disc (smooth shading, thin dark lines) on black whose edge is
    anti-aliased over 1.5 px, like a resized photograph's, (3, h, w), and its FOV (h, w) bool."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    r = 0.45 * min(h, w)
    cover = ((r - torch.sqrt((yy + 0.5 - h / 2) ** 2 + (xx + 0.5 - w / 2) ** 2)) / 1.5 + 0.5).clamp(0, 1)
    base = 0.5 + 0.1 * torch.sin(xx / 23.0) * torch.cos(yy / 31.0)
    lines = sum(torch.exp(-((xx - w / 2) * math.cos(a) + (yy - h / 2) * math.sin(a) - off) ** 2 / 2.0)
                for a, off in zip((math.pi * torch.rand(4, generator=g)).tolist(),
                                  (0.6 * r * (torch.rand(4, generator=g) - 0.5)).tolist()))  # four thin vessels
    img = ((torch.stack([base * 0.9, base * 0.5, base * 0.3]) - 0.15 * lines).clamp(0, 1) * cover).float()
    return img, fov_mask(img)


def _box_blurred(img: torch.Tensor, fov: torch.Tensor, kw: int, kh: int) -> torch.Tensor:
    """Cofe-Net's blur at a large σ (a nearly flat kernel), then the FOV cut and 8-bit levels, as ``degrade``."""
    y = gaussian_blur(img[None], (kw, kh), 40.0)[0] * fov
    return (y * 255).round() / 255


@pytest.mark.parametrize("shape,kw,kh", [((301, 333), 3, 5), ((256, 256), 7, 3), ((400, 361), 5, 5),
                                         ((512, 480), 9, 7)])
def test_the_box_width_is_read_off_the_field_of_view_edge(shape, kw, kh):
    img, fov = _disc(*shape)
    est = D.estimate_blur(_box_blurred(img, fov, kw, kh), fov)
    assert (est.width, est.height) == (kw, kh), est
    assert est.blurred and min(est.agreement) >= 0.85


def test_a_sharp_edge_reads_as_no_blur_and_the_image_passes_bit_for_bit():
    img, fov = _disc(257, 300)
    img = (img * 255).round() / 255
    out, ests = D.deblur(img[None], fov[None])
    assert not ests[0].blurred and ests[0].reason == "the field-of-view edge is sharp"
    assert torch.equal(out[0], img)


def test_an_edge_that_is_not_a_blurred_step_is_left_alone():
    """A light leak on one side only (as Cofe-Net's halo) makes the sides disagree: nothing is done, though the
    image is blurred."""
    img, fov = _disc(300, 300)
    xx = torch.arange(300, dtype=torch.float32)[None, :].expand(300, 300)
    leak = 0.6 * torch.exp(-(xx - 15) / 8.0).clamp(max=1)  # brightens the left rim, spreading inwards
    x = _box_blurred(((img + leak) * fov).clamp(0, 1), fov, 5, 5)
    est = D.estimate_blur(x, fov)
    assert not est.blurred and "disagree" in est.reason
    assert D.estimate_blur(_box_blurred(img, fov, 5, 5), fov).blurred  # the same blur without the leak is seen


@pytest.mark.parametrize("side", [1411, 1024, 768, 512, 256])
def test_the_clean_photograph_reads_as_sharp_at_every_size(side):
    """The photograph's own edge is an optical feature: ~1.5 px soft at 512 px, ~4 px at its full 1411 px. With a
    fixed 1.5 px the full-size clean photograph read as a 3-px blur and was 'deblurred'; the softness is now
    scaled with the size above 512 px."""
    from retina_fast.training.enhance_data import real_image

    img = real_image()
    if side != img.shape[-1]:
        img = F.interpolate(img[None], size=(side, side), mode="bilinear", antialias=True, align_corners=False)[0]
    img = (img.clamp(0, 1) * 255).round() / 255
    est = D.estimate_blur(img, fov_mask(img))
    assert not est.blurred, est


def test_a_large_photograph_is_read_at_512_px_and_deblurred_at_its_own_size():
    """The real photograph at 1024 px blurred by Cofe-Net (validation seed 10: an 11 × 11 box at this size): read
    on a 512-px copy (5 × 5 there), scaled back to 9 × 9, deconvolved at 1024 px: the photograph gets closer to the
    clean one."""
    from retina_fast.training.enhance_data import real_image

    clean = F.interpolate(real_image()[None], size=(1024, 1024), mode="bilinear", antialias=True,
                          align_corners=False).clamp(0, 1)
    clean = (clean * 255).round() / 255
    x, p = degrade(clean, seed=10, kinds=("blur",), return_params=True)
    x = (x * 255).round() / 255
    truth = tuple(p[0]["blur"]["ksize"])
    out, ests = D.deblur(x, fov_mask(x))
    est = ests[0]
    assert est.blurred and "read at 512×512 px" in est.reason
    assert abs(est.width - truth[0]) <= 2 and abs(est.height - truth[1]) <= 2, (est, truth)
    assert psnr(out, clean).item() > psnr(x, clean).item() + 1.0


def test_no_field_of_view_edge_inside_the_frame_means_nothing_is_done():
    x = torch.rand(3, 64, 80)
    est = D.estimate_blur(x, torch.ones(64, 80, dtype=torch.bool))
    assert not est.blurred and "no field-of-view edge" in est.reason


def _tikhonov_reference(y: np.ndarray, kw: int, kh: int, lam: float) -> np.ndarray:
    """Independent float64 closed form on a reflect-padded copy, written with numpy."""
    h, w = y.shape
    ph, pw = min(h - 1, max(8, 2 * kh)), min(w - 1, max(8, 2 * kw))
    yp = np.pad(y, ((ph, ph), (pw, pw)), mode="reflect")
    H, W = yp.shape
    k = np.zeros((H, W))
    k[:kh, :kw] = 1.0 / (kw * kh)
    K = np.fft.fft2(np.roll(k, (-(kh // 2), -(kw // 2)), (0, 1)))
    fy, fx = np.fft.fftfreq(H)[:, None], np.fft.fftfreq(W)[None, :]
    lap = (2 - 2 * np.cos(2 * np.pi * fx)) + (2 - 2 * np.cos(2 * np.pi * fy))
    u = np.real(np.fft.ifft2(np.fft.fft2(yp) * np.conj(K) / (np.abs(K) ** 2 + lam * lap ** 2)))
    return u[ph:ph + h, pw:pw + w]


@pytest.mark.parametrize("h,w,kw,kh,lam", [(37, 53, 3, 5, 0.02), (64, 41, 7, 1, 0.005), (30, 30, 1, 3, 0.1)])
def test_the_closed_form_matches_a_numpy_reference(h, w, kw, kh, lam):
    y = torch.rand(2, h, w, generator=torch.Generator().manual_seed(h * w))
    got = D.deconvolve_box(y, kw, kh, lam)
    for i in range(2):
        np.testing.assert_allclose(got[i].numpy(), _tikhonov_reference(y[i].double().numpy(), kw, kh, lam),
                                   atol=2e-5)


def test_the_masked_deconvolution_converges_to_the_dense_solution():
    """||M(k * u) − M y||² + λ||Δu||² on a tiny image, solved densely (the same padded periodic operators, as
    matrices): conjugate gradients reach it."""
    h, w, kw, kh, lam = 9, 11, 3, 5, 0.02
    g = torch.Generator().manual_seed(1)
    y = torch.rand(h, w, generator=g)
    fov = torch.rand(h, w, generator=g) > 0.3
    ph, pw = max(8, 2 * kh), max(8, 2 * kw)
    H, W = h + 2 * ph, w + 2 * pw
    n = H * W
    eye = torch.eye(n, dtype=torch.float64).reshape(n, H, W)

    def circ(x, kernel):
        return torch.fft.irfft2(torch.fft.rfft2(x) * kernel, s=(H, W))

    k = torch.zeros(H, W, dtype=torch.float64)
    k[:kh, :kw] = 1.0 / (kw * kh)
    kf = torch.fft.rfft2(torch.roll(k, (-(kh // 2), -(kw // 2)), (0, 1)))
    fy = torch.fft.fftfreq(H, dtype=torch.float64)[:, None]
    fx = torch.fft.rfftfreq(W, dtype=torch.float64)[None, :]
    lapf = (2 - 2 * torch.cos(2 * math.pi * fx)) + (2 - 2 * torch.cos(2 * math.pi * fy))
    A = circ(eye, kf).reshape(n, n).T  # columns: the blur of each unit image
    L = circ(eye, lapf).reshape(n, n).T
    m = F.pad(fov.double(), (pw, pw, ph, ph)).reshape(n)
    yp = F.pad(y.double(), (pw, pw, ph, ph)).reshape(n)
    normal = A.T @ (m[:, None] * A) + lam * L.T @ L
    want = torch.linalg.solve(normal, A.T @ (m * yp)).reshape(H, W)[ph:ph + h, pw:pw + w]
    got = D.deconvolve_box(y, kw, kh, lam, fov=fov, iterations=1000)  # a random mask: badly conditioned
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=0)
    few = D.deconvolve_box(y, kw, kh, lam, fov=fov, iterations=0)
    assert (few.double() - want).abs().max() > 10 * (got.double() - want).abs().max()  # the iterations matter


def test_deconvolve_box_refuses_even_widths():
    with pytest.raises(ValueError, match="odd"):
        D.deconvolve_box(torch.rand(10, 10), 4, 3)


@pytest.mark.parametrize("doc,needle", [("on", "must be an object"), ({"lamda": 0.1}, "unknown keys"),
                                        ({"lambda": 0}, "deblur.lambda"), ({"lambda": float("nan")}, "deblur.lambda"),
                                        ({"min_agreement": 2}, "deblur.min_agreement"),
                                        ({"native_width": True}, "deblur.native_width")])
def test_bad_settings_are_named(doc, needle):
    with pytest.raises(ValueError, match=needle):
        D.check_deblur_config(doc)


# ----------------------------------------------------------------------------- in the enhancer


@pytest.fixture(scope="module")
def blurred():
    """The real photograph at 256 px, clean and blurred by Cofe-Net (validation seed 10: a 3 × 3 box here)."""
    clean = enhance_kinds.clean_real(256)
    x = (degrade(clean, seed=10, kinds=("blur",)) * 255).round() / 255
    return clean, x


def test_the_shipped_default_deblurs_and_its_setting_was_chosen_on_validation():
    first = load_enhancer("default")
    assert first.deblur == D.check_deblur_config(first.meta["deblur"])
    sel = first.meta["provenance"]["deblur_selection"]
    assert "--choose-deblur" in sel["command"] and "seeds [10, 11" in sel["validation"]
    assert first.deblur["lambda"] >= enhance_kinds.RING_FREE_LAMBDA
    assert load_enhancer("magenet-spots").deblur is None  # only before the first network


def test_enhance_deblurs_a_blurred_photograph_and_leaves_a_sharp_one(blurred):
    clean, x = blurred
    on, off = enhance(x, backend="torch"), enhance(x, backend="torch", deblur=False)
    assert psnr(on, clean).item() > psnr(off, clean).item() + 0.5
    assert torch.equal(enhance(clean, backend="torch"), enhance(clean, backend="torch", deblur=False))
    est = D.estimate_blur(x[0], fov_mask(x[0]))
    # deblur=True with the checkpoint's settings, a dict overrides them
    torch.testing.assert_close(enhance(x, backend="torch", deblur=True), on, rtol=0, atol=0)
    stronger = enhance(x, backend="torch", deblur={"lambda": 0.5})
    assert est.blurred and not torch.equal(stronger, on)


@pytest.mark.parametrize("value,err", [("yes", TypeError), (1, TypeError), ({"lambda": -1.0}, ValueError)])
def test_enhance_refuses_a_bad_deblur_argument(blurred, value, err):
    with pytest.raises(err, match="deblur"):
        enhance(blurred[1], backend="torch", deblur=value)


def test_a_bad_deblur_entry_in_config_json_is_named(tmp_path):
    d = tmp_path / "m"
    shutil.copytree(resolve_enhancer("default"), d)
    doc = json.loads((d / "config.json").read_text())
    doc["deblur"] = {"lambda": "strong"}
    (d / "config.json").write_text(json.dumps(doc))
    unload_enhancer(str(d))
    with pytest.raises(CheckpointError, match="deblur.lambda") as e:
        load_enhancer(str(d))
    assert str(d / "config.json") in str(e.value)


def test_write_deblur_records_a_setting_that_loads(tmp_path):
    d = tmp_path / "m"
    shutil.copytree(resolve_enhancer("default"), d)
    rows = [{"lambda": None, "mean_blur_gain_left": 0.0}, {"lambda": 0.04, "mean_blur_gain_left": 1.0}]
    enhance_kinds.write_deblur(d, 0.04, rows, (10, 11), 0.1, "torch", 256, name=str(d))
    e = load_enhancer(str(d))
    assert e.deblur["lambda"] == 0.04 and e.meta["provenance"]["deblur_selection"]["grid"] == rows


def test_the_cli_deblur_switch_in_a_fresh_interpreter(blurred, tmp_path):
    from PIL import Image

    _, x = blurred
    img = np.round(x[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    (tmp_path / "in").mkdir()
    Image.fromarray(img).save(tmp_path / "in" / "a.png")
    outs = {}
    for mode in ("auto", "off"):
        r = subprocess.run([sys.executable, "-m", "retina_fast", "enhance", str(tmp_path / "in" / "a.png"), "--out",
                            str(tmp_path / mode), "--backend", "torch", "--deblur", mode, "-q"],
                           capture_output=True, text=True, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        outs[mode] = np.asarray(Image.open(tmp_path / mode / "a.png"))
    assert np.array_equal(outs["auto"], enhance(img, backend="torch"))
    assert np.array_equal(outs["off"], enhance(img, backend="torch", deblur=False))
    assert not np.array_equal(outs["auto"], outs["off"])
    r = subprocess.run([sys.executable, "-m", "retina_fast", "enhance", str(tmp_path / "in" / "a.png"), "--out",
                        str(tmp_path / "bad"), "--deblur", "maybe"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "--deblur" in r.stderr and not (tmp_path / "bad").exists()


def test_choose_deblur_takes_the_best_ring_free_lambda_that_harms_no_combination(monkeypatch):
    """The rule on made-up outputs: the blur row gets better as λ falls; below 0.04 the illumination row loses
    0.5 dB; 0.005 is the best for blur but below RING_FREE_LAMBDA. Expected: 0.04."""
    import retina_fast.enhance as E

    clean = torch.full((1, 3, 32, 32), 0.5)
    names = ["none", "100", "001"]
    x = torch.cat([clean, clean + 0.02, clean - 0.2])
    monkeypatch.setattr(enhance_kinds, "kind_inputs", lambda size, seeds: (names, x, clean))

    def fake_enhance(batch, *, deblur, **_):
        lam = None if deblur is False else deblur["lambda"]
        err = {None: 0.02, 0.005: 0.001, 0.01: 0.002, 0.02: 0.004, 0.04: 0.008, 0.08: 0.016}[lam]
        out = [clean[0] + (err if n == "100" else 0.0 if n == "none" else
                           -0.05 * (1.06 if lam is not None and lam < 0.04 else 1.0)) for n in names]
        return torch.stack(out)[: len(batch)]

    monkeypatch.setattr(E, "enhance", fake_enhance)
    lam, rows = enhance_kinds.choose_deblur("default", seeds=(0,))
    assert [r["lambda"] for r in rows] == [None, *enhance_kinds.DEBLUR_GRID]
    assert rows[1]["mean_blur_gain_left"] > rows[4]["mean_blur_gain_left"]  # 0.005 scores best...
    assert lam == 0.04  # ...but rings; 0.02 loses 0.5 dB on the illumination row
    lam, _ = enhance_kinds.choose_deblur("default", seeds=(0,), min_lambda=0.0, max_loss_db=1.0)
    assert lam == 0.005
