"""The cpu backend's choice of convolution library (C++ direct kernels or oneDNN) for the U-Net and the decoder:
the rule, the measurement, the environment setting, and ``retina-fast sample`` recording the choice so that a
resumed run and every torchrun rank compute the same way."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from retina_fast import cli, engine, shards
from retina_fast.backends import cpu_unet
from retina_fast.backends.cpu_pack import mkldnn_usable
from retina_fast.models.config import UNetConfig
from retina_fast.models.unet import UNet2D


needs_fused = pytest.mark.skipif(not mkldnn_usable(), reason="torch without oneDNN")


def test_pick_library_takes_onednn_only_when_clearly_faster():
    assert cpu_unet.pick_library(1.0, 0.5) == "onednn"
    assert cpu_unet.pick_library(1.0, 0.9) == "direct"  # within the margin: the batch-invariant kernels
    assert cpu_unet.pick_library(1.0, 1.0 / cpu_unet.ONEDNN_MARGIN) == "direct"
    assert cpu_unet.pick_library(None, 3.0) == "onednn" and cpu_unet.pick_library(3.0, None) == "direct"
    with pytest.raises(ValueError, match="neither"):
        cpu_unet.pick_library(None, None)


def _net():
    torch.manual_seed(0)
    return UNet2D(UNetConfig(in_channels=4, base_channels=16, channel_mults=(1, 2), attn_heads=2, attn_head_dim=8,
                             groups=4, num_res_blocks=1)).eval()


@needs_fused
@pytest.mark.parametrize("timings, want", [((1.0, 0.5), "onednn"), ((1.0, 0.95), "direct")])
def test_auto_follows_the_measurement(monkeypatch, timings, want):
    fused = cpu_unet.FusedCPUUNet(_net(), torch.float32)
    seen = []
    monkeypatch.setattr(fused, "_measure", lambda shape, rounds, batch: seen.append(shape) or timings)
    monkeypatch.delenv(cpu_unet.LIBRARY_ENV, raising=False)
    if not fused.batch_invariant:
        pytest.skip("no direct kernel on this CPU: nothing to choose")
    assert fused.choose_library((8, 8)) == want == fused.library and seen == [(8, 8)]
    assert fused.batch_invariant == (want == "direct")
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([1, 900])
    with torch.no_grad():
        assert torch.linalg.norm(fused(x, t) - fused.unet(x, t)) <= 2e-6 * torch.linalg.norm(fused.unet(x, t))


@needs_fused
def test_auto_measures_both_libraries_for_real():
    fused = cpu_unet.FusedCPUUNet(_net(), torch.float32)
    if not fused.batch_invariant:
        pytest.skip("no direct kernel on this CPU: nothing to choose")
    got = fused.choose_library((8, 8), setting="auto", rounds=1)
    secs = fused.timings["seconds_at_batch"]
    assert set(secs) == {"direct", "onednn"} and all(s > 0 for s in secs.values())
    assert got == cpu_unet.pick_library(secs["direct"], secs["onednn"])


@needs_fused
def test_environment_pins_the_library_and_a_bad_value_is_named(monkeypatch):
    fused = cpu_unet.FusedCPUUNet(_net(), torch.float32)
    monkeypatch.setattr(fused, "_measure", lambda *a: pytest.fail("a pinned library is not measured"))
    monkeypatch.setenv(cpu_unet.LIBRARY_ENV, "onednn")
    assert fused.choose_library((8, 8)) == "onednn" and not fused.batch_invariant
    monkeypatch.setenv(cpu_unet.LIBRARY_ENV, " Direct ")
    assert fused.choose_library((8, 8)) == "direct"
    monkeypatch.setenv(cpu_unet.LIBRARY_ENV, "mkl")
    with pytest.raises(ValueError, match="RETINA_FAST_CPU_CONVS='mkl'"):
        fused.choose_library((8, 8))


def _sample(model_dir, out, *extra):
    return cli.main(["sample", "--n", "4", "--steps", "3", "--seed", "5", "--model", str(model_dir), "--out",
                     str(out), "--shard-size", "2", "--backend", "cpu", "--dtype", "bf16", "--quiet", *extra])


@needs_fused
def test_sample_records_the_library_and_a_resumed_run_keeps_it(model_dir, tmp_path, monkeypatch):
    from retina_fast.ops.conv import direct_conv_usable

    if not direct_conv_usable(torch.bfloat16):
        pytest.skip("no direct bf16 kernel on this CPU: nothing to choose")
    monkeypatch.setenv(cpu_unet.LIBRARY_ENV, "onednn")
    full = tmp_path / "full"
    assert _sample(model_dir, full) == 0
    recorded = json.loads((full / "run.json").read_text())["convolutions"]
    assert recorded["unet"] == "onednn" and recorded["decoder"] in ("onednn", None)
    want = np.concatenate([shards.read_shard(p) for _, p in shards.iter_manifest(full)])
    # the same run, interrupted after its first shard and resumed where the measurement would now pick direct
    part = tmp_path / "part"
    assert _sample(model_dir, part) == 0
    (part / "manifest.json").unlink()
    (part / "shard-00001.done.json").unlink()
    (part / "shard-00001.npy").unlink()
    monkeypatch.setenv(cpu_unet.LIBRARY_ENV, "direct")
    assert _sample(model_dir, part, "--resume") == 0
    assert json.loads((part / "run.json").read_text())["convolutions"] == recorded
    got = np.concatenate([shards.read_shard(p) for _, p in shards.iter_manifest(part)])
    np.testing.assert_array_equal(got, want)
    # and the direct kernels do give other bf16 images: the record is what made them equal (a fresh pipeline:
    # the cached one's runner measured -- here: read the setting -- when it was built)
    monkeypatch.setattr(engine, "_PIPELINES", {})
    other = tmp_path / "direct"
    assert _sample(model_dir, other) == 0
    assert json.loads((other / "run.json").read_text())["convolutions"]["unet"] == "direct"
    assert not np.array_equal(np.concatenate([shards.read_shard(p) for _, p in shards.iter_manifest(other)]), want)


def test_run_file_refuses_an_unknown_library(tmp_path):
    spec = {"model": "m", "model_sha256": "0" * 64, "seed": 0, "n": 1, "steps": 1, "sampler": "ddim", "eta": 0.0,
            "backend": "cpu", "dtype": "bfloat16", "shard_size": 1, "format": "npy", "wavelengths": [500.0],
            "batch_size": None, "convolutions": "mkl"}
    with pytest.raises(shards.BadRunFile, match="convolutions"):
        shards.spec_from_dict(spec, tmp_path / "run.json")
    for bad in ({"unet": "direct"}, {"unet": "direct", "decoder": "mkl"}, ["direct"]):
        spec["convolutions"] = bad
        with pytest.raises(shards.BadRunFile, match="convolutions"):
            shards.spec_from_dict(spec, tmp_path / "run.json")
    for good in ("onednn", None, {"unet": "onednn", "decoder": None}):
        spec["convolutions"] = good
        assert shards.spec_from_dict(spec, tmp_path / "run.json").convolutions == good


def test_runs_written_before_the_decoder_chose_resume_with_a_direct_decoder():
    assert shards.convolutions_by_part(None) == {"unet": "direct", "decoder": "direct"}
    assert shards.convolutions_by_part("onednn") == {"unet": "onednn", "decoder": "direct"}
    assert shards.convolutions_by_part({"unet": None, "decoder": "onednn"}) == {"unet": None, "decoder": "onednn"}


def test_bench_contenders_pin_the_library_in_their_own_runner(model_dir):
    from retina_fast import bench

    assert bench.parse_spec("cpu@onednn:bf16") == ("cpu@onednn", torch.bfloat16)
    assert bench.parse_spec("cuda@nhwc:bf16") == ("cuda@nhwc", torch.bfloat16)
    for bad in ("torch@direct", "cpu@mkl", "cpu@", "cpu@nhwc", "cuda@direct", "cuda@nhcw"):
        with pytest.raises(ValueError, match="only the cpu backend takes a convolution library"):
            bench.parse_spec(bad)
    if not mkldnn_usable():
        pytest.skip("torch without oneDNN")
    pipe = engine.load(str(model_dir))
    shared = pipe.runner("cpu", "cpu", torch.float32)
    before = shared.convolutions
    rows = {lib: bench.make_contender(pipe, f"cpu@{lib}") for lib in ("direct", "onednn")}
    assert shared.convolutions == before  # the pipeline's own runner keeps its measured choice
    for lib, c in rows.items():
        assert c.runner is not shared and set(c.runner.convolutions.values()) <= {lib, None} and c.backend == "cpu"
        assert ("oneDNN" in c.note) == (lib == "onednn" or not c.runner.fast_unet.batch_invariant)
    a = rows["direct"].sample(2, 3, seed=1)[0]
    b = rows["onednn"].sample(2, 3, seed=1)[0]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)  # fp32: the same images to rounding


# --- the decoder's choice ----------------------------------------------------------------------------------

def _fused_decoder_or_skip(model_dir, dtype):
    from retina_fast.backends.cpu_decoder import FusedCPUDecoder

    if not mkldnn_usable():
        pytest.skip("torch without oneDNN")
    loaded = engine.load(str(model_dir)).loaded
    reason = FusedCPUDecoder.unsupported_reason(loaded.vqgan, dtype)
    if reason:
        pytest.skip(f"no fused decoder here: {reason}")
    return loaded


@pytest.mark.parametrize("timings, want", [((1.0, 0.5), "onednn"), ((1.0, 0.95), "direct")])
def test_decoder_follows_its_own_measurement(model_dir, monkeypatch, timings, want):
    from retina_fast.backends.runners import CPURunner

    loaded = _fused_decoder_or_skip(model_dir, torch.float32)
    monkeypatch.delenv(cpu_unet.LIBRARY_ENV, raising=False)
    monkeypatch.setattr(cpu_unet.FusedCPUUNet, "_measure", lambda self, shape, rounds, batch: (1.0, 0.95))
    seen = []
    monkeypatch.setattr(CPURunner, "_measure_decoders",
                        lambda self, shape, batch: seen.append((shape, batch)) or timings)
    runner = CPURunner(loaded, torch.device("cpu"), torch.float32)
    assert seen == [] and runner.prepared_for is None  # nothing is measured before a batch size is known
    assert runner.prepare(3)["decoder"] == runner.convolutions["decoder"] == want
    assert seen == [(tuple(loaded.config.latent_shape[1:]), 3)] and runner.prepared_for == 3
    assert runner.convolutions["unet"] in ("direct", "onednn")  # the U-Net decided on its own (direct if it can)
    assert ("oneDNN" in runner.decode_path) == (want == "onednn")
    if runner.convolutions["unet"] == "direct":
        assert runner.batch_invariant == (want == "direct")
    runner.prepare(3)
    assert len(seen) == 1  # the same batch size again: nothing measured
    runner.prepare(20)
    assert seen[-1][1] == CPURunner.DECODE_CHUNK  # the decoder runs in chunks of DECODE_CHUNK images


@needs_fused
def test_the_choice_is_made_per_batch_size(model_dir, monkeypatch):
    """A batch of 1 is run the way a batch of 1 is fastest: the U-Net's library is measured at the batch a run
    uses (cached per batch size), a first call without prepare chooses for its own batch, and a pinned part is
    not measured until unpin()."""
    from retina_fast.backends.runners import CPURunner
    from retina_fast.ops.conv import direct_conv_usable

    if not direct_conv_usable(torch.float32):
        pytest.skip("no direct kernel on this CPU: nothing to choose")
    monkeypatch.delenv(cpu_unet.LIBRARY_ENV, raising=False)
    loaded = engine.load(str(model_dir)).loaded
    fast = {1: "direct", 8: "onednn"}  # what a CPU where oneDNN pays only for large batches would measure
    calls = []

    def measure(self, shape, rounds, batch):
        calls.append(batch)
        return (1.0, 0.5) if fast[batch] == "onednn" else (1.0, 0.95)

    monkeypatch.setattr(cpu_unet.FusedCPUUNet, "_measure", measure)
    monkeypatch.setattr(CPURunner, "_measure_decoders", lambda self, shape, batch: (1.0, 0.95))
    runner = CPURunner(loaded, torch.device("cpu"), torch.float32)
    x = torch.randn(1, *loaded.config.latent_shape)
    runner.denoise(x, torch.full((1,), 10))  # first call: chooses for B = 1
    assert calls == [1] and runner.convolutions["unet"] == "direct" and runner.batch_invariant
    assert runner.prepare(8)["unet"] == "onednn" and not runner.batch_invariant
    runner.denoise(x.expand(3, -1, -1, -1), torch.full((3,), 10))  # a run's last, smaller batch: no new choice
    assert calls == [1, 8] and runner.convolutions["unet"] == "onednn"
    runner.use_convolutions({"unet": "direct", "decoder": None})
    assert runner.prepare(8)["unet"] == "direct" and calls == [1, 8]  # pinned
    runner.unpin()
    assert runner.prepare(8)["unet"] == "onednn"
    # Pipeline.sample chooses for min(batch, n)
    pipe = engine.Pipeline(loaded, "test")  # not the cached pipeline: its runner stays as other tests left it
    calls.clear()
    pipe.sample(1, 2, backend="cpu", device="cpu", dtype=torch.float32)
    pipe.sample(9, 2, backend="cpu", device="cpu", dtype=torch.float32, batch_size=8)
    assert calls[-2:] == [1, 8]


def test_measure_libraries_times_the_current_library_first_and_caches():
    timed, cache = [], {}
    plan = {"direct": (2, 3), "onednn": (5, 1)}
    got = cpu_unet.measure_libraries(plan, "onednn", cache, lambda lib, n: (lib, n),
                                     lambda lib, n: timed.append((lib, n)) or float(n))
    assert timed == [("onednn", 5), ("direct", 2)] and got == {"direct": 6.0, "onednn": 5.0}
    assert cpu_unet.measure_libraries(plan, "direct", cache, lambda lib, n: (lib, n), pytest.fail) == got


def test_fused_unet_measures_each_batch_size_once():
    fused = cpu_unet.FusedCPUUNet(_net(), torch.float32)
    if not fused.batch_invariant or not mkldnn_usable():
        pytest.skip("no direct kernel on this CPU: nothing to choose")
    fused.choose_library((8, 8), setting="auto", rounds=1, batch=3)
    first = dict(fused._seconds)
    assert {k[0] for k in first} == {"direct", "onednn"} and ("onednn", (8, 8), 3) in first
    fused.choose_library((8, 8), setting="auto", rounds=1, batch=3)
    assert fused._seconds == first  # cached
    fused.choose_library((8, 8), setting="auto", rounds=1, batch=5)
    new = set(fused._seconds) - set(first)
    assert new == {("onednn", (8, 8), 5)}  # the direct kernels' per-core time serves every batch size
    direct = fused._seconds["direct", (8, 8), fused.cores]
    assert fused.timings["seconds_at_batch"]["direct"] == direct * -(-5 // fused.cores)
    before = set(fused._seconds)
    fused.choose_library((8, 8), setting="auto", rounds=1, batch=1)  # fewer images than cores: timed as they run
    assert set(fused._seconds) - before == {("onednn", (8, 8), 1)} | ({("direct", (8, 8), 1)} if fused.cores > 1 else set())
    assert fused.timings["seconds_at_batch"]["direct"] == fused._seconds["direct", (8, 8), min(1, fused.cores)]


def test_direct_plan_times_min_of_batch_and_cores():
    assert cpu_unet.direct_plan(1, 2) == (1, 1) and cpu_unet.direct_plan(2, 2) == (2, 1)
    assert cpu_unet.direct_plan(5, 2) == (2, 3) and cpu_unet.direct_plan(3, 16) == (3, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_both_decoders_decode_the_same_cubes(model_dir, dtype):
    """The two decoders are the same function: fp32 to rounding, bf16 within bf16 storage's error; odd batch
    (5: the bf16 oneDNN path pads it to 8) and every code index drawn."""
    from retina_fast.backends.runners import CPURunner

    loaded = _fused_decoder_or_skip(model_dir, dtype)
    runner = CPURunner(loaded, torch.device("cpu"), dtype, convolutions="direct")
    h, w = loaded.config.latent_shape[1:]
    idx = torch.randint(0, loaded.vqgan.codebook.embedding.shape[0], (5, h, w), generator=torch.Generator().manual_seed(3))
    direct = runner.decode_reflectance(idx)
    runner.use_convolutions({"unet": None, "decoder": "onednn"})
    assert runner.convolutions["decoder"] == "onednn" and not runner.batch_invariant
    onednn = runner.decode_reflectance(idx)
    with torch.no_grad():
        ref = _reference_runner(loaded).decode_reflectance(idx)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for got in (direct, onednn):
        assert got.shape == ref.shape and torch.linalg.norm(got - ref) <= tol * torch.linalg.norm(ref)
    runner.use_convolutions("direct")
    assert runner.convolutions["decoder"] == "direct" and torch.equal(runner.decode_reflectance(idx), direct)


def _reference_runner(loaded):
    from retina_fast.backends.runners import Runner

    return Runner(loaded, torch.device("cpu"), torch.float32)


def test_decoder_measurement_times_both_for_real(model_dir, monkeypatch):
    from retina_fast.backends.runners import CPURunner

    loaded = _fused_decoder_or_skip(model_dir, torch.float32)
    monkeypatch.delenv(cpu_unet.LIBRARY_ENV, raising=False)
    runner = CPURunner(loaded, torch.device("cpu"), torch.float32)
    runner.prepare(5)
    secs = runner.decoder_timings["seconds_at_batch"]
    assert set(secs) == {"direct", "onednn"} and all(s > 0 for s in secs.values())
    assert runner.convolutions["decoder"] == cpu_unet.pick_library(secs["direct"], secs["onednn"])
    with pytest.raises(ValueError, match="convolutions"):
        runner.use_convolutions({"decoder": "direct"})
