"""Mean-teacher machinery for T-MAGE-Net (Tarvainen & Valpola 2017, as used by Guo et al.).

- Teacher = exponential moving average of the student: θ'_t = α_t θ'_{t−1} + (1 − α_t) θ_t with
  α_t = min(1 − 1/(step + 1), α), α = 0.999 (so step 0 copies the student).
- Consistency weight: w(t) = w_max · exp(−5 (1 − clip(t / T, 0, 1))²) (Gaussian warm-up over T steps).
- Consistency loss: Σ_stages MSE(student image, teacher image) + Σ_4 scales MSE(σ(student logit),
  σ(teacher logit)); MSE on sigmoid probabilities for segmentation (the mean-teacher convention of
  comparing probabilities, not logits). Teacher outputs are detached.
- The teacher sees the real image, the student a Gaussian-noise augment x + N(0, std²).
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ALPHA", "ema_alpha", "ema_update", "consistency_weight", "gaussian_noise", "consistency_loss",
           "make_teacher", "MeanTeacher"]

ALPHA = 0.999


def ema_alpha(step: int, alpha: float = ALPHA) -> float:
    """α_t = min(1 − 1/(step + 1), α)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return min(1.0 - 1.0 / (step + 1), alpha)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, step: int, alpha: float = ALPHA) -> float:
    """teacher ← α_t·teacher + (1 − α_t)·student for every parameter (and floating buffer); other
    buffers are copied. Returns α_t. Modules must have identical structure."""
    a = ema_alpha(step, alpha)
    t_params, s_params = list(teacher.parameters()), list(student.parameters())
    if len(t_params) != len(s_params):
        raise ValueError("teacher and student have different parameter lists")
    for t, s in zip(t_params, s_params):
        t.mul_(a).add_(s.detach(), alpha=1.0 - a)
    for t, s in zip(teacher.buffers(), student.buffers()):
        if t.is_floating_point():
            t.mul_(a).add_(s, alpha=1.0 - a)
        else:
            t.copy_(s)
    return a


def consistency_weight(step: float, ramp_steps: float, w_max: float = 1.0) -> float:
    """w(t) = w_max · exp(−5 (1 − clip(t/T, 0, 1))²); T <= 0 means no ramp (w_max)."""
    if ramp_steps <= 0:
        return float(w_max)
    p = min(max(step / ramp_steps, 0.0), 1.0)
    return float(w_max * math.exp(-5.0 * (1.0 - p) ** 2))


def gaussian_noise(x: torch.Tensor, std: float = 0.05, *, generator: torch.Generator | None = None,
                   mask: torch.Tensor | None = None, clamp: bool = True) -> torch.Tensor:
    """Student augment: x + std·N(0, 1) (noise × ``mask`` if given, e.g. the FOV), clamped to [0, 1]."""
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device if generator is None
                        else generator.device).to(x.device)
    if mask is not None:
        noise = noise * mask
    y = x + std * noise
    return y.clamp(0, 1) if clamp else y


def consistency_loss(student, teacher) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Multi-stage + multi-scale consistency between two ``MAGENetOutput``s (see module doc).
    Returns (total, parts) with detached scalar parts ``stage1``, ``stage2``, ``seg``."""
    parts: dict[str, torch.Tensor] = {}
    s_st, t_st = student.stages, teacher.stages
    if len(s_st) != len(t_st):
        raise ValueError("student and teacher outputs have different numbers of stages")
    total = s_st[0].new_zeros(())
    for i, (s, t) in enumerate(zip(s_st, t_st), start=1):
        term = F.mse_loss(s, t.detach())
        total = total + term
        parts[f"stage{i}"] = term.detach()
    if student.seg and teacher.seg:
        seg = sum(F.mse_loss(torch.sigmoid(s), torch.sigmoid(t.detach())) for s, t in zip(student.seg, teacher.seg))
        total = total + seg
        parts["seg"] = seg.detach()
    return total, parts


def make_teacher(student: nn.Module) -> nn.Module:
    """A frozen deep copy of ``student`` (requires_grad False)."""
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


class MeanTeacher:
    """Holds the EMA teacher and the schedule. Typical step:

        loss_sup, _ = magenet_loss(student(x_syn), y_syn, mask)
        loss_con, _ = mt.consistency(student, x_real)   # student sees noise, teacher the real image
        (loss_sup + mt.weight() * loss_con).backward(); opt.step(); mt.update(student)
    """

    def __init__(self, student: nn.Module, *, alpha: float = ALPHA, w_max: float = 1.0, ramp_steps: int = 0,
                 noise_std: float = 0.05) -> None:
        self.teacher = make_teacher(student)
        self.alpha, self.w_max, self.ramp_steps, self.noise_std = alpha, w_max, ramp_steps, noise_std
        self.step = 0

    def weight(self) -> float:
        return consistency_weight(self.step, self.ramp_steps, self.w_max)

    def consistency(self, student: nn.Module, real: torch.Tensor, *, generator: torch.Generator | None = None,
                    mask: torch.Tensor | None = None):
        """(loss, parts) for an unlabelled real batch (N, 3, H, W)."""
        s_out = student(gaussian_noise(real, self.noise_std, generator=generator, mask=mask))
        with torch.no_grad():
            t_out = self.teacher(real)
        return consistency_loss(s_out, t_out)

    def update(self, student: nn.Module) -> float:
        """EMA step with α_step, then step += 1. Returns the α used."""
        a = ema_update(self.teacher, student, self.step, self.alpha)
        self.step += 1
        return a

    def state_dict(self) -> dict:
        return {"teacher": self.teacher.state_dict(), "step": self.step, "alpha": self.alpha,
                "w_max": self.w_max, "ramp_steps": self.ramp_steps, "noise_std": self.noise_std}

    def load_state_dict(self, state: dict) -> None:
        self.teacher.load_state_dict(state["teacher"])
        self.step = int(state["step"])
        self.alpha, self.w_max = float(state["alpha"]), float(state["w_max"])
        self.ramp_steps, self.noise_std = int(state["ramp_steps"]), float(state["noise_std"])
