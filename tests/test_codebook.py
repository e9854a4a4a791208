"""Codebook: straight-through, commitment, EMA math, dead-code restart, K-Means init, resume, DDP."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from retina_fast.checkpoint import load_checkpoint, load_state_into, save_checkpoint
from retina_fast.models import Codebook, kmeans, quantisation_stats
from retina_fast.ops import nearest_code_ref


def _mixture(n: int, d: int, clusters: int, seed: int = 0) -> torch.Tensor:
    """Imbalanced Gaussian mixture standing in for encoder outputs: (n, d)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, d, generator=g) * 3 + 1.5
    w = torch.rand(clusters, generator=g) ** 2
    comp = torch.multinomial(w / w.sum(), n, replacement=True, generator=g)
    scale = 0.2 + torch.rand(clusters, generator=g)
    return centres[comp] + torch.randn(n, d, generator=g) * scale[comp, None]


def _as_map(rows: torch.Tensor, w: int = 8) -> torch.Tensor:
    """(N, D) -> (N / w, D, 1, w): the codebook's (B, D, h, w) layout."""
    n, d = rows.shape
    return rows.view(n // w, 1, w, d).permute(0, 3, 1, 2).contiguous()


def test_nearest_codes_straight_through_and_commitment():
    torch.manual_seed(0)
    cb = Codebook(16, 4).eval()
    z = torch.randn(2, 4, 3, 5, requires_grad=True)
    out = cb(z)
    idx_ref, _ = nearest_code_ref(Codebook.flatten(z.detach()), cb.embedding)
    assert torch.equal(out.indices.flatten(), idx_ref)
    codes = cb.lookup(out.indices)
    torch.testing.assert_close(out.zq_st, codes)
    torch.testing.assert_close(out.commit_loss, 0.25 * ((z.detach() - codes) ** 2).mean())
    w = torch.randn_like(z)
    (g,) = torch.autograd.grad((out.zq_st * w).sum(), z, retain_graph=True)
    torch.testing.assert_close(g, w)                                   # straight-through: identity
    (g,) = torch.autograd.grad(out.commit_loss, z)
    torch.testing.assert_close(g, 0.5 * (z.detach() - codes) / z.numel())
    p = torch.bincount(idx_ref, minlength=16).float() / idx_ref.numel()
    torch.testing.assert_close(out.perplexity, torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))


def test_eval_mode_does_not_update():
    cb = Codebook(8, 2).eval()
    before = {k: v.clone() for k, v in cb.state_dict().items()}
    cb(torch.randn(1, 2, 4, 4))
    assert all(torch.equal(before[k], v) for k, v in cb.state_dict().items())


def test_ema_update_math_by_hand():
    decay, eps = 0.9, 0.1
    cb = Codebook(4, 2, decay=decay, eps=eps, restart_threshold=0.0).train()
    emb = [[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]]
    cb.reset_codes(torch.arange(4), torch.tensor(emb), 1.0)
    pts = [[1.0, 0.0], [0.0, 1.0], [9.0, 0.0], [10.0, 9.0], [11.0, 11.0]]   # codes 0, 0, 1, 3, 3
    z = torch.tensor(pts).t().reshape(1, 2, 1, 5)
    out = cb(z)
    assert out.indices.flatten().tolist() == [0, 0, 1, 3, 3]
    counts = [2, 1, 0, 2]
    sums = [[1.0, 1.0], [9.0, 0.0], [0.0, 0.0], [21.0, 20.0]]
    n_ema = [decay * 1.0 + (1 - decay) * c for c in counts]
    s_ema = [[decay * e + (1 - decay) * s for e, s in zip(emb[j], sums[j])] for j in range(4)]
    total = sum(n_ema)
    w = [(n + eps) / (total + 4 * eps) * total for n in n_ema]
    expect = [[s / w[j] for s in s_ema[j]] for j in range(4)]
    torch.testing.assert_close(cb.ema_count, torch.tensor(n_ema))
    torch.testing.assert_close(cb.ema_sum, torch.tensor(s_ema))
    torch.testing.assert_close(cb.embedding, torch.tensor(expect))


def test_dead_code_restart_resets_ema_statistics():
    torch.manual_seed(0)
    cb = Codebook(4, 2, restart_threshold=1.0).train()
    cb.reset_codes(torch.arange(4), torch.tensor([[0.0, 0.0], [5.0, 0.0], [100.0, 100.0], [0.0, 5.0]]),
                   torch.tensor([5.0, 5.0, 0.5, 5.0]))                  # code 2: far away, count < 1
    z = torch.tensor([[0.1, 0.0], [5.0, 0.2], [0.2, 5.0], [4.9, 0.1]]).t().reshape(1, 2, 1, 4)
    cb(z)
    assert cb.restarted_last_step == 1
    new = cb.embedding[2].clone()
    rows = Codebook.flatten(z)
    assert any(torch.equal(new, r) for r in rows)                       # restarted to a batch row
    assert float(cb.ema_count[2]) == 1.0                                # fresh statistics ...
    torch.testing.assert_close(cb.ema_sum[2], new)                      # ... consistent with the code
    # The next EMA step (code 2 unused, restarts off) keeps the new code; with the stale statistics
    # (count 0.5 * 0.99, sum towards (100, 100)) it would have jumped back towards the old code.
    cb.restart_threshold = 0.0
    cb(z)
    torch.testing.assert_close(cb.embedding[2], new, rtol=1e-3, atol=1e-3)


def test_kmeans_reseeds_empty_clusters_and_early_stops():
    x = _mixture(2048, 4, 8)
    init = torch.full((32, 4), 1000.0)                                  # all but one cluster empty
    init[0] = 0.0
    c, a, info = kmeans(x, init, iters=50, tol=1e-4)
    assert info["reseeded"] >= 31
    assert int(torch.bincount(a, minlength=32).gt(0).sum()) == 32
    assert info["inertia"] < info["initial_inertia"] / 10
    assert info["converged"] and info["iterations"] < 50
    assert all(b <= a * (1 + 1e-6) for a, b in zip(info["history"][1:], info["history"][2:]))


def test_kmeans_init_beats_random_init(capsys):
    """Same data, K = 128 codes: K-Means init vs the codebook's random init and vs random data rows."""
    k, d = 128, 8
    x = _mixture(k * 64, d, 24)
    torch.manual_seed(0)
    cb = Codebook(k, d)
    rand = quantisation_stats(x, cb.embedding)
    rows = quantisation_stats(x, x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(1))[:k]])
    info = cb.kmeans_init(_as_map(x), epoch=0, rows_per_step=4096, generator=torch.Generator().manual_seed(1))
    km = quantisation_stats(x, cb.embedding)
    with capsys.disabled():
        print(f"\n[kmeans vs random, K={k}, N={x.shape[0]}, D={d}] randn codebook: mse {rand['mse']:.3f} "
              f"perplexity {rand['perplexity']:.1f} used {rand['used']}; random rows: mse {rows['mse']:.3f} "
              f"perplexity {rows['perplexity']:.1f} used {rows['used']}; K-Means ({info['iterations']} it): "
              f"mse {km['mse']:.3f} perplexity {km['perplexity']:.1f} used {km['used']}")
    assert km["mse"] < 0.8 * rows["mse"] and km["mse"] < 0.1 * rand["mse"]
    assert km["perplexity"] > rows["perplexity"] > rand["perplexity"]
    assert km["used"] == k


def test_kmeans_init_resets_ema_and_warm_starts():
    k, d = 64, 4
    x = _mixture(k * 32, d, 12)
    cb = Codebook(k, d, restart_threshold=0.0).train()
    cb.kmeans_init(_as_map(x), epoch=0, rows_per_step=512, generator=torch.Generator().manual_seed(0))
    assert float(cb.ema_count.sum()) == pytest.approx(512, rel=1e-5)
    used = cb.ema_count > 0
    torch.testing.assert_close(cb.ema_sum[used] / cb.ema_count[used, None], cb.embedding[used])
    fitted = cb.embedding.clone()
    cb(_as_map(x[:512]))                                                # one EMA step keeps K-Means
    assert float((cb.embedding - fitted).norm(dim=1).max()) < 0.5
    idx0, _ = nearest_code_ref(x, cb.embedding)
    info = cb.kmeans_init(_as_map(x), epoch=1, rows_per_step=512)
    assert info["warm_start"] and info["iterations"] <= 20
    idx1, _ = nearest_code_ref(x, cb.embedding)
    assert float((idx0 == idx1).float().mean()) > 0.9                   # indices keep their meaning


def test_kmeans_state_survives_checkpoint_resume(tmp_path):
    k, d = 32, 4
    x = _mixture(k * 16, d, 6)
    cb = Codebook(k, d)
    assert not cb.initialized and cb.needs_kmeans(0)
    assert cb.kmeans_init(_as_map(x), epoch=0, generator=torch.Generator().manual_seed(0)) is not None
    save_checkpoint(tmp_path / "ck", {"codebook": cb}, {"note": "test"}, {"steps": 1})
    _, states = load_checkpoint(tmp_path / "ck")
    resumed = Codebook(k, d)
    load_state_into(resumed, states["codebook"])
    assert resumed.initialized and int(resumed.kmeans_epoch) == 0
    before = resumed.embedding.clone()
    assert resumed.kmeans_init(_as_map(x.flip(0)), epoch=0) is None     # no re-initialisation
    assert torch.equal(resumed.embedding, before)
    assert resumed.kmeans_init(_as_map(x), epoch=1) is not None


def _ddp_worker(rank: int, world: int, folder: str, data: torch.Tensor) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/rdv", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        cb = Codebook(32, 4).train()
        part = data.chunk(world)[rank]
        cb.kmeans_init(_as_map(part), epoch=0, rows_per_step=32, generator=torch.Generator().manual_seed(3))
        cb(_as_map(part[:128]))
        save_checkpoint(f"{folder}/rank{rank}", {"codebook": cb}, {}, {"restarted": cb.restarted_last_step})
    finally:
        dist.destroy_process_group()


def test_ddp_two_ranks_match_one_process(tmp_path):
    """gloo, 2 CPU ranks with half the data each == one process with all of it (K-Means + EMA step)."""
    data = _mixture(32 * 16, 4, 6)
    torch.manual_seed(0)
    single = Codebook(32, 4).train()
    single.kmeans_init(_as_map(data), epoch=0, rows_per_step=32, generator=torch.Generator().manual_seed(3))
    halves = data.chunk(2)
    single(_as_map(torch.cat([halves[0][:128], halves[1][:128]])))
    assert single.restarted_last_step > 0                               # the restart path runs too
    mp.spawn(_ddp_worker, args=(2, str(tmp_path), data), nprocs=2, join=True)
    for rank in (0, 1):
        config, states = load_checkpoint(tmp_path / f"rank{rank}")
        assert config["provenance"]["restarted"] == single.restarted_last_step
        for key, value in single.state_dict().items():
            torch.testing.assert_close(states["codebook"][key], value, rtol=1e-5, atol=1e-5,
                                       msg=f"rank {rank} {key}")
