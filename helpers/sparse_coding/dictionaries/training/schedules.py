"""Schedules of a training run, as functions of the 0-based step: the learning rate and the sparsity coefficient.

- lr: linear warm-up over `warmup_steps`, then constant, then (`decay="linear"` or `"cosine"`) a decay to zero over
  the last `decay_frac` of the steps (linear-to-zero over the last 20 % is Anthropic's and SAELens's recipe; the last
  step still gets lr/decay_steps, so no step is wasted).
- sparsity coefficient: the kind's coefficient (relu: l1_coef, jumprelu: l0_coef; TopK has none) ramps linearly
  from coef/coef_warmup_steps to its value over `coef_warmup_steps`; early on the dictionary first learns to
  reconstruct, so fewer latents die before they find a direction."""

from __future__ import annotations

import math

import torch

from ...arguments import checked
from ..base import EnsembleSAE


def lr_factor(step: int, steps: int, warmup_steps: int = 0, decay: str | None = None, decay_frac: float = 0.2
              ) -> float:
    """Multiplier of the base lr at 0-based `step`: linear warm-up to 1 over `warmup_steps`, then 1, then over the
    last `decay_frac` of the steps a decay to 0 ("linear": (steps - step) / decay_steps; "cosine": half a cosine)."""
    f = 1.0
    if warmup_steps > 0 and step < warmup_steps:
        f = (step + 1) / warmup_steps
    if decay is not None:
        decay_steps = max(1, round(decay_frac * steps))
        start = steps - decay_steps
        if step >= start:
            t = (step - start + 1) / decay_steps  # in (0, 1]: the last step is t = 1
            f *= (1 - t) + 1 / decay_steps if decay == "linear" else 0.5 * (1 + math.cos(math.pi * (t - 1 / decay_steps)))
    return f


def coef_factor(step: int, coef_warmup_steps: int = 0) -> float:
    """Multiplier of the sparsity coefficient at 0-based `step` (linear warm-up, then 1)."""
    if coef_warmup_steps <= 0 or step >= coef_warmup_steps:
        return 1.0
    return (step + 1) / coef_warmup_steps


def sparsity_key(sae: EnsembleSAE) -> str | None:
    """The per-member hyperparameter that weighs the sparsity penalty, or None (TopK: sparsity is structural):
    the kind's own `sparsity_coef`."""
    return type(sae).sparsity_coef


def log_spaced_steps(steps: int) -> list[int]:
    """0, 1, 2, 4, 8, ... up to `steps`, and `steps` itself (steps completed: 0 is the initialisation)."""
    out, s = [0], 1
    while s < steps:
        out.append(s)
        s *= 2
    return out + [steps]


@checked
def tracking_schedule(steps: int, n_even: int = 16) -> list[int]:
    """Training steps to snapshot for following features through training: log-spaced (0, 1, 2, 4, ...) for the
    fast early changes, plus `n_even` evenly spaced ones, so that late in training "the previous snapshot" is a
    fixed distance back rather than half the run. Raises ValueError for steps < 1 or n_even < 0."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if isinstance(n_even, bool) or not isinstance(n_even, int) or n_even < 0:
        raise ValueError(f"n_even must be an int >= 0, got {n_even!r}")
    even = {round(i * steps / n_even) for i in range(1, n_even + 1)} if n_even else set()
    return sorted(set(log_spaced_steps(steps)) | even)


class Schedules:
    """Applies both schedules to an optimizer and an SAE step by step; `close()` puts the full coefficients back
    (also after an error), so the SAE never keeps a warm-up value. When every schedule is off the optimizer's lr is
    never touched (a callback may schedule it)."""

    def __init__(self, sae: EnsembleSAE, opt: torch.optim.Optimizer, lr: float, steps: int, warmup_steps: int = 0,
                 decay: str | None = None, decay_frac: float = 0.2, coef_warmup_steps: int = 0):
        self.sae, self.opt, self.lr, self.steps = sae, opt, lr, steps
        self.warmup_steps, self.decay, self.decay_frac = warmup_steps, decay, decay_frac
        self.coef_warmup_steps = coef_warmup_steps
        self.scheduled = warmup_steps > 0 or decay is not None
        self.coef_key = sparsity_key(sae) if coef_warmup_steps > 0 else None
        self.coef_base = sae.member_param(self.coef_key).clone() if self.coef_key else None

    def apply(self, step: int) -> None:
        if self.scheduled:
            for group in self.opt.param_groups:
                group["lr"] = self.lr * lr_factor(step, self.steps, self.warmup_steps, self.decay, self.decay_frac)
        if self.coef_key and step <= self.coef_warmup_steps:
            self.sae.member_param(self.coef_key).copy_(self.coef_base * coef_factor(step, self.coef_warmup_steps))

    def close(self) -> None:
        if self.coef_key:
            self.sae.member_param(self.coef_key).copy_(self.coef_base)
