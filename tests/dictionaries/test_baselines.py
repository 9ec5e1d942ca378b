import numpy as np
import pytest
import torch

from sparse_coding.dictionaries.baselines import batched_omp, ica_dictionary, omp_dictionary, pca_dictionary
from sparse_coding.analyses import expected_random_mmcs, mmcs_to_truth


def _orthogonal(d, seed):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q.T.float()  # rows orthonormal


def test_pca_recovers_planted_orthogonal_basis():
    d = 12
    Q = _orthogonal(d, 0)
    g = torch.Generator().manual_seed(1)
    # sparse non-negative sources with clearly distinct variances, so principal axes are the planted rows
    scales = torch.linspace(3.0, 0.5, d)
    S = torch.rand(4000, d, generator=g) * (torch.rand(4000, d, generator=g) < 0.3) * scales
    X = S @ Q
    D = pca_dictionary(X)
    assert D.shape == (d, d)
    torch.testing.assert_close(D.norm(dim=1), torch.ones(d))
    # signed cosine: orientation by skew must also point each atom the right way
    assert mmcs_to_truth(D, Q).item() > 0.99


def test_ica_recovers_non_gaussian_sources_with_equal_variance():
    # equal variances defeat PCA (any rotation is a principal basis) but not ICA
    d = 8
    Q = _orthogonal(d, 2)
    g = torch.Generator().manual_seed(3)
    S = torch.rand(5000, d, generator=g) * (torch.rand(5000, d, generator=g) < 0.2)
    X = S @ Q
    assert mmcs_to_truth(ica_dictionary(X, seed=0), Q).item() > 0.98
    assert mmcs_to_truth(pca_dictionary(X), Q).item() < 0.95


def test_batched_omp_matches_sklearn():
    from sklearn.linear_model import orthogonal_mp

    g = torch.Generator().manual_seed(0)
    D = torch.randn(40, 16, generator=g, dtype=torch.float64)
    D /= D.norm(dim=1, keepdim=True)
    X = torch.randn(25, 16, generator=g, dtype=torch.float64)
    ours = batched_omp(X, D, 5).numpy()
    ref = orthogonal_mp(D.T.numpy(), X.T.numpy(), n_nonzero_coefs=5).T
    assert ((ours != 0).sum(1) == 5).all()
    np.testing.assert_array_equal(ours != 0, ref != 0)  # same atoms chosen
    np.testing.assert_allclose(ours, ref, atol=1e-9)


def test_omp_dictionary_recovers_planted_sparse_dictionary():
    d, n, k = 20, 30, 2
    g = torch.Generator().manual_seed(0)
    T = torch.randn(n, d, generator=g)
    T /= T.norm(dim=1, keepdim=True)
    N = 1500
    idx = torch.rand(N, n, generator=g).argsort(1)[:, :k]
    codes = torch.zeros(N, n).scatter_(1, idx, 0.5 + torch.rand(N, k, generator=g))
    X = codes @ T
    D = omp_dictionary(X, n, k, n_iter=15, seed=0)
    assert D.shape == (n, d)
    torch.testing.assert_close(D.norm(dim=1), torch.ones(n))
    # k-SVD atoms may come out sign-flipped (codes can be negative), so score |cos|
    best = (T @ D.T).abs().max(1).values
    # k-SVD has local minima: a few atoms may settle as mixtures, the large majority must be found
    assert (best > 0.99).float().mean() > 0.85
    assert best.mean() > 0.97
    assert best.mean() > expected_random_mmcs(d, n) + 0.4


@pytest.mark.parametrize("call, name", [
    (lambda X: pca_dictionary(X, n_components=50), "n_components"),
    (lambda X: ica_dictionary(X, n_components=0), "n_components"),
    (lambda X: omp_dictionary(X, 10, 0), "n_nonzero"),
    (lambda X: omp_dictionary(X, 10, 2, n_iter=0), "n_iter"),
    (lambda X: omp_dictionary(X, 500, 2), "n_components"),
    (lambda X: pca_dictionary(X[0]), "X"),
])
def test_bad_parameters_name_themselves(call, name):
    X = torch.randn(100, 8)
    with pytest.raises(ValueError, match=name):
        call(X)
