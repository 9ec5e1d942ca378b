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
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ...activations import Exclusion
from ...arguments import checked
from ...checks import check_bool
from ...files import folder_lock
from ..base import DEFAULT_DEAD_WINDOW, EnsembleSAE, SAEOutput
from ..metrics import FVU
from .optim import adam
from .resample import member_generators, resample_dead_
from .rescale import fit_scale_
from .schedules import Schedules, log_spaced_steps
from .settings import TrainSettings, snapshot_set
from .e2e import SplicedObjective
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


class _Rollback:
    """Gives the SAE back as it came (input scale, the weights `fit_scale_` rewrote, train/eval mode, `fitted`) when
    training fails before its first step changed anything; the loop sets `stepped` after that step."""

    def __init__(self, sae: EnsembleSAE):
        self.sae, self.undo, self.stepped = sae, None, False
        self.before = (sae.input_scale, sae.training, getattr(sae, "fitted", False))

    def __enter__(self) -> "_Rollback":
        return self

    def __exit__(self, kind, error, trace) -> None:
        if error is not None and not self.stepped:
            if self.undo is not None:
                self.undo()
            self.sae.input_scale, training, self.sae.fitted = self.before
            self.sae.train(training)


def _batch(source: BatchSource, step: int, sae: EnsembleSAE) -> torch.Tensor:
    x = source(step)
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[1] != sae.d_in or x.shape[0] == 0:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"batch at step {step} must be [batch >= 1, d_in={sae.d_in}], got {got}")
    x = x.to(device=sae.device, dtype=sae.dtype, non_blocking=True)
    # One reduction without a bool temporary: min and max are NaN if any entry is, ±inf if any entry is.
    if not bool(torch.isfinite(torch.stack(torch.aminmax(x))).all()):
        raise ValueError(f"batch at step {step} contains NaN or inf; clean the activations (or drop those rows) "
                         "before training")
    return x


@torch.no_grad()
def _log_row(sae: EnsembleSAE, x: torch.Tensor, out: SAEOutput, run: dict[str, Any], loss: torch.Tensor,
             terms: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    row = {"loss": loss, "mse": out.mse, **terms, "fvu": FVU().update(x, out.x_hat).value(),
           "l0": out.l0,
           # update_firing_ already counted this batch, so the window includes it.
           "dead_frac": sae.dead_mask(min(run["dead_window"], run["tokens_seen"])).float().mean(-1),
           **out.losses}
    if run["resampled"] is not None:
        row["resampled"] = torch.tensor(run["resampled"])
    return {k: v.detach().float().cpu().tolist() for k, v in row.items()}  # the one host sync per log


def _objective(cfg: TrainSettings, batches: Any, model: Any, hook_name: Any, exclude: Any
               ) -> SplicedObjective | None:
    """The e2e batch source and loss for an e2e mode; None (and no model, hook or exclusion given) for "local"."""
    if cfg.loss == "local":
        given = [n for n, v in (("model", model), ("hook_name", hook_name), ("exclude", exclude)) if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)} given with loss='local': they are for end-to-end training (pass "
                             f"loss='e2e' or 'e2e+ds' with token contexts), a local SAE trains on activations alone")
        return None
    missing = [n for n, v in (("model", model), ("hook_name", hook_name)) if v is None]
    if missing:
        raise ValueError(f"loss={cfg.loss!r} needs {' and '.join(missing)}: the frozen model and the hook whose "
                         f"activation the reconstruction replaces")
    return SplicedObjective(model, hook_name, batches, cfg.batch_size, cfg.seed, cfg.loss, exclude)


@checked
def train_sae(sae: EnsembleSAE, batches: Batches, settings: TrainSettings | None = None, *, progress: bool = True,
              callback: Callable[[int, EnsembleSAE], None] | None = None,
              optimizer: torch.optim.Optimizer | None = None, state_dir: str | Path | None = None,
              resume: bool = True, model: torch.nn.Module | None = None, hook_name: str | None = None,
              exclude: Exclusion | None = None, **fields: Any) -> pd.DataFrame:
    """Train every member of `sae` in place on the same batches; return the log.

    settings: how to train (`TrainSettings`: steps, lr, betas, batch_size, seed, log_every, dead_window, warmup_steps,
    decay, decay_frac, coef_warmup_steps, input_scale, resample_every, resample_until, snapshot_steps, state_every;
    each field's unit, default and source are in its docstring); `fields` given as keywords override it
    (`train_sae(sae, x, steps=500, lr=3e-4)`), and a misspelt one is an error.
    batches: a dataset tensor [rows, d_in] (rows sampled with `seed` and `batch_size`), an ActivationStore
    (shuffled epoch after epoch; seekable, the best source for resumable runs), a callable step -> [B, d_in] or an
    iterable of [B, d_in] (see sources.BatchSource). The SAE sees input_scale · x (stored on the SAE, which still
    takes raw activations, and folded into saved weights). Input scale "auto": for a new SAE (from make_sae), s with
    E‖s·x‖² = d_in estimated from the source (`estimate_input_scale` with the run's seed), so the default
    coefficients fit any activation scale; for an SAE that has weights (`sae.fitted`: trained before, or loaded,
    its scale folded into its weights), the scale its weights work at, nothing estimated: a loaded SAE's scale is
    unfolded from its decoder rows back into input_scale. A number is the scale to train at; an SAE with weights
    has them rewritten for it. Either way such an SAE computes the same function when training starts: decoder
    rows not of unit norm are folded into the codes (`training.rescale`; refused for a TopK or BatchTopK SAE whose
    rows differ in norm within a member, as that would change its picks). A call that fails before its first step
    leaves the SAE as it came (scale, weights, train/eval mode), unless it resumed a saved state into it.
    callback(step, sae) runs after each logged step. optimizer: one to continue with (default a fresh Adam).
    state_dir: where snapshots and the resumable state go; resume: continue from state_dir's state (its settings
    must equal this call's, state_every and snapshot_steps aside).
    End-to-end modes (settings.loss "e2e" / "e2e+ds", Braun et al. 2024, arXiv 2405.12241; `training.e2e`):
    batches are token contexts [n_contexts, ctx_len] (integer ids; batch_size counts tokens, rounded down to whole
    contexts), `model` is the frozen TransformerLens model and `hook_name` where the reconstruction is spliced in;
    `exclude` (an `activations.Exclusion`, as the harvest recorded it) keeps positions out of the SAE's inputs and
    the loss. The SAE sees the clean activations at the hook and is trained on the KL of the spliced output (plus
    the later layers' MSE for "e2e+ds"); the model's weights never change.

    Returns a DataFrame, one row per (logged step, member): step, member, loss, mse, fvu, l0, dead_frac, the kind's
    loss terms (l1, aux, l0_loss, ...), kl and downstream_mse in e2e modes (unweighted), `resampled` when
    resampling, and the member's hyperparameters. `step` is the step whose batch was measured, before its update;
    the last step is always logged. Raises
    TrainingDiverged (a FloatingPointError) naming the step and member when a loss becomes NaN/inf, and ValueError
    for a bad setting (naming it), a float16 SAE (Adam's second moments underflow in float16: train in float32 or
    bfloat16, then cast) or a source that is not batches."""
    if not isinstance(sae, EnsembleSAE):
        raise ValueError(f"sae must be an SAE from dictionaries.make_sae (or a loaded one), got {type(sae).__name__}")
    cfg = TrainSettings.build(settings, **fields)
    check_bool(progress, "progress")
    check_bool(resume, "resume")
    if sae.dtype == torch.float16:
        raise ValueError("float16 SAEs are not trained here: Adam's second moments underflow in float16 and the run "
                         "diverges whatever the lr; train in float32 (or bfloat16) and cast the result")
    steps, log_every, dead_window = cfg.steps, cfg.log_every, cfg.dead_window
    resample_every, resample_until = cfg.resample_every, cfg.resample_until
    objective = _objective(cfg, batches, model, hook_name, exclude)
    source = BatchSource(batches if objective is None else objective, cfg.batch_size, cfg.seed)
    if source.width is not None and source.width != sae.d_in:
        raise ValueError(f"batches have width {source.width} but the SAE has d_in={sae.d_in}: pass activations of "
                         f"the width it encodes (or make an SAE with d_in={source.width})")
    with ExitStack() as locks:
        rollback = locks.enter_context(_Rollback(sae))
        if getattr(sae, "fitted", False):
            rollback.undo = fit_scale_(sae, None if cfg.input_scale == "auto" else float(cfg.input_scale))
        else:
            sae.input_scale = float(source.estimate_scale(cfg.seed) if cfg.input_scale == "auto" else cfg.input_scale)
        # What a resume compares: the settings (where and how often the state is written aside), the source's kind
        # and the scale actually used.
        settings_json = {**cfg.resume_key(), "source": source.kind, "input_scale": float(sae.input_scale)}
        if objective is not None:
            settings_json["contexts"] = objective.key()
        opt = optimizer or adam(sae, cfg.lr, cfg.betas)
        schedules = Schedules(sae, opt, cfg.lr, steps, cfg.warmup_steps, cfg.decay, cfg.decay_frac,
                              cfg.coef_warmup_steps)
        generators = member_generators(sae, cfg.seed) if resample_every else []
        if state_dir is not None:  # two trainings into one folder would interleave their states
            locks.enter_context(folder_lock(state_dir, f"train_sae {sae.kind} x{sae.n_members}"))
        saved = None if state_dir is None else TrainingState(
            state_dir, sae, opt, source, generators, settings_json, sae.input_scale,
            snapshot_set(cfg, log_spaced_steps(steps)), cfg.state_every, steps)
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
            rollback.stepped = sae.fitted = True  # the SAE now holds the saved run's state
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
                loss, terms = (out.loss, {}) if objective is None else objective.loss(
                    out, sae, cfg.kl_coef, cfg.downstream_coef)
                opt.zero_grad(set_to_none=True)
                loss.sum().backward()
                sae.project_decoder_grad_()
                opt.step()
                rollback.stepped = sae.fitted = True
                sae.normalize_decoder_()
                sae.update_firing_(out.fired, x.shape[0])
                run["tokens_seen"] += x.shape[0]
                guard.note(loss, step)
                done = step + 1
                if resample_every and done % resample_every == 0 and done <= resample_until * steps:
                    guard.check(done)
                    dead = sae.dead_mask(run["tokens_seen"] - run["tokens_at_resample"])
                    counts = resample_dead_(sae, opt, x, dead, generators)
                    run["resampled"] = [a + b for a, b in zip(run["resampled"], counts)]
                    run["tokens_at_resample"] = run["tokens_seen"]
                if step % log_every == 0 or step == steps - 1:
                    guard.check(done)
                    run["log"].append((step, _log_row(sae, x, out, run, loss, terms)))
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
