"""Lazily read image sets for ``retina-fast evaluate``, and the metric steps that need random access.

A set is a folder of cube files (every ``.npy .npz .tif .h5`` file read by :mod:`retina_fast.io`, sorted by
path, the first ``max_images``, bands mapped to the 16 default wavelengths) or a finished ``retina-fast sample``
run directory (its shards in manifest order, each verified against the manifest's sha256 whenever it is read).
:func:`open_set` reads the whole set once to validate it -- the same checks, in the same order and with the
same :class:`EvaluationError` messages as loading it into memory -- but keeps nothing of it: a
:class:`CubeSet` knows its files, count and image size, yields batches in order (:meth:`CubeSet.iter_batches`)
and reads any list of images (:meth:`CubeSet.get`). A run set caches at most one shard, so memory is one batch
(or one shard) of cubes whatever the number of images.

:func:`pairwise_ms_ssim` and :func:`nearest_two_sets` are :func:`retina_fast.metrics.pairwise_ms_ssim` and
:func:`retina_fast.metrics.nearest_two` for such sets: the same pairs and the same distance blocks in the same
order, so the same numbers, reading only the images each block needs.
:func:`load_set` still returns a whole set in memory (:class:`ImageSet`), for small sets.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch

from retina_fast import DEFAULT_WAVELENGTHS
from retina_fast.io import CubeFormatError, load_masks

__all__ = ["EvaluationError", "KL_STRUCTURES", "CubeSet", "FolderSet", "RunSet", "open_set", "count_images",
           "check_sizes", "ImageSet", "load_set", "pairwise_ms_ssim", "nearest_two_sets"]

KL_STRUCTURES = ("vein", "artery", "onh")


class EvaluationError(ValueError):
    """Bad evaluation input; the message names the folder or file."""


def mask_path(cube: Path) -> Path:
    return cube.with_name(cube.name[: -len(cube.suffix)] + "_masks.npz")


def _dataset(root: Path, role: str):
    from retina_fast.data import CubeFolderDataset

    if not root.exists():
        raise EvaluationError(f"--{role} {root}: no such directory")
    if not root.is_dir():
        raise EvaluationError(f"--{role} {root}: not a directory")
    try:
        return CubeFolderDataset(root, DEFAULT_WAVELENGTHS, out_range=None)
    except FileNotFoundError as exc:
        raise EvaluationError(f"--{role} {exc}") from exc


def is_run(root: Path) -> bool:
    """A ``retina-fast sample`` run directory (shards + manifest) rather than a folder of cube files."""
    return (root / "run.json").is_file()  # written first by every run (``retina-fast phantom`` folders
    # have a manifest.json of their own)


def _run_records(root: Path, role: str) -> list:
    from retina_fast import shards

    try:
        return list(shards.iter_manifest(root))
    except FileNotFoundError:
        raise EvaluationError(f"--{role} {root}: a retina-fast sample run without manifest.json, i.e. unfinished; "
                              f"finish it with `retina-fast sample ... --resume`") from None
    except shards.RunError as exc:
        raise EvaluationError(f"--{role} {exc}") from None


def count_images(root: Path, role: str) -> int:
    """Images in a folder or run (before ``max_images``), without reading them."""
    if root.is_dir() and is_run(root):
        return sum(record["count"] for record, _ in _run_records(root, role))
    return len(_dataset(root, role))


class CubeSet:
    """A validated, lazily read set: ``role``, ``root``, ``n`` images, ``files`` (n paths; a run's images are
    named ``shard-00000.npy[j]``), ``size`` (H, W), ``bands`` and ``mask_keys`` (the structures every cube has
    in its ``<stem>_masks.npz``, sorted, or None when mask files are missing, unusable or not asked for)."""

    role: str
    root: Path
    files: list
    size: tuple
    bands: int = len(DEFAULT_WAVELENGTHS)
    mask_keys: Optional[tuple] = None

    @property
    def n(self) -> int:
        return len(self.files)

    def get(self, indices: Iterable[int]) -> torch.Tensor:
        """Images ``indices`` (any order, repeats allowed) as a (len, bands, H, W) float32 tensor."""
        raise NotImplementedError

    def iter_batches(self, batch_size: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(first index, (B, bands, H, W) images) for consecutive batches of ``batch_size``, in order."""
        for start in range(0, self.n, batch_size):
            yield start, self.get(range(start, min(start + batch_size, self.n)))

    def load_masks(self, indices: Iterable[int]) -> list[dict]:
        """The mask files of images ``indices`` ({name: bool (H, W) array} each)."""
        raise EvaluationError(f"--{self.role} {self.root}: a sample run has no mask files")

    def _size_error(self, where, shape, first) -> EvaluationError:
        return EvaluationError(f"--{self.role}: {where}: image is {shape[-2]}x{shape[-1]}, but {first} is "
                               f"{self.size[0]}x{self.size[1]}; all images must have one size")


class FolderSet(CubeSet):
    """A folder of cube files (see the module docstring)."""

    def __init__(self, root: Path, role: str, max_images: Optional[int]) -> None:
        self.root, self.role = root, role
        self.ds = _dataset(root, role)
        n = len(self.ds) if max_images is None else min(len(self.ds), int(max_images))
        if n < 2:
            raise EvaluationError(f"--{role} {root}: {len(self.ds)} cube file(s); at least 2 are needed")
        self.files = list(self.ds.files[:n])

    def _load(self, i: int) -> np.ndarray:
        try:
            cube = self.ds.load(i)
        except CubeFormatError as exc:
            raise EvaluationError(f"--{self.role}: {exc}") from exc
        if tuple(cube.shape[1:]) != tuple(self.size):
            raise self._size_error(self.ds.files[i], cube.shape, self.ds.files[0].name)
        return cube

    def get(self, indices: Iterable[int]) -> torch.Tensor:
        idx = [int(i) for i in indices]
        loaded: dict[int, np.ndarray] = {}
        for i in idx:
            if i not in loaded:
                loaded[i] = self._load(i)
        return torch.from_numpy(np.stack([loaded[i] for i in idx]))

    def load_masks(self, indices: Iterable[int]) -> list[dict]:
        out = []
        for i in indices:
            try:
                out.append(load_masks(mask_path(self.files[i])))
            except CubeFormatError as exc:
                raise EvaluationError(f"--{self.role}: {exc}") from exc
        return out

    def check(self, tick: Callable[[], None], with_masks: bool) -> None:
        """Read every cube once (errors name the file), then every mask file when each cube has one."""
        self.size = (0, 0)
        for i in range(self.n):
            if i == 0:
                try:
                    self.size = tuple(self.ds.load(0).shape[1:])
                except CubeFormatError as exc:
                    raise EvaluationError(f"--{self.role}: {exc}") from exc
            else:
                self._load(i)
            tick()
        if not with_masks or not all(mask_path(f).is_file() for f in self.files):
            return
        keys, usable = None, True
        for i in range(self.n):
            m = self.load_masks([i])[0]
            usable = usable and set(KL_STRUCTURES) <= set(m) and m[KL_STRUCTURES[0]].shape == self.size
            keys = set(m) if keys is None else keys & set(m)
        self.mask_keys = tuple(sorted(keys)) if usable else None


class RunSet(CubeSet):
    """A finished ``retina-fast sample`` run; one verified shard is cached."""

    def __init__(self, root: Path, role: str, max_images: Optional[int]) -> None:
        from retina_fast import shards

        self.root, self.role = root, role
        records = _run_records(root, role)
        try:
            self.spec = shards.load_spec(root)
        except shards.RunError as exc:
            raise EvaluationError(f"--{role} {exc}") from None
        limit = max_images if max_images is not None else math.inf
        self.shards, self.starts, self.files = [], [], []
        for record, path in records:
            if len(self.files) >= limit:
                break
            take = int(min(record["count"], limit - len(self.files)))
            self.starts.append(len(self.files))
            self.shards.append((record, path, take))
            self.files += [Path(f"{path.name}[{j}]") for j in range(take)]  # image j of the shard (report names)
        self._cache: tuple[int, Optional[np.ndarray]] = (-1, None)

    def _read(self, k: int) -> np.ndarray:
        from retina_fast import shards

        if self._cache[0] != k:
            record, path, _ = self.shards[k]
            self._cache = (-1, None)  # drop the old shard before reading the next one
            try:
                self._cache = (k, shards.read_shard(path, sha256=record["sha256"]))
            except (shards.RunError, CubeFormatError) as exc:
                raise EvaluationError(f"--{self.role}: {exc}") from None
        return self._cache[1]

    def _cube(self, k: int, arr: np.ndarray, j: int) -> np.ndarray:
        from retina_fast.data import resample_bands

        path = self.shards[k][1]
        try:
            cube = resample_bands(arr[j], self.spec.wavelengths, DEFAULT_WAVELENGTHS, path=path)
        except CubeFormatError as exc:
            raise EvaluationError(f"--{self.role}: {exc}") from None
        if tuple(cube.shape[1:]) != tuple(self.size):
            raise self._size_error(self.files[self.starts[k] + j], cube.shape, self.files[0])
        return cube

    def get(self, indices: Iterable[int]) -> torch.Tensor:
        idx = [int(i) for i in indices]
        by_shard: dict[int, list[int]] = {}
        for pos, i in enumerate(idx):
            if not 0 <= i < self.n:
                raise IndexError(f"image {i} of a set of {self.n}")
            by_shard.setdefault(bisect.bisect_right(self.starts, i) - 1, []).append(pos)
        out: list = [None] * len(idx)
        for k in sorted(by_shard, key=lambda k: (k != self._cache[0], k)):  # the cached shard first
            arr = self._read(k)
            for pos in by_shard[k]:
                out[pos] = self._cube(k, arr, idx[pos] - self.starts[k])
        return torch.from_numpy(np.stack(out))

    def check(self, tick: Callable[[], None], with_masks: bool) -> None:
        """Read (and verify) every shard once."""
        self.size = (0, 0)
        for k, (_, _, take) in enumerate(self.shards):
            arr = self._read(k)
            for j in range(take):
                if k == 0 and j == 0:
                    self.size = tuple(arr.shape[-2:])
                self._cube(k, arr, j)
                tick()
        if self.n < 2:
            raise EvaluationError(f"--{self.role} {self.root}: the run holds {self.n} image(s); at least 2 are "
                                  f"needed")


def open_set(root: str | Path, role: str = "real", max_images: Optional[int] = None,
             tick: Callable[[], None] = lambda: None, with_masks: bool = True) -> CubeSet:
    """Open and validate a cube folder or a finished sample run (see the module docstring); ``tick`` is
    called once per image read. ``with_masks``: also read the ``<stem>_masks.npz`` files (``mask_keys``)."""
    root = Path(root)
    s = RunSet(root, role, max_images) if root.is_dir() and is_run(root) else FolderSet(root, role, max_images)
    s.check(tick, with_masks)
    return s


def check_sizes(sets: Sequence[CubeSet]) -> None:
    ref = sets[0]
    for s in sets[1:]:
        if tuple(s.size) != tuple(ref.size):
            raise EvaluationError(f"--{s.role} {s.root}: images are {s.size[0]}x{s.size[1]}, --{ref.role} images "
                                  f"are {ref.size[0]}x{ref.size[1]}; all sets must share one size")


@dataclass
class ImageSet:
    """A set in memory: ``images`` (N, 16, H, W) float32 reflectance, ``files`` (N paths),
    ``masks`` ({name: bool (N, H, W)} from mask files, or None)."""

    role: str
    root: Path
    files: list
    images: torch.Tensor
    masks: Optional[dict] = None


def load_set(root: str | Path, role: str = "real", max_images: Optional[int] = None,
             tick: Callable[[], None] = lambda: None) -> ImageSet:
    """A whole set in memory (N x cube: for small sets; :func:`retina_fast.evaluate.evaluate_folders`
    streams). ``tick`` is called once per image."""
    s = open_set(root, role, max_images, tick, with_masks=True)
    masks = None
    if s.mask_keys is not None:
        loaded = s.load_masks(range(s.n))
        masks = {k: torch.from_numpy(np.stack([m[k] for m in loaded])) for k in s.mask_keys}
    return ImageSet(role, s.root, s.files, s.get(range(s.n)), masks)


def pairwise_ms_ssim(images: CubeSet, pairs: np.ndarray, batch_size: int = 16, chunk: int = 4,
                     **ms_ssim_kwargs) -> torch.Tensor:
    """:func:`retina_fast.metrics.pairwise_ms_ssim` (data range 1) on a lazily read set: each batch of
    ``batch_size`` pairs reads only its own (at most 2 x batch_size) images, and MS-SSIM runs on ``chunk`` pairs
    at a time (its filtered moment maps take ~12 cubes per pair; the value of a pair does not depend on the
    others, and CPU convolutions give the same bits for any batch size). Returns (P,) float64."""
    from retina_fast.metrics import ms_ssim

    out = []
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            p = np.asarray(pairs[start:start + batch_size])
            uniq, inv = np.unique(p.reshape(-1), return_inverse=True)
            x = images.get(uniq.tolist())
            inv = torch.as_tensor(inv.reshape(-1, 2))
            a, b = x[inv[:, 0]], x[inv[:, 1]]
            del x
            for c in range(0, a.shape[0], chunk):
                out.append(ms_ssim(a[c:c + chunk], b[c:c + chunk], 1.0, reduction="none", warn_reduced=False,
                                   **ms_ssim_kwargs).double())
    return torch.cat(out)


def nearest_two_sets(queries: Sequence[CubeSet], train: CubeSet, memory_budget_mb: float = 256.0,
                     query_budget_mb: float = 256.0) -> list[tuple[torch.Tensor, ...]]:
    """:func:`retina_fast.metrics.nearest_two` (pixel space, L2) of every image of each query set against
    ``train``, reading blocks. Returns one (d1, d2, i1, i2) per query set, equal to ``nearest_two`` bit for bit.

    The blocks are those of ``nearest_two(memory_budget_mb)``: query chunks and training chunks of ``chunk``
    images, d^2 = |q|^2 + |t|^2 - 2 q.t in float64, a running top-2 merged over the training chunks in order,
    then the two nearest recomputed as |q - t|. Query chunks (of all sets) are held in groups of about
    ``query_budget_mb`` of float32 images; the training set is streamed once per group and the two nearest
    training images of each chunk are read back for the exact distances.
    """
    d = train.bands * train.size[0] * train.size[1]
    budget = memory_budget_mb * 2 ** 20
    chunk = max(1, int(min(budget // (2 * 8 * d), (budget / 48) ** 0.5)))
    if train.n < 2:
        raise ValueError(f"need at least 2 reference (training) samples, got {train.n}")
    chunks = [(k, s, min(s + chunk, q.n)) for k, q in enumerate(queries) for s in range(0, q.n, chunk)]
    per_group = max(1, int(query_budget_mb * 2 ** 20 // (chunk * d * 4)))
    best_d = [torch.full((q.n, 2), float("inf"), dtype=torch.float64) for q in queries]
    best_i = [torch.zeros((q.n, 2), dtype=torch.int64) for q in queries]
    exact = [torch.empty((q.n, 2), dtype=torch.float64) for q in queries]
    for g in range(0, len(chunks), per_group):
        group = chunks[g:g + per_group]
        data = [queries[k].get(range(s, e)).reshape(-1, d) for k, s, e in group]
        norms = [(qc * qc).sum(1, keepdim=True) for qc in (x.double() for x in data)]
        for rs, rbatch in train.iter_batches(chunk):
            rc = rbatch.reshape(-1, d).double()
            rn = (rc * rc).sum(1)
            idx = torch.arange(rs, rs + rc.shape[0])
            for (k, s, e), x, qn in zip(group, data, norms):
                qc = x.double()
                d2 = (qn + rn - 2.0 * qc @ rc.T).clamp_min(0.0)
                cand_d = torch.cat([best_d[k][s:e], d2], 1)
                cand_i = torch.cat([best_i[k][s:e], idx.expand_as(d2)], 1)
                top, pos = cand_d.topk(2, dim=1, largest=False)
                best_d[k][s:e], best_i[k][s:e] = top, cand_i.gather(1, pos)
            del rc, rbatch
        for (k, s, e), x in zip(group, data):
            qc = x.double()
            for j in range(2):
                rc = train.get(best_i[k][s:e, j].tolist()).reshape(-1, d).double()
                exact[k][s:e, j] = (qc - rc).norm(dim=1)
        del data, norms
    out = []
    for ex, bi in zip(exact, best_i):
        swap = ex[:, 0] > ex[:, 1]
        ex[swap] = ex[swap].flip(1)
        bi[swap] = bi[swap].flip(1)
        out.append((ex[:, 0], ex[:, 1], bi[:, 0], bi[:, 1]))
    return out
