"""The random-direction null for MCS: what a feature scores against random directions by chance, exactly.

For a fixed unit vector and a uniform random one in R^d, (1 + cos) / 2 ~ Beta((d−1)/2, (d−1)/2); the max over n_ref
independent ones has CDF F(t)^n_ref."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..arguments import checked
from .similarity import mcs


def _cos_tail(t, d):
    """P(cos > t) for the cosine between a fixed unit vector and a uniform random one in R^d: (1 + cos) / 2 is
    Beta((d-1)/2, (d-1)/2)."""
    from scipy.stats import beta

    a = (d - 1) / 2.0
    return beta.sf((np.asarray(t, dtype=np.float64) + 1.0) / 2.0, a, a)


@checked
def null_mcs_cdf(t: float | np.ndarray, n_ref: int, d: int, absolute: bool = False):
    """P(MCS <= t) for one random direction against n_ref independent random directions in R^d (exact).

    absolute=False: MCS = max cos (what `mcs` computes); absolute=True: max |cos|."""
    _check_null_args(n_ref, d)
    t = np.asarray(t, dtype=np.float64)
    tail = 2.0 * _cos_tail(np.abs(t), d) if absolute else _cos_tail(t, d)
    # F^n = exp(n log(1 - tail)) keeps precision when tail is tiny and n is large
    with np.errstate(divide="ignore"):  # tail == 1 (t at the bottom of the range) gives log 0 = -inf -> CDF 0
        out = np.exp(n_ref * np.log1p(-np.clip(tail, 0.0, 1.0)))
    return np.where(t < 0, 0.0, out) if absolute else out


@checked
def null_mcs_mean(n_ref: int, d: int, absolute: bool = False) -> float:
    """Expected MCS of a random direction against n_ref random directions in R^d (numerical integral of 1 - CDF)."""
    from scipy.integrate import quad

    _check_null_args(n_ref, d)
    upper = lambda t: 1.0 - float(null_mcs_cdf(t, n_ref, d, absolute))  # noqa: E731
    pts = [null_mcs_quantile(q, n_ref, d, absolute) for q in (0.01, 0.5, 0.99)]
    pos = quad(upper, 0.0, 1.0, points=pts, limit=200)[0]
    if absolute:
        return pos
    neg = quad(lambda t: float(null_mcs_cdf(t, n_ref, d, False)), -1.0, 0.0, limit=200)[0]
    return pos - neg


@checked
def null_mcs_quantile(q: float | np.ndarray, n_ref: int, d: int, absolute: bool = False):
    """Inverse of `null_mcs_cdf` (e.g. q=0.99: an MCS above this is unlikely to be chance)."""
    from scipy.stats import beta

    _check_null_args(n_ref, d)
    q = np.asarray(q, dtype=np.float64)
    if not np.all((q > 0) & (q < 1)):  # written so that NaN fails too (it would come back as a NaN quantile)
        raise ValueError(f"quantiles q must lie strictly between 0 and 1 (e.g. 0.99), got {q}")
    tail = -np.expm1(np.log(q) / n_ref)  # 1 - q^(1/n), accurate for large n
    if absolute:
        tail = tail / 2.0
    a = (d - 1) / 2.0
    t = 2.0 * beta.isf(tail, a, a) - 1.0
    return float(t) if t.ndim == 0 else t


def _check_null_args(n_ref, d):
    if int(n_ref) < 1:
        raise ValueError(f"n_ref (number of reference directions) must be >= 1, got {n_ref}")
    if int(d) < 2:
        raise ValueError(f"width d must be >= 2 for a cosine null, got {d}")


@dataclass
class NullBaseline:
    samples: torch.Tensor       # [n_features] sampled MCS of random directions against n_ref random directions
    mean: float                 # analytic expectation
    q01: float                  # analytic 1 % and 99 % quantiles
    q99: float
    n_ref: int
    d: int
    absolute: bool


@checked
def random_null(n_features: int, d: int, n_ref: int | None = None, seed: int = 0, absolute: bool = False,
                chunk_size: int | None = None, device: str | torch.device = "cpu") -> NullBaseline:
    """The MCS you get by chance: n_features random unit directions against n_ref (default n_features) others of
    the same width, sampled, next to the exact distribution. Plot it behind an MCS histogram as the null."""
    n_ref = n_features if n_ref is None else n_ref
    _check_null_args(n_ref, d)
    if int(n_features) < 1:
        raise ValueError(f"n_features must be >= 1, got {n_features}")
    g = torch.Generator(device="cpu").manual_seed(seed)
    X = torch.randn(n_features, d, generator=g).to(device)
    Y = torch.randn(n_ref, d, generator=g).to(device)
    if absolute:
        Y = torch.cat([Y, -Y])  # max over ±y is max |cos|
    samples = mcs(X, Y, chunk_size=chunk_size).a_to_b
    return NullBaseline(samples, null_mcs_mean(n_ref, d, absolute), null_mcs_quantile(0.01, n_ref, d, absolute),
                        null_mcs_quantile(0.99, n_ref, d, absolute), n_ref, d, absolute)
