"""Sets of directions to score against an SAE's latents (Cunningham et al. 2023, arXiv 2309.08600, Section 3 and
Appendix G): the neuron basis, random directions, PCA and ICA components (scikit-learn), and top-K PCA/ICA.

Every baseline is built on the same terms. Each has linear scores z = (x − mean) W [rows, n], with the mean fitted on
a sample x [rows, d_in] (for the neuron basis and random directions too), and each component is split into its
positive and negative half, so that every "direction" has a non-negative activation like a feature's:

    encoder(x) = [ReLU(z), ReLU(−z)]  [rows, 2n];  column j is component j's positive half, column n + j its negative.

Top-K (PCA, ICA) keeps per row only the K largest of the 2n half-activations, ranked and valued on whitened scores
z / std (std [n]: each component's score standard deviation over the fit sample), so that no component takes the
top-K slots by its variance alone.

Each constructor returns an `Encoder`: a callable activations [rows, d_in] -> [rows, 2n], ready for
`analyses.mining.mine`, that carries what it was built from (`mean`, `W`, `std`, `top_k`) and how the fit went
(`info`)."""

from __future__ import annotations

import warnings
import weakref
from typing import Any, Callable

import numpy as np
import torch

from ..arguments import checked
from ..checks import check_int, check_tensor

# scikit-learn's random_state must fit in 32 bits
_MAX_SEED = 2**32 - 1
# A component whose score std is below this share of the largest is flat on the fit sample: its std is floored
# there, so that whitening cannot blow a rounding error up into a top-K winner.
_FLAT = 1e-6


class Encoder:
    """A baseline's encoder (Cunningham et al. 2023, arXiv 2309.08600): x [rows, d_in] (any float dtype, any
    device) -> non-negative half-activations [rows, 2n], [ReLU(z), ReLU(−z)] with z = (x − mean) W; column j is
    component j's positive half, column n + j its negative half.

    With top_k, z is whitened first (divided by `std`), per row only the top_k largest of the 2n half-activations are
    kept and the rest set to 0: the activations kept are then in unit-variance units (one std of the component over
    the fit sample), not in the units of x.

    Attributes: mean [d_in] and W [d_in, n] (float32, CPU); std [n], each component's score standard deviation over
    the fit sample (floored at 1e-6 of the largest, see info["n_flat"]); top_k (int or None); info, a dict of how it
    was built (see the constructors: `neuron_encoder`, `random_encoder`, `pca_encoder`, `ica_encoder`).

    Raises ValueError (calling it) when x is not a 2-D tensor with d_in columns."""

    def __init__(self, mean: torch.Tensor, W: torch.Tensor, std: torch.Tensor, info: dict[str, Any],
                 top_k: int | None = None):
        self.mean, self.W, self.std, self.top_k = mean, W, std, top_k
        self.info = {**info, "n_directions": 2 * W.shape[1], "top_k": top_k, "whitened": top_k is not None}
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # copies per device, made once

    @property
    def d_in(self) -> int:
        return self.W.shape[0]

    @property
    def n_directions(self) -> int:
        return 2 * self.W.shape[1]

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """z [rows, n] for x [rows, d_in]: (x − mean) W, divided by std when top_k is set (whitened)."""
        if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[1] != self.d_in:
            got = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{self.info['method']} encoder: x must be a tensor [rows, d_in] with d_in = {self.d_in} "
                             f"(the width it was fitted on), got {got}; pass activations of the same layer, "
                             "flattened to 2-D (x.reshape(-1, d_in))")
        if x.device not in self._on:
            W = self.W / self.std if self.top_k is not None else self.W
            self._on[x.device] = (self.mean.to(x.device), W.to(x.device))
        mean, W = self._on[x.device]
        return (x.float() - mean) @ W

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        z = self.scores(x)
        h = torch.cat([torch.relu(z), torch.relu(-z)], dim=1)
        if self.top_k is not None and self.top_k < h.shape[1]:
            v, i = h.topk(self.top_k, dim=1)
            h = torch.zeros_like(h).scatter_(1, i, v)
        return h

    def __repr__(self) -> str:
        return f"Encoder({', '.join(f'{k}={v!r}' for k, v in self.info.items() if k != 'warning')})"


def _std(X: np.ndarray, mean: np.ndarray, W: np.ndarray) -> tuple[torch.Tensor, int]:
    """(each component's score std over the sample X [rows, d_in], floored [n]; how many were floored)."""
    s = ((X - mean) @ W).std(axis=0, ddof=1) if X.shape[0] > 1 else np.ones(W.shape[1])
    floor = max(_FLAT * float(s.max()), np.finfo(np.float32).tiny)
    return torch.from_numpy(np.maximum(s, floor)).float(), int((s < floor).sum())


def _build(X: np.ndarray, mean: np.ndarray, W: np.ndarray, info: dict[str, Any]) -> tuple:
    """(mean [d_in], W [d_in, n], std [n], info) as float32 tensors, info completed with the common keys."""
    std, n_flat = _std(X, mean, W)
    info = {**info, "d_in": X.shape[1], "n_components": W.shape[1], "fit_rows": X.shape[0], "n_flat": n_flat}
    return torch.from_numpy(np.ascontiguousarray(mean)).float(), torch.from_numpy(np.ascontiguousarray(W)).float(), \
        std, info


def _rows(x: torch.Tensor) -> np.ndarray:
    """The fit sample as float64 numpy [rows, d_in] (ValueError unless 2-D, floating and finite)."""
    check_tensor(x, "x", 2, finite=True, shape_hint="[rows, d_in]")
    return x.detach().double().cpu().numpy()


def _sample(x: torch.Tensor) -> np.ndarray:
    """As `_rows`, and with more rows than columns (PCA and ICA need them to estimate d_in directions)."""
    X = _rows(x)
    if X.shape[0] < X.shape[1] + 1:
        raise ValueError(f"x has {X.shape[0]} rows for width {X.shape[1]}: fit PCA/ICA on more rows than dimensions "
                         f"(at least {X.shape[1] + 1}; the notebooks use tens of thousands)")
    return X


def _checked_sizes(x: torch.Tensor, n_components: int | None, top_k: int | None, seed: int) -> int:
    """n_components resolved (d_in by default); ValueError naming the argument when a size does not fit x."""
    d_in = x.shape[1] if isinstance(x, torch.Tensor) and x.ndim == 2 else None
    n = d_in if n_components is None else check_int(n_components, "n_components", 1)
    if d_in is not None and n > d_in:
        raise ValueError(f"n_components must be <= d_in = {d_in} (x's columns), got {n}: lower it, or pass None "
                         "for all of them")
    if top_k is not None and n is not None and check_int(top_k, "top_k", 1) > 2 * n:
        raise ValueError(f"top_k must be <= 2·n_components = {2 * n} (each component has two halves), got {top_k}: "
                         "lower it, or pass None to keep every half-activation")
    check_int(seed, "seed", 0, _MAX_SEED, " (scikit-learn's random_state)")
    return n


@checked
def neuron_encoder(x: torch.Tensor) -> Encoder:
    """The neuron basis, centred and split (W = identity): x [rows, d_in], the sample whose mean is taken; the
    encoder maps [rows, d_in] -> [ReLU(x − mean), ReLU(mean − x)] [rows, 2·d_in].

    info: method "neurons", d_in, n_components (= d_in), n_directions, fit_rows, n_flat, top_k (None), whitened.
    Raises ValueError unless x is a 2-D finite floating-point tensor."""
    X = _rows(x)
    mean = X.mean(axis=0)
    return Encoder(*_build(X, mean, np.eye(X.shape[1]), {"method": "neurons"}))


@checked
def random_encoder(x: torch.Tensor, n: int | None = None, seed: int = 0) -> Encoder:
    """n random directions, centred and split: W [d_in, n] seeded standard-normal columns scaled to unit norm (n
    defaults to d_in; the same seed gives the same W), the mean taken over the sample x [rows, d_in]; the encoder
    maps [rows, d_in] -> [ReLU(z), ReLU(−z)] [rows, 2n], z = (x − mean) W.

    info: method "random", seed, d_in, n_components (= n), n_directions, fit_rows, n_flat, top_k (None), whitened.
    Raises ValueError unless x is a 2-D finite floating-point tensor and n an int >= 1."""
    X = _rows(x)
    n = X.shape[1] if n is None else check_int(n, "n", 1)
    R = torch.randn(X.shape[1], n, generator=torch.Generator().manual_seed(seed))
    R /= R.norm(dim=0, keepdim=True)
    return Encoder(*_build(X, X.mean(axis=0), R.double().numpy(), {"method": "random", "seed": seed}))


# Fits by input tensor: the plain and the top-K encoder of a method share one fit (an ICA of SmolLM2's 576 dims on
# 20k rows takes minutes on 2 cores). By the tensor's id, dropped when the tensor is (tensors compare elementwise,
# so they cannot be dictionary keys themselves).
_FITS: dict[int, dict] = {}


def _fitted(x: torch.Tensor, key: tuple, fit: Callable[[np.ndarray], tuple]) -> tuple:
    """`fit(sample)` -> (mean [d_in], W [d_in, n], std [n], info) for x, computed once per (x, key)."""
    if id(x) not in _FITS:
        _FITS[id(x)] = {}
        weakref.finalize(x, _FITS.pop, id(x), None)
    fits = _FITS[id(x)]
    if key not in fits:
        fits[key] = fit(_sample(x))
    return fits[key]


def _fit_noting_convergence(est: Any, X: np.ndarray) -> list[str]:
    """Fit est on X; return the texts of the ConvergenceWarnings it raised. Every other warning is passed on as it
    was: only non-convergence is taken over, to be recorded in the encoder's info and re-raised with its context."""
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        est.fit(X)
    notes = []
    for w in caught:
        if issubclass(w.category, ConvergenceWarning):
            notes.append(str(w.message))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return notes


@checked
def pca_encoder(x: torch.Tensor, n_components: int | None = None, top_k: int | None = None, seed: int = 0
                ) -> Encoder:
    """PCA (scikit-learn) fitted on x [rows, d_in]: W [d_in, n] its components (n = n_components, d_in by default),
    mean its mean; the encoder maps [rows, d_in] -> [ReLU(z), ReLU(−z)] [rows, 2n], z = (x − mean) W. With top_k,
    z is whitened (divided by std = sqrt(explained_variance_), from the fit sample) and per row only the top_k largest
    half-activations are kept, in unit-variance units (see `Encoder`). The plain and top-K encoders of one x share a
    fit.

    info: method "pca", seed, explained_variance_ratio (the n components' share of the variance, summed), d_in,
    n_components, n_directions, fit_rows, n_flat, top_k, whitened.
    Raises ValueError unless x is a 2-D finite floating-point tensor with more rows than columns, n_components
    <= d_in and top_k <= 2n."""
    from sklearn.decomposition import PCA

    n = _checked_sizes(x, n_components, top_k, seed)

    def fit(X):
        pca = PCA(n_components=n, random_state=seed).fit(X)
        info = {"method": "pca", "seed": seed, "explained_variance_ratio": float(pca.explained_variance_ratio_.sum())}
        return _build(X, pca.mean_, pca.components_.T, info)

    return Encoder(*_fitted(x, ("pca", n, seed), fit), top_k=top_k)


@checked
def ica_encoder(x: torch.Tensor, n_components: int | None = None, top_k: int | None = None, seed: int = 0,
                max_iter: int = 400) -> Encoder:
    """FastICA (scikit-learn, whiten="unit-variance") fitted on x [rows, d_in]: W [d_in, n] its unmixing matrix
    (components_.T; n = n_components, d_in by default), so z = (x − mean) W are the estimated sources, of unit
    variance on the fit sample; the encoder maps [rows, d_in] -> [ReLU(z), ReLU(−z)] [rows, 2n]. With top_k, z is
    divided by the sources' std over the fit sample (about 1, computed as for PCA so both go through the same code)
    and per row only the top_k largest half-activations are kept (see `Encoder`). The plain and top-K encoders of one
    x share a fit.

    Non-convergence within max_iter is not an error (the last unmixing is still a set of directions), but it is not
    hidden either: scikit-learn's ConvergenceWarning is re-raised with this context and recorded in info.

    info: method "ica", seed, n_iter (scikit-learn's n_iter_), max_iter, converged (False when FastICA warned that
    it did not converge, i.e. it ran all max_iter iterations), warning (its text, or None), d_in, n_components,
    n_directions, fit_rows, n_flat, top_k, whitened.
    Raises ValueError unless x is a 2-D finite floating-point tensor with more rows than columns, n_components
    <= d_in, top_k <= 2n and max_iter >= 1."""
    from sklearn.decomposition import FastICA
    from sklearn.exceptions import ConvergenceWarning

    n = _checked_sizes(x, n_components, top_k, seed)
    check_int(max_iter, "max_iter", 1, hint=" (FastICA's iterations)")

    def fit(X):
        ica = FastICA(n_components=n, whiten="unit-variance", random_state=seed, max_iter=max_iter)
        notes = _fit_noting_convergence(ica, X)
        info = {"method": "ica", "seed": seed, "n_iter": int(ica.n_iter_), "max_iter": max_iter,
                "converged": not notes, "warning": " ".join(notes) or None}
        if notes:
            warnings.warn(f"ica_encoder: FastICA on x {X.shape} stopped after max_iter={max_iter} iterations without "
                          f"converging ({' '.join(notes)}); the encoder uses its last unmixing and records "
                          "info['converged'] = False: raise max_iter for a converged fit", ConvergenceWarning,
                          stacklevel=5)
        return _build(X, ica.mean_, ica.components_.T, info)

    return Encoder(*_fitted(x, ("ica", n, seed, max_iter), fit), top_k=top_k)
