"""Read and write hyperspectral cubes with their wavelengths: ``.npy``, ``.npz``, TIFF and HDF5 -- the one cube
I/O layer of the package: single cube files (``save_cube`` / ``load_cube``), stacks of cubes such as the shards
of a sampling run (``save_cubes`` / ``load_cubes``), and :func:`iter_cubes`, which streams the cubes of a
file, a folder of files or a run directory one at a time (evaluation, datasets).

On disk a cube is (bands, H, W) (``save_cube`` always writes that layout) with its wavelengths:

========  ===================================================================================
``.npy``  the array; wavelengths in a JSON side file ``<name>.json`` (``{"wavelengths": [...]}``)
``.npz``  arrays ``cube`` and ``wavelengths`` (+ ``metadata``, a JSON string)
``.tif``  one page per band (multi-page TIFF); JSON in the first page's ImageDescription
``.h5``   dataset ``cube`` with attributes ``wavelengths`` (and ``metadata``, JSON)
========  ===================================================================================

A stack is (N, bands, H, W): ``.npy`` the 4-D array, ``.npz`` array ``cubes``, ``.tif`` pages in N-major
order with ``"axes": "NCYX"`` and the shape in the description's JSON, ``.h5`` dataset ``cubes``; wavelengths
and metadata as for single cubes (``.npy`` stacks carry none). Every writer is atomic
(``retina_fast.files.atomic_path``): a reader never sees half a file.

``load_cube`` reads any of these (also files written elsewhere: a single 3-D array/dataset, a
(H, W, bands) layout when the wavelengths or the shape make it unambiguous, float or unsigned-integer
data) and validates it. Every problem raises :class:`CubeFormatError` (a ``ValueError``) whose message
starts with the file's path: unreadable or truncated files, a wrong number of dimensions, too few
pixels, a band count that disagrees with the wavelengths or with ``expected_bands``, unsupported
dtypes, NaN / Inf values. ``tifffile`` and ``h5py`` are optional and imported only when needed;
without them a clear ``ImportError`` names the package to install.
"""
from __future__ import annotations

import hashlib
import importlib
import io as _io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from retina_fast.files import atomic_path

__all__ = [
    "CubeFile", "CubeStack", "CubeFormatError", "SUFFIXES", "load_cube", "save_cube", "load_cubes", "save_cubes",
    "iter_cubes", "save_masks", "load_masks", "is_cube_file",
]

SUFFIXES = (".npy", ".npz", ".tif", ".tiff", ".h5", ".hdf5")
_MASK_SUFFIX = "_masks.npz"   # masks side file written by the phantom CLI; never read as a cube
MIN_SIDE = 8


class CubeFormatError(ValueError):
    """A cube file is unreadable or invalid; the message starts with the file's path."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


@dataclass
class CubeFile:
    """A validated cube: ``data`` float32 (bands, H, W), ``wavelengths`` (nm) or None if the file has
    none, ``metadata`` (free-form dict from the file), ``path``."""

    data: np.ndarray
    wavelengths: tuple[float, ...] | None
    path: Path
    metadata: dict = field(default_factory=dict)


def _optional(name: str, purpose: str):
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ImportError(
            f"{purpose} needs the optional package '{name}': pip install {name} "
            f"(or pip install 'retina_fast[io]')"
        ) from exc


def is_cube_file(path: str | Path) -> bool:
    """True for file names ``load_cube`` reads (by suffix; masks side files excluded)."""
    name = Path(path).name.lower()
    return name.endswith(SUFFIXES) and not name.endswith(_MASK_SUFFIX)


def _kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise CubeFormatError(path, f"unknown cube format {suffix!r} (expected one of {', '.join(SUFFIXES)})")
    return {".tiff": ".tif", ".hdf5": ".h5"}.get(suffix, suffix)


# ----------------------------------------------------------------------------------------- writing
def save_cube(
    path: str | Path,
    cube: Any,
    wavelengths: Sequence[float] | None = None,
    *,
    metadata: dict | None = None,
) -> Path:
    """Write ``cube`` (bands, H, W; NumPy array or torch tensor) with its wavelengths (nm).

    The format follows the suffix (see the module docstring). Data are stored as float32.
    """
    path = Path(path)
    kind = _kind(path)
    arr = np.asarray(cube.detach().cpu() if hasattr(cube, "detach") else cube, dtype=np.float32)
    if arr.ndim != 3:
        raise ValueError(f"{path}: save_cube needs a (bands, H, W) cube, got shape {arr.shape}")
    wl = None if wavelengths is None else [float(w) for w in wavelengths]
    if wl is not None and len(wl) != arr.shape[0]:
        raise ValueError(f"{path}: {len(wl)} wavelengths for a cube with {arr.shape[0]} bands")
    meta = dict(metadata or {})
    _write(path, kind, arr, wl, meta, stack=False)
    if kind == ".npy" and (wl is not None or meta):
        from retina_fast.files import atomic_write

        atomic_write(path.with_suffix(".json"), json.dumps({"wavelengths": wl, "metadata": meta}))
    return path


def _write(path: Path, kind: str, arr: np.ndarray, wl: list | None, meta: dict, stack: bool) -> None:
    """One writer for single cubes (CYX, array / dataset ``cube``) and stacks (NCYX, ``cubes``), atomic."""
    name, axes = ("cubes", "NCYX") if stack else ("cube", "CYX")
    path.parent.mkdir(parents=True, exist_ok=True)  # a user's new output folder (a file in the way raises)
    with atomic_path(path) as tmp:
        if kind == ".npy":
            with open(tmp, "wb") as fh:
                np.save(fh, arr)
        elif kind == ".npz":
            extra = {} if wl is None else {"wavelengths": np.asarray(wl, dtype=np.float64)}
            with open(tmp, "wb") as fh:
                np.savez(fh, **{name: arr}, metadata=np.asarray(json.dumps(meta)), **extra)
        elif kind == ".tif":
            tifffile = _optional("tifffile", "writing TIFF cubes")
            info = {"retina_fast": 1, "axes": axes, **({"shape": list(arr.shape)} if stack else {}),
                    "wavelengths": wl, "metadata": meta}
            tifffile.imwrite(tmp, arr, photometric="minisblack", description=json.dumps(info), metadata=None)
        else:
            h5py = _optional("h5py", "writing HDF5 cubes")
            with h5py.File(tmp, "w") as f:
                ds = f.create_dataset(name, data=arr)
                if wl is not None:
                    ds.attrs["wavelengths"] = np.asarray(wl, dtype=np.float64)
                ds.attrs["metadata"] = json.dumps(meta)


@dataclass
class CubeStack:
    """A stack of cubes: ``data`` float32 (N, bands, H, W), ``wavelengths`` or None, ``metadata``, ``path``."""

    data: np.ndarray
    wavelengths: tuple[float, ...] | None
    path: Path
    metadata: dict = field(default_factory=dict)


def save_cubes(path: str | Path, cubes: Any, wavelengths: Sequence[float] | None = None, *,
               metadata: dict | None = None) -> Path:
    """Write a stack ``cubes`` (N, bands, H, W; NumPy or torch) as float32 with its wavelengths (nm)."""
    path = Path(path)
    kind = _kind(path)
    arr = np.ascontiguousarray(np.asarray(cubes.detach().cpu() if hasattr(cubes, "detach") else cubes,
                                          dtype=np.float32))
    if arr.ndim != 4:
        raise ValueError(f"{path}: save_cubes needs a (N, bands, H, W) stack, got shape {arr.shape}")
    wl = None if wavelengths is None else [float(w) for w in wavelengths]
    if wl is not None and len(wl) != arr.shape[1]:
        raise ValueError(f"{path}: {len(wl)} wavelengths for cubes with {arr.shape[1]} bands")
    _write(path, kind, arr, None if kind == ".npy" else wl, dict(metadata or {}), stack=True)
    return path


def load_cubes(path: str | Path, *, sha256: str | None = None) -> CubeStack:
    """Read a stack written by :func:`save_cubes` (or a single cube file, as a stack of one).

    With ``sha256`` (e.g. a run manifest's record) the file is read into memory once, its hash compared and
    the array parsed from those same bytes: a modified or corrupted file raises :class:`CubeFormatError`."""
    path = Path(path)
    kind = _kind(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    source: Path | _io.BytesIO = path
    if sha256 is not None:
        data = path.read_bytes()
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise CubeFormatError(path, f"sha256 {actual[:16]}... does not match the recorded {sha256[:16]}...: "
                                        f"the file was modified or corrupted")
        source = _io.BytesIO(data)
    try:
        arr, wl, meta = _read_stack(source, kind)
    except (CubeFormatError, ImportError):
        raise
    except Exception as exc:  # noqa: BLE001 - truncated / corrupt: one clear error naming the file
        raise CubeFormatError(path, f"cannot read {kind[1:]} file (truncated or corrupt?): "
                                    f"{str(exc) or type(exc).__name__}") from exc
    if arr is None:  # a single cube
        if sha256 is not None:
            raise CubeFormatError(path, "expected a (N, bands, H, W) stack, found a single cube")
        single = load_cube(path)
        return CubeStack(single.data[None], single.wavelengths, path, single.metadata)
    if arr.ndim != 4:
        raise CubeFormatError(path, f"expected a (N, bands, H, W) stack, got shape {tuple(arr.shape)}")
    data = _to_float(path, np.ascontiguousarray(arr))
    wl = None if wl is None else tuple(float(w) for w in np.asarray(wl, dtype=np.float64).ravel())
    if wl is not None and len(wl) != data.shape[1]:
        raise CubeFormatError(path, f"{data.shape[1]} bands but {len(wl)} wavelengths in the metadata")
    return CubeStack(data, wl, path, dict(meta or {}))


def _read_stack(path, kind: str) -> tuple[np.ndarray | None, list | None, dict]:
    """The stack stored in ``path`` (a Path or the file's bytes in a BytesIO; array None: the file holds a
    single cube)."""
    if kind == ".npy":
        arr = np.load(path, allow_pickle=False, mmap_mode="r" if isinstance(path, Path) else None)
        return (np.array(arr) if arr.ndim == 4 else None), None, {}
    if kind == ".npz":
        with np.load(path, allow_pickle=False) as z:
            if "cubes" not in z.files:
                return None, None, {}
            wl = z["wavelengths"].tolist() if "wavelengths" in z.files else None
            meta = json.loads(str(z["metadata"])) if "metadata" in z.files else {}
            return z["cubes"], wl, meta
    if kind == ".tif":
        tifffile = _optional("tifffile", "reading TIFF cubes")
        with tifffile.TiffFile(path) as tif:
            desc = tif.pages[0].description if len(tif.pages) else ""
            try:
                info = json.loads(desc) if desc else {}
            except ValueError:
                info = {}
            if not isinstance(info, dict) or info.get("axes") != "NCYX":
                return None, None, {}
            return tif.asarray().reshape(info["shape"]), info.get("wavelengths"), info.get("metadata") or {}
    h5py = _optional("h5py", "reading HDF5 cubes")
    with h5py.File(path, "r") as f:
        if "cubes" not in f:
            return None, None, {}
        ds = f["cubes"]
        wl = ds.attrs["wavelengths"].tolist() if "wavelengths" in ds.attrs else None
        raw = ds.attrs.get("metadata", "{}")
        return ds[()], wl, json.loads(raw.decode() if isinstance(raw, bytes) else str(raw))


def iter_cubes(source: str | Path, *, expected_bands: int | None = None) -> Iterator[CubeFile]:
    """Stream the cubes of ``source`` one at a time, whatever holds them: a cube or stack file, a folder of cube
    files (sorted by name, masks side files skipped), or a sampling run directory (its ``manifest.json``
    shards, in image order). Memory: one file (one shard) at a time."""
    source = Path(source)
    if source.is_dir() and (source / "manifest.json").is_file():
        from retina_fast.shards import iter_manifest

        files = [(path, record["sha256"]) for record, path in iter_manifest(source)]  # verified as read
    elif source.is_dir():
        files = [(p, None) for p in sorted(source.iterdir()) if p.is_file() and is_cube_file(p)]
    else:
        files = [(source, None)]
    for path, sha256 in files:
        stack = load_cubes(path, sha256=sha256)
        if expected_bands is not None and stack.data.shape[1] != expected_bands:
            raise CubeFormatError(path, f"wrong band count: {stack.data.shape[1]} bands, expected {expected_bands}")
        for i, cube in enumerate(stack.data):
            name = path if stack.data.shape[0] == 1 else path.with_name(f"{path.stem}[{i}]{path.suffix}")
            yield CubeFile(cube, stack.wavelengths, name, stack.metadata)


def save_masks(path: str | Path, masks: dict[str, Any]) -> Path:
    """Write bool masks (name -> (H, W)) to an ``.npz`` file (uncompressed, one array per mask)."""
    path = Path(path)
    arrays = {k: np.asarray(v.cpu() if hasattr(v, "cpu") else v, dtype=bool) for k, v in masks.items()}
    np.savez(path, **arrays)
    return path


def load_masks(path: str | Path) -> dict[str, np.ndarray]:
    """Read masks written by :func:`save_masks` (bool (H, W) arrays by name)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k].astype(bool) for k in z.files}
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - any reader failure becomes one clear error
        raise CubeFormatError(path, f"cannot read masks: {exc}") from exc


# ----------------------------------------------------------------------------------------- reading
def _read_raw(path: Path, kind: str, dataset: str | None) -> tuple[np.ndarray, list | None, dict]:
    """(array, wavelengths or None, metadata) exactly as stored; raises on unreadable files."""
    if kind == ".npy":
        arr = np.load(path, allow_pickle=False)
        side = path.with_suffix(".json")
        wl, meta = None, {}
        if side.exists():
            info = json.loads(side.read_text())
            wl, meta = info.get("wavelengths"), info.get("metadata") or {}
        return arr, wl, meta
    if kind == ".npz":
        with np.load(path, allow_pickle=False) as z:
            names = list(z.files)
            key = dataset or ("cube" if "cube" in names else None)
            if key is None:
                cands = [n for n in names if z[n].ndim == 3]
                if len(cands) != 1:
                    raise CubeFormatError(path, f"no 'cube' array and {len(cands)} 3-D arrays in {names}")
                key = cands[0]
            if key not in names:
                raise CubeFormatError(path, f"no array {key!r} (arrays: {names})")
            arr = z[key]
            wl = z["wavelengths"].tolist() if "wavelengths" in names else None
            meta = json.loads(str(z["metadata"])) if "metadata" in names else {}
        return arr, wl, meta
    if kind == ".tif":
        tifffile = _optional("tifffile", "reading TIFF cubes")
        with tifffile.TiffFile(path) as tif:
            arr = tif.asarray()
            desc = tif.pages[0].description if len(tif.pages) else ""
        info: dict = {}
        if desc:
            try:
                info = json.loads(desc)
            except ValueError:
                info = {}
        if not isinstance(info, dict):
            info = {}
        return arr, info.get("wavelengths"), info.get("metadata") or {}
    h5py = _optional("h5py", "reading HDF5 cubes")
    with h5py.File(path, "r") as f:
        key = dataset or ("cube" if "cube" in f else None)
        if key is None:
            cands = [k for k, v in f.items() if isinstance(v, h5py.Dataset) and v.ndim == 3]
            if len(cands) != 1:
                raise CubeFormatError(path, f"no 'cube' dataset and {len(cands)} 3-D datasets")
            key = cands[0]
        if key not in f:
            raise CubeFormatError(path, f"no dataset {key!r} (has: {list(f.keys())})")
        ds = f[key]
        arr = ds[()]
        wl = ds.attrs["wavelengths"].tolist() if "wavelengths" in ds.attrs else None
        raw_meta = ds.attrs.get("metadata", "{}")
        meta = json.loads(raw_meta.decode() if isinstance(raw_meta, bytes) else str(raw_meta))
    return arr, wl, meta


def _to_float(path: Path, arr: np.ndarray) -> np.ndarray:
    """float32 copy; unsigned integers are scaled by their maximum (0..255 / 0..65535 -> 0..1)."""
    if arr.dtype.kind == "f":
        return arr.astype(np.float32, copy=False)
    if arr.dtype.kind == "u" and arr.dtype.itemsize <= 2:
        return arr.astype(np.float32) / np.float32(np.iinfo(arr.dtype).max)
    raise CubeFormatError(
        path, f"unsupported dtype {arr.dtype} (expected float16/32/64 reflectance or uint8/uint16)"
    )


def _layout(path: Path, arr: np.ndarray, n_wl: int | None, expected: int | None) -> np.ndarray:
    """Return (bands, H, W); a (H, W, bands) array is transposed when that is unambiguous."""
    if arr.ndim != 3:
        raise CubeFormatError(path, f"expected a 3-D cube (bands, H, W), got shape {tuple(arr.shape)}")
    n = n_wl if n_wl is not None else expected
    first, last = arr.shape[0], arr.shape[2]
    if n is not None:
        if first == n:
            return arr
        if last == n:
            return np.moveaxis(arr, -1, 0)
        return arr  # the band-count check below reports the mismatch
    if last < first and last < arr.shape[1]:
        return np.moveaxis(arr, -1, 0)  # channels-last is the only sensible reading
    return arr


def load_cube(
    path: str | Path,
    *,
    expected_bands: int | None = None,
    dataset: str | None = None,
) -> CubeFile:
    """Read and validate the cube in ``path`` (see the module docstring for formats and checks).

    ``expected_bands``: required band count when known (e.g. files without wavelengths feeding a
    16-band model). ``dataset``: array / dataset name inside ``.npz`` / ``.h5`` files (default:
    ``cube``, else the only 3-D one).
    """
    path = Path(path)
    kind = _kind(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if path.is_dir():
        raise CubeFormatError(path, "is a directory, not a cube file")
    try:
        arr, wl, meta = _read_raw(path, kind, dataset)
    except (CubeFormatError, ImportError):
        raise
    except Exception as exc:  # noqa: BLE001 - truncated / corrupt / permission: one clear error
        reason = str(exc) or type(exc).__name__
        raise CubeFormatError(path, f"cannot read {kind[1:]} file (truncated or corrupt?): {reason}") from exc
    if arr.dtype.kind not in "fu" or (arr.dtype.kind == "u" and arr.dtype.itemsize > 2):
        raise CubeFormatError(
            path, f"unsupported dtype {arr.dtype} (expected float16/32/64 reflectance or uint8/uint16)"
        )
    if wl is not None:
        try:
            wl = tuple(float(w) for w in np.asarray(wl, dtype=np.float64).ravel())
        except (TypeError, ValueError) as exc:
            raise CubeFormatError(path, f"wavelength metadata is not a list of numbers: {exc}") from exc
        if not all(np.isfinite(wl)):
            raise CubeFormatError(path, "wavelength metadata contains NaN/Inf")
    arr = _layout(path, arr, None if wl is None else len(wl), expected_bands)
    bands, h, w = arr.shape
    if wl is not None and len(wl) != bands:
        raise CubeFormatError(path, f"{bands} bands but {len(wl)} wavelengths in the metadata")
    if expected_bands is not None and wl is None and bands != expected_bands:
        raise CubeFormatError(
            path, f"wrong band count: {bands} bands, expected {expected_bands} (shape {tuple(arr.shape)})"
        )
    if h < MIN_SIDE or w < MIN_SIDE:
        raise CubeFormatError(path, f"image too small: {h}x{w} pixels (shape {tuple(arr.shape)})")
    data = _to_float(path, np.ascontiguousarray(arr))
    finite = np.isfinite(data)
    if not finite.all():
        bad = int(data.size - finite.sum())
        kinds = ", ".join(k for k, t in (("NaN", np.isnan(data).any()), ("Inf", np.isinf(data).any())) if t)
        raise CubeFormatError(path, f"{bad} non-finite values ({kinds})")
    return CubeFile(data=data, wavelengths=wl, path=path, metadata=dict(meta or {}))
