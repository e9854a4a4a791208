"""Production sampling runs: shards written atomically, a manifest, resume, and rank slicing.

Layout of a run directory::

    run.json                 the run's identity (model, config sha256, seed, n, steps, sampler, eta,
                             backend, dtype, shard size, format, wavelengths): resume refuses a mismatch
    shard-00000.npy|tif|h5   images [0, S) as (count, bands, H, W) float32 reflectance
    shard-00000.done.json    written after the shard (atomically): first, count, file, sha256
    manifest.json            written when every shard is done: the shard list with hashes
    preview.png              optional contact sheet of the first images

A shard counts as done only when its ``.done.json`` exists and the file's sha256 matches it, so a run
killed at any instant resumes with no duplicates and no gaps. Under torchrun, shard k belongs to rank
k mod world_size; image i is a pure function of (seed, i), so the union of the ranks' shards equals the
single-process run.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from retina_fast.files import atomic_write
from retina_fast.io import save_cubes

FORMATS = {"npy": ".npy", "tiff": ".tif", "h5": ".h5"}


class RunMismatch(ValueError):
    """--resume with arguments that differ from the run already in the directory."""


@dataclass(frozen=True)
class RunSpec:
    model: str
    model_sha256: str
    seed: int
    n: int
    steps: int
    sampler: str
    eta: float
    backend: str
    dtype: str
    shard_size: int
    format: str
    wavelengths: tuple[float, ...]

    def shards(self) -> list[tuple[int, int, int]]:
        """(index, first image, count) for every shard of the run."""
        return [(k, s, min(self.shard_size, self.n - s)) for k, s in enumerate(range(0, self.n, self.shard_size))]

    def shard_path(self, out: Path, k: int) -> Path:
        return out / f"shard-{k:05d}{FORMATS[self.format]}"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_shard(path: str | Path) -> np.ndarray:
    """(count, bands, H, W) float32 from a shard file, with a clear error naming a bad file."""
    from retina_fast.io import CubeFormatError, load_cubes

    path = Path(path)
    if path.suffix not in FORMATS.values():
        raise ValueError(f"{path}: unknown shard format {path.suffix!r}")
    try:
        arr = load_cubes(path).data
    except (OSError, CubeFormatError) as exc:
        raise ValueError(f"{path}: unreadable shard ({exc})") from exc
    if arr.ndim != 4:
        raise ValueError(f"{path}: expected a (count, bands, H, W) float32 shard, got {arr.dtype} {arr.shape}")
    return arr


def load_spec(out: Path) -> RunSpec | None:
    path = out / "run.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    data["wavelengths"] = tuple(data["wavelengths"])
    return RunSpec(**data)


def prepare_run(out: Path, spec: RunSpec, *, resume: bool, rank: int = 0) -> None:
    """Create the run directory (rank 0 writes run.json) or check that ``--resume`` matches it."""
    out.mkdir(parents=True, exist_ok=True)
    existing = load_spec(out)
    if existing is None:
        leftovers = [p.name for p in out.glob("shard-*")]
        if leftovers:
            raise RunMismatch(f"{out} holds shards but no run.json: not a retina-fast run directory")
        if rank == 0:
            atomic_write(out / "run.json", json.dumps(asdict(spec), indent=2).encode())
        return
    if not resume:
        raise RunMismatch(f"{out} already holds a run; pass --resume to finish it or choose another --out")
    if existing != spec:
        diff = [f"{k}: {getattr(existing, k)!r} -> {getattr(spec, k)!r}" for k in asdict(spec)
                if getattr(existing, k) != getattr(spec, k)]
        raise RunMismatch(f"--resume with different settings than {out / 'run.json'}: " + "; ".join(diff))


def shard_done(out: Path, spec: RunSpec, k: int) -> bool:
    side = out / f"shard-{k:05d}.done.json"
    path = spec.shard_path(out, k)
    if not (side.exists() and path.exists()):
        return False
    try:
        record = json.loads(side.read_text())
    except (OSError, ValueError):
        return False
    return record.get("sha256") == sha256_file(path)


def run_shards(out: Path, spec: RunSpec, produce: Callable[[int, int], np.ndarray], *, rank: int = 0,
               world: int = 1, on_images: Callable[[int], None] | None = None) -> list[int]:
    """Produce and write every missing shard of this rank; returns the shard indices written now."""
    written = []
    for k, first, count in spec.shards():
        if k % world != rank or shard_done(out, spec, k):
            continue
        cubes = np.ascontiguousarray(produce(first, count), dtype=np.float32)
        if cubes.shape[0] != count:
            raise RuntimeError(f"shard {k}: produced {cubes.shape[0]} images, expected {count}")
        path = spec.shard_path(out, k)
        save_cubes(path, cubes, spec.wavelengths, metadata={"first": first, "count": count, "seed": spec.seed})
        record = {"index": k, "first": first, "count": count, "file": path.name, "sha256": sha256_file(path)}
        atomic_write(out / f"shard-{k:05d}.done.json", json.dumps(record).encode())
        written.append(k)
        if on_images is not None:
            on_images(count)
    return written


def pending_images(out: Path, spec: RunSpec, rank: int = 0, world: int = 1) -> int:
    return sum(c for k, _, c in spec.shards() if k % world == rank and not shard_done(out, spec, k))


def write_manifest(out: Path, spec: RunSpec) -> Path:
    """Check that every shard is done (no gaps) and write manifest.json."""
    records, missing = [], []
    for k, first, count in spec.shards():
        if not shard_done(out, spec, k):
            missing.append(k)
            continue
        records.append(json.loads((out / f"shard-{k:05d}.done.json").read_text()))
    if missing:
        raise RuntimeError(f"{out}: shards {missing[:10]} are missing or corrupt; run again with --resume")
    manifest = {"run": asdict(spec), "shards": records, "images": spec.n}
    path = out / "manifest.json"
    atomic_write(path, json.dumps(manifest, indent=2).encode())
    return path


def iter_manifest(out: str | Path) -> Iterator[tuple[dict, Path]]:
    """(shard record, shard path) for every shard of a finished run, verifying the manifest exists."""
    out = Path(out)
    path = out / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no manifest (the run is unfinished or this is not a run directory)")
    manifest = json.loads(path.read_text())
    for record in manifest["shards"]:
        yield record, out / record["file"]
