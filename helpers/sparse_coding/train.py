"""The training loop: Adam on an ensemble SAE, every member on the same batches.

Kept lean because on small SAEs the loop itself is the cost: metrics are computed and copied to the host only at
logged steps, so the steps in between run without a device sync (except the NaN check on the batch and, for
TopK, the AuxK "anything dead?" check). Non-finite losses are noted on the device every step and looked at only at
logged steps, checkpoints and resampling, which is early enough: nothing is ever written after a bad step.

What a run can add to plain Adam (all off by default, so a plain call trains exactly as before):

- lr schedule: linear warm-up over `warmup_steps`, then constant, then (`decay="linear"` or `"cosine"`) a decay to
  zero over the last `decay_frac` of the steps (linear-to-zero over the last 20 % is the default decay, as in
  Anthropic's and SAELens's recipes; the last step still gets lr/decay_steps, so no step is wasted).
- sparsity-coefficient warm-up: the kind's sparsity coefficient (ReLU: l1_coef, JumpReLU: l0_coef; TopK has none)
  ramps linearly from coef/coef_warmup_steps to its value over `coef_warmup_steps`; early on the dictionary first
  learns to reconstruct, so fewer latents die before they find a direction.
- input normalisation: every batch is multiplied by `input_scale` (estimate it with `estimate_input_scale`, which
  gives E||s x||^2 = d_in: the activations then have unit mean square per coordinate, so hyperparameters transfer
  across layers and models). Save with `sae_io.save_sweep(sae, ..., input_scale=s)`, which folds s into the weights.
- dead-latent resampling (Anthropic, "Towards Monosemanticity"): every `resample_every` steps, until
  `resample_until` of the run, latents that have not fired since the last resample get a new direction: an input
  drawn with probability ∝ (its squared reconstruction error)^2 from the current batch, normalised, as the decoder
  row; the same vector times 0.2 × the mean alive encoder norm as the encoder column; b_enc = 0; their Adam moments
  zeroed. Each member draws from its own generator (seeded by the training seed and the member's seed), so a
  member resamples the same way in any ensemble and on any rank. AuxK (TopK's loss) is the other remedy.
- checkpoints (`checkpoint_dir`): weight snapshots at log-spaced steps (0, 1, 2, 4, ... and the last) for tracking
  features across training, and the full state at each of those steps (and every `checkpoint_every` steps) to
  resume from; see checkpoint.py for the layout. `resume=True` continues from the latest full state and ends
  bit-identical (torch.equal) to an uninterrupted run: weights, Adam state, schedules, resampling RNG, firing
  counters, data position and the log are all restored.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .sae import DEFAULT_DEAD_WINDOW, EnsembleSAE

Batches = Iterable[torch.Tensor] | Callable[[int], torch.Tensor] | torch.Tensor


class TrainingDiverged(FloatingPointError):
    """A loss became NaN or inf during training (the message says where and which checkpoint is intact)."""


# --------------------------------------------------------------------------------------------------- batch sources

class _Source:
    """One callable step -> [B, d_in] over every accepted batch source, with what a resume needs to continue the
    stream exactly: `state()` / `restore(state, step)`."""

    def __init__(self, batches: Any, batch_size: int | None, seed: int):
        self.kind = "iterable"
        self.gen: torch.Generator | None = None
        self.it: Iterator[torch.Tensor] | None = None
        self.pos = 0  # batches taken from an iterable
        if isinstance(batches, torch.Tensor):
            # A whole dataset in memory: sample rows with the training seed, so a rerun sees the same batches.
            if batches.ndim != 2:
                raise ValueError(f"batches as a tensor must be a dataset [rows, d_in], got shape "
                                 f"{tuple(batches.shape)}")
            if batch_size is None:
                raise ValueError("batch_size is required when batches is a dataset tensor [rows, d_in]")
            self.kind, self.data, self.batch_size = "tensor", batches, batch_size
            self.gen = torch.Generator(device="cpu").manual_seed(seed)
        elif _is_store(batches):
            if batch_size is None:
                raise ValueError("batch_size is required when batches is an ActivationStore")
            if batch_size > batches.n_tokens:
                raise ValueError(f"batch_size={batch_size} exceeds the store's {batches.n_tokens} rows; lower it")
            # Same order as store.batches(batch_size, seed, drop_last=True): a permutation per epoch drawn from
            # (seed, epoch), so any step's batch is computable directly and a resume needs only the step.
            self.kind, self.store, self.batch_size, self.seed = "store", batches, batch_size, seed
            self.per_epoch = batches.n_tokens // batch_size
            self._perm_epoch, self._perm = -1, None
        elif callable(batches):
            self.kind, self.fn = "callable", batches
        else:
            try:
                self.it = iter(batches)
            except TypeError:
                raise ValueError(f"batches must be a dataset tensor, an ActivationStore, a callable step -> batch "
                                 f"or an iterable of batches, got {type(batches).__name__}") from None

    def __call__(self, step: int) -> torch.Tensor:
        if self.kind == "tensor":
            return self.data[torch.randint(len(self.data), (self.batch_size,), generator=self.gen)]
        if self.kind == "store":
            epoch, i = divmod(step, self.per_epoch)
            if epoch != self._perm_epoch:
                self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.store.n_tokens)
                self._perm_epoch = epoch
            return self.store.rows(self._perm[i * self.batch_size:(i + 1) * self.batch_size])
        if self.kind == "callable":
            return self.fn(step)
        try:
            x = next(self.it)
        except StopIteration:
            raise ValueError(f"batches ran out after {step} steps; give at least `steps` batches or a callable "
                             "step -> batch") from None
        self.pos += 1
        return x

    def state(self) -> dict[str, torch.Tensor]:
        return {"rng.data": self.gen.get_state()} if self.gen is not None else {}

    def restore(self, tensors: dict[str, torch.Tensor], step: int) -> None:
        if self.gen is not None:
            self.gen.set_state(tensors["rng.data"])
        elif self.kind == "iterable":
            # An iterable cannot seek: replay it. Correct for any iterable that yields the same batches when
            # created again (a list, store.batches(...) with the same seed, ToyData.batches(...)).
            for s in range(step):
                self(s)


def _is_store(obj: Any) -> bool:
    from .activations import ActivationStore

    return isinstance(obj, ActivationStore)


# --------------------------------------------------------------------------------------------------- schedules

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
    """The per-member hyperparameter that weighs the sparsity penalty, or None (TopK: sparsity is structural).
    A kind names it with a class attribute `sparsity_coef_key`; otherwise l1_coef / l0_coef when it has one."""
    key = getattr(type(sae), "sparsity_coef_key", None)
    if key is not None:
        return key
    return next((k for k in ("l1_coef", "l0_coef") if k in sae.member_keys), None)


def log_spaced_steps(steps: int) -> list[int]:
    """0, 1, 2, 4, 8, ... up to `steps`, and `steps` itself (steps completed: 0 is the initialisation)."""
    out, s = [0], 1
    while s < steps:
        out.append(s)
        s *= 2
    return out + [steps]


@torch.no_grad()
def estimate_input_scale(batches: Batches, n_batches: int = 16, batch_size: int | None = None, seed: int = 0
                         ) -> float:
    """s with E||s x||^2 = d_in, from `n_batches` batches of the source (a dataset tensor or an ActivationStore,
    sampled with `seed` and `batch_size`; a callable, called for steps 0..n-1; an iterable, its first batches).
    Pass it to train_sae(input_scale=s) and to sae_io.save_sweep(input_scale=s)."""
    if isinstance(n_batches, bool) or not isinstance(n_batches, int) or n_batches < 1:
        raise ValueError(f"n_batches must be a positive int, got {n_batches!r}")
    if (isinstance(batches, torch.Tensor) or _is_store(batches)) and batch_size is None:
        batch_size = 4096
    src = _Source(batches, batch_size, seed + 7919)  # not the training stream's generator
    total, rows, d = 0.0, 0, None
    for step in range(n_batches):
        try:
            x = src(step)
        except ValueError:
            if rows:
                break  # a short iterable: what it had is the estimate
            raise
        if not isinstance(x, torch.Tensor) or x.ndim != 2:
            raise ValueError(f"batch {step} must be a [batch, d_in] tensor")
        total += float(x.double().pow(2).sum())
        rows, d = rows + x.shape[0], x.shape[1]
    mean_sq = total / max(rows, 1)
    if not math.isfinite(mean_sq) or mean_sq <= 0:
        raise ValueError(f"mean squared norm of the inputs is {mean_sq!r}: the activations are all zero or contain "
                         "NaN/inf; clean them before estimating the scale")
    return math.sqrt(d / mean_sq)


# --------------------------------------------------------------------------------------------------- optimizer

def _adam(sae: EnsembleSAE, lr: float, betas: tuple[float, float]) -> torch.optim.Adam:
    """Adam, fused into one kernel per step where the device supports it (CPU and CUDA do): on small SAEs the
    per-parameter-tensor launches of the default implementation are a visible share of a step. Still elementwise,
    so ensemble members stay independent."""
    try:
        return torch.optim.Adam(sae.parameters(), lr=lr, betas=betas, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.Adam(sae.parameters(), lr=lr, betas=betas)


def _optimizer_tensors(opt: torch.optim.Optimizer, sae: EnsembleSAE) -> tuple[dict[str, torch.Tensor], list]:
    names = {id(p): n for n, p in sae.named_parameters()}
    tensors = {}
    for p, st in opt.state.items():
        for key, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"adam.{names[id(p)]}.{key}"] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"}
              for g in opt.param_groups]
    return tensors, groups


def _load_optimizer(opt: torch.optim.Optimizer, sae: EnsembleSAE, tensors: dict[str, torch.Tensor],
                    groups: list) -> None:
    params = dict(sae.named_parameters())
    index = {id(p): i for i, p in enumerate(q for g in opt.param_groups for q in g["params"])}
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, v in tensors.items():
        if name.startswith("adam."):
            pname, key = name[len("adam."):].rsplit(".", 1)
            state.setdefault(index[id(params[pname])], {})[key] = v
    sd = opt.state_dict()
    for g, saved in zip(sd["param_groups"], groups):
        g.update({k: (tuple(v) if k == "betas" else v) for k, v in saved.items()})
    opt.load_state_dict({"state": state, "param_groups": sd["param_groups"]})
    # Give each moment its parameter's memory layout, as a fresh Adam does (zeros_like): safetensors hands back
    # contiguous tensors, W_enc starts as a transposed view's clone, and an elementwise kernel over mismatched
    # strides can take another code path (vectorised or not, FMA or not): last-bit differences, not a resume.
    for p, st in opt.state.items():
        for key, v in st.items():
            if isinstance(v, torch.Tensor) and v.shape == p.shape and v.stride() != p.stride():
                st[key] = torch.empty_like(p, dtype=v.dtype).copy_(v)


# --------------------------------------------------------------------------------------------------- resampling

def _member_generators(sae: EnsembleSAE, seed: int) -> list[torch.Generator]:
    """One CPU generator per member from (training seed, member seed): a member's resampling draws do not depend
    on which other members share its ensemble (or its rank)."""
    gens = []
    for h in sae.hparams:
        s = int(np.random.SeedSequence([seed, int(h["seed"]) & 0xFFFFFFFF, 0x5E5A]).generate_state(1)[0])
        gens.append(torch.Generator(device="cpu").manual_seed(s))
    return gens


@torch.no_grad()
def resample_dead_(sae: EnsembleSAE, opt: torch.optim.Optimizer, x: torch.Tensor, dead: torch.Tensor,
                   generators: Sequence[torch.Generator], encoder_scale: float = 0.2) -> list[int]:
    """Re-initialise the latents marked in `dead` [E, d_sae] towards badly reconstructed rows of `x` [B, d_in]
    (Towards Monosemanticity): rows drawn ∝ loss², loss = ||x - x̂||² per member; decoder row = the row (as the
    encoder sees it, i.e. minus b_dec with pre_bias) normalised; encoder column = the same × encoder_scale × the
    mean norm of the member's alive encoder columns; b_enc = 0; their Adam moments and firing counters reset.
    Returns the number resampled per member."""
    counts = dead.sum(-1).tolist()
    if not any(counts):
        return counts
    was_training = sae.training
    sae.eval()  # plain reconstruction: no auxiliary losses
    x_hat = sae.decode(sae.encode(x))
    sae.train(was_training)
    err = (x_hat - x).pow(2).sum(-1)  # [E, B]
    W_enc = sae.encoder_weight()
    enc_norm = W_enc.norm(dim=1)  # [E, d_sae]: the norm of each latent's encoder column
    for m, n in enumerate(counts):
        if n == 0:
            continue
        p = err[m].double().cpu().pow(2)
        if not bool(torch.isfinite(p).all()) or float(p.sum()) <= 0:
            p = torch.ones_like(p)
        # Distinct rows while there are enough: two dead latents on one input would compete for it.
        replace = n > int((p > 0).sum())
        rows = torch.multinomial(p, n, replacement=replace, generator=generators[m]).to(x.device)
        v = x[rows].to(sae.dtype)
        if sae.pre_bias:
            v = v - sae.b_dec[m]
        v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        alive = ~dead[m]
        avg = enc_norm[m][alive].mean() if bool(alive.any()) else enc_norm.new_tensor(1.0)
        j = dead[m].nonzero().squeeze(1)
        sae.W_dec[m, j] = v
        if not sae.tied:
            sae.W_enc[m][:, j] = v.T * (avg * encoder_scale)
        sae.b_enc[m, j] = 0
        sae.tokens_since_fired[m, j] = 0
        for name, param in sae.named_parameters():
            st = opt.state.get(param, {})
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                if key in st:
                    buf = st[key][m]
                    if name == "W_enc":
                        buf[:, j] = 0
                    elif name == "W_dec" or tuple(param.shape[1:]) == (sae.d_sae,):  # b_enc, a kind's thresholds
                        buf[j] = 0
    return counts


# --------------------------------------------------------------------------------------------------- checks

def _check_int(v: Any, name: str, minimum: int, hint: str = "") -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}{hint}, got {v!r}")
    return v


def _checkpoint_steps(checkpoint_steps: Any, steps: int) -> list[int]:
    if checkpoint_steps is None:
        return []
    if checkpoint_steps == "log":
        return log_spaced_steps(steps)
    if isinstance(checkpoint_steps, str) or not isinstance(checkpoint_steps, (list, tuple, range)):
        raise ValueError(f"checkpoint_steps must be 'log', a list of step counts in [0, steps] or None, got "
                         f"{checkpoint_steps!r}")
    out = sorted({int(s) for s in checkpoint_steps})
    bad = [s for s in checkpoint_steps if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= steps]
    if bad:
        raise ValueError(f"checkpoint_steps must be ints in [0, steps={steps}] (steps completed), got {bad}")
    return out


# --------------------------------------------------------------------------------------------------- the loop

def train_sae(sae: EnsembleSAE, batches: Batches, steps: int = 2000, lr: float = 1e-3, progress: bool = True,
              log_every: int = 50, dead_window: int | None = None, seed: int = 0, *,
              batch_size: int | None = None, betas: tuple[float, float] = (0.9, 0.999),
              callback: Callable[[int, EnsembleSAE], None] | None = None,
              optimizer: torch.optim.Optimizer | None = None,
              warmup_steps: int = 0, decay: str | None = None, decay_frac: float = 0.2,
              coef_warmup_steps: int = 0, input_scale: float = 1.0,
              resample_every: int | None = None, resample_until: float = 0.5,
              checkpoint_dir: str | Path | None = None, checkpoint_steps: str | Sequence[int] | None = "log",
              checkpoint_every: int | None = None, resume: bool = True) -> pd.DataFrame:
    """Train every member of `sae` in place on the same batches; return the log.

    batches: an iterable of [B, d_in] tensors, a callable step -> [B, d_in], a dataset tensor [rows, d_in] (rows
    are sampled with `seed` and `batch_size`) or an ActivationStore (shuffled as store.batches(batch_size, seed,
    drop_last=True), epoch after epoch; seekable, so the best source for resumable runs).
    dead_window: tokens without firing before a latent counts as dead (the `dead_frac` column and TopK's AuxK).
    None keeps the SAE's own setting, else min(10M tokens, 1000 batches) as in Gao et al. / SAELens. Until a run
    has seen a full window, `dead_frac` counts latents that have not fired at all yet.
    callback(step, sae) runs after each logged step (checkpoints, feature snapshots).
    optimizer: pass one to continue training with its state; by default a fresh Adam.
    warmup_steps, decay ("linear" | "cosine" | None), decay_frac: the lr schedule (module docstring); when all
    are off the optimizer's lr is never touched (a callback may schedule it).
    coef_warmup_steps: linear warm-up of the kind's sparsity coefficient (see `sparsity_key`).
    input_scale: every batch is multiplied by it (see `estimate_input_scale`).
    resample_every: resample dead latents every so many steps (None: never), while step < resample_until * steps.
    checkpoint_dir: where snapshots and the resumable state go (None: nowhere). checkpoint_steps: "log" (0, 1, 2,
    4, ..., steps), a list of step counts, or None; checkpoint_every: also save the full state every so many steps.
    resume: continue from checkpoint_dir's state when there is one (its settings must equal this call's).
    A callable source must be a pure function of the step for a resumed run to equal an uninterrupted one; an
    iterable is replayed from its start.

    Returns a DataFrame with one row per (logged step, member): step, member, loss, mse, fvu, l0, dead_frac, the
    kind's own loss terms (l1, aux), `resampled` when resampling, and the member's hyperparameters. `step` is the
    step whose batch was measured, before that step's update; the last step is always logged.
    Raises TrainingDiverged (a FloatingPointError) naming the step and member when a loss becomes NaN/inf.
    """
    _check_int(steps, "steps", 1)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    _check_int(log_every, "log_every", 1, " (steps between log rows)")
    if dead_window is not None:
        _check_int(dead_window, "dead_window", 1, " (tokens) or None")
    _check_int(warmup_steps, "warmup_steps", 0)
    _check_int(coef_warmup_steps, "coef_warmup_steps", 0)
    if decay not in (None, "linear", "cosine"):
        raise ValueError(f"decay must be None, 'linear' or 'cosine', got {decay!r}")
    if not isinstance(decay_frac, (int, float)) or not 0 < decay_frac <= 1:
        raise ValueError(f"decay_frac must be in (0, 1] (share of the steps spent decaying), got {decay_frac!r}")
    if isinstance(input_scale, bool) or not isinstance(input_scale, (int, float)) or not (
            0 < input_scale < float("inf")):
        raise ValueError(f"input_scale must be a finite number > 0 (see estimate_input_scale), got {input_scale!r}")
    if resample_every is not None:
        _check_int(resample_every, "resample_every", 1, " (steps) or None")
    if not isinstance(resample_until, (int, float)) or not 0 <= resample_until <= 1:
        raise ValueError(f"resample_until must be in [0, 1] (share of the run during which to resample), got "
                         f"{resample_until!r}")
    if checkpoint_every is not None:
        _check_int(checkpoint_every, "checkpoint_every", 1, " (steps) or None")
    snap_steps = set(_checkpoint_steps(checkpoint_steps, steps)) if checkpoint_dir is not None else set()
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None

    source = _Source(batches, batch_size, seed)
    opt = optimizer or _adam(sae, lr, betas)
    scheduled = warmup_steps > 0 or decay is not None
    coef_key = sparsity_key(sae) if coef_warmup_steps > 0 else None
    coef_base = sae.member_param(coef_key).clone() if coef_key else None
    res_gens = _member_generators(sae, seed) if resample_every else []
    settings = {"steps": steps, "lr": float(lr), "betas": list(betas), "log_every": log_every, "seed": seed,
                "batch_size": batch_size, "dead_window": dead_window, "warmup_steps": warmup_steps, "decay": decay,
                "decay_frac": float(decay_frac), "coef_warmup_steps": coef_warmup_steps,
                "input_scale": float(input_scale), "resample_every": resample_every,
                "resample_until": float(resample_until), "source": source.kind}

    logged: list[tuple[int, dict[str, list[float]]]] = []
    tokens_seen = tokens_at_resample = 0
    start = 0
    window = None  # the dead window in tokens, fixed at the first step (it needs the batch size)
    if folder is not None and resume:
        loaded = ckpt.load_state(folder, device=sae.device)
        if loaded is not None:
            tensors, meta = loaded
            ours = _jsonish({"config": sae.config, "settings": settings})
            diff = [f"{part}.{k}" for part in ours for k in sorted(set(ours[part]) | set(meta[part]))
                    if ours[part].get(k) != meta[part].get(k)]
            if _jsonish(sae.hparams) != meta["hparams"]:
                diff.append("hparams")
            if diff:
                raise ValueError(f"{folder} holds a run with other settings ({', '.join(diff)}); pass resume=False "
                                 f"to start over there, or use another checkpoint_dir")
            start = int(meta["step"])
            with torch.no_grad():
                for name, t in sae.state_dict().items():
                    t.copy_(tensors[f"sae.{name}"])
            _load_optimizer(opt, sae, tensors, meta["param_groups"])
            source.restore({k: v.cpu() for k, v in tensors.items()}, start)
            for m, g in enumerate(res_gens):
                g.set_state(tensors["rng.resample"][m].cpu().clone())
            tokens_seen, tokens_at_resample = int(meta["tokens_seen"]), int(meta["tokens_at_resample"])
            window = sae.dead_window = meta["dead_window"]
            logged = [(int(s), row) for s, row in meta["log"]]

    bad_step = torch.full((sae.n_members,), -1, dtype=torch.long, device=sae.device)
    last_good = {"step": None}

    def check_finite(at: int) -> None:
        bad = bad_step.tolist()
        members = [m for m, s in enumerate(bad) if s >= 0]
        if members:
            first = min(bad[m] for m in members)
            where = (f"the last good checkpoint ({folder / ckpt.STATE_FILE}, step {last_good['step']}) is intact"
                     if last_good["step"] is not None else "no checkpoint was written")
            raise TrainingDiverged(
                f"loss became NaN/inf at step {first} for member(s) {members} (hparams "
                f"{[sae.hparams[m] for m in members]}); training stopped at step {at} and {where}. Lower lr, add "
                f"warmup_steps, or check the inputs' scale (estimate_input_scale) and resume from the checkpoint")

    def save(done: int, snapshot: bool) -> None:
        check_finite(done)
        if not all(bool(torch.isfinite(p).all()) for p in sae.parameters()):
            raise TrainingDiverged(f"weights are NaN/inf after step {done}; nothing was written, {folder} keeps "
                                   f"the state of step {last_good['step']}")
        weights = {k: v for k, v in sae.state_dict().items()}
        meta = {"input_scale": float(input_scale), "config": sae.config, "hparams": sae.hparams}
        if snapshot:
            ckpt.save_snapshot(folder, done, weights, meta)
        tensors = {f"sae.{k}": v for k, v in weights.items()}
        opt_tensors, groups = _optimizer_tensors(opt, sae)
        tensors.update(opt_tensors)
        tensors.update(source.state())
        if res_gens:
            tensors["rng.resample"] = torch.stack([g.get_state() for g in res_gens])
        ckpt.save_state(folder, tensors, _jsonish({
            **meta, "step": done, "settings": settings, "param_groups": groups, "tokens_seen": tokens_seen,
            "tokens_at_resample": tokens_at_resample, "dead_window": window, "log": logged}))
        ckpt.write_index(folder, done, {"settings": settings, "input_scale": float(input_scale)})
        last_good["step"] = done

    if folder is not None and start == 0 and 0 in snap_steps:
        save(0, snapshot=True)
    elif folder is not None and start > 0:
        last_good["step"] = start

    sae.train()
    bar = tqdm(range(start, steps), disable=not progress, desc=f"train {sae.kind} x{sae.n_members}",
               mininterval=0.5, initial=start, total=steps)
    resampled = torch.zeros(sae.n_members, dtype=torch.long)
    try:
        for step in bar:
            x = source(step)
            if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[1] != sae.d_in:
                got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"batch at step {step} must be [batch, d_in={sae.d_in}], got {got}")
            x = x.to(device=sae.device, dtype=sae.dtype, non_blocking=True)
            if not bool(torch.isfinite(x).all()):
                raise ValueError(f"batch at step {step} contains NaN or inf; clean the activations (or drop those "
                                 "rows) before training")
            if input_scale != 1.0:
                x = x * input_scale
            if window is None:
                window = dead_window or sae.dead_window or min(DEFAULT_DEAD_WINDOW, 1000 * x.shape[0])
                sae.dead_window = window
            if scheduled:
                for group in opt.param_groups:
                    group["lr"] = lr * lr_factor(step, steps, warmup_steps, decay, decay_frac)
            if coef_key and step <= coef_warmup_steps:
                sae.member_param(coef_key).copy_(coef_base * coef_factor(step, coef_warmup_steps))
            out = sae(x)
            opt.zero_grad(set_to_none=True)
            out["loss"].sum().backward()
            sae.project_decoder_grad_()
            opt.step()
            sae.normalize_decoder_()
            # With "fired" the codes are not needed here (TopK builds its dense codes only when they are read).
            fired = out.get("fired")
            sae.update_firing_(out["codes"].detach() if fired is None else None, fired, n_tokens=x.shape[0])
            tokens_seen += x.shape[0]
            bad_step.masked_fill_((~torch.isfinite(out["loss"].detach())) & (bad_step < 0), step)
            done = step + 1

            if resample_every and done % resample_every == 0 and done <= resample_until * steps:
                check_finite(done)
                dead = sae.dead_mask(tokens_seen - tokens_at_resample)
                resampled += torch.tensor(resample_dead_(sae, opt, x, dead, res_gens))
                tokens_at_resample = tokens_seen

            if step % log_every == 0 or step == steps - 1:
                check_finite(done)
                with torch.no_grad():
                    variance = (x - x.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
                    row = {"loss": out["loss"].detach(), "mse": out["mse"].detach(),
                           "fvu": out["mse"].detach() / variance,
                           "l0": (out["codes"] != 0).sum(-1).float().mean(-1),
                           # update_firing_ already counted this batch, so the window includes it.
                           "dead_frac": sae.dead_mask(min(window, tokens_seen)).float().mean(-1)}
                    row.update({k: out[k].detach() for k in sae.loss_terms if k in out})
                    if resample_every:
                        row["resampled"] = resampled
                    row = {k: v.float().cpu().tolist() for k, v in row.items()}  # the one host sync per log
                logged.append((step, row))
                if progress:
                    bar.set_postfix(loss=f"{np.mean(row['loss']):.4g}", l0=f"{np.mean(row['l0']):.1f}",
                                    dead=f"{np.mean(row['dead_frac']):.2f}", refresh=False)
                if callback is not None:
                    callback(step, sae)
            if folder is not None and (done in snap_steps or done == steps
                                       or (checkpoint_every and done % checkpoint_every == 0)):
                save(done, snapshot=done in snap_steps)
        check_finite(steps)
    finally:
        bar.close()
        if coef_key:  # the buffers hold the full coefficients again, whatever happened
            sae.member_param(coef_key).copy_(coef_base)
    sae.eval()

    records = []
    for step, row in logged:
        for m, h in enumerate(sae.hparams):
            rec = {"step": step, "member": m}
            rec.update({k: float(v[m]) for k, v in row.items()})
            rec.update(h)
            records.append(rec)
    return pd.DataFrame.from_records(records)


def _jsonish(obj: Any) -> Any:
    """What a value looks like after a JSON round trip (tuples -> lists), for comparing saved settings."""
    import json

    from .io import _jsonable

    return json.loads(json.dumps(_jsonable(obj)))
