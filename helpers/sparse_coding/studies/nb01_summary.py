"""Notebook 01's summary: each kind's best grid cell, the bars of the method comparison, and figures/01_metrics.json
(keys read by the write-up: best_<kind>_mmcs / best_<kind>_l0 for every kind, the baselines' MMCS, and the small
K-SVD experiment's ksvd_mmcs_by_k, ksvd_epochs_by_k, sae_mmcs_small_setting)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from . import nb01_ksvd
from .nb01_toy import ToySweepResult

KIND_NAMES = {"relu": "ReLU-L1", "topk": "TopK", "batchtopk": "BatchTopK", "jumprelu": "JumpReLU"}


def best_by_kind(sweeps: Mapping[str, ToySweepResult]) -> pd.DataFrame:
    """One row per kind: its best cell (highest MMCS with the truth) with that cell's held-out L0, FVU, setting,
    size and learning rate."""
    rows = []
    for kind, s in sweeps.items():
        b = s.best()
        rows.append({"kind": kind, "mmcs": b["mmcs"], "l0": b["l0"], "fvu": b["fvu"], "setting": s.param,
                     "value": b[s.param], "per_true": b["per_true"], "lr": b["lr"], "n_saes": len(s.table)})
    return pd.DataFrame(rows).set_index("kind")


def _method(base: pd.DataFrame, prefix: str) -> float:
    hit = base[base["method"].str.startswith(prefix)]
    if hit.empty:
        raise KeyError(f"no baseline named {prefix!r}...; have {list(base['method'])}")
    return float(hit["mmcs"].iloc[0])


def bars(best: pd.DataFrame, base: pd.DataFrame) -> tuple[list[str], list[float], list[float | None]]:
    """(names, MMCS, L0 or None) for the method comparison: every SAE kind's best, then every baseline."""
    names = [f"SAE {KIND_NAMES.get(k, k)}" for k in best.index]
    values = [float(v) for v in best["mmcs"]]
    l0s: list[float | None] = [float(v) for v in best["l0"]]
    for _, row in base.iterrows():
        names.append(str(row["method"]))
        values.append(float(row["mmcs"]))
        l0s.append(None)
    return names, values, l0s


def metrics(best: pd.DataFrame, sweeps: Mapping[str, ToySweepResult], base: pd.DataFrame,
            ksvd_summary: pd.DataFrame, sae_small: Sequence[float], *, chance: float, steps: int,
            runtime_s: float) -> dict[str, Any]:
    """The 01_metrics.json dictionary. best_sae_* is ReLU-L1's best (the original work's SAE); topk_mmcs is
    TopK's best; omp_* are K-SVD (OMP coding) with the true and a doubled k on the large toy data."""
    out: dict[str, Any] = {}
    for kind, row in best.iterrows():
        out[f"best_{kind}_mmcs"] = float(row["mmcs"])
        out[f"best_{kind}_l0"] = float(row["l0"])
        out[f"best_{kind}_{row['setting']}"] = float(row["value"])
        out[f"best_{kind}_per_true"] = float(row["per_true"])
        out[f"best_{kind}_lr"] = float(row["lr"])
    if "relu" in best.index:
        out.update(best_sae_mmcs=out["best_relu_mmcs"], best_sae_l1_coef=out["best_relu_l1_coef"],
                   best_sae_per_true=out["best_relu_per_true"])
    if "topk" in best.index:
        out["topk_mmcs"] = out["best_topk_mmcs"]
    ksvd_mmcs, ksvd_epochs = nb01_ksvd.by_k(ksvd_summary)
    out.update({
        "pca_mmcs": _method(base, "PCA"), "ica_mmcs": _method(base, "ICA"),
        "omp_true_k_mmcs": float(base[base["method"].str.contains("true")]["mmcs"].iloc[0]),
        "omp_wrong_k_mmcs": float(base[base["method"].str.contains("2×")]["mmcs"].iloc[0]),
        "online_dl_mmcs": _method(base, "Online DL"),
        "random_mmcs": float(chance),
        "ksvd_mmcs_by_k": ksvd_mmcs, "ksvd_epochs_by_k": ksvd_epochs,
        "sae_mmcs_small_setting": float(np.median(sae_small)),
        "sae_mmcs_small_setting_by_seed": [round(float(v), 4) for v in sae_small],
        "steps": int(steps), "n_saes": int(sum(len(s.table) for s in sweeps.values())),
        "runtime_s": round(float(runtime_s), 1),
    })
    return out
