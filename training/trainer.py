"""Loop helpers shared by the trainers: distributed setup, deterministic batch plans, EMA, train-state
checkpoints with exact resume, metric logs and provenance.

Data order is a pure function of (seed, step): epoch e visits ``randperm(N)`` drawn from a generator
seeded by (seed, e); global step s reads positions [p B, (p + 1) B) of epoch s // (N // B), p = s mod
(N // B) (the incomplete last batch is dropped). Under DDP rank r of W takes the contiguous slice
[r B/W, (r + 1) B/W) of that global batch, so W processes see exactly the batch one process would.

Train-state checkpoint = a ``retina_fast.checkpoint`` directory ``RUN/checkpoints/step_<s>/``:
model / EMA / optimizer tensors and RNG states as safetensors (never pickle), and in ``config.json``
the step, the run options, the optimizers' hyper-parameters and the non-tensor RNG parts.
``RUN/checkpoints/latest`` (a text file, replaced atomically) names the newest complete one.
"""
from __future__ import annotations

import copy
import csv
import json
import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from retina_fast.checkpoint import load_checkpoint, load_state_into, save_checkpoint
from retina_fast.files import atomic_write

__all__ = ["checkpoint_to_resume", "DistInfo", "init_distributed", "BatchPlan", "epoch_permutation", "step_generator", "EMA",
           "save_train_state", "load_train_state", "latest_checkpoint", "MetricLogger", "provenance", "command_line",
           "unwrap", "seed_everything"]

_GOLDEN = 0x9E3779B97F4A7C15


@dataclass(frozen=True)
class DistInfo:
    """rank / world size of this process, its device, and whether we created the process group."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the process group: an existing one (tests spawn their own), one launched by ``torchrun``
    (gloo on CPU, NCCL on CUDA), or none (a single process). ``device`` None: CUDA if available."""
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    owns = False
    if not dist.is_initialized() and dist.is_available() and dist.is_torchelastic_launched():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        owns = True
    if not dist.is_initialized():
        return DistInfo(0, 1, dev, False)
    rank, world = dist.get_rank(), dist.get_world_size()
    if dev.type == "cuda" and dev.index is None:
        from retina_fast import _env

        dev = torch.device("cuda", _env.local_rank() if owns else rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    return DistInfo(rank, world, dev, owns)


def seed_everything(seed: int) -> None:
    """Seed the global torch / numpy / python generators (the codebook's dead-code restarts use torch's)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _mix(*parts: int) -> int:
    h = 0
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * _GOLDEN + 0x632BE59BD9B4E019) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & 0x7FFFFFFFFFFFFFFF


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A CPU generator that is a pure function of (seed, step, stream): stateless randomness per step."""
    return torch.Generator().manual_seed(_mix(seed, step, stream))


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order (n,) int64 in which epoch ``epoch`` visits the dataset."""
    return torch.randperm(n, generator=step_generator(seed, epoch, 0x0DA7A))


class BatchPlan:
    """Which dataset indices every rank reads at every step (see the module docstring)."""

    def __init__(self, n: int, global_batch: int, seed: int, rank: int = 0, world: int = 1) -> None:
        if global_batch < 1 or global_batch % world:
            raise ValueError(f"batch size {global_batch} must be a positive multiple of the {world} processes")
        if n < global_batch:
            raise ValueError(f"{n} images are fewer than one batch of {global_batch}")
        self.n, self.global_batch, self.seed, self.rank, self.world = n, global_batch, seed, rank, world
        self.steps_per_epoch = n // global_batch
        self._cache: tuple[int, torch.Tensor] | None = None

    def epoch(self, step: int) -> int:
        return step // self.steps_per_epoch

    def global_indices(self, step: int) -> list[int]:
        e, p = divmod(step, self.steps_per_epoch)
        if self._cache is None or self._cache[0] != e:
            self._cache = (e, epoch_permutation(self.n, self.seed, e))
        return self._cache[1][p * self.global_batch:(p + 1) * self.global_batch].tolist()

    def local_indices(self, step: int) -> list[int]:
        per = self.global_batch // self.world
        return self.global_indices(step)[self.rank * per:(self.rank + 1) * per]

    def batches(self, start: int, stop: int) -> Iterable[list[int]]:
        """This rank's index lists for steps start .. stop-1 (a batch sampler for a DataLoader)."""
        plan = self

        class _Sampler:
            def __iter__(self):
                return (plan.local_indices(s) for s in range(start, stop))

            def __len__(self):
                return max(stop - start, 0)

        return _Sampler()


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


class EMA:
    """Exponential moving average of a module's parameters (buffers are copied).

    ``update(step)``: before ``start`` steps the average is a copy; afterwards
    avg <- decay * avg + (1 - decay) * param."""

    def __init__(self, module: nn.Module, decay: float = 0.995, start: int = 0) -> None:
        self.module = copy.deepcopy(unwrap(module)).eval().requires_grad_(False)
        self.decay, self.start = decay, start

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        src = unwrap(module)
        w = 0.0 if step < self.start else self.decay
        for avg, p in zip(self.module.parameters(), src.parameters()):
            avg.lerp_(p.detach(), 1.0 - w)
        for avg, b in zip(self.module.buffers(), src.buffers()):
            avg.copy_(b)


# -- train-state checkpoints ------------------------------------------------------------------------

def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    sd = opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            tensors[f"{idx}.{key}"] = value if isinstance(value, torch.Tensor) else torch.tensor(value)
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, groups


def _load_optimizer(opt: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], groups: list[dict]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in groups]
    opt.load_state_dict({"state": state, "param_groups": groups})


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    py = random.getstate()
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np.asarray(keys, np.int64))}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.cuda.get_rng_state()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(gauss)],
            "python": [py[0], list(py[1]), py[2]]}
    return tensors, meta


def _set_rng_state(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, state, gauss_next = meta["python"]
    random.setstate((version, tuple(state), gauss_next))


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete train-state checkpoint of a run, or None."""
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if (path / "config.json").is_file() else None


def checkpoint_to_resume(run_dir: str | os.PathLike, resume: bool) -> Path | None:
    """The checkpoint a trainer starts from: the run's latest with ``resume`` (an error if it has none),
    None without (an error if ``run_dir`` already holds a run, so nothing is overwritten by accident)."""
    ck = latest_checkpoint(run_dir)
    if resume and ck is None:
        raise ValueError(f"--resume: {run_dir} has no checkpoint to resume from")
    if not resume and ck is not None:
        raise ValueError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
    return ck


def require_finite(loss: torch.Tensor, step: int) -> None:
    """Stop a run whose loss is NaN or infinite before that step's update, so that its checkpoints (the last
    was written at or before ``step``) hold finite weights to resume or inspect; ``step`` is 0-based."""
    if not torch.isfinite(loss.detach()).all():
        raise FloatingPointError(f"step {step + 1}: the training loss is {float(loss.detach().float().sum())}; "
                                 "stopped before the update (the run's checkpoints are from before it)")


def save_train_state(run_dir: str | os.PathLike, step: int, modules: Mapping[str, nn.Module],
                     optimizers: Mapping[str, torch.optim.Optimizer], options: Mapping[str, Any],
                     extra: Mapping[str, Any] | None = None, keep: int = 2) -> Path:
    """Write ``RUN/checkpoints/step_<step>/`` (rank 0 only), point ``latest`` at it, keep ``keep`` newest.

    Each checkpoint carries the run's ``code`` (git commit and dirty flag): the previous checkpoint's, or the
    working tree's at the first one, so a run's provenance names the code it started with even when the tree
    changes (or the run is resumed) while it trains."""
    ckdir = Path(run_dir) / "checkpoints"
    target = ckdir / f"step_{step:08d}"
    tensors: dict[str, Mapping[str, torch.Tensor]] = {k: unwrap(m) for k, m in modules.items()}
    groups = {}
    for name, opt in optimizers.items():
        tensors[f"optim_{name}"], groups[name] = _optimizer_tensors(opt)
    rng_t, rng_meta = _rng_state()
    tensors["rng"] = rng_t
    config = {"kind": "train_state", "step": step, "options": dict(options), "optimizers": groups,
              "rng": rng_meta, "code": run_code_state(run_dir) or code_state(), **dict(extra or {})}
    save_checkpoint(target, tensors, config)
    atomic_write(ckdir / "latest", target.name + "\n")
    old = sorted(p for p in ckdir.glob("step_*") if p.is_dir() and p != target)
    for p in old[:max(len(old) - (keep - 1), 0)]:
        shutil.rmtree(p, ignore_errors=True)
    return target


def load_train_state(path: str | os.PathLike, modules: Mapping[str, nn.Module],
                     optimizers: Mapping[str, torch.optim.Optimizer]) -> dict[str, Any]:
    """Restore modules, optimizers and every RNG from a train-state checkpoint; returns its config."""
    doc, states = load_checkpoint(path)
    for name, module in modules.items():
        load_state_into(unwrap(module), states[name], f"{path}/{name}.safetensors")
    for name, opt in optimizers.items():
        _load_optimizer(opt, states[f"optim_{name}"], doc["optimizers"][name])
    _set_rng_state(states["rng"], doc["rng"])
    return doc


# -- logs and provenance ----------------------------------------------------------------------------

class MetricLogger:
    """Rows of scalars to ``RUN/log.csv`` (always) and TensorBoard (``RUN/tb``, when importable).

    On resume, rows after ``resume_step`` (written after the checkpoint) are dropped."""

    def __init__(self, run_dir: str | os.PathLike, fields: list[str], enabled: bool = True,
                 resume_step: int | None = None) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "log.csv"
        self.fields = ["step"] + [f for f in fields if f != "step"]
        self.tb = None
        if not enabled:
            return
        rows = []
        if resume_step is not None and self.path.is_file():
            with open(self.path, newline="") as fh:
                rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= resume_step]
        with open(self.path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, self.fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            SummaryWriter = None
        if SummaryWriter is not None:
            self.tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=resume_step)

    def log(self, step: int, values: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: (f"{float(v):.6g}" if v is not None else "") for k, v in values.items()}}
        with open(self.path, "a", newline="") as fh:
            csv.DictWriter(fh, self.fields, extrasaction="ignore").writerow(row)
        if self.tb is not None:
            for k, v in values.items():
                if v is not None:
                    self.tb.add_scalar(k, float(v), step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _git(*args: str) -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def provenance(options: Mapping[str, Any], steps: int, data: str, command: str | None = None,
               run_dir: str | os.PathLike | None = None, **extra: Any) -> dict[str, Any]:
    """Training provenance for a checkpoint's config.json: data, steps, command line (``command``, the
    canonical command that reproduces the run, and ``argv``, how this process was started), code version
    and git commit: that of ``run_dir``'s checkpoints (the code the run started with) where given, else the
    working tree's now."""
    from retina_fast import __version__

    code = (run_code_state(run_dir) if run_dir is not None else None) or code_state()
    return {"data": data, "steps": steps, "command": command or " ".join(sys.argv),
            "argv": [Path(sys.argv[0]).name] + sys.argv[1:], "options": dict(options), "code_version": __version__,
            **code, "torch": torch.__version__, **extra}


def code_state() -> dict[str, Any]:
    """The working tree's git commit and whether tracked files differ from it (None where git is absent)."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": _git("rev-parse", "HEAD"), "git_dirty": None if status is None else bool(status)}


def run_code_state(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The ``code`` recorded in the run's latest train-state checkpoint (None for none, or one written before
    checkpoints recorded it)."""
    ck = latest_checkpoint(run_dir)
    if ck is None:
        return None
    try:
        code = json.loads((ck / "config.json").read_text()).get("code")
    except (OSError, ValueError):
        return None
    return code if isinstance(code, dict) and set(code) == {"git_commit", "git_dirty"} else None


def command_line(trainer: str, options: Mapping[str, Any], cli_keys: Iterable[str]) -> str:
    """``retina-fast train <trainer> --key value ...`` for the options a run actually used."""
    import shlex

    parts = ["retina-fast", "train", trainer]
    for key in cli_keys:
        value = options.get(key)
        if value is not None and key != "resume":
            text = ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)  # --betas
            parts += [f"--{key.replace('_', '-')}", shlex.quote(text)]
    return " ".join(parts)
