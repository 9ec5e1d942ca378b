"""JumpReLU (Rajamanoharan et al. 2024, arXiv 2407.14435): codes = z·H(z − θ) with a learned per-latent threshold θ,
stored as log θ; loss = mse + l0_coef·L0, the L0 (a step function) trained through a straight-through estimator
whose pseudo-derivative is a rectangle kernel of width `bandwidth`. Saved as SAELens "jumprelu".

Scale of the defaults: they assume inputs normalised to E‖x‖² = d_in (SAELens's normalisation, and train_sae's
default input_scale="auto"), where a unit encoder row's pre-activation on a random input is O(1). bandwidth 0.05 is
SAELens's default and the paper's 0.001 (at E‖x‖² = 1 and d ≈ 2300) rescaled to that normalisation; l0_coef 1.0
likewise matches the paper's λ ≈ 5e-4 times the mse's factor d_in. init_threshold 0.5 (the paper starts at θ₀ = ε
and trains for billions of tokens): from ε, the thresholds of a default-length run (2000 steps at lr 1e-3, θ moving
by a factor of about e^(lr·steps) ≈ 7) never reach the size of the codes, and L0 stays several times too high
(MMCS 0.6 against 0.97 on a planted dictionary, tests/dictionaries/test_defaults.py).

Adam moves log θ by about lr per step, so θ changes by a factor of about e^(lr·steps): thresholds (and so L0) move
slowly with a small lr, the paper's "needs long training before L0 falls"; threshold_lr_mult speeds them up."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ...checks import check_coef, check_positive
from ..base import EnsembleSAE, register_sae
from ..kernels import SparseDecode, SparseEncode
from ..picks import SparseCodes, above, screened_above, slice_rows, sum_slices
from ..screening import screens
from ..workspace import Workspaces


def checked_threshold(state: dict[str, torch.Tensor], d_sae: int) -> torch.Tensor:
    """state["threshold"] [d_sae], checked: present, the right shape, finite and >= 0."""
    if "threshold" not in state:
        raise ValueError("state is missing 'threshold' (a JumpReLU-style SAE needs W_enc, b_enc, W_dec, b_dec and "
                         "threshold)")
    t = torch.as_tensor(state["threshold"]) if isinstance(state["threshold"], np.ndarray) else state["threshold"]
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or tuple(t.shape) != (d_sae,):
        got = f"{t.dtype} of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"state['threshold'] must be a floating-point tensor of shape {(d_sae,)}, got {got}")
    if bool((t < 0).any()) or not bool(torch.isfinite(t).all()):
        raise ValueError("state['threshold'] must be finite and >= 0 (a negative threshold would let negative "
                         "pre-activations through)")
    return t


class _JumpReLUFunction(torch.autograd.Function):
    """codes = z·H(z − θ) and the per-member mean L0 in one pass, with the paper's pseudo-derivatives.

    Exact gradients: ∂codes/∂z = H(z − θ); the L0 gives z no gradient (as in the paper and SAELens's default, the
    estimator feeds only θ). Straight-through, with the rectangle kernel K(u) = 1 for |u| < 1/2:
        ∂codes/∂θ ≈ −(θ/ε)·K((z − θ)/ε),     ∂H(z − θ)/∂θ ≈ −(1/ε)·K((z − θ)/ε)
    so θ only hears from pre-activations within ε/2 of it. Both θ terms share the kernel, hence one pass:
        g_θ = −(1/ε)·Σ_b K·(θ·g_codes + g_L0/B).
    Returns codes [E, B, n], L0 [E] (mean active latents per row) and the per-latent firing counts [E, n] (not
    differentiable: one reduction over the mask gives both the L0 and which latents fired)."""

    @staticmethod
    def forward(ctx, pre, theta, bandwidth):
        active = pre > theta.unsqueeze(1)
        codes = pre * active
        counts = active.sum(1)
        l0 = counts.sum(-1).to(pre.dtype) / pre.shape[1]
        ctx.save_for_backward(pre, theta, bandwidth)
        ctx.mark_non_differentiable(counts)
        ctx.set_materialize_grads(False)
        return codes, l0, counts

    @staticmethod
    def backward(ctx, g_codes, g_l0, _g_counts):
        pre, theta, eps = ctx.saved_tensors
        E, B, _ = pre.shape
        th = theta.unsqueeze(1)
        g_pre = g_codes * (pre > th) if g_codes is not None and ctx.needs_input_grad[0] else None
        g_theta = None
        if ctx.needs_input_grad[1]:
            window = ((pre - th).abs() < 0.5 * eps.view(E, 1, 1)).to(pre.dtype)
            drive = th * g_codes if g_codes is not None else torch.zeros_like(pre)
            if g_l0 is not None:
                drive = drive + (g_l0 / B).view(E, 1, 1)
            g_theta = -(window * drive).sum(1) / eps.view(E, 1)
        return g_pre, g_theta, None


# Picks per row slice: about the mean L0 of a sparse JumpReLU, so slices are mostly full; also the L0 at which the
# screen's size rule (`screening.screens`) is asked whether it pays.
SLICE = 32


class _SparseJump(torch.autograd.Function):
    """`_JumpReLUFunction` on the entries of pre that may matter only: picked [E, S, K] (pre at the latents of the
    row slices of `picks.Picks`), theta_at [E, S, K] (each pick's θ, differentiable), eps [E], keep [E, S, K] (False
    on padding), B the batch's rows. Every active entry (pre > θ) and every entry within ε/2 of θ must be among the
    picks: the others have neither a code nor a threshold gradient. Returns codes [E, S, K] and L0 [E] (mean active
    latents per row); the same estimator, so the same gradients as the dense function."""

    @staticmethod
    def forward(ctx, picked, theta_at, eps, keep, B):
        active = (picked > theta_at) & keep
        codes = picked * active
        l0 = active.sum((1, 2)).to(picked.dtype) / B
        ctx.B = B
        ctx.save_for_backward(picked, theta_at, eps, keep, active)
        ctx.set_materialize_grads(False)
        return codes, l0

    @staticmethod
    def backward(ctx, g_codes, g_l0):
        picked, th, eps, keep, active = ctx.saved_tensors
        E, B = picked.shape[0], ctx.B
        g_pre = g_codes * active if g_codes is not None and ctx.needs_input_grad[0] else None
        g_theta = None
        if ctx.needs_input_grad[1]:
            window = (((picked - th).abs() < 0.5 * eps.view(E, 1, 1)) & keep).to(picked.dtype)
            drive = th * g_codes if g_codes is not None else torch.zeros_like(picked)
            if g_l0 is not None:
                drive = drive + (g_l0 / B).view(E, 1, 1)
            g_theta = -(window * drive) / eps.view(E, 1, 1)
        return g_pre, g_theta, None, None, None


@register_sae("jumprelu")
class JumpReLUSAE(Workspaces, EnsembleSAE):
    """JumpReLU + L0 (Rajamanoharan et al. 2024). Per member: l0_coef (λ), bandwidth (ε), init_threshold (θ₀),
    threshold_lr_mult (log θ is stored divided by it, so Adam moves log θ that many times faster than lr: short runs
    need it for the L0 penalty to move the thresholds at all; 1 is the paper's setting).

    Decoder rows are kept unit-norm (the base class's projection and renormalisation). The paper trains an
    unconstrained decoder and folds its norms into the encoder at the end; since the L0 does not see the scale of
    the codes, unit-norm rows lose nothing, keep every threshold in the same units, and need no folding on save."""

    architecture = "jumprelu"
    member_keys = ("l0_coef", "bandwidth", "init_threshold", "threshold_lr_mult")
    log_params = ("log_threshold",)  # θ = 0 (a plain ReLU, as loaded SAEs may have) is log θ = -inf
    sparsity_knob = sparsity_coef = "l0_coef"

    @classmethod
    def default_hparams(cls, d_in: int) -> dict[str, Any]:
        return {"l0_coef": 1.0, "bandwidth": 0.05, "init_threshold": 0.5, "threshold_lr_mult": 1.0}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        theta0 = torch.tensor([float(h["init_threshold"]) for h in self.hparams], dtype=torch.float64)
        mult = torch.tensor([float(h["threshold_lr_mult"]) for h in self.hparams], dtype=torch.float64)
        self._unit_mult = bool((mult == 1).all())  # a Python flag: no device sync per forward
        log_theta = (theta0.log() / mult).view(-1, 1).expand(-1, self.d_sae)
        self.log_threshold = nn.Parameter(log_theta.to(device=self.device, dtype=self.dtype).contiguous())

    def validate_member(self, h: dict[str, Any]) -> None:
        super().validate_member(h)
        check_coef(h.get("l0_coef"), "l0_coef")
        check_positive(h.get("bandwidth"), "bandwidth", " (the width ε of the threshold's straight-through kernel, "
                       "e.g. 0.05 on inputs with E‖x‖² = d_in)")
        check_positive(h.get("init_threshold"), "init_threshold", " (the starting θ, stored as log θ, e.g. 0.05)")
        check_positive(h.get("threshold_lr_mult"), "threshold_lr_mult", " (how many times faster than lr log θ "
                       "learns, e.g. 1 (the paper) or 30 for runs of a few hundred steps)")

    def threshold(self) -> torch.Tensor:
        """[E, d_sae] thresholds θ = exp(threshold_lr_mult · log_threshold)."""
        if self._unit_mult:
            return self.log_threshold.exp()
        return (self.log_threshold * self.member_param("threshold_lr_mult").view(-1, 1)).exp()

    def _jump(self, pre: torch.Tensor):
        return _JumpReLUFunction.apply(pre, self.threshold(), self.member_param("bandwidth"))

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return self._jump(pre)[0]

    def kind_losses(self, x, pre, codes, x_hat):
        return {"l0_loss": self.member_param("l0_coef") * self._jump(pre)[1]}

    def _forward(self, x: torch.Tensor):
        # The loss term is not called "l0": the trainer's log already has an "l0" column (active latents per row);
        # this is λ·L0.
        if not (self.training and torch.is_grad_enabled()):
            return self._dense_forward(x)
        return self._sparse_forward(x)

    def _dense_forward(self, x: torch.Tensor):
        """The generic maths, one jump pass giving codes, L0 and firing together."""
        pre = self._pre(x)
        codes, l0, counts = self._jump(pre)
        return self._decode(codes), codes, counts > 0, {"l0_loss": self.member_param("l0_coef") * l0}

    def _sparse_forward(self, x: torch.Tensor):
        """The training step through the entries above θ − ε/2 only (every active one and every one the threshold's
        gradient hears from): the encoder's dense forward runs without autograd, the gradients and the decoder
        touch the picks only (`kernels.SparseEncode`, `kernels.SparseDecode`), as TopK's step. Where more than
        1/`picks.DENSE_SHARE` of the entries are above their floors (early in training, thresholds still low), or
        the pre-activations are not finite, the dense maths runs instead (the same numbers)."""
        E, B, n = self.n_members, x.shape[-2], self.d_sae
        W = self.encoder_weight()
        xs = self.expand(x)
        theta = self.threshold()
        eps = self.member_param("bandwidth")
        with torch.no_grad():
            bias = self.encoder_bias()
            # A little below θ − ε/2, so that no entry the window test (|pre − θ| < ε/2, rounded) admits is missed;
            # the extra picks get no code and no gradient.
            floor = theta.detach() - 0.5 * eps.view(E, 1) * (1 + 1e-3) - 1e-6 * theta.detach().abs()
            if screens(xs, n, SLICE):
                picks = screened_above(xs, W, bias, floor, SLICE, self._workspace)
            else:
                picks = above(torch.baddbmm(bias.unsqueeze(1), xs, W, out=self._workspace("pre", E, B, n)), floor,
                              SLICE)
        if picks is None:  # many entries above their floors (thresholds still low), or NaN/inf: the dense maths
            return self._dense_forward(x)
        picked, idx, keep, rows = picks
        b_dec = self.b_dec if self.pre_bias else None
        picked = SparseEncode.apply(slice_rows(xs, rows), W, self.b_enc, b_dec, idx, picked)
        theta_at = theta.gather(1, idx.view(E, -1)).view_as(picked)
        codes, l0 = _SparseJump.apply(picked, theta_at, eps, keep, B)
        x_hat = sum_slices(SparseDecode.apply(self.W_dec, codes, idx), rows, B) + self.b_dec.unsqueeze(1)
        with torch.no_grad():
            v = codes.detach()
            fired = torch.zeros(E, n, device=self.device, dtype=self.dtype).scatter_add_(
                1, idx.reshape(E, -1), (v != 0).to(v.dtype).reshape(E, -1)) > 0
        return x_hat, SparseCodes(v, idx, n, rows, B), fired, {"l0_loss": self.member_param("l0_coef") * l0}

    def member_state(self, i: int) -> dict[str, torch.Tensor]:
        state = super().member_state(i)
        state["threshold"] = self.threshold().detach()[i]
        return state

    @torch.no_grad()
    def scale_thresholds_(self, factor: torch.Tensor) -> None:
        """θ times factor [E, d_sae] (> 0), as the codes are scaled by it (`training.rescale`)."""
        mult = self.member_param("threshold_lr_mult").to(torch.float64).view(-1, 1)
        self.log_threshold.add_((factor.to(torch.float64).log() / mult).to(self.dtype))

    @torch.no_grad()
    def load_member_state_(self, i: int, state: dict[str, torch.Tensor]) -> None:
        t = checked_threshold(state, self.d_sae)
        super().load_member_state_(i, state)
        # θ = 0 (a plain ReLU) becomes log θ = -inf, which exp() maps back to exactly 0.
        self.log_threshold[i].copy_(t.to(torch.float64).log() / float(self.hparams[i]["threshold_lr_mult"]))
