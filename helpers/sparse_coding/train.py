"""The training loop: Adam on an ensemble SAE, every member on the same batches.

Kept lean because on small SAEs the loop itself is the cost: metrics are computed and copied to the host only at
logged steps, so the steps in between run without a device sync (except the NaN check on the batch and, for
TopK, the AuxK "anything dead?" check)."""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import pandas as pd
import torch
from tqdm.auto import tqdm

from .sae import DEFAULT_DEAD_WINDOW, EnsembleSAE

Batches = Iterable[torch.Tensor] | Callable[[int], torch.Tensor] | torch.Tensor


def _batch_source(batches: Batches, batch_size: int | None, seed: int) -> Callable[[int], torch.Tensor]:
    """Turn the accepted batch sources into one callable step -> [B, d_in]."""
    if isinstance(batches, torch.Tensor):
        # A whole dataset in memory: sample rows with the training seed, so a rerun sees the same batches.
        if batches.ndim != 2:
            raise ValueError(f"batches as a tensor must be a dataset [rows, d_in], got shape {tuple(batches.shape)}")
        if batch_size is None:
            raise ValueError("batch_size is required when batches is a dataset tensor [rows, d_in]")
        g = torch.Generator(device="cpu").manual_seed(seed)
        data = batches
        return lambda step: data[torch.randint(len(data), (batch_size,), generator=g)]
    if callable(batches):
        return batches
    it: Iterator[torch.Tensor] = iter(batches)

    def nxt(step: int) -> torch.Tensor:
        try:
            return next(it)
        except StopIteration:
            raise ValueError(f"batches ran out after {step} steps; give at least `steps` batches or a callable "
                             "step -> batch") from None

    return nxt


def _adam(sae: EnsembleSAE, lr: float, betas: tuple[float, float]) -> torch.optim.Adam:
    """Adam, fused into one kernel per step where the device supports it (CPU and CUDA do): on small SAEs the
    per-parameter-tensor launches of the default implementation are a visible share of a step. Still elementwise,
    so ensemble members stay independent."""
    try:
        return torch.optim.Adam(sae.parameters(), lr=lr, betas=betas, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.Adam(sae.parameters(), lr=lr, betas=betas)


def train_sae(sae: EnsembleSAE, batches: Batches, steps: int = 2000, lr: float = 1e-3, progress: bool = True,
              log_every: int = 50, dead_window: int | None = None, seed: int = 0, *,
              batch_size: int | None = None, betas: tuple[float, float] = (0.9, 0.999),
              callback: Callable[[int, EnsembleSAE], None] | None = None,
              optimizer: torch.optim.Optimizer | None = None) -> pd.DataFrame:
    """Train every member of `sae` in place on the same batches; return the log.

    batches: an iterable of [B, d_in] tensors, a callable step -> [B, d_in], or a dataset tensor [rows, d_in]
    (then rows are sampled with `seed` and `batch_size`).
    dead_window: tokens without firing before a latent counts as dead (the `dead_frac` column and TopK's AuxK).
    None keeps the SAE's own setting, else min(10M tokens, 1000 batches) as in Gao et al. / SAELens. Until a run
    has seen a full window, `dead_frac` counts latents that have not fired at all yet.
    callback(step, sae) runs after each logged step (checkpoints, feature snapshots).
    optimizer: pass one to continue training with its state; by default a fresh Adam.

    Returns a DataFrame with one row per (logged step, member): step, member, loss, mse, fvu, l0, dead_frac, the
    kind's own loss terms (l1, aux) and the member's hyperparameters. `step` is the step whose batch was measured,
    before that step's update; the last step is always logged.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1:
        raise ValueError(f"log_every must be a positive int (steps between log rows), got {log_every!r}")
    if dead_window is not None and (isinstance(dead_window, bool) or not isinstance(dead_window, int)
                                    or dead_window < 1):
        raise ValueError(f"dead_window must be a positive int (tokens) or None, got {dead_window!r}")
    next_batch = _batch_source(batches, batch_size, seed)
    opt = optimizer or _adam(sae, lr, betas)
    sae.train()
    logged: list[tuple[int, dict[str, torch.Tensor]]] = []
    tokens_seen = 0
    bar = tqdm(range(steps), disable=not progress, desc=f"train {sae.kind} x{sae.n_members}", mininterval=0.5)
    for step in bar:
        x = next_batch(step)
        if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[1] != sae.d_in:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"batch at step {step} must be [batch, d_in={sae.d_in}], got {got}")
        x = x.to(device=sae.device, dtype=sae.dtype, non_blocking=True)
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"batch at step {step} contains NaN or inf; clean the activations (or drop those "
                             "rows) before training")
        if step == 0:
            window = dead_window or sae.dead_window or min(DEFAULT_DEAD_WINDOW, 1000 * x.shape[0])
            sae.dead_window = window
        out = sae(x)
        opt.zero_grad(set_to_none=True)
        out["loss"].sum().backward()
        sae.project_decoder_grad_()
        opt.step()
        sae.normalize_decoder_()
        codes = out["codes"].detach()
        sae.update_firing_(codes, out.get("fired"))
        tokens_seen += x.shape[0]

        if step % log_every == 0 or step == steps - 1:
            with torch.no_grad():
                variance = (x - x.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
                row = {"loss": out["loss"].detach(), "mse": out["mse"].detach(),
                       "fvu": out["mse"].detach() / variance,
                       "l0": (codes != 0).sum(-1).float().mean(-1),
                       # update_firing_ already counted this batch, so the window includes it.
                       "dead_frac": sae.dead_mask(min(window, tokens_seen)).float().mean(-1)}
                row.update({k: out[k].detach() for k in sae.loss_terms if k in out})
                row = {k: v.float().cpu() for k, v in row.items()}  # the one host sync per logged step
            logged.append((step, row))
            if progress:
                bar.set_postfix(loss=f"{row['loss'].mean():.4g}", l0=f"{row['l0'].mean():.1f}",
                                dead=f"{row['dead_frac'].mean():.2f}", refresh=False)
            if callback is not None:
                callback(step, sae)
    bar.close()
    sae.eval()

    records = []
    for step, row in logged:
        for m, h in enumerate(sae.hparams):
            rec = {"step": step, "member": m}
            rec.update({k: float(v[m]) for k, v in row.items()})
            rec.update(h)
            records.append(rec)
    return pd.DataFrame.from_records(records)
