"""Classical dictionaries to compare SAEs against: PCA, ICA, K-SVD and online dictionary learning, each from a
maintained library.

Every function takes data X [N, d] (torch or numpy) and returns a dictionary [n, d] float32 torch tensor of unit
rows, ready for `analyses.recovery.mmcs_to_truth`. Their atoms have no natural sign while MMCS uses the signed
cosine, so each atom is turned so that its coefficients over the data are positively skewed (sparse non-negative
features give a long positive tail), which is what a fair comparison needs.

- PCA and FastICA: scikit-learn, as they are.
- K-SVD (Aharon, Elad & Bruckstein 2006), the method the original work compared against: `dictlearn`'s exact K-SVD
  (its authors wrote the book on these algorithms): orthogonal matching pursuit with exactly `n_nonzero` atoms per
  sample, then for every atom a rank-1 SVD update of the residual of the samples that use it; started from
  normalised samples, unused atoms replaced by the worst-reconstructed sample. scikit-learn has no K-SVD: its
  dictionary learners code with LARS or coordinate descent while fitting, and `transform_n_nonzero_coefs` only
  applies afterwards, so "mis-setting k" there would not change the learned dictionary at all.
- Online dictionary learning (Mairal et al. 2009) with lasso coding: scikit-learn's MiniBatchDictionaryLearning,
  coding by coordinate descent (the same lasso as LARS, and much faster on the toy data), run for its full budget
  (its default early stopping understates it badly).
"""

from __future__ import annotations

import numbers
import warnings
from typing import Callable

import numpy as np
import torch

from ..arguments import checked
from ..checks import check_int

# scikit-learn (and numpy's legacy RandomState under it) takes seeds in [0, 2**32)
SKLEARN_SEEDS = 2**32


def _as_numpy(X, name: str = "X") -> np.ndarray:
    if isinstance(X, torch.Tensor):
        X = X.detach().cpu().numpy()
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] < 2:
        raise ValueError(f"{name} must be [n_samples >= 2, d], got shape {X.shape}")
    if not np.isfinite(X).all():
        raise ValueError(f"{name} contains NaN or inf")
    return X


def _check_components(n_components, d: int, name: str = "n_components", at_most: int | None = None) -> int:
    if not isinstance(n_components, numbers.Integral) or n_components < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {n_components!r}")
    if at_most is not None and n_components > at_most:
        raise ValueError(f"{name}={n_components} exceeds {at_most}: this method finds at most min(n_samples, d) "
                         f"components; lower {name}")
    return int(n_components)


def _sklearn_seed(seed: int) -> int:
    return check_int(seed, "seed", 0, SKLEARN_SEEDS - 1, " (scikit-learn's random_state range)")


def _input_eps(X) -> float:
    """The rounding unit of X as given (before the float64 copy): what decides which directions are noise."""
    if isinstance(X, torch.Tensor) and X.is_floating_point():
        return float(torch.finfo(X.dtype).eps)
    dtype = np.asarray(X).dtype
    return float(np.finfo(dtype).eps) if np.issubdtype(dtype, np.floating) else float(np.finfo(np.float64).eps)


def _centred_rank(X: np.ndarray, eps: float) -> int:
    """The number of directions the centred X spans above the rounding noise of its entries (the noise matrix's
    spectral norm is at most its Frobenius norm, about eps·‖X‖_F)."""
    s = np.linalg.svd(X - X.mean(axis=0), compute_uv=False)
    return int((s > 10 * eps * np.linalg.norm(X)).sum())


def _unit_oriented(atoms: np.ndarray, coefs: np.ndarray) -> torch.Tensor:
    """Unit rows, each flipped so that its coefficients over the data have positive skewness."""
    centred = coefs - coefs.mean(axis=0)
    sign = np.sign((centred ** 3).mean(axis=0))
    sign[sign == 0] = 1
    atoms = atoms * sign[:, None]
    atoms = atoms / np.linalg.norm(atoms, axis=1, keepdims=True).clip(1e-12)
    return torch.from_numpy(atoms.astype(np.float32))


@checked
def pca_dictionary(X: torch.Tensor | np.ndarray, n_components: int | None = None, seed: int = 0) -> torch.Tensor:
    """The top principal directions [n, d] (n ≤ d: PCA cannot be over-complete). Raises ValueError for X not
    [n_samples >= 2, d] and finite, n_components above min(n_samples, d), or seed outside [0, 2**32)."""
    from sklearn.decomposition import PCA

    seed = _sklearn_seed(seed)
    X = _as_numpy(X)
    n = min(X.shape) if n_components is None else _check_components(n_components, X.shape[1], at_most=min(X.shape))
    pca = PCA(n_components=n, random_state=seed).fit(X)
    return _unit_oriented(pca.components_, pca.transform(X))


@checked
def ica_dictionary(X: torch.Tensor | np.ndarray, n_components: int | None = None, seed: int = 0, max_iter: int = 400) -> torch.Tensor:
    """FastICA's mixing directions [n, d] (the columns of `mixing_`, i.e. the directions the sources add along).

    n_components: default the rank of the centred X (at most min(n_samples - 1, d)). Whitening divides by the
    singular values of the centred X, so a direction it does not span (a constant or dead column, fewer samples than
    d, features in a subspace) cannot be unmixed: n_components above that rank raises ValueError, as do X with no
    variance and seed outside [0, 2**32)."""
    from sklearn.decomposition import FastICA
    from sklearn.exceptions import ConvergenceWarning

    seed = _sklearn_seed(seed)
    eps = _input_eps(X)
    X = _as_numpy(X)
    rank = _centred_rank(X, eps)
    if rank == 0:
        raise ValueError(f"X has no variance (every row is the same, shape {X.shape}): ICA needs data that varies")
    n = rank if n_components is None else _check_components(n_components, X.shape[1], at_most=min(X.shape))
    if n > rank:
        raise ValueError(f"n_components={n} exceeds the rank {rank} of the centred X (shape {X.shape}): ICA unmixes "
                         f"only the directions X varies along (constant columns, fewer samples than d or a subspace "
                         f"add none); lower n_components to <= {rank}, or leave it None")
    ica = FastICA(n_components=n, whiten="unit-variance", random_state=seed, max_iter=max_iter)
    with warnings.catch_warnings():
        # Non-convergence within max_iter still leaves a usable (if rougher) unmixing; the score shows the quality.
        warnings.simplefilter("ignore", ConvergenceWarning)
        # Whitening divides by every singular value, the zeros past the rank too, before keeping the first n.
        warnings.filterwarnings("ignore", "(invalid value|divide by zero) encountered in divide", RuntimeWarning)
        sources = ica.fit_transform(X)
    return _unit_oriented(ica.mixing_.T, sources)


@checked
def ksvd_dictionary(X: torch.Tensor | np.ndarray, n_components: int, n_nonzero: int, n_iter: int = 20, seed: int = 0,
                    on_iteration: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Exact K-SVD (`dictlearn`, see the module docstring): `n_iter` rounds of OMP coding with exactly `n_nonzero`
    atoms per sample and a rank-1 SVD update of each atom. on_iteration(i, D [n, d]) sees the (unoriented)
    dictionary after each round, e.g. to follow its recovery of known features."""
    from dictlearn import DictionaryLearning

    X = _as_numpy(X)
    N, d = X.shape
    n = _check_components(n_components, d)
    if n > N:
        raise ValueError(f"n_components={n} exceeds n_samples={N}: K-SVD starts from samples; pass more samples")
    if not isinstance(n_nonzero, numbers.Integral) or not 1 <= n_nonzero <= min(n, d):
        raise ValueError(f"n_nonzero must be an integer in [1, min(n_components, d)={min(n, d)}], got {n_nonzero!r}")
    if not isinstance(n_iter, numbers.Integral) or n_iter < 1:
        raise ValueError(f"n_iter must be an integer >= 1, got {n_iter!r}")
    rng = np.random.default_rng(seed)
    candidates = np.flatnonzero(np.linalg.norm(X, axis=1) > 1e-8)
    if len(candidates) < n:
        raise ValueError(f"X has only {len(candidates)} nonzero samples, fewer than n_components={n}")
    D = X[rng.choice(candidates, n, replace=False)]
    D = D / np.linalg.norm(D, axis=1, keepdims=True)
    for it in range(n_iter):
        # One round per fit: each fit starts by coding with the dictionary given, so the rounds chain exactly.
        dl = DictionaryLearning(n_components=n, fit_algorithm="ksvd", n_nonzero_coefs=int(n_nonzero),
                                transform_algorithm="omp", max_iter=1, tol=0.0, dict_init=D,
                                replace_unused_atoms="worst", random_state=(seed + it) % SKLEARN_SEEDS).fit(X)
        D = dl.components_
        if on_iteration is not None:
            on_iteration(it + 1, torch.from_numpy(D.astype(np.float32)))
    return _unit_oriented(D, dl.transform(X))


@checked
def online_dictionary(X: torch.Tensor | np.ndarray, n_components: int, alpha: float, n_epochs: int = 5, batch_size: int = 256,
                      seed: int = 0) -> torch.Tensor:
    """Online dictionary learning with lasso coding (scikit-learn's MiniBatchDictionaryLearning, Mairal et al.
    2009, coordinate descent) for `n_epochs` passes over X, no early stopping; alpha is the lasso penalty in X's
    units. Raises ValueError for n_epochs < 1 (scikit-learn would return its random initial dictionary for 0) or
    seed outside [0, 2**32)."""
    from sklearn.decomposition import MiniBatchDictionaryLearning

    check_int(n_epochs, "n_epochs", 1, hint=" (passes over X)")
    seed = _sklearn_seed(seed)
    X = _as_numpy(X)
    n = _check_components(n_components, X.shape[1])
    if not (isinstance(alpha, numbers.Real) and alpha > 0):
        raise ValueError(f"alpha must be a number > 0 (the lasso penalty), got {alpha!r}")
    dl = MiniBatchDictionaryLearning(n_components=n, alpha=float(alpha), fit_algorithm="cd",
                                     transform_algorithm="lasso_cd", transform_alpha=float(alpha),
                                     batch_size=batch_size, max_iter=n_epochs, tol=0.0, max_no_improvement=None,
                                     random_state=seed)
    with warnings.catch_warnings():
        # Coordinate descent stopping short of its tolerance on a few samples changes nothing the score would show.
        warnings.simplefilter("ignore")
        dl.fit(X)
        codes = dl.transform(X)
    return _unit_oriented(dl.components_, codes)
