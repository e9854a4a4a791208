"""Production sampling runs: shards written atomically, a manifest, resume, and rank slicing.

Layout of a run directory::

    run.json                 the run's identity (model, config sha256, seed, n, steps, sampler, eta,
                             spacing, backend, dtype, shard size, format, wavelengths, batch size where the
                             backend's images depend on it): resume refuses a mismatch
    shard-00000.npy|tif|h5   images [0, S) as (count, bands, H, W) float32 reflectance
    shard-00000.done.json    written after the shard (atomically): first, count, file, sha256
    manifest.json            written when every shard is done: the shard list with hashes
    preview.png              optional contact sheet of the first images

A shard counts as done only when its ``.done.json`` exists and the file's sha256 matches it, so a run
killed at any instant resumes with no duplicates and no gaps. Reading a finished run back
(:func:`read_shard` with the manifest's ``sha256``) hashes the bytes it has read anyway, once per shard
read, and refuses a shard whose bytes changed. Files are created with the user's umask. Under torchrun,
shard k belongs to rank k mod world_size; image i is drawn from (seed, i) alone and the batch size is
fixed by run.json where it matters, so the union of the ranks' shards equals the single-process run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from retina_fast.files import atomic_write
from retina_fast.io import save_cubes

FORMATS = {"npy": ".npy", "tiff": ".tif", "h5": ".h5"}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class RunError(ValueError):
    """A run directory that cannot be used as asked; the message names the file."""


class RunMismatch(RunError):
    """--resume with arguments that differ from the run already in the directory."""


class BadRunFile(RunError):
    """A run file (run.json, manifest.json, a shard) is unreadable, malformed or corrupted."""


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
    # Images per sampling batch where the backend cannot promise that image i is the same whatever the
    # batch (Runner.batch_invariant); None where it can, and in runs written before this field existed.
    batch_size: int | None = None
    # The cpu backend's convolution library per part, {"unet": direct | onednn | null, "decoder": ...}, measured
    # when its runner is built: kept on --resume and shared by torchrun ranks so that every image of a run is
    # computed the same way. None for other backends and in runs written before this field existed; a plain
    # string in runs written before the decoder chose too (the U-Net's; their decoder ran direct).
    convolutions: str | dict | None = None
    # The timestep spacing (retina_fast.schedules.SPACINGS). None in runs written before this field existed:
    # those cannot say whether they ran DDIM / DDPM from t = T - 1 ("linspace", before 2026-12-04) or from
    # t = 989 ("trimmed"), so `retina-fast sample --resume` asks for --spacing and records it.
    spacing: str | None = None

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


def read_shard(path: str | Path, sha256: str | None = None) -> np.ndarray:
    """(count, bands, H, W) float32 from a shard file, with a clear error naming a bad file.

    With ``sha256`` (the manifest's record) the file is read into memory once, its hash compared and the
    array parsed from those same bytes (:func:`retina_fast.io.load_cubes`): a modified or corrupted shard
    raises :class:`BadRunFile`."""
    from retina_fast.io import CubeFormatError, load_cubes

    path = Path(path)
    if path.suffix not in FORMATS.values():
        raise BadRunFile(f"{path}: unknown shard format {path.suffix!r}")
    try:
        arr = load_cubes(path, sha256=sha256).data
    except OSError as exc:
        raise BadRunFile(f"{path}: cannot read shard ({exc.strerror or exc})") from exc
    except CubeFormatError as exc:
        hint = ("; run `retina-fast sample ... --resume` with the run's settings to draw it again"
                if "sha256" in str(exc) else "")
        raise BadRunFile(f"{path}: unreadable shard ({exc}){hint}") from exc
    if arr.ndim != 4:
        raise BadRunFile(f"{path}: expected a (count, bands, H, W) float32 shard, got {arr.dtype} {arr.shape}")
    return arr


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise BadRunFile(f"{path}: not valid JSON (not UTF-8 text)") from exc
    try:
        return json.loads(text, parse_constant=_no_constant)
    except (json.JSONDecodeError, ValueError) as exc:
        raise BadRunFile(f"{path}: not valid JSON ({exc}); the file is truncated or corrupt") from exc


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _spec_problem(key: str, value: Any) -> str | None:
    """Why ``value`` is not a valid ``key`` of run.json (None when it is)."""
    from retina_fast.samplers import SAMPLERS
    from retina_fast.schedules import SPACINGS

    if key in ("model", "backend", "dtype"):
        return None if isinstance(value, str) and value else "must be a non-empty string"
    if key == "model_sha256":
        return None if isinstance(value, str) and _SHA256.match(value) else "must be a 64-digit hex sha256"
    if key == "seed":
        return None if _is_int(value) and -2**63 <= value < 2**64 else "must be an integer that fits in 64 bits"
    if key in ("n", "steps", "shard_size"):
        return None if _is_int(value) and value >= 1 else "must be a positive integer"
    if key == "batch_size":
        return None if value is None or (_is_int(value) and value >= 1) else "must be null or a positive integer"
    if key == "convolutions":
        libraries = (None, "direct", "onednn")
        ok = value in libraries or (isinstance(value, dict) and set(value) == set(CONVOLUTION_PARTS)
                                    and all(v in libraries for v in value.values()))
        return None if ok else ('must be null, "direct", "onednn" or {"unet": .., "decoder": ..} with each of '
                                'null, "direct", "onednn"')
    if key == "sampler":
        return None if value in SAMPLERS else f"must be one of {', '.join(SAMPLERS)}"
    if key == "spacing":
        return None if value is None or value in SPACINGS else f"must be null or one of {', '.join(SPACINGS)}"
    if key == "format":
        return None if value in FORMATS else f"must be one of {', '.join(FORMATS)}"
    if key == "eta":
        return None if _is_number(value) and value >= 0 else "must be a finite number >= 0"
    if key == "wavelengths":
        ok = isinstance(value, list) and value and all(_is_number(w) and w > 0 for w in value)
        return None if ok else "must be a non-empty list of positive numbers (nm)"
    return "unknown key"


CONVOLUTION_PARTS = ("unet", "decoder")  # the cpu runner's parts that choose a convolution library each


def convolutions_by_part(value: str | dict | None) -> dict[str, str]:
    """A run's recorded ``convolutions`` as ``{"unet": .., "decoder": ..}``: a run written before the field
    existed ran the direct kernels, one written before the decoder chose recorded the U-Net's library."""
    if isinstance(value, dict):
        return dict(value)
    return {"unet": value or "direct", "decoder": "direct"}


def spec_from_dict(data: Any, path: Path) -> RunSpec:
    """A RunSpec from run.json's content; :class:`BadRunFile` naming ``path`` and the key otherwise."""
    if not isinstance(data, dict):
        raise BadRunFile(f"{path}: expected a JSON object, got {type(data).__name__}")
    fields = [f.name for f in dataclasses.fields(RunSpec)]
    optional = {"batch_size", "convolutions", "spacing"}  # absent in runs written before they existed
    unknown = sorted(set(data) - set(fields))
    missing = [k for k in fields if k not in data and k not in optional]
    if unknown or missing:
        parts = ([f"unknown key(s) {', '.join(unknown)}"] if unknown else []) + \
                ([f"missing key(s) {', '.join(missing)}"] if missing else [])
        raise BadRunFile(f"{path}: not a retina-fast run file: " + "; ".join(parts))
    for key, value in data.items():
        problem = _spec_problem(key, value)
        if problem:
            raise BadRunFile(f"{path}: {key} {problem}, got {json.dumps(value)[:80]}")
    return RunSpec(**{**data, "wavelengths": tuple(float(w) for w in data["wavelengths"]),
                      "eta": float(data["eta"])})


def load_spec(out: Path) -> RunSpec | None:
    """The RunSpec in ``out/run.json`` (None when there is none); :class:`BadRunFile` for a bad file."""
    path = out / "run.json"
    if not path.exists():
        return None
    return spec_from_dict(_read_json(path), path)


def spec_json(spec: RunSpec) -> bytes:
    return json.dumps(asdict(spec), indent=2, allow_nan=False).encode()


def prepare_run(out: Path, spec: RunSpec, *, resume: bool, rank: int = 0) -> None:
    """Create the run directory (rank 0 writes run.json) or check that ``--resume`` matches it."""
    if out.exists() and not out.is_dir():
        raise RunMismatch(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    existing = load_spec(out)
    if existing is None:
        leftovers = [p.name for p in out.glob("shard-*")]
        if leftovers:
            raise RunMismatch(f"{out} holds shards but no run.json: not a retina-fast run directory")
        if rank == 0:
            atomic_write(out / "run.json", spec_json(spec))
        return
    if not resume:
        raise RunMismatch(f"{out} already holds a run; pass --resume to finish it or choose another --out")
    if existing != spec:
        diff = [k for k in asdict(spec) if getattr(existing, k) != getattr(spec, k)]
        if diff == ["batch_size"] and existing.batch_size is not None:
            raise RunMismatch(f"--resume with batch size {spec.batch_size}, but {out / 'run.json'} records "
                              f"{existing.batch_size} and this backend's images depend on the batch size; "
                              f"resume with --batch-size {existing.batch_size} (or without --batch-size)")
        raise RunMismatch(f"--resume with different settings than {out / 'run.json'}: " + "; ".join(
            f"{k}: {getattr(existing, k)!r} -> {getattr(spec, k)!r}" for k in diff))


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
    atomic_write(path, json.dumps(manifest, indent=2, allow_nan=False).encode())
    return path


def _record_problem(record: Any) -> str | None:
    if not isinstance(record, dict):
        return "a shard record is not an object"
    for key in ("first", "count"):
        if not _is_int(record.get(key)) or record[key] < (1 if key == "count" else 0):
            return f"shard record {key} must be a {'positive' if key == 'count' else 'non-negative'} integer"
    name = record.get("file")
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        return "shard record file must be a file name inside the run directory"
    if not isinstance(record.get("sha256"), str) or not _SHA256.match(record["sha256"]):
        return "shard record sha256 must be a 64-digit hex digest"
    return None


def iter_manifest(out: str | Path) -> Iterator[tuple[dict, Path]]:
    """(shard record, shard path) for every shard of a finished run. The manifest is checked first
    (:class:`BadRunFile` naming it); each record's ``sha256`` is what :func:`read_shard` verifies."""
    out = Path(out)
    path = out / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no manifest (the run is unfinished or this is not a run directory)")
    manifest = _read_json(path)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise BadRunFile(f"{path}: not a retina-fast manifest (no 'shards' list)")
    for i, record in enumerate(manifest["shards"]):
        problem = _record_problem(record)
        if problem:
            raise BadRunFile(f"{path}: shard {i}: {problem}")
    return iter([(record, out / record["file"]) for record in manifest["shards"]])
