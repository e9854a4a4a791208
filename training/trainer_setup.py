"""Run setup shared by the trainers: command-line options (and how ``--resume`` merges them), model
configs from a preset plus a JSON override, and training data as batches.

Options: every option defaults to None on the command line and is filled from the trainer's defaults.
On ``--resume`` the run's saved options are used; options in ``MUTABLE`` (how long / how often / where)
may change, any other option given explicitly must equal the saved value (else ``ValueError``), so a
resumed run is the same run. The saved options include the resolved architecture, so a later change of
a preset in code does not change a resumed run.

Data: ``phantom`` = eyes 0 .. N-1 of ``retina_fast.phantom`` (via ``retina_fast.data.PhantomDataset``)
rendered once by rank 0 into ``RUN/cache/`` (float16 reflectance) and held in memory; a directory =
``retina_fast.data.CubeFolderDataset`` read lazily by a DataLoader (``--num-workers``). Both are mapped to
the VQ-GAN's units (``reflectance_to_model``) as they are read.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from safetensors.torch import load_file, save_file

from retina_fast.models import LDMConfig, get_preset
from retina_fast.models.normalisation import band_statistics, reflectance_to_model
from retina_fast.training.trainer import BatchPlan, DistInfo

__all__ = ["MUTABLE", "add_common_arguments", "resolve_options", "resolve_config", "DataSource", "load_data"]

MUTABLE = {"steps", "num_workers", "log_every", "sample_every", "ckpt_every", "device", "out", "resume"}
_CLI_ROUTING = {"func", "command", "model"}  # argparse sub-command selectors, not run options


def add_common_arguments(p: argparse.ArgumentParser, defaults: Mapping[str, Any]) -> None:
    """Options every trainer has (defaults shown from ``defaults``; all parse to None when absent)."""
    def d(key: str) -> str:
        return f" (default {defaults.get(key)})"

    p.add_argument("--preset", help="model preset: tiny, paper-224, paper-672, sweep-f8-c8-b512, ..." + d("preset"))
    p.add_argument("--config-json", metavar="JSON", help="JSON file or inline JSON overriding preset fields, e.g. "
                   "'{\"vqgan\": {\"image_size\": 32}, \"unet\": {\"base_channels\": 16}}'")
    p.add_argument("--data", help="'phantom' (rendered eyes) or a directory of cubes" + d("data"))
    p.add_argument("--out", required=True, metavar="RUN", help="run directory (checkpoints, logs, previews, final/)")
    p.add_argument("--steps", type=int, help="total optimisation steps" + d("steps"))
    p.add_argument("--batch-size", type=int, help="global batch size (split over DDP ranks)" + d("batch_size"))
    p.add_argument("--lr", type=float, help="Adam learning rate" + d("lr"))
    p.add_argument("--seed", type=int, help="seed of initialisation, data order and noise" + d("seed"))
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--num-workers", type=int,
                   help="worker processes rendering phantoms / reading a cube directory" + d("num_workers"))
    p.add_argument("--num-images", type=int, help="phantom eyes to render (--data phantom)" + d("num_images"))
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--amp", choices=("off", "bf16"), help="bf16 autocast" + d("amp"))
    p.add_argument("--grad-clip", type=float, help="max gradient norm (0: off)" + d("grad_clip"))
    p.add_argument("--log-every", type=int, help="steps between log rows" + d("log_every"))
    p.add_argument("--sample-every", type=int, help="steps between preview PNGs (0: off)" + d("sample_every"))
    p.add_argument("--ckpt-every", type=int, help="steps between checkpoints" + d("ckpt_every"))


def resolve_options(args: argparse.Namespace, defaults: Mapping[str, Any],
                    saved: Mapping[str, Any] | None) -> dict[str, Any]:
    """Command-line values, else saved values (resume), else defaults; checks resume consistency."""
    given = {k: v for k, v in vars(args).items() if k not in _CLI_ROUTING and v is not None}
    if saved is None:
        opts = {**defaults, **given}
    else:
        clash = sorted(k for k, v in given.items() if k not in MUTABLE and k in saved and saved[k] != v)
        if clash:
            detail = ", ".join(f"--{k.replace('_', '-')} {given[k]!r} (run has {saved[k]!r})" for k in clash)
            raise ValueError(f"--resume continues the same run; these options differ from it: {detail}")
        opts = {**defaults, **saved, **{k: v for k, v in given.items() if k in MUTABLE}}
    for key in ("steps", "batch_size", "num_images", "log_every", "ckpt_every"):
        if key in opts and (not isinstance(opts[key], int) or opts[key] < 1):
            raise ValueError(f"--{key.replace('_', '-')} must be a positive integer, got {opts[key]!r}")
    for key in ("num_workers", "sample_every"):
        if key in opts and opts[key] < 0:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 0, got {opts[key]!r}")
    if opts.get("lr") is not None and not opts["lr"] > 0:
        raise ValueError(f"--lr must be positive, got {opts['lr']!r}")
    return opts


def _merge(base: dict, over: Mapping) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def resolve_config(preset: str, config_json: str | None = None) -> LDMConfig:
    """A preset, with fields overridden by a JSON file or inline JSON object (nested like LDMConfig)."""
    try:
        cfg = get_preset(preset)
    except KeyError as exc:
        raise ValueError(exc.args[0]) from None
    if not config_json:
        return cfg
    text = config_json.strip()
    if not text.startswith("{"):
        path = Path(text)
        if not path.is_file():
            raise ValueError(f"--config-json {text!r}: neither inline JSON nor an existing file")
        text = path.read_text(encoding="utf-8")
    try:
        over = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--config-json: invalid JSON ({exc})") from None
    if not isinstance(over, dict):
        raise ValueError("--config-json must be a JSON object")
    merged = _merge(cfg.to_dict(), over)
    if "unet" not in over or "in_channels" not in over["unet"]:
        merged["unet"]["in_channels"] = merged["vqgan"]["latent_channels"]
    try:
        return LDMConfig.from_dict(merged)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"--config-json: {exc}") from None


class DataSource:
    """N training images (bands, H, W): in memory as reflectance (``images``) or a lazy ``dataset`` of
    reflectance cubes. ``get`` / ``batches`` return them in the units of ``config`` (a ``VQGANConfig``,
    ``reflectance_to_model``); the trainer may replace ``config`` once it knows the normalisation."""

    def __init__(self, images: torch.Tensor | None = None, dataset=None, description: str = "",
                 config=None) -> None:
        self.images, self.dataset, self.description, self.config = images, dataset, description, config

    def __len__(self) -> int:
        return len(self.images) if self.images is not None else len(self.dataset)

    def reflectance(self, indices: list[int]) -> torch.Tensor:
        """(len(indices), bands, H, W) float32 reflectance."""
        if self.images is not None:
            return self.images[indices].float()
        return torch.stack([self.dataset[i] for i in indices]).float()

    def _model(self, r: torch.Tensor) -> torch.Tensor:
        return r if self.config is None else reflectance_to_model(r, self.config)

    def get(self, indices: list[int]) -> torch.Tensor:
        """(len(indices), bands, H, W) float32 in model units."""
        return self._model(self.reflectance(indices))

    def batches(self, plan: BatchPlan, start: int, stop: int, num_workers: int = 0) -> Iterator[torch.Tensor]:
        """This rank's batches for steps start .. stop-1 (float32, CPU, model units)."""
        if self.images is not None or num_workers == 0:
            for s in range(start, stop):
                yield self.get(plan.local_indices(s))
            return
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=plan.batches(start, stop),
                                             num_workers=num_workers, persistent_workers=False)
        yield from (self._model(x.float()) for x in loader)

    def band_statistics(self, max_images: int = 256) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-band (mean, std) of the reflectance inside the field of view over up to ``max_images``
        evenly spaced images (``retina_fast.models.normalisation.band_statistics``)."""
        n = len(self)
        idx = sorted({int(i) for i in torch.linspace(0, n - 1, min(n, max_images))})
        return band_statistics(self.reflectance(idx[i:i + 32]) for i in range(0, len(idx), 32))


def load_data(data: str, num_images: int, config, info: DistInfo, run_dir: Path, num_workers: int = 0
              ) -> DataSource:
    """Training images for a ``VQGANConfig`` (size, wavelengths, normalisation); see the module docstring.
    ``num_workers`` processes render the phantoms."""
    from retina_fast.data import CubeFolderDataset, PhantomDataset

    size, wl = config.image_size, config.wavelengths
    if data != "phantom":
        root = Path(data)
        if not root.is_dir():
            raise ValueError(f"--data {data!r}: not 'phantom' and not a directory")
        ds = CubeFolderDataset(root, wavelengths=wl, size=size, out_range=None)
        return DataSource(dataset=ds, description=f"{root} ({len(ds)} cubes)", config=config)
    # reflectance in float16 (relative precision 5e-4: ~2e-5 at the visible bands' 3-4 %)
    cache = run_dir / "cache" / f"phantom_reflectance_s{size}_n{num_images}.safetensors"
    if info.is_main and not cache.is_file():
        from tqdm import tqdm

        ds = PhantomDataset(num_images, size, wavelengths=wl, out_range=None)
        loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=num_workers)
        imgs = torch.cat([b.half() for b in tqdm(loader, desc="render phantoms", unit="batch", leave=False)])
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        save_file({"images": imgs}, str(tmp))
        tmp.replace(cache)
    info.barrier()
    imgs = load_file(str(cache))["images"]
    return DataSource(images=imgs, description=f"phantom eyes 0..{num_images - 1} at {size}x{size}", config=config)
