"""Paired bootstrap intervals of the difference between two methods' mean interpretability scores.

Two methods score different directions, so directions cannot be paired; what they share is the test text. Each
bootstrap draw reweights the test documents (Poisson(1) weights, the same draw for both methods: the pairing) and,
within each method, resamples its directions; each direction's score is recomputed from its per-fragment sums
(`interpretability.fragment_sums`) under the document weights. The interval of the difference of the two resampled
means says whether the ordering survives both the choice of directions and the choice of test text; an ordering is
stated only where it excludes 0."""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Sequence

import numpy as np

from ..arguments import checked
from .interpretability import correlation_from_sums


def _resampled_means(sums: Sequence[np.ndarray], docs: Sequence[Sequence[int]], weights: np.ndarray,
                     doc_index: dict[int, int], rng: np.random.Generator) -> np.ndarray:
    """[n_boot] mean over resampled directions of each direction's correlation under the document weights
    [n_boot, n_docs]."""
    D = len(sums)
    rows = np.concatenate([np.asarray(s, dtype=np.float64) for s in sums])
    owner = np.repeat(np.arange(D), [len(s) for s in sums])
    col = np.asarray([doc_index[int(d)] for ds in docs for d in ds], dtype=np.int64)
    onehot = np.zeros((len(rows), D))
    onehot[np.arange(len(rows)), owner] = 1.0
    W = weights[:, col]  # [n_boot, rows]
    S = np.stack([(W * rows[:, j]) @ onehot for j in range(6)], -1)  # [n_boot, D, 6]
    r = correlation_from_sums(S)
    idx = rng.integers(0, D, size=(len(weights), D))
    picked = np.take_along_axis(r, idx, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a draw can leave a direction no token
        return np.nanmean(picked, 1)


@checked
def paired_difference(a_sums: Sequence[np.ndarray], a_docs: Sequence[Sequence[int]],
                      b_sums: Sequence[np.ndarray], b_docs: Sequence[Sequence[int]], *, n_boot: int = 2000,
                      level: float = 0.95, seed: int = 0) -> dict[str, float | bool | int]:
    """Mean score of method a minus method b, with its paired percentile bootstrap interval (see the module
    docstring). *_sums: per direction [n_fragments, 6] fragment sums; *_docs: per direction the document of each of
    those fragments. Returns {"mean", "low", "high", "separated" (the interval excludes 0), "n_a", "n_b"}; NaN and
    not separated when either method has no direction. Raises ValueError when sums and docs disagree in length."""
    if isinstance(level, bool) or not isinstance(level, numbers.Real) or not 0 < level < 1:
        raise ValueError(f"level must be a share in (0, 1), e.g. 0.95 for a 95% interval, got {level!r}")
    for s, d, name in ((a_sums, a_docs, "a"), (b_sums, b_docs, "b")):
        if len(s) != len(d) or any(len(x) != len(y) for x, y in zip(s, d)):
            raise ValueError(f"{name}_sums and {name}_docs must list the same directions and fragments")
    if not len(a_sums) or not len(b_sums):
        return {"mean": math.nan, "low": math.nan, "high": math.nan, "separated": False,
                "n_a": len(a_sums), "n_b": len(b_sums)}
    point = [float(np.nanmean(correlation_from_sums(np.stack([np.asarray(s).sum(0) for s in x]))))
             for x in (a_sums, b_sums)]
    all_docs = sorted({int(d) for ds in list(a_docs) + list(b_docs) for d in ds})
    doc_index = {d: i for i, d in enumerate(all_docs)}
    rng = np.random.default_rng(seed)
    weights = rng.poisson(1.0, size=(n_boot, len(all_docs))).astype(np.float64)
    diff = (_resampled_means(a_sums, a_docs, weights, doc_index, np.random.default_rng([seed, 1]))
            - _resampled_means(b_sums, b_docs, weights, doc_index, np.random.default_rng([seed, 2])))
    lo, hi = np.nanquantile(diff, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"mean": point[0] - point[1], "low": float(lo), "high": float(hi),
            "separated": bool(lo > 0 or hi < 0), "n_a": len(a_sums), "n_b": len(b_sums)}
