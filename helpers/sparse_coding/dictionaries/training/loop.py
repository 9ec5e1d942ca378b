"""The training loop: Adam on an ensemble SAE, every member on the same batches.

Kept lean because on small SAEs the loop itself is the cost: metrics are computed and copied to the host only at
logged steps, so the steps in between run without a device sync (except the NaN check on the batch and, for TopK,
the AuxK "anything dead?" check). Non-finite losses are noted on the device every step and looked at only at logged
steps, saves and resampling, which is early enough: nothing is ever written after a bad step.

The parts it runs, each in its own module: the batch source (`sources`), the lr and sparsity-coefficient schedules
(`schedules`), dead-latent resampling (`resample`), and saving/resuming (`state`). A resumed run ends bit-identical
(torch.equal) to an uninterrupted one: weights, Adam state, schedules, resampling RNG, firing counters, data position
and every column of the log are restored."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ...checks import check_bool, check_choice, check_int, check_number, check_positive, check_seed
from ...files import folder_lock
from ..base import DEFAULT_DEAD_WINDOW, EnsembleSAE, SAEOutput
from ..metrics import FVU
from .optim import adam
from .resample import member_generators, resample_dead_
from .schedules import Schedules, log_spaced_steps
from .sources import Batches, BatchSource
from .state import TrainingDiverged, TrainingState


class _Divergence:
    """Notes, per member, the first step whose loss was NaN/inf (on the device, no sync) and raises on `check`."""

    def __init__(self, sae: EnsembleSAE, last_good: Callable[[], str]):
        self.sae, self.last_good = sae, last_good
        self.bad_step = torch.full((sae.n_members,), -1, dtype=torch.long, device=sae.device)

    def note(self, loss: torch.Tensor, step: int) -> None:
        self.bad_step.masked_fill_((~torch.isfinite(loss.detach())) & (self.bad_step < 0), step)

    def check(self, at: int) -> None:
        bad = self.bad_step.tolist()
        members = [m for m, s in enumerate(bad) if s >= 0]
        if members:
            raise TrainingDiverged(
                f"loss became NaN/inf at step {min(bad[m] for m in members)} for member(s) {members} (hparams "
                f"{[self.sae.hparams[m] for m in members]}); training stopped at step {at} and {self.last_good()}. "
                f"Lower lr, add warmup_steps, or check the inputs' scale (estimate_input_scale) and resume")


def _settings(**kw: Any) -> dict[str, Any]:
    """Check train_sae's arguments (naming the one that is wrong) and return them as the run's settings."""
    check_int(kw["steps"], "steps", 1)
    check_positive(kw["lr"], "lr")
    check_int(kw["log_every"], "log_every", 1, hint=" (steps between log rows)")
    for name in ("dead_window", "resample_every", "state_every", "batch_size"):
        if kw[name] is not None:
            check_int(kw[name], name, 1, hint=" or None")
    check_int(kw["warmup_steps"], "warmup_steps", 0)
    check_int(kw["coef_warmup_steps"], "coef_warmup_steps", 0)
    check_choice(kw["decay"], "decay", (None, "linear", "cosine"))
    check_number(kw["decay_frac"], "decay_frac", low=0, high=1, low_open=True, hint=" (share of the steps decaying)")
    if kw["input_scale"] != "auto":
        check_positive(kw["input_scale"], "input_scale", " (see estimate_input_scale) or 'auto'")
    check_number(kw["resample_until"], "resample_until", low=0, high=1, hint=" (share of the run resampling)")
    check_seed(kw["seed"])
    betas = kw["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be Adam's two decay rates (b1, b2) in [0, 1), got {betas!r}")
    for i, b in enumerate(betas):
        check_number(b, f"betas[{i}]", low=0, high=1, high_open=True, hint=" (an Adam decay rate)")
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in kw.items() if k != "state_every"}


def _snapshot_at(snapshot_steps: Any, steps: int) -> set[int]:
    if snapshot_steps is None:
        return set()
    if isinstance(snapshot_steps, str) and snapshot_steps == "log":
        return set(log_spaced_steps(steps))
    if isinstance(snapshot_steps, str) or not isinstance(snapshot_steps, (list, tuple, range)):
        raise ValueError(f"snapshot_steps must be 'log', a list of step counts in [0, steps] or None, got "
                         f"{snapshot_steps!r}")
    bad = [s for s in snapshot_steps if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= steps]
    if bad:
        raise ValueError(f"snapshot_steps must be ints in [0, steps={steps}] (steps completed), got {bad}")
    return {int(s) for s in snapshot_steps}


def _batch(source: BatchSource, step: int, sae: EnsembleSAE) -> torch.Tensor:
    x = source(step)
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[1] != sae.d_in:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"batch at step {step} must be [batch, d_in={sae.d_in}], got {got}")
    x = x.to(device=sae.device, dtype=sae.dtype, non_blocking=True)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"batch at step {step} contains NaN or inf; clean the activations (or drop those rows) "
                         "before training")
    return x


@torch.no_grad()
def _log_row(sae: EnsembleSAE, x: torch.Tensor, out: SAEOutput, run: dict[str, Any]) -> dict[str, list[float]]:
    row = {"loss": out.loss, "mse": out.mse, "fvu": FVU().update(x, out.x_hat).value(),
           "l0": (out.codes != 0).sum(-1).float().mean(-1),
           # update_firing_ already counted this batch, so the window includes it.
           "dead_frac": sae.dead_mask(min(run["dead_window"], run["tokens_seen"])).float().mean(-1),
           **out.losses}
    if run["resampled"] is not None:
        row["resampled"] = torch.tensor(run["resampled"])
    return {k: v.detach().float().cpu().tolist() for k, v in row.items()}  # the one host sync per log


def train_sae(sae: EnsembleSAE, batches: Batches, steps: int = 2000, lr: float = 1e-3, progress: bool = True,
              log_every: int = 50, dead_window: int | None = None, seed: int = 0, *,
              batch_size: int | None = None, betas: tuple[float, float] = (0.9, 0.999),
              callback: Callable[[int, EnsembleSAE], None] | None = None,
              optimizer: torch.optim.Optimizer | None = None, warmup_steps: int = 0, decay: str | None = None,
              decay_frac: float = 0.2, coef_warmup_steps: int = 0, input_scale: float | str = "auto",
              resample_every: int | None = None, resample_until: float = 0.5, state_dir: str | Path | None = None,
              snapshot_steps: str | Sequence[int] | None = "log", state_every: int | None = None,
              resume: bool = True) -> pd.DataFrame:
    """Train every member of `sae` in place on the same batches; return the log.

    batches: a dataset tensor [rows, d_in] (rows sampled with `seed` and `batch_size`), an ActivationStore
    (shuffled epoch after epoch; seekable, the best source for resumable runs), a callable step -> [B, d_in] or an
    iterable of [B, d_in] (see sources.BatchSource). dead_window: tokens without firing before a latent counts as
    dead (the `dead_frac` column and TopK's AuxK); None keeps the SAE's own, else a tenth of the run's tokens (at
    least one batch, at most Gao et al.'s 10M), so AuxK and resampling engage in short runs too; until a run has
    seen a full window, `dead_frac` counts latents not fired yet.
    callback(step, sae) runs after each logged step. optimizer: one to continue with (default a fresh Adam).
    warmup_steps, decay ("linear" | "cosine" | None), decay_frac, coef_warmup_steps: see `schedules`.
    input_scale: the SAE sees input_scale · x (it is stored on the SAE, which still takes raw activations, and folded
    into saved weights); "auto" (default) estimates E‖s·x‖² = d_in from the source (`estimate_input_scale`; an
    iterable's first batch), so the default coefficients fit any activation scale. resample_every: resample dead
    latents every so many steps while step < resample_until · steps (see `resample`). state_dir: where snapshots
    (at snapshot_steps: "log" = 0, 1, 2, 4, ..., steps; a list; None) and the resumable state (also every
    state_every steps) go; resume: continue from state_dir's state (its settings must equal this call's).

    Returns a DataFrame, one row per (logged step, member): step, member, loss, mse, fvu, l0, dead_frac, the kind's
    loss terms (l1, aux, l0_loss, ...), `resampled` when resampling, and the member's hyperparameters. `step` is
    the step whose batch was measured, before its update; the last step is always logged. Raises
    TrainingDiverged (a FloatingPointError) naming the step and member when a loss becomes NaN/inf, and ValueError
    for a float16 SAE (Adam's second moments underflow in float16: train in float32 or bfloat16, then cast)."""
    if not isinstance(sae, EnsembleSAE):
        raise ValueError(f"sae must be an SAE from dictionaries.make_sae (or a loaded one), got {type(sae).__name__}")
    check_bool(progress, "progress")
    check_bool(resume, "resume")
    if sae.dtype == torch.float16:
        raise ValueError("float16 SAEs are not trained here: Adam's second moments underflow in float16 and the run "
                         "diverges whatever the lr; train in float32 (or bfloat16) and cast the result")
    settings = _settings(steps=steps, lr=lr, betas=betas, log_every=log_every, seed=seed, batch_size=batch_size,
                         dead_window=dead_window, warmup_steps=warmup_steps, decay=decay, decay_frac=decay_frac,
                         coef_warmup_steps=coef_warmup_steps, input_scale=input_scale, resample_every=resample_every,
                         resample_until=resample_until, state_every=state_every)
    source = BatchSource(batches, batch_size, seed)
    settings["source"] = source.kind
    if input_scale == "auto":
        input_scale = source.estimate_scale(batch_size)
    settings["input_scale"] = float(input_scale)
    sae.input_scale = float(input_scale)
    opt = optimizer or adam(sae, lr, betas)
    schedules = Schedules(sae, opt, lr, steps, warmup_steps, decay, decay_frac, coef_warmup_steps)
    generators = member_generators(sae, seed) if resample_every else []
    with ExitStack() as locks:
        if state_dir is not None:  # two trainings into one folder would interleave their states
            locks.enter_context(folder_lock(state_dir, f"train_sae {sae.kind} x{sae.n_members}"))
        saved = None if state_dir is None else TrainingState(
            state_dir, sae, opt, source, generators, settings, sae.input_scale, _snapshot_at(snapshot_steps, steps),
            state_every, steps)
        run: dict[str, Any] = {"tokens_seen": 0, "tokens_at_resample": 0, "dead_window": None, "log": [],
                               "resampled": [0] * sae.n_members if resample_every else None}
        # The window is this run's: a default chosen for a short run must not stay on the SAE for the next run
        # (AuxK would then treat nearly every latent as dead); a window the user set on the SAE is kept.
        window_before = sae.dead_window
        meta = saved.resume() if saved is not None and resume else None
        start = 0 if meta is None else int(meta["step"])
        if meta is not None:
            run = {k: meta[k] for k in run}
            sae.dead_window = run["dead_window"]
        guard = _Divergence(sae, saved.describe_last_good if saved is not None else lambda: "no training state was "
                            "written")
        if saved is not None and start == 0 and 0 in saved.snapshot_at:
            saved.save(0, run)

        sae.train()
        bar = tqdm(range(start, steps), disable=not progress, desc=f"train {sae.kind} x{sae.n_members}",
                   mininterval=0.5, initial=start, total=steps)
        try:
            for step in bar:
                x = _batch(source, step, sae)
                if run["dead_window"] is None:  # fixed at the first step: it needs the batch size
                    run["dead_window"] = sae.dead_window = (dead_window or sae.dead_window or min(
                        DEFAULT_DEAD_WINDOW, max(x.shape[0], steps * x.shape[0] // 10)))
                schedules.apply(step)
                out = sae(x)
                opt.zero_grad(set_to_none=True)
                out.loss.sum().backward()
                sae.project_decoder_grad_()
                opt.step()
                sae.normalize_decoder_()
                sae.update_firing_(out.fired, x.shape[0])
                run["tokens_seen"] += x.shape[0]
                guard.note(out.loss, step)
                done = step + 1
                if resample_every and done % resample_every == 0 and done <= resample_until * steps:
                    guard.check(done)
                    dead = sae.dead_mask(run["tokens_seen"] - run["tokens_at_resample"])
                    counts = resample_dead_(sae, opt, x, dead, generators)
                    run["resampled"] = [a + b for a, b in zip(run["resampled"], counts)]
                    run["tokens_at_resample"] = run["tokens_seen"]
                if step % log_every == 0 or step == steps - 1:
                    guard.check(done)
                    run["log"].append((step, _log_row(sae, x, out, run)))
                    if progress:
                        row = run["log"][-1][1]
                        bar.set_postfix(loss=f"{np.mean(row['loss']):.4g}", l0=f"{np.mean(row['l0']):.1f}",
                                        dead=f"{np.mean(row['dead_frac']):.2f}", refresh=False)
                    if callback is not None:
                        callback(step, sae)
                if saved is not None and saved.due(done):
                    guard.check(done)
                    saved.save(done, run)
            guard.check(steps)
        finally:
            bar.close()
            schedules.close()
            sae.dead_window = window_before
    sae.eval()
    return pd.DataFrame.from_records([{"step": step, "member": m, **{k: float(v[m]) for k, v in row.items()}, **h}
                                      for step, row in run["log"] for m, h in enumerate(sae.hparams)])
