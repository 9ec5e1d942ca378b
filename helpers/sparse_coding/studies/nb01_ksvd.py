"""Notebook 01's small K-SVD experiment, in the original team's setting: 10 standard-basis features in 10
dimensions, exactly 3 active per sample. Exact K-SVD (`dictionaries.ksvd_dictionary`) is told k = 3 (right) up to 6
nonzeros per sample; we follow its recovery round by round (one round = one pass over the data = one epoch) and
train an SAE with its defaults on the same data for comparison.

The original finding: K-SVD "worked very well if you know ahead of time how many features there are, but struggled
if you increase that number by just a bit" (converged in ~23 epochs at k = 3, far from the features after 100 epochs
above 3)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..activations.synthetic import standard_basis_data
from ..analyses.recovery import mmcs_to_truth
from ..dictionaries import make_sae, train_sae
from ..dictionaries.baselines import ksvd_dictionary

# A run has converged from the first round after which its MMCS stays within this of its final value.
CONVERGED_WITHIN = 0.005


def _abs_mmcs(D: torch.Tensor, truth: torch.Tensor) -> float:
    """MMCS with |cos|: K-SVD atoms (and their codes) have no sign until oriented, and a flipped atom is the same
    feature."""
    D = D / D.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return float((truth @ D.T).abs().max(dim=1).values.mean())


def ksvd_wrong_k(ks: Sequence[int] = (3, 4, 5, 6), seeds: Sequence[int] = (0, 1, 2), n_samples: int = 1024,
                 n_iter: int = 50, d: int = 10, active: int = 3, progress: bool = True) -> pd.DataFrame:
    """K-SVD with n_components = d told each k in `ks`, one run per seed (data and initial atoms both follow the
    seed). Returns one row per (k, seed, round): mmcs (|cos|, against the d true features)."""
    rows = []
    runs = [(int(k), int(s)) for k in ks for s in seeds]
    for k, s in tqdm(runs, desc="K-SVD runs", disable=not progress):
        x, truth = standard_basis_data(n_samples, d=d, active=active, seed=s)
        ksvd_dictionary(x, d, k, n_iter=n_iter, seed=s,
                        on_iteration=lambda r, D: rows.append({"k": k, "seed": s, "round": r,
                                                               "mmcs": _abs_mmcs(D, truth)}))
    return pd.DataFrame(rows)


def convergence(trajectories: pd.DataFrame, within: float = CONVERGED_WITHIN, found: float = 0.99) -> pd.DataFrame:
    """Per (k, seed): final_mmcs, rounds_to_converge (the first round after which MMCS stays within `within` of its
    final value) and rounds_to_found (the first round with MMCS ≥ `found`, NaN if never)."""
    out = []
    for (k, seed), g in trajectories.sort_values("round").groupby(["k", "seed"]):
        m = g["mmcs"].to_numpy()
        rounds = g["round"].to_numpy()
        off = np.abs(m - m[-1]) > within
        last_off = np.flatnonzero(off)
        hit = np.flatnonzero(m >= found)
        out.append({"k": k, "seed": seed, "final_mmcs": float(m[-1]),
                    "rounds_to_converge": int(rounds[last_off[-1] + 1]) if len(last_off) else int(rounds[0]),
                    "rounds_to_found": float(rounds[hit[0]]) if len(hit) else float("nan")})
    return pd.DataFrame(out)


def by_k(summary: pd.DataFrame) -> tuple[dict[str, float], dict[str, float]]:
    """(median final MMCS by k, median rounds to converge by k), keyed by str(k) for JSON."""
    med = summary.groupby("k").median(numeric_only=True)
    return ({str(k): round(float(v), 4) for k, v in med["final_mmcs"].items()},
            {str(k): float(v) for k, v in med["rounds_to_converge"].items()})


def sae_small_setting(seeds: Sequence[int] = (0, 1, 2), n_samples: int = 1024, d: int = 10, active: int = 3,
                      steps: int = 2000, batch_size: int = 256, progress: bool = False) -> list[float]:
    """MMCS (signed) of a ReLU SAE with d latents and every training default, one per seed, on the K-SVD data."""
    out = []
    for s in seeds:
        x, truth = standard_basis_data(n_samples, d=d, active=active, seed=s)
        sae = make_sae("relu", d_in=d, d_sae=d, seed=s)
        train_sae(sae, x, steps=steps, batch_size=batch_size, seed=s, progress=progress)
        out.append(float(mmcs_to_truth(sae.decoder_directions()[0], truth)))
    return out
