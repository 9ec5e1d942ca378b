"""Small statistics the analyses share: bimodality of a distribution and medians in equal-count bins."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch

from ..arguments import checked


def _values(x) -> np.ndarray:
    """Any sample as float64 numpy, flattened. A tensor goes through torch first: numpy cannot read bfloat16, a
    tensor that requires grad or one on a GPU (each would fail inside np.asarray with torch's message)."""
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy().ravel()
    return np.asarray(x, dtype=np.float64).ravel()


BIMODAL_SARLE = 5 / 9
"""Sarle's coefficient of a uniform distribution: above it suggests two modes."""


@checked
def sarle_bimodality(values: np.ndarray | torch.Tensor | Sequence[float]) -> float:
    """Sarle's bimodality coefficient (skew² + 1) / (excess kurtosis + 3 (n−1)² / ((n−2)(n−3))), with the
    bias-corrected sample skewness and kurtosis: 1/3 for a normal, 5/9 for a uniform, 1 for two equal spikes.
    Above 5/9 suggests two modes. NaN for fewer than 4 finite values or a constant sample."""
    from scipy.stats import kurtosis, skew

    v = _values(values)
    v = v[np.isfinite(v)]
    n = v.size
    if n < 4 or np.ptp(v) == 0:
        return float("nan")
    g, k = skew(v, bias=False), kurtosis(v, bias=False)
    return float((g * g + 1) / (k + 3 * (n - 1) ** 2 / ((n - 2) * (n - 3))))


@checked
def binned_median(x: np.ndarray, y: np.ndarray, bins: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Median of y in `bins` equal-count bins of x: (bin centres as medians of x [bins], medians of y [bins]).
    Pairs where x or y is NaN or inf (not measured) are left out, as `sarle_bimodality` leaves them out: otherwise
    argsort puts them into the last bin and its medians come out NaN. Raises ValueError unless x and y are 1-d of
    one length."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-d arrays of the same length, got {x.shape} and {y.shape}")
    finite = np.isfinite(x) & np.isfinite(y)
    x, y = x[finite], y[finite]
    if x.size == 0:
        return np.empty(0), np.empty(0)
    order = np.argsort(x, kind="stable")
    parts = [p for p in np.array_split(order, min(int(bins), x.size)) if p.size]
    return np.array([np.median(x[p]) for p in parts]), np.array([np.median(y[p]) for p in parts])


@checked
def spearman(a: np.ndarray | torch.Tensor | Sequence[float], b: np.ndarray | torch.Tensor | Sequence[float]) -> float:
    """Spearman's rank correlation of two equal-length samples (ties get average ranks; pandas' implementation),
    NaN when either is constant or shorter than 2. Raises ValueError for unequal lengths."""
    a, b = _values(a), _values(b)
    if len(a) != len(b):
        raise ValueError(f"a and b must have the same length, got {len(a)} and {len(b)}")
    return float(pd.Series(a).corr(pd.Series(b), method="spearman"))
