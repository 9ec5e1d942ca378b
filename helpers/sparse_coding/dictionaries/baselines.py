"""Classical dictionaries to compare SAEs against: PCA, ICA and OMP-based dictionary learning.

Every function takes data X [N, d] (torch or numpy) and returns a dictionary [n, d] float32 torch tensor of unit
rows, ready for `analyses.recovery.mmcs_to_truth`. PCA and ICA come from scikit-learn as they are. Their atoms have no
natural sign, while MMCS uses the signed cosine; each atom is therefore turned so that its coefficients are
positively skewed (sparse non-negative features give a long positive tail), which is what a fair comparison needs.

OMP dictionary learning with a fixed number of nonzeros: scikit-learn has no k-SVD. Its DictionaryLearning and
MiniBatchDictionaryLearning code the data with LARS or coordinate-descent lasso while FITTING (fit_algorithm is
'lars' or 'cd'); transform_algorithm='omp' and transform_n_nonzero_coefs only apply afterwards, in `transform`.
So "mis-setting k" there would not change the learned dictionary at all. `omp_dictionary` therefore alternates
  1. sparse coding with exactly `n_nonzero` atoms per sample by orthogonal matching pursuit (`batched_omp`),
  2. the approximate K-SVD atom update of Rubinstein, Zibulevsky & Elad (2008): each atom becomes the normalised
     residual direction of the samples that use it, and those samples' coefficients are refit,
which is the k-SVD the original work compared against. `batched_omp` is the same greedy algorithm as scikit-learn's
`orthogonal_mp` (the tests check they pick the same atoms and coefficients), run for all samples at once in torch,
where scikit-learn loops over samples one by one.
"""

from __future__ import annotations

import numbers
import warnings

import numpy as np
import torch


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


def _unit_oriented(atoms: np.ndarray, coefs: np.ndarray) -> torch.Tensor:
    """Unit rows, each flipped so that its coefficients over the data have positive skewness."""
    centred = coefs - coefs.mean(axis=0)
    sign = np.sign((centred ** 3).mean(axis=0))
    sign[sign == 0] = 1
    atoms = atoms * sign[:, None]
    atoms = atoms / np.linalg.norm(atoms, axis=1, keepdims=True).clip(1e-12)
    return torch.from_numpy(atoms.astype(np.float32))


def pca_dictionary(X, n_components: int | None = None, seed: int = 0) -> torch.Tensor:
    """The top principal directions [n, d] (n ≤ d: PCA cannot be over-complete)."""
    from sklearn.decomposition import PCA

    X = _as_numpy(X)
    n = min(X.shape) if n_components is None else _check_components(n_components, X.shape[1], at_most=min(X.shape))
    pca = PCA(n_components=n, random_state=seed).fit(X)
    return _unit_oriented(pca.components_, pca.transform(X))


def ica_dictionary(X, n_components: int | None = None, seed: int = 0, max_iter: int = 400) -> torch.Tensor:
    """FastICA's mixing directions [n, d] (the columns of `mixing_`, i.e. the directions the sources add along)."""
    from sklearn.decomposition import FastICA
    from sklearn.exceptions import ConvergenceWarning

    X = _as_numpy(X)
    n = min(X.shape) if n_components is None else _check_components(n_components, X.shape[1], at_most=min(X.shape))
    ica = FastICA(n_components=n, whiten="unit-variance", random_state=seed, max_iter=max_iter)
    with warnings.catch_warnings():
        # Non-convergence within max_iter still leaves a usable (if rougher) unmixing; the score shows the quality.
        warnings.simplefilter("ignore", ConvergenceWarning)
        sources = ica.fit_transform(X)
    return _unit_oriented(ica.mixing_.T, sources)


def batched_omp(X: torch.Tensor, D: torch.Tensor, n_nonzero: int) -> torch.Tensor:
    """Orthogonal matching pursuit for every row of X at once: codes [N, n] with exactly `n_nonzero` nonzeros
    per row, X ≈ codes @ D. D's rows must be unit norm.

    Each step adds the atom most correlated (in absolute value) with the current residual, then refits all chosen
    coefficients by least squares, as in scikit-learn's `orthogonal_mp`. The chosen atoms, their Gram matrix and
    right-hand sides are filled in place step by step, so nothing of size [N, k, n] is ever built."""
    N, d = X.shape
    k = int(n_nonzero)
    G = D @ D.T
    XD = X @ D.T
    chosen = torch.zeros(N, k, dtype=torch.long, device=X.device)
    atoms = torch.zeros(N, k, d, dtype=X.dtype, device=X.device)
    gram = torch.zeros(N, k, k, dtype=X.dtype, device=X.device)
    rhs = torch.zeros(N, k, 1, dtype=X.dtype, device=X.device)
    corr = XD.abs()
    # A few ulps on the diagonal keep Cholesky alive if chosen atoms are dependent, without moving the solution.
    ridge = 10 * torch.finfo(X.dtype).eps * torch.eye(k, dtype=X.dtype, device=X.device)
    for s in range(k):
        corr.scatter_(1, chosen[:, :s], -1.0)  # never pick an atom twice
        j = corr.argmax(dim=1)
        chosen[:, s] = j
        atoms[:, s] = D[j]
        gram[:, s, : s + 1] = G[j[:, None], chosen[:, : s + 1]]
        gram[:, : s + 1, s] = gram[:, s, : s + 1]
        rhs[:, s, 0] = XD.gather(1, j[:, None])[:, 0]
        L, _ = torch.linalg.cholesky_ex(gram[:, : s + 1, : s + 1] + ridge[: s + 1, : s + 1])
        coef = torch.cholesky_solve(rhs[:, : s + 1], L)  # [N, s+1, 1]
        residual = X - (coef.transpose(1, 2) @ atoms[:, : s + 1])[:, 0]
        corr = (residual @ D.T).abs_()
    return torch.zeros(N, D.shape[0], dtype=X.dtype, device=X.device).scatter_(1, chosen, coef[:, :, 0])


def _clear_dictionary(D: np.ndarray, codes: np.ndarray, residual: np.ndarray, X: np.ndarray,
                      max_cos: float = 0.99) -> None:
    """K-SVD's dictionary-clearing step (Aharon, Elad & Bruckstein 2006): an atom nobody uses, or a near-copy
    (|cos| > max_cos) of an earlier atom, is wasted; re-seed it with the worst-reconstructed sample, a different
    one each time. Without this, two atoms settling on one feature stay there and leave another feature unfound."""
    gram = np.abs(D @ D.T)
    np.fill_diagonal(gram, 0)
    duplicate = np.triu(gram > max_cos).any(axis=0)  # the later atom of each close pair
    unused = ~(codes != 0).any(axis=0)
    wasted = np.flatnonzero(duplicate | unused)
    if wasted.size == 0:
        return
    worst = np.argsort(-(residual ** 2).sum(axis=1))[: wasted.size]
    D[wasted[: worst.size]] = X[worst] / np.linalg.norm(X[worst], axis=1, keepdims=True).clip(1e-12)


def omp_dictionary(X, n_components: int, n_nonzero: int, n_iter: int = 20, seed: int = 0,
                   verbose: bool = False) -> torch.Tensor:
    """OMP coding (scikit-learn) with exactly `n_nonzero` atoms per sample + approximate K-SVD updates.

    Starts from `n_components` distinct random samples (normalised), the usual k-SVD initialisation; unused and
    duplicate atoms are re-seeded after every iteration (`_clear_dictionary`), as in the original k-SVD."""
    X = _as_numpy(X)
    N, d = X.shape
    n = _check_components(n_components, d)
    if n > N:
        raise ValueError(f"n_components={n} exceeds n_samples={N}: k-SVD initialises atoms from samples; "
                         f"pass more samples")
    if not isinstance(n_nonzero, numbers.Integral) or not 1 <= n_nonzero <= min(n, d):
        raise ValueError(f"n_nonzero must be an integer in [1, min(n_components, d)={min(n, d)}], got {n_nonzero!r}")
    if not isinstance(n_iter, numbers.Integral) or n_iter < 1:
        raise ValueError(f"n_iter must be an integer >= 1, got {n_iter!r}")
    rng = np.random.default_rng(seed)
    norms = np.linalg.norm(X, axis=1)
    candidates = np.flatnonzero(norms > 1e-8)
    if len(candidates) < n:
        raise ValueError(f"X has only {len(candidates)} nonzero samples, fewer than n_components={n}")
    D = X[rng.choice(candidates, n, replace=False)]
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    Xt = torch.from_numpy(X).float()
    for it in range(n_iter):
        codes = batched_omp(Xt, torch.from_numpy(D).float(), int(n_nonzero)).double().numpy()  # [N, n]
        residual = X - codes @ D
        for j in rng.permutation(n):
            users = np.flatnonzero(codes[:, j])
            if users.size == 0:
                continue  # re-seeded below
            g = codes[users, j]
            # Residual of these samples without atom j; then the rank-1 refit of (atom, coefficients).
            E = residual[users] + np.outer(g, D[j])
            atom = E.T @ g
            norm = np.linalg.norm(atom)
            if norm < 1e-12:
                continue
            atom /= norm
            g_new = E @ atom
            D[j] = atom
            codes[users, j] = g_new
            residual[users] = E - np.outer(g_new, atom)
        _clear_dictionary(D, codes, residual, X)
        if verbose:
            fvu = (residual ** 2).sum() / ((X - X.mean(0)) ** 2).sum()
            print(f"[omp k={n_nonzero}] iter {it + 1}/{n_iter}: FVU {fvu:.4f}", flush=True)
    return torch.from_numpy(D.astype(np.float32))
