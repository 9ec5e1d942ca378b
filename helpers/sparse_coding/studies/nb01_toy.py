"""Notebook 01's experiment: train SAEs on toy data over an α × dictionary-size grid and score them against the
known features, next to TopK and the classical baselines.

One ensemble per dictionary size, one member per L1 coefficient α. Every ensemble is fed the same batches:
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
from ..dictionaries import FVU, make_sae, train_sae
from ..dictionaries.baselines import ica_dictionary, omp_dictionary, pca_dictionary

# Held-out data for dead-feature counts and FVU comes from this seed offset, never from a training stream.
EVAL_SEED_OFFSET = 10_000


@dataclass
class ToySweepResult:
    l1_coefs: list[float]
    per_true_grid: list[float]
    # one row per (per_true, l1_coef): mmcs, mmcs_reverse, share_recovered, dead_share, l0, fvu, mmcs_vs_larger
    table: pd.DataFrame
    dictionaries: dict[float, torch.Tensor] = field(repr=False)  # per_true -> [E, n, d] decoder directions
    history: pd.DataFrame = field(repr=False)  # train_sae logs with a `per_true` column
    seconds: float = 0.0

    def grid(self, metric: str) -> pd.DataFrame:
        """metric as a per_true × l1_coef matrix (rows: per_true_grid ascending, columns: α ascending)."""
        return self.table.pivot(index="per_true", columns="l1_coef", values=metric).sort_index()

    def best(self) -> dict:
        """The grid cell with the highest MMCS against the truth."""
        row = self.table.loc[self.table["mmcs"].idxmax()]
        return {"mmcs": float(row["mmcs"]), "l1_coef": float(row["l1_coef"]), "per_true": float(row["per_true"])}


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


def _train(sae, data: ToyData, steps: int, batch_size: int, lr: float, seed: int, progress: bool,
           resample_every: int | None = None) -> pd.DataFrame:
    """Adam at `lr`, then linear decay over the last 40 % of the steps (train_sae's schedule): the high early rate
    finds the features fast, the decay lets the learned features settle on the true ones precisely. resample_every:
    re-initialise latents that have not fired since the last resample towards badly reconstructed samples (first
    half of training), which is how the rarely firing true features get a latent of their own."""
    return train_sae(sae, data.batches(batch_size, steps, seed), steps=steps, lr=lr, progress=progress,
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


def run_toy_sweep(data: ToyData, l1_coefs, per_true_grid, steps: int, batch_size: int = 256, lr: float = 1e-3,
                  seed: int = 0, n_eval: int = 4096, tied: bool = False, progress: bool = False,
                  resample_every: int | None = None) -> ToySweepResult:
    """Train one ReLU-L1 ensemble per dictionary size (per_true_grid: features per true feature; members =
    l1_coefs) on identical batches and score every member.

    Adam at `lr`, decayed linearly to zero over the last 40 % of the steps."""
    l1_coefs = _check_grid(l1_coefs, "l1_coefs")
    per_true_grid = _check_grid(per_true_grid, "per_true")
    steps = _check_positive_int(steps, "steps")
    batch_size = _check_positive_int(batch_size, "batch_size")
    n_eval = _check_positive_int(n_eval, "n_eval")
    t0 = time.time()
    truth = data.features
    x_eval, _ = eval_batch(data, n_eval, seed)
    rows, dictionaries, histories = [], {}, []
    for i, per_true in enumerate(per_true_grid):
        n = max(1, round(per_true * data.cfg.n_features))
        # A different init seed per size: with one seed the smaller dictionary's initial decoder would be a prefix
        # of the larger one's, and "reappears in a larger dictionary" would partly measure a shared start.
        sae = make_sae("relu", d_in=data.cfg.d, d_sae=n, l1_coef=l1_coefs, tied=tied, seed=seed + 1000 * i,
                       device=data.device)
        hist = _train(sae, data, steps, batch_size, lr, seed, progress, resample_every)
        histories.append(hist.assign(per_true=per_true))
        scores = _score_ensemble(sae, truth, x_eval)
        dictionaries[per_true] = sae.decoder_directions().cpu()
        for m, a in enumerate(l1_coefs):
            rows.append({"per_true": per_true, "d_sae": n, "l1_coef": a,
                         **{k: float(v[m]) for k, v in scores.items()}})
    table = pd.DataFrame(rows)
    table["mmcs_vs_larger"] = np.nan
    if len(per_true_grid) > 1:
        for per_true, vals in mmcs_vs_larger(dictionaries).items():
            for m, a in enumerate(l1_coefs):
                table.loc[(table.per_true == per_true) & (table.l1_coef == a), "mmcs_vs_larger"] = float(vals[m])
    return ToySweepResult(l1_coefs, per_true_grid, table, dictionaries, pd.concat(histories, ignore_index=True),
                          time.time() - t0)


def train_topk(data: ToyData, k: int, per_true: float, steps: int, batch_size: int = 256, lr: float = 1e-3,
               seed: int = 0, n_eval: int = 4096, progress: bool = False) -> dict:
    """One TopK SAE (k active per row) on the same stream as the sweep; its scores as a dict."""
    n = max(1, round(_check_grid([per_true], "per_true")[0] * data.cfg.n_features))
    sae = make_sae("topk", d_in=data.cfg.d, d_sae=n, k=[_check_positive_int(k, "k")], seed=seed, device=data.device)
    _train(sae, data, _check_positive_int(steps, "steps"), _check_positive_int(batch_size, "batch_size"), lr, seed,
           progress)
    x_eval, _ = eval_batch(data, _check_positive_int(n_eval, "n_eval"), seed)
    scores = _score_ensemble(sae, data.features, x_eval)
    return {"k": k, "per_true": per_true, **{key: float(v[0]) for key, v in scores.items()}}


def run_baselines(data: ToyData, n_samples: int = 8192, omp_iter: int = 10, ica_samples: int = 4096,
                  seed: int = 0, k_true: int | None = None, verbose: bool = False) -> pd.DataFrame:
    """PCA, ICA and OMP/k-SVD (true k and 2k) fitted on one fresh sample; MMCS against the truth for each.

    PCA and ICA can return at most d directions (half the true features at the defaults): that limit is part of what
    the comparison shows. OMP/k-SVD gets as many dictionary features as there are true features."""
    n_samples = _check_positive_int(n_samples, "n_samples")
    ica_samples = _check_positive_int(ica_samples, "ica_samples")
    k_true = _check_positive_int(k_true if k_true is not None else max(1, round(data.cfg.k)), "k_true")
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
    add(f"OMP k={k_true} (true)", lambda: omp_dictionary(X, F, k_true, n_iter=omp_iter, seed=seed, verbose=verbose))
    add(f"OMP k={2 * k_true} (2×)", lambda: omp_dictionary(X, F, 2 * k_true, n_iter=omp_iter, seed=seed,
                                                          verbose=verbose))
    return pd.DataFrame(rows)
