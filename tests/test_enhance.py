"""``retina_fast.enhance``: types and shapes in = out, odd sizes, FOV, tiling, backends within the stated
tolerance (err(backend) <= 2·err(eager torch at the same dtype) + 2/255 against the fp32 reference),
bad inputs, and the ``retina-fast enhance`` command."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

import retina_fast
import retina_fast.enhance as E
from retina_fast import backends
from retina_fast.checkpoint import CheckpointError, save_checkpoint
from retina_fast.models.magenet import MAGENet
from retina_fast.training.degrade import fov_mask

ATOL = 2 / 255


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    net = MAGENet()
    path = tmp_path_factory.mktemp("magenet") / "ck"
    save_checkpoint(path, {"model": net}, {"kind": "magenet", "architecture": net.config.to_dict(), "preset": "tiny"})
    return str(path)


@pytest.fixture(scope="module")
def fundus():
    from retina_fast.phantom import render

    return render(7, 61).rgb[:, :, :59]  # odd 61×59, black surround outside the field of view


def _bf16_available():
    return backends.get("cpu").usable("cpu", torch.bfloat16)


def test_module_is_callable_and_tensor_shapes(ckpt, fundus):
    one = retina_fast.enhance(fundus, model=ckpt, backend="torch")
    assert one.shape == fundus.shape and one.dtype == torch.float32
    batch = E.enhance(torch.stack([fundus, fundus.flip(-1)]).double(), model=ckpt, backend="torch")
    assert batch.shape == (2, 3, 61, 59) and batch.dtype == torch.float64
    torch.testing.assert_close(batch[0].float(), one, rtol=0, atol=1e-6)
    assert float(one.min()) >= 0 and float(one.max()) <= 1


def test_numpy_and_pil_round_trip(ckpt, fundus):
    arr = np.round(fundus.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    out = E.enhance(arr, model=ckpt, backend="torch")
    assert out.shape == arr.shape and out.dtype == np.uint8
    outs = E.enhance(np.stack([arr, arr]), model=ckpt, backend="torch")
    # eager torch is not batch invariant (~1e-7 in float), so a value at a .5 boundary may round the other way
    assert outs.shape == (2, 61, 59, 3) and np.abs(outs[0].astype(int) - out.astype(int)).max() <= 1
    f32 = E.enhance(arr.astype(np.float32) / 255, model=ckpt, backend="torch")
    assert f32.dtype == np.float32 and f32.shape == arr.shape
    pil = E.enhance(Image.fromarray(arr), model=ckpt, backend="torch")
    assert isinstance(pil, Image.Image) and pil.size == (59, 61) and pil.mode == "RGB"
    assert np.array_equal(np.asarray(pil), out)
    mixed = E.enhance([arr, Image.fromarray(arr[:40, :50])], model=ckpt, backend="torch")
    assert isinstance(mixed, list) and mixed[1].size == (50, 40)


@pytest.mark.parametrize("h,w", [(16, 16), (37, 59), (97, 33)])
def test_odd_sizes(ckpt, h, w):
    x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(h))
    assert E.enhance(x, model=ckpt, backend="torch").shape == (1, 3, h, w)


def test_field_of_view_is_preserved(ckpt, fundus):
    out = E.enhance(fundus, model=ckpt, backend="torch")
    inside = fov_mask(fundus)
    assert not inside.all() and inside.any()
    assert float(out[:, ~inside].abs().max()) == 0.0
    assert float(out[:, inside].mean()) > 0.05


def test_tiles_cover_the_image(ckpt):
    x = torch.rand(1, 3, 150, 170, generator=torch.Generator().manual_seed(1)) * 0.8 + 0.1
    whole = E.enhance(x, model=ckpt, backend="torch", tile=0)
    tiled = E.enhance(x, model=ckpt, backend="torch", tile=64)
    assert tiled.shape == whole.shape
    # Not identical (channel attention / GroupNorm see only the tile) but the same image.
    assert float((tiled - whole).abs().mean()) < 0.1
    same = E.enhance(x, model=ckpt, backend="torch", tile=256)  # one tile = the whole image
    torch.testing.assert_close(same, whole, rtol=0, atol=1e-6)


def test_work_size_makes_the_change_at_that_scale(ckpt):
    """work_size: the network runs on a copy whose shorter side is scaled to work_size (never up); its change
    out − in is resized back bilinearly and added to the full-size input, then clamped, thresholded and masked
    like a full-size output."""
    x = torch.rand(2, 3, 75, 101, generator=torch.Generator().manual_seed(3)) * 0.8 + 0.1
    full = E.enhance(x, model=ckpt, backend="torch", residual_threshold=0.0)
    for off in (None, 0, 75, 200):  # at or above the image's shorter side: the image's own size
        assert torch.equal(E.enhance(x, model=ckpt, backend="torch", residual_threshold=0.0, work_size=off), full)
    assert E.work_shape(75, 101, 40) == (40, 54) and E.work_shape(101, 75, 40) == (54, 40)
    assert E.work_shape(30, 30, 40) == (30, 30)
    net = E.load_enhancer(ckpt).model
    small = torch.nn.functional.interpolate(x, size=(40, 54), mode="bilinear", align_corners=False, antialias=True)
    pad, _ = E.pad_to_multiple(small, 8)
    with torch.no_grad():
        change = net.restore(pad)[..., :40, :54].clamp(0, 1) - small
    up = torch.nn.functional.interpolate(change, size=(75, 101), mode="bilinear", align_corners=False)
    fov = fov_mask(x).float()[:, None]
    for tau in (0.0, 0.03):
        expected = E.shrink_residual(x, (x + up).clamp(0, 1), tau) * fov
        got = E.enhance(x, model=ckpt, backend="torch", residual_threshold=tau, work_size=40)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # the input's fine detail passes through: the output minus the input is as smooth as the upsampled change
    got = E.enhance(x, model=ckpt, backend="torch", residual_threshold=0.0, work_size=40)
    assert float((got - x * fov).diff(dim=-1).abs().mean()) < 0.5 * float((full - x * fov).diff(dim=-1).abs().mean())
    for bad, exc in ((8, ValueError), (True, TypeError), (40.0, TypeError)):
        with pytest.raises(exc, match="work_size"):
            E.enhance(x, model=ckpt, backend="torch", work_size=bad)


def _eager_same_dtype(ckpt, x, dtype):
    net = copy.deepcopy(E.load_enhancer(ckpt).model).to(dtype)
    with torch.no_grad():
        y = net.restore(x.to(dtype)).float()
    return y.clamp(0, 1) * fov_mask(x).float()[:, None]


@pytest.mark.skipif(not backends.get("cpu").usable("cpu"), reason="; ".join(backends.get("cpu").not_supported_reasons("cpu")))
def test_cpu_backend_matches_reference(ckpt, fundus):
    x = torch.stack([fundus, fundus.flip(-2)])
    ref = E.enhance(x, model=ckpt, backend="torch")
    fp32 = E.enhance(x, model=ckpt, backend="cpu", dtype=torch.float32)
    torch.testing.assert_close(fp32, ref, rtol=0, atol=2e-4)
    if _bf16_available():
        fast = E.enhance(x, model=ckpt, backend="cpu")  # bf16 by default on this CPU
        err = (fast - ref).abs().max()
        err_torch = (_eager_same_dtype(ckpt, x, torch.bfloat16) - ref).abs().max()
        assert err <= 2 * err_torch + ATOL, (float(err), float(err_torch))


@pytest.mark.skipif(not backends.get("onnxruntime").usable("cpu"),
                    reason="; ".join(backends.get("onnxruntime").not_supported_reasons("cpu")) or "usable")
def test_onnxruntime_backend_matches_reference(ckpt, fundus, tmp_path, monkeypatch):
    monkeypatch.setenv("RETINA_FAST_CACHE", str(tmp_path))
    ref = E.enhance(fundus, model=ckpt, backend="torch")
    torch.testing.assert_close(E.enhance(fundus, model=ckpt, backend="onnxruntime"), ref, rtol=0, atol=1e-4)


def test_auto_prefers_the_cpu_backend_on_cpu(ckpt):
    if not backends.get("cpu").usable("cpu"):
        pytest.skip("cpu backend unusable here")
    run = E.load_enhancer(ckpt).runner("auto", "cpu")
    assert isinstance(run, E.CPURunner)


@pytest.mark.gpu
def test_cuda_backend_matches_reference(ckpt, fundus):
    x = torch.stack([fundus, fundus.flip(-1)])
    ref = E.enhance(x, model=ckpt, backend="torch", device="cpu")
    out = E.enhance(x.cuda(), model=ckpt, backend="cuda")
    assert out.is_cuda and out.shape == x.shape
    err = (out.cpu() - ref).abs().max()
    err_torch = (_eager_same_dtype(ckpt, x, torch.bfloat16) - ref).abs().max()
    assert err <= 2 * err_torch + ATOL
    again = E.enhance(x.cuda(), model=ckpt, backend="cuda")  # replayed CUDA graph
    torch.testing.assert_close(again, out, rtol=0, atol=0)


@pytest.mark.parametrize("bad,match", [
    (torch.rand(1, 4, 20, 20), "expected a tensor"),
    (torch.randint(0, 255, (3, 20, 20)), "float"),
    (torch.rand(3, 20, 20) * 255, r"\[0, 1\]"),
    (torch.full((3, 20, 20), float("nan")), "NaN"),
    (torch.rand(3, 8, 40), "at least 16"),
    (np.zeros((20, 20), np.uint8), "expected an array"),
    (np.zeros((20, 20, 3), np.int32), "uint8 or float"),
    (Image.new("L", (20, 20)), "mode RGB"),
    ([], "no images"),
])
def test_bad_inputs(ckpt, bad, match):
    with pytest.raises(ValueError, match=match):
        E.enhance(bad, model=ckpt, backend="torch")


def test_bad_arguments(ckpt, tmp_path):
    x = torch.rand(3, 20, 20)
    with pytest.raises(TypeError, match="PIL"):
        E.enhance("image.png", model=ckpt)
    with pytest.raises(ValueError, match="tile"):
        E.enhance(x, model=ckpt, tile=10)
    with pytest.raises(ValueError, match="unknown backend"):
        E.enhance(x, model=ckpt, backend="nope")
    if not backends.get("tensorrt").usable("cuda"):
        with pytest.raises(backends.BackendUnavailable, match="tensorrt"):
            E.enhance(x, model=ckpt, backend="tensorrt")
    with pytest.raises(backends.BackendUnavailable):
        E.enhance(x, model=ckpt, backend="torch", dtype=torch.bfloat16)
    with pytest.raises(FileNotFoundError, match="neither"):
        E.enhance(x, model=str(tmp_path / "missing"))
    save_checkpoint(tmp_path / "rsp", {"model": torch.nn.Linear(2, 2)}, {"kind": "rsp"})
    with pytest.raises(CheckpointError, match="not a MAGE-Net"):
        E.enhance(x, model=str(tmp_path / "rsp"))


def test_default_weights_load():
    try:
        path = E.resolve_enhancer("default")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    enh = E.load_enhancer("default")
    assert path.name == E.DEFAULT_ENHANCER and enh.meta["kind"] == "magenet"
    x = torch.rand(1, 3, 24, 24)
    assert E.enhance(x, backend="torch").shape == x.shape


def test_cli(ckpt, fundus, tmp_path, capsys):
    from retina_fast.cli import main

    arr = np.round(fundus.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    Image.fromarray(arr[:, ::-1]).save(tmp_path / "b.jpg", quality=95)
    Image.fromarray(arr[:48, :40]).save(tmp_path / "c.tif")
    out = tmp_path / "out"
    args = ["enhance", str(tmp_path / "a.png"), str(tmp_path / "b.jpg"), str(tmp_path / "c.tif"), "--out", str(out),
            "--model", ckpt, "--backend", "torch", "--batch-size", "2", "--no-progress"]
    assert main(args) == 0
    assert Image.open(out / "a.png").size == (59, 61) and Image.open(out / "c.png").size == (40, 48)
    expected = E.enhance(arr, model=ckpt, backend="torch")
    # batch of 2 against 1: eager torch may round a value at a .5 boundary the other way (see above)
    assert np.abs(np.asarray(Image.open(out / "a.png")).astype(int) - expected.astype(int)).max() <= 1
    (tmp_path / "bad.png").write_bytes(b"not an image")
    assert main(["enhance", str(tmp_path / "bad.png"), "--out", str(out), "--model", ckpt]) == 2
    err = capsys.readouterr().err
    assert "bad.png" in err and len(err.strip().splitlines()) == 1
    assert main(["enhance", str(tmp_path / "missing.png"), "--out", str(out), "--model", ckpt]) == 2
    assert "missing.png: no such file" in capsys.readouterr().err
