"""AdaRound: learn, per weight, whether to round down or up (Nagel et al. 2020, as BRECQ uses it).

Each weight w with frozen per-channel scale s is represented as floor(w / s) + h(alpha), where
h(alpha) = clamp(sigmoid(alpha) * (zeta - gamma) + gamma, 0, 1) is a rectified sigmoid. alpha
starts where h equals the fractional part of w / s (so training starts from the float weight),
the reconstruction loss pulls h where the block output wants it, and the regularizer
sum(1 - |2h - 1|^beta), with beta annealed from 20 to 2, pushes every h to 0 or 1. At the end the
rounding becomes hard: up where alpha >= 0. Settings from the BRECQ/QDrop reference code.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from fxq.quantizers import WeightQuantizer

GAMMA, ZETA = -0.1, 1.1


def rectified_sigmoid(alpha: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(alpha) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def alpha_for(fraction: torch.Tensor) -> torch.Tensor:
    """The alpha whose rectified sigmoid equals ``fraction`` (in [0, 1))."""
    p = (fraction - GAMMA) / (ZETA - GAMMA)
    return -torch.log(1.0 / p - 1.0)


class AdaRoundQuantizer(WeightQuantizer):
    """A WeightQuantizer whose rounding is learned. ``soft`` mode (training) uses h(alpha);
    after ``harden()`` it is an ordinary fixed-grid quantizer the lowering reads unchanged."""

    def __init__(self, base: WeightQuantizer, weight: torch.Tensor):
        nn.Module.__init__(self)
        self.spec = base.spec
        self.layer = base.layer
        self.enabled = True
        self._cache = None
        self.register_buffer("scale", base.scale.detach().clone())
        scaled = weight.detach() / self._scale_view(weight)
        self.register_buffer("floor", torch.floor(scaled))
        self.alpha = nn.Parameter(alpha_for(scaled - self.floor))
        self.hard = False

    def rounding(self) -> torch.Tensor:
        return (self.alpha >= 0).to(self.floor.dtype) if self.hard else rectified_sigmoid(self.alpha)

    def _fake_quantize(self, w: torch.Tensor) -> torch.Tensor:
        q = torch.clamp(self.floor + self.rounding(), self.spec.qmin, self.spec.qmax)
        return q * self._scale_view(w)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        if self.hard:
            return super().forward(w)  # frozen: cached like any fixed-grid weight
        return self._fake_quantize(w)

    def int_weight(self, w: torch.Tensor) -> torch.Tensor:
        q = self.floor + (self.alpha >= 0).to(self.floor.dtype)
        return torch.clamp(q, self.spec.qmin, self.spec.qmax).to(torch.int32)

    def regularizer(self, beta: float) -> torch.Tensor:
        h = rectified_sigmoid(self.alpha)
        return (1.0 - (2.0 * h - 1.0).abs().pow(beta)).sum()

    def harden(self) -> None:
        self.hard = True
        self._cache = None
        self.alpha.requires_grad_(False)

    def describe(self) -> str:
        return f"wq-adaround {self.spec.describe()}" + (" hard" if self.hard else " soft")


def beta_schedule(step: int, total: int, warmup: float = 0.2, start: float = 20.0, end: float = 2.0) -> float | None:
    """beta at ``step``: None during the warm-up (no rounding term), then linear start -> end."""
    first = int(warmup * total)
    if step < first:
        return None
    progress = (step - first) / max(total - first, 1)
    return start + (end - start) * progress


def rounding_loss(quantizers, beta: float | None, weight: float) -> torch.Tensor:
    if beta is None or not quantizers:
        return torch.zeros(())
    return weight * sum(q.regularizer(beta) for q in quantizers)


def unrounded_fraction(quantizers) -> float:
    """Share of weights whose h(alpha) is not yet 0 or 1 (a convergence measure)."""
    total = undecided = 0
    for q in quantizers:
        h = rectified_sigmoid(q.alpha.detach())
        undecided += int(((h > 0) & (h < 1)).sum())
        total += h.numel()
    return undecided / max(total, 1) if total else math.nan
