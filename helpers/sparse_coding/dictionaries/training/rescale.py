"""Fine-tuning an SAE that already has weights without changing what it computes before it learns anything.

A loaded SAE takes raw activations: the input scale s it was trained at is folded into its weights (W_enc·s, W_dec/s,
b_dec/s; `base.fold_input_scale`), so its input_scale is 1 and its decoder rows have norm 1/s (SAELens's files may
have rows of any norm). Training keeps decoder rows at unit norm; renormalising such rows, or giving the SAE a new
input scale on top of the folded one, would change its function at step 0. `fit_scale_` first rewrites the SAE with
three exact changes of parameterisation, each keeping the function (x -> x̂):

- unfold a scale a from the weights: input_scale·a, W_enc/a, W_dec·a, b_dec·a (the codes do not change);
- scale latent j's codes by f_j > 0: W_enc[:, j]·f_j, b_enc[j]·f_j, W_dec[j]/f_j and its thresholds ·f_j (the
  kind's `scale_thresholds_`), as SAELens's fold_W_dec_norm: this makes the rows unit norm. ReLU and JumpReLU take
  any positive f; TopK and BatchTopK only one f per member (a factor per latent would change which latents win);
- move to another input scale s' = g·s keeping the weights: b_enc·g, b_dec·g, thresholds·g (the codes times g)."""

from __future__ import annotations

from typing import Callable

import torch

from ..base import EnsembleSAE
from ..kinds.topk import TopKSAE


def _tolerance(sae: EnsembleSAE) -> float:
    """How far from 1 a row norm may be and still count as unit norm (its dtype's rounding, at least 1e-5)."""
    return max(1e-5, 4 * torch.finfo(sae.dtype).eps)


@torch.no_grad()
def _scale_codes_(sae: EnsembleSAE, f: torch.Tensor) -> None:
    """Latent j's codes times f [E, d_sae] (> 0), the function unchanged: W_enc columns and b_enc times f, W_dec rows
    divided by it, the thresholds times it (untied SAEs only: a tied encoder is its decoder)."""
    f = f.to(sae.dtype)
    sae.W_enc.mul_(f.unsqueeze(1))
    sae.b_enc.mul_(f)
    sae.W_dec.div_(f.unsqueeze(-1))
    _scale_thresholds_(sae, f)


def _scale_thresholds_(sae: EnsembleSAE, f: torch.Tensor) -> None:
    """The kind's thresholds times f [E, d_sae], for a kind whose codes meet thresholds (`scale_thresholds_`)."""
    scale = getattr(sae, "scale_thresholds_", None)
    if scale is not None:
        scale(f)


@torch.no_grad()
def _unit_rows_(sae: EnsembleSAE) -> None:
    """Decoder rows of unit norm, the function unchanged: the rows' typical norm r unfolded into the input scale
    (input_scale/r, W_enc·r, W_dec/r, b_dec/r), what is left of each row's norm folded into its codes."""
    tol = _tolerance(sae)
    norms = sae.W_dec.double().norm(dim=-1)  # [E, d_sae]
    r = float(norms[norms > 0].median()) if bool((norms > 0).any()) else 1.0
    if abs(r - 1) > tol:
        sae.W_enc.mul_(r)
        sae.W_dec.div_(r)
        sae.b_dec.div_(r)
        sae.input_scale = float(sae.input_scale) / r
        norms = norms / r
    f = torch.where(norms > 0, norms, torch.ones_like(norms))  # an all-zero row stays as it is
    if float((f - 1).abs().max()) <= tol:
        return
    if isinstance(sae, TopKSAE):
        spread = f.amax(1) / f.amin(1) - 1
        bad = [m for m, s in enumerate(spread.tolist()) if s > tol]
        if bad:
            raise ValueError(
                f"sae's decoder rows differ in norm within member(s) {bad} ({float(norms.min()):.4g}.."
                f"{float(norms.max()):.4g}): training keeps them at unit norm, and folding per-latent norms into a "
                f"{sae.kind} SAE's codes would change which latents it picks. Fine-tune it as kind 'relu' or "
                f"'jumprelu', or normalise sae.W_dec's rows yourself first (accepting the change)")
        f = f.mean(1, keepdim=True).expand_as(f)  # one factor per member: the ranking of its latents is kept
    _scale_codes_(sae, f)


@torch.no_grad()
def fit_scale_(sae: EnsembleSAE, scale: float | None) -> Callable[[], None] | None:
    """Get an SAE with weights (`sae.fitted`: trained, or loaded) ready to train on at input scale `scale` (None:
    the scale its weights work at, its input_scale times the scale folded into its decoder rows), with unit-norm
    decoder rows where its kind keeps them, computing the same function as before (module docstring). Returns a
    function that puts the SAE back as it was, or None when nothing changed. Raises ValueError for a TopK-family SAE
    whose decoder rows differ in norm within a member."""
    tol = _tolerance(sae)
    unit = not sae.unit_norm_decoder or sae.tied or float(
        (sae.W_dec.double().norm(dim=-1) - 1).abs().max()) <= tol
    if unit and (scale is None or scale == sae.input_scale):
        return None
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    before_scale = sae.input_scale

    def undo() -> None:
        sae.load_state_dict(before)
        sae.input_scale = before_scale

    try:
        if not unit:
            _unit_rows_(sae)
        if scale is not None and scale != sae.input_scale:
            g = float(scale) / float(sae.input_scale)
            sae.b_enc.mul_(g)
            sae.b_dec.mul_(g)
            _scale_thresholds_(sae, torch.full_like(sae.b_enc, g))
            sae.input_scale = float(scale)
    except BaseException:
        undo()
        raise
    return undo
