"""``SyntheticRetinaDataset``: synthetic cubes straight into a self-supervised trainer.

Two sources, one IterableDataset:

* a finished ``retina-fast sample`` run directory (reads manifest.json; shards are split across
  DataLoader workers and DDP ranks, so every image is seen once per epoch; each shard's bytes are
  checked against the manifest's sha256 as they are read), or
* sampling on the fly from a model (``SyntheticRetinaDataset.from_model``): worker w of W on rank r
  of R draws images i with (i // block) mod (W·R) == r·W + w, so the union over workers and ranks is
  exactly images 0 .. n-1 of the run with that seed.

Items are (bands, H, W) float32 reflectance in [0, 1], passed through ``transform`` if given.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from retina_fast import shards


def _slot() -> tuple[int, int]:
    """(this consumer's index, number of consumers) over DataLoader workers x DDP ranks."""
    info = get_worker_info()
    w, nw = (info.id, info.num_workers) if info is not None else (0, 1)
    rank, world = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    return rank * nw + w, nw * world


class SyntheticRetinaDataset(IterableDataset):
    def __init__(self, run_dir: str | Path, *, shuffle: bool = False, seed: int = 0,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.records = list(shards.iter_manifest(self.run_dir))
        self.shuffle = shuffle
        self.seed = seed
        self.transform = transform
        self.epoch = 0
        self._sampler = None

    @classmethod
    def from_model(cls, model: str = "default", n: int = 1024, *, seed: int = 0, steps: int = 50,
                   sampler: str = "ddim", backend: str = "auto", batch_size: int = 16,
                   transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> "SyntheticRetinaDataset":
        """Sample images 0 .. n-1 of the run (model, seed, steps, sampler) lazily, in batches."""
        if n < 1 or batch_size < 1:
            raise ValueError("n and batch_size must be positive")
        self = cls.__new__(cls)
        self.run_dir, self.records, self.shuffle, self.seed, self.epoch = None, [], False, seed, 0
        self.transform = transform
        self._sampler = dict(model=model, n=n, steps=steps, sampler=sampler, backend=backend, batch_size=batch_size)
        return self

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle shards and images for a new epoch (shard runs with shuffle=True)."""
        self.epoch = epoch

    def __len__(self) -> int:
        if self._sampler is not None:
            return self._sampler["n"]
        return sum(r["count"] for r, _ in self.records)

    def __iter__(self) -> Iterator[torch.Tensor]:
        me, consumers = _slot()
        source = self._iter_sampled(me, consumers) if self._sampler is not None else self._iter_shards(me, consumers)
        for cube in source:
            yield self.transform(cube) if self.transform is not None else cube

    def _iter_shards(self, me: int, consumers: int) -> Iterator[torch.Tensor]:
        order = np.arange(len(self.records))
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.shuffle:
            rng.shuffle(order)
        for pos in order[me::consumers]:
            record, path = self.records[pos]
            cubes = shards.read_shard(path, sha256=record["sha256"])  # verified: one hash per shard read
            if len(cubes) != record["count"]:
                raise shards.BadRunFile(f"{path}: {len(cubes)} images, the manifest records {record['count']}")
            idx = rng.permutation(len(cubes)) if self.shuffle else range(len(cubes))
            for i in idx:
                yield torch.from_numpy(cubes[i].copy())

    def _iter_sampled(self, me: int, consumers: int) -> Iterator[torch.Tensor]:
        from retina_fast import engine

        cfg = self._sampler
        pipe = engine.load(cfg["model"])
        block = cfg["batch_size"]
        for first in range(me * block, cfg["n"], consumers * block):
            count = min(block, cfg["n"] - first)
            cubes = pipe.sample(count, cfg["steps"], seed=self.seed, sampler=cfg["sampler"],
                                backend=cfg["backend"], first_index=first)
            yield from cubes
