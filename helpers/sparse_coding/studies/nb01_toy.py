"""Notebook 01's experiment: train SAEs of every kind on toy data over a small grid of their own (the kind's sparsity
setting × dictionary size × learning rate) and score them against the known features, next to the classical
baselines.

One ensemble per (dictionary size, learning rate), one member per value of the kind's sparsity setting (`SPARSITY`:
ReLU's L1 coefficient α, TopK's and BatchTopK's k, JumpReLU's L0 coefficient). Inputs are normalised to E‖x‖² = d
(train_sae's default), so the coefficients mean what they mean on language-model activations. Every ensemble is fed the same batches:
`ToyData.batches` is deterministic for a seed, so each ensemble re-draws the identical stream (drawing a batch is
a small part of a training step, far cheaper than holding steps × batch × d floats in memory to share them).
Sizes are given as `per_true`, dictionary features per true feature (1 = 512 features for 512 true ones), as in
Sharkey et al. 2022."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from ..activations.synthetic import ToyData
from ..analyses.recovery import dead_features, mmcs_from_learned, mmcs_to_truth, mmcs_vs_larger, share_recovered
from ..dictionaries import FVU, SAE_KINDS, make_sae, train_sae
from ..dictionaries.baselines import ica_dictionary, ksvd_dictionary, online_dictionary, pca_dictionary

# Held-out data for dead-feature counts and FVU comes from this seed offset, never from a training stream.
EVAL_SEED_OFFSET = 10_000


# The member hyperparameter each kind's sweep varies.
SPARSITY = {kind: SAE_KINDS[kind].sparsity_knob for kind in ("relu", "topk", "batchtopk", "jumprelu")}


@dataclass
class ToySweepResult:
    kind: str
    values: list[float]  # the swept sparsity setting (SPARSITY[kind]), ascending
    per_true_grid: list[float]
    lrs: list[float]
    # one row per (per_true, lr, value): kind, d_sae, <SPARSITY[kind]>, mmcs, mmcs_reverse, share_recovered,
    # dead_share, l0, fvu (held-out samples), mmcs_vs_larger
    table: pd.DataFrame
    dictionaries: dict[tuple[float, float], torch.Tensor] = field(repr=False)  # (per_true, lr) -> [E, n, d]
    history: pd.DataFrame = field(repr=False)  # train_sae logs with `per_true` and `lr` columns
    seconds: float = 0.0

    @property
    def param(self) -> str:
        return SPARSITY[self.kind]

    def best_lr(self) -> float:
        """The learning rate of the best cell."""
        return float(self.best()["lr"])

    def grid(self, metric: str, lr: float | None = None) -> pd.DataFrame:
        """metric as a per_true × sparsity-setting matrix at one learning rate (default: the best cell's)."""
        lr = self.best_lr() if lr is None else float(lr)
        sub = self.table[self.table["lr"] == lr]
        return sub.pivot(index="per_true", columns=self.param, values=metric).sort_index()

    def best(self) -> dict:
        """The grid cell with the highest MMCS against the truth: its mmcs, l0 (held-out), fvu, setting, per_true
        and lr."""
        row = self.table.loc[self.table["mmcs"].idxmax()]
        return {"kind": self.kind, "mmcs": float(row["mmcs"]), "l0": float(row["l0"]), "fvu": float(row["fvu"]),
                self.param: float(row[self.param]), "per_true": float(row["per_true"]), "lr": float(row["lr"])}


def _check_grid(values, name: str) -> list[float]:
    try:
        out = [float(v) for v in values]
    except TypeError:
        raise ValueError(f"{name} must be a list of positive numbers, got {values!r}") from None
    if not out or any(not (v > 0 and math.isfinite(v)) for v in out):
        raise ValueError(f"{name} must be a non-empty list of positive numbers, got {values!r}")
    if len(set(out)) != len(out):
        raise ValueError(f"{name} has repeated values: {values!r}")
    return sorted(out)


def _check_positive_int(v, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return int(v)


def draw_stream(data: ToyData, batch_size: int, steps: int, seed: int = 0) -> torch.Tensor:
    """The training stream [steps, batch_size, d], drawn once (steps·batch_size·d·4 bytes: 1 GiB at the notebook's
    defaults) so that every ensemble of every kind trains on the same batches without re-drawing them (drawing costs
    a quarter of a TopK step here)."""
    steps = _check_positive_int(steps, "steps")
    batch_size = _check_positive_int(batch_size, "batch_size")
    out = torch.empty(steps, batch_size, data.cfg.d, device=data.device)
    for i, b in enumerate(data.batches(batch_size, steps, seed)):
        out[i] = b
    return out


def _train(sae, stream: torch.Tensor, steps: int, lr: float, seed: int, progress: bool,
           resample_every: int | None = None) -> pd.DataFrame:
    """Adam at `lr`, then linear decay over the last 40 % of the steps (train_sae's schedule): the high early rate
    finds the features fast, the decay lets the learned features settle on the true ones precisely. Inputs are
    normalised (train_sae's input_scale="auto"). resample_every: re-initialise latents that have not fired since the
    last resample towards badly reconstructed samples (first half of training)."""
    return train_sae(sae, lambda step: stream[step], steps=steps, lr=lr, progress=progress,
                     log_every=max(1, steps // 20), seed=seed, decay="linear", decay_frac=0.4,
                     resample_every=resample_every)


def eval_batch(data: ToyData, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out (x, true codes), disjoint in seed from every training stream."""
    return data.sample(n, data.generator(seed + EVAL_SEED_OFFSET))


@torch.no_grad()
def _score_ensemble(sae, truth: torch.Tensor, x_eval: torch.Tensor) -> dict[str, np.ndarray]:
    D = sae.decoder_directions()
    codes = sae.encode(x_eval)
    x_hat = sae.decode(codes)
    _, dead_share = dead_features(codes)
    return {
        "mmcs": mmcs_to_truth(D, truth).cpu().numpy(),
        "mmcs_reverse": mmcs_from_learned(D, truth).cpu().numpy(),
        "share_recovered": share_recovered(D, truth, 0.9).cpu().numpy(),
        "dead_share": dead_share.cpu().numpy(),
        "l0": (codes > 0).sum(-1).float().mean(-1).cpu().numpy(),
        "fvu": FVU().update(x_eval, x_hat).value().numpy(),
    }


def _check_values(kind: str, values) -> list:
    if kind not in SPARSITY:
        raise ValueError(f"kind must be one of {sorted(SPARSITY)}, got {kind!r}")
    name = SPARSITY[kind] + ("s" if kind in ("relu", "jumprelu") else "")
    if SPARSITY[kind] == "k":
        try:
            out = sorted(_check_positive_int(v, "k") for v in values)
        except TypeError:
            raise ValueError(f"ks must be a list of positive integers, got {values!r}") from None
        if not out or len(set(out)) != len(out):
            raise ValueError(f"ks must be a non-empty list of distinct positive integers, got {values!r}")
        return out
    return _check_grid(values, name)


def run_toy_sweep(data: ToyData, kind: str, values, per_true_grid, steps: int, lrs=(1e-3,), batch_size: int = 256,
                  seed: int = 0, n_eval: int = 4096, tied: bool = False, progress: bool = False,
                  resample_every: int | None = None, stream: torch.Tensor | None = None, **fixed) -> ToySweepResult:
    """Train one `kind` ensemble per (dictionary size, learning rate) (per_true_grid: features per true feature;
    members = `values` of the kind's sparsity setting, SPARSITY[kind]) on identical batches and score every member
    on held-out samples. `fixed`: other member hyperparameters, the same for every member (e.g. aux_k). stream:
    `draw_stream(data, batch_size, steps, seed)`, shared between sweeps (drawn here when None).

    Adam at each lr of `lrs`, decayed linearly to zero over the last 40 % of the steps. Raises ValueError naming
    the argument for an unknown kind, an empty or repeated grid, or a non-positive size, step count or lr."""
    values = _check_values(kind, values)
    per_true_grid = _check_grid(per_true_grid, "per_true")
    lrs = _check_grid(lrs if isinstance(lrs, (list, tuple)) else [lrs], "lrs")
    steps = _check_positive_int(steps, "steps")
    batch_size = _check_positive_int(batch_size, "batch_size")
    n_eval = _check_positive_int(n_eval, "n_eval")
    t0 = time.time()
    x_eval, _ = eval_batch(data, n_eval, seed)
    if stream is None:
        stream = draw_stream(data, batch_size, steps, seed)
    elif stream.ndim != 3 or stream.shape[0] < steps or stream.shape[2] != data.cfg.d:
        raise ValueError(f"stream must be [>= steps={steps}, batch, d={data.cfg.d}] (draw_stream), got "
                         f"{tuple(stream.shape)}")
    parts = [train_cell(data, kind, values, per_true, i, lr, stream, steps=steps, seed=seed, x_eval=x_eval,
                        tied=tied, progress=progress, resample_every=resample_every, **fixed)
             for lr in lrs for i, per_true in enumerate(per_true_grid)]
    return assemble(kind, values, per_true_grid, lrs, parts, time.time() - t0)


def train_cell(data: ToyData, kind: str, values: list, per_true: float, size_index: int, lr: float,
               stream: torch.Tensor, steps: int, seed: int, x_eval: torch.Tensor, tied: bool = False,
               progress: bool = False, resample_every: int | None = None, **fixed
               ) -> tuple[list[dict], torch.Tensor, pd.DataFrame]:
    """One grid cell: the ensemble of `values` at one dictionary size (per_true, the size_index-th of the grid) and
    lr, trained on stream and scored on x_eval: (one table row per member, its decoder directions [E, n, d], its
    training log). Checked arguments (run_toy_sweep checks them)."""
    param = SPARSITY[kind]
    n = max(1, round(per_true * data.cfg.n_features))
    if param == "k" and values[-1] > n:
        raise ValueError(f"k={values[-1]} exceeds the dictionary size {n} at per_true={per_true:g}")
    # A different init seed per size: with one seed the smaller dictionary's initial decoder would be a
    # prefix of the larger one's, and "reappears in a larger dictionary" would partly measure a shared start.
    sae = make_sae(kind, d_in=data.cfg.d, d_sae=n, tied=tied, seed=seed + 1000 * size_index, device=data.device,
                   **{param: values}, **fixed)
    hist = _train(sae, stream, steps, lr, seed, progress, resample_every)
    scores = _score_ensemble(sae, data.features, x_eval)
    rows = [{"kind": kind, "per_true": per_true, "lr": lr, "d_sae": n, param: v,
             **{k: float(s[m]) for k, s in scores.items()}} for m, v in enumerate(values)]
    return rows, sae.decoder_directions().cpu(), hist.assign(per_true=per_true, lr=lr)


def assemble(kind: str, values: list, per_true_grid: list[float], lrs: list[float],
             parts: list[tuple[list[dict], torch.Tensor, pd.DataFrame]], seconds: float) -> ToySweepResult:
    """A kind's `ToySweepResult` from its cells (`train_cell`'s results, ordered lr-major then size), with each
    member's MMCS against the next larger dictionary of the same lr."""
    param = SPARSITY[kind]
    cells = [(lr, p) for lr in lrs for p in per_true_grid]
    table = pd.DataFrame([row for rows, _, _ in parts for row in rows])
    dictionaries = {(p, lr): D for (lr, p), (_, D, _) in zip(cells, parts)}
    table["mmcs_vs_larger"] = np.nan
    if len(per_true_grid) > 1:
        for lr in lrs:
            by_size = {p: dictionaries[(p, lr)] for p in per_true_grid}
            for per_true, vals in mmcs_vs_larger(by_size).items():
                for m, v in enumerate(values):
                    at = (table.per_true == per_true) & (table.lr == lr) & (table[param] == v)
                    table.loc[at, "mmcs_vs_larger"] = float(vals[m])
    return ToySweepResult(kind, values, per_true_grid, lrs, table, dictionaries,
                          pd.concat([h for _, _, h in parts], ignore_index=True), seconds)


def run_baselines(data: ToyData, n_samples: int = 8192, ksvd_iter: int = 10, ica_samples: int = 4096,
                  seed: int = 0, k_true: int | None = None, online_alpha: float = 0.1, online_epochs: int = 3
                  ) -> pd.DataFrame:
    """PCA, ICA, exact K-SVD told the true k and 2k nonzeros, and online dictionary learning (lasso coding),
    fitted on one fresh sample [n_samples, d] in raw units; MMCS against the truth for each (one row per method:
    method, d_sae, mmcs, mmcs_reverse, share_recovered, seconds).

    PCA and ICA can return at most d directions (half the true features at the defaults): that limit is part of what
    the comparison shows. K-SVD and online dictionary learning get as many atoms as there are true features.
    online_alpha is the lasso penalty on inputs scaled to E‖x‖² = 1 per sample (MiniBatchDictionaryLearning)."""
    n_samples = _check_positive_int(n_samples, "n_samples")
    ica_samples = _check_positive_int(ica_samples, "ica_samples")
    k_true = _check_positive_int(k_true if k_true is not None else max(1, round(data.cfg.mean_active)), "k_true")
    X, _ = data.sample(n_samples, data.generator(seed + 2 * EVAL_SEED_OFFSET))
    X = X.cpu()
    truth = data.features.cpu()
    F = data.cfg.n_features
    rows = []

    def add(name: str, fit):
        t = time.time()
        D = fit()
        rows.append({"method": name, "d_sae": D.shape[0], "mmcs": float(mmcs_to_truth(D, truth)),
                     "mmcs_reverse": float(mmcs_from_learned(D, truth)),
                     "share_recovered": float(share_recovered(D, truth, 0.9)), "seconds": time.time() - t})

    add("PCA", lambda: pca_dictionary(X, seed=seed))
    add("ICA", lambda: ica_dictionary(X[:ica_samples], seed=seed))
    add(f"K-SVD k={k_true} (true)", lambda: ksvd_dictionary(X, F, k_true, n_iter=ksvd_iter, seed=seed))
    add(f"K-SVD k={2 * k_true} (2×)", lambda: ksvd_dictionary(X, F, 2 * k_true, n_iter=ksvd_iter, seed=seed))
    # The lasso penalty depends on the scale of x: give it unit mean squared norm, as for the SAEs' coefficients.
    unit = X / X.pow(2).sum(1).mean().sqrt()
    add("Online DL (lasso)", lambda: online_dictionary(unit, F, alpha=online_alpha, n_epochs=online_epochs,
                                                       seed=seed))
    return pd.DataFrame(rows)
