"""Sets of directions to score against an SAE's latents (Cunningham et al. 2023, arXiv 2309.08600, Section 3 and
Appendix G): the neuron basis and random directions (both through a ReLU, as the paper did), PCA and ICA components
(scikit-learn; each split into its positive and negative half, so that every "direction" has a non-negative
activation like a feature's), and top-K PCA/ICA (per token only the K largest half-activations kept).

Each constructor returns an encoder: activations [rows, d_in] -> non-negative direction activations [rows, n], ready
for `analyses.mining.mine`."""

from __future__ import annotations

import warnings
import weakref
from typing import Callable

import numpy as np
import torch

from ..arguments import checked
from ..checks import check_int, check_tensor

Encoder = Callable[[torch.Tensor], torch.Tensor]


@checked
def neuron_encoder() -> Encoder:
    """x -> ReLU(x): each residual dimension is a direction (d_in of them)."""
    return lambda x: torch.relu(x.float())


@checked
def random_encoder(d_in: int, n: int | None = None, seed: int = 0) -> Encoder:
    """x -> ReLU(x R), R [d_in, n] random unit directions (n defaults to d_in), seeded."""
    check_int(d_in, "d_in", 1)
    n = check_int(n if n is not None else d_in, "n", 1)
    g = torch.Generator().manual_seed(seed)
    R = torch.randn(d_in, n, generator=g)
    R /= R.norm(dim=0, keepdim=True)
    return lambda x: torch.relu(x.float() @ R.to(x.device))


def _halves(mean: torch.Tensor, W: torch.Tensor, top_k: int | None) -> Encoder:
    """x -> [ReLU(z), ReLU(−z)] with z = (x − mean) W, each component's positive then negative half; with top_k,
    per row only the top_k largest of those 2n values are kept."""

    def encode(x: torch.Tensor) -> torch.Tensor:
        z = (x.float() - mean.to(x.device)) @ W.to(x.device)
        h = torch.cat([torch.relu(z), torch.relu(-z)], dim=1)
        if top_k is not None and top_k < h.shape[1]:
            v, i = h.topk(top_k, dim=1)
            h = torch.zeros_like(h).scatter_(1, i, v)
        return h

    return encode


def _sample(x: torch.Tensor) -> np.ndarray:
    check_tensor(x, "x", 2, finite=True, shape_hint="[rows, d_in]")
    if x.shape[0] < x.shape[1] + 1:
        raise ValueError(f"x has {x.shape[0]} rows for width {x.shape[1]}: fit PCA/ICA on more rows than dimensions")
    return x.double().cpu().numpy()


# Fits by input tensor: the plain and the top-K encoder of a method share one fit (an ICA of SmolLM2's 576 dims on
# 20k rows takes minutes on 2 cores). By the tensor's id, dropped when the tensor is (tensors compare elementwise,
# so they cannot be dictionary keys themselves).
_FITS: dict[int, dict] = {}


def _fitted(x: torch.Tensor, key: tuple, fit) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [d_in], components [d_in, n]) of `fit(sample)` for x, computed once per (x, key)."""
    if id(x) not in _FITS:
        _FITS[id(x)] = {}
        weakref.finalize(x, _FITS.pop, id(x), None)
    fits = _FITS[id(x)]
    if key not in fits:
        est = fit(_sample(x))
        fits[key] = (torch.from_numpy(est.mean_).float(), torch.from_numpy(est.components_.T).float())
    return fits[key]


@checked
def pca_encoder(x: torch.Tensor, n_components: int | None = None, top_k: int | None = None, seed: int = 0
                ) -> Encoder:
    """Fit PCA on x [rows, d_in] (scikit-learn); the encoder gives the 2·n_components half-activations of the
    components' scores (see `_halves`). n_components defaults to d_in."""
    from sklearn.decomposition import PCA

    fit = lambda X: PCA(n_components=n_components, random_state=seed).fit(X)  # noqa: E731
    return _halves(*_fitted(x, ("pca", n_components, seed), fit), top_k)


@checked
def ica_encoder(x: torch.Tensor, n_components: int | None = None, top_k: int | None = None, seed: int = 0,
                max_iter: int = 400) -> Encoder:
    """Fit FastICA on x [rows, d_in] (scikit-learn, unit-variance whitening); the encoder gives the half-activations
    of the estimated sources (x − mean) W_unmixing (see `_halves`)."""
    from sklearn.decomposition import FastICA
    from sklearn.exceptions import ConvergenceWarning

    def fit(X):
        ica = FastICA(n_components=n_components, whiten="unit-variance", random_state=seed, max_iter=max_iter)
        with warnings.catch_warnings():
            # Non-convergence within max_iter still leaves a usable (if rougher) unmixing; the score shows it.
            warnings.simplefilter("ignore", ConvergenceWarning)
            return ica.fit(X)

    return _halves(*_fitted(x, ("ica", n_components, seed, max_iter), fit), top_k)
