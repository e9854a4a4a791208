"""The Pareto-front, rank and diversity helpers of ``benchmarks/pareto.py`` (loaded from its file:
benchmarks/ is a folder of scripts, not a package)."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "pareto.py"


@pytest.fixture(scope="module")
def pareto():
    spec = importlib.util.spec_from_file_location("benchmarks_pareto", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _pts(pairs):
    return [{"speed": s, "err": e} for s, e in pairs]


def test_front_drops_dominated_points(pareto):
    pts = _pts([(1.0, 0.1), (2.0, 0.2), (4.0, 0.4), (1.5, 0.3), (3.0, 0.5), (0.5, 0.05)])
    # (1.5, 0.3) is dominated by (2.0, 0.2); (3.0, 0.5) by (4.0, 0.4).
    assert pareto.pareto_front(pts, maximize=["speed"], minimize=["err"]) == [0, 1, 2, 5]


def test_front_single_best_point_dominates_all(pareto):
    pts = _pts([(1.0, 0.5), (5.0, 0.1), (2.0, 0.3), (4.0, 0.2)])
    assert pareto.pareto_front(pts, maximize=["speed"], minimize=["err"]) == [1]


def test_front_ties(pareto):
    pts = _pts([(2.0, 0.2), (2.0, 0.2), (2.0, 0.3), (1.0, 0.2), (3.0, 0.5)])
    # identical points do not dominate each other; equal speed + worse error and equal error + lower
    # speed are dominated.
    assert pareto.pareto_front(pts, maximize=["speed"], minimize=["err"]) == [0, 1, 4]


def test_front_missing_values_never_on_front_and_dominate_nothing(pareto):
    pts = [{"speed": 1.0, "err": 0.5}, {"speed": 10.0, "err": None}, {"speed": 20.0, "err": math.nan},
           {"speed": 0.5, "err": 0.6}, {"speed": 30.0}]
    assert pareto.pareto_front(pts, maximize=["speed"], minimize=["err"]) == [0]


def test_front_direction_matters(pareto):
    pts = _pts([(1.0, 0.1), (2.0, 0.2)])
    assert pareto.pareto_front(pts, maximize=["speed", "err"]) == [1]
    assert pareto.pareto_front(pts, minimize=["speed", "err"]) == [0]
    assert pareto.pareto_front(pts, minimize=["err"]) == [0]
    with pytest.raises(ValueError):
        pareto.pareto_front(pts)


def test_front_three_objectives(pareto):
    pts = [{"s": 1, "a": 1, "b": 3}, {"s": 1, "a": 3, "b": 1}, {"s": 1, "a": 2, "b": 2},
           {"s": 1, "a": 3, "b": 3}, {"s": 2, "a": 3, "b": 3}]
    # (1,3,3) is dominated by every other point with s = 1; (2,3,3) is faster than all of them.
    assert pareto.pareto_front(pts, maximize=["s"], minimize=["a", "b"]) == [0, 1, 2, 4]


def test_ranks_ties_and_missing(pareto):
    assert pareto.ranks([0.3, 0.1, 0.2]) == [3.0, 1.0, 2.0]
    assert pareto.ranks([0.1, 0.2, 0.1, None, math.nan]) == [1.5, 3.0, 1.5, 4.5, 4.5]


def test_combined_rank(pareto):
    pts = [{"x": 1.0, "y": 3.0}, {"x": 2.0, "y": 1.0}, {"x": 3.0, "y": None}]
    assert pareto.combined_rank(pts, keys=["x", "y"]) == [1.5, 1.5, 3.0]


def test_diversity_with_reused_real_scores_matches_metric(pareto):
    from retina_fast import metrics as M

    g = torch.Generator().manual_seed(3)
    real = torch.rand(7, 3, 41, 41, generator=g)
    syn = (real.flip(0) * 0.7 + 0.3 * torch.rand(7, 3, 41, 41, generator=g)).clamp(0, 1)
    pairs, seed = 9, 4
    index = M.sample_pairs(7, pairs, seed)
    stand_in = SimpleNamespace(pair_index=index,
                               pair_scores=M.pairwise_ms_ssim(real, index, 1.0, 16, weights=M.MS_SSIM_WEIGHTS))
    got = pareto.diversity(stand_in, syn, seed, n_boot=50)
    with pytest.warns(M.MetricWarning):
        want = M.ms_ssim_diversity(real, syn, pairs=pairs, seed=seed, n_boot=50)
    for k in ("val_mean", "syn_mean", "abs_delta", "ci_low", "ci_high", "scales"):
        assert got[k] == pytest.approx(want[k], rel=1e-12, abs=1e-15), k


def _ldm_flags(script: str) -> dict[str, str]:
    """The ``train ldm`` options of a training script, minus those a grid point may change (steps, width,
    output, VQ-GAN, resume, previews)."""
    text = (_PATH.parent.parent / "scripts" / script).read_text(encoding="utf-8")
    lines = text[text.index("train ldm"):].splitlines()
    end = next(i for i, line in enumerate(lines) if not line.rstrip().endswith("\\"))
    tokens = " ".join(line.rstrip().rstrip("\\") for line in lines[:end + 1]).split()
    flags, i = {}, 0
    while i < len(tokens):
        if tokens[i].startswith("--"):
            value = tokens[i + 1] if i + 1 < len(tokens) and not tokens[i + 1].startswith("--") else ""
            flags[tokens[i]] = value
            i += 2 if value else 1
        else:
            i += 1
    varying = ("--steps", "--out", "--vqgan", "--resume", "--config-json", "--sample-every", "--num-images", "--amp")
    return {k: v for k, v in flags.items() if k not in varying}


def test_pareto_grid_trains_the_shipped_recipe():
    """The grid's LDMs differ from the shipped default only in width and steps: a recipe change made in
    scripts/train_tiny.sh must be made in scripts/train_pareto_grid.sh too."""
    shipped, grid = _ldm_flags("train_tiny.sh"), _ldm_flags("train_pareto_grid.sh")
    assert "--lr" in shipped and "--latent-asinh" in shipped
    assert grid == shipped
