import numpy as np
import pytest
import torch

from sparse_coding.activations import standard_basis_data
from sparse_coding.dictionaries.baselines import ica_dictionary, ksvd_dictionary, online_dictionary, pca_dictionary
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


def test_ksvd_recovers_standard_basis_at_true_k():
    # The original team's small setting: 10 standard-basis features in 10 dimensions, exactly 3 active per sample.
    x, truth = standard_basis_data(1024, d=10, active=3, seed=0)
    rounds = []
    D = ksvd_dictionary(x, 10, 3, n_iter=40, seed=0, on_iteration=lambda r, D: rounds.append(r))
    assert rounds == list(range(1, 41))
    torch.testing.assert_close(D.norm(dim=1), torch.ones(10))
    # atoms are oriented by the skew of their codes, so the signed MMCS (what SAEs are scored with) applies
    assert mmcs_to_truth(D, truth).item() >= 0.99


def test_ksvd_codes_exactly_k_atoms_like_sklearn_omp():
    # K-SVD's coder must be OMP with exactly k atoms: dictlearn's transform agrees with sklearn's orthogonal_mp.
    from dictlearn import DictionaryLearning
    from sklearn.linear_model import orthogonal_mp

    g = torch.Generator().manual_seed(0)
    D = torch.randn(40, 16, generator=g, dtype=torch.float64)
    D /= D.norm(dim=1, keepdim=True)
    X = torch.randn(25, 16, generator=g, dtype=torch.float64).numpy()
    dl = DictionaryLearning(n_components=40, fit_algorithm="ksvd", n_nonzero_coefs=5, transform_algorithm="omp",
                            max_iter=1, dict_init=D.numpy()).fit(X)
    ours = dl.transform(X)
    ref = orthogonal_mp(dl.components_.T, X.T, n_nonzero_coefs=5).T
    assert ((ours != 0).sum(1) == 5).all()
    np.testing.assert_array_equal(ours != 0, ref != 0)
    np.testing.assert_allclose(ours, ref, atol=1e-8)


def test_ksvd_over_told_k_does_not_recover_the_basis():
    # The failure the original team reported: told twice the true number of nonzeros, K-SVD fits the 3-sparse data
    # with a dictionary that is not the basis.
    x, truth = standard_basis_data(1024, d=10, active=3, seed=0)
    D = ksvd_dictionary(x, 10, 6, n_iter=30, seed=0)
    assert mmcs_to_truth(D, truth).item() < 0.95


def test_online_dictionary_recovers_planted_sparse_dictionary():
    d, n, k = 20, 30, 2
    g = torch.Generator().manual_seed(0)
    T = torch.randn(n, d, generator=g)
    T /= T.norm(dim=1, keepdim=True)
    N = 2000
    idx = torch.rand(N, n, generator=g).argsort(1)[:, :k]
    codes = torch.zeros(N, n).scatter_(1, idx, 0.5 + torch.rand(N, k, generator=g))
    X = codes @ T
    D = online_dictionary(X, n, alpha=0.2, n_epochs=10, seed=0)
    assert D.shape == (n, d)
    torch.testing.assert_close(D.norm(dim=1), torch.ones(n))
    assert mmcs_to_truth(D, T).item() > 0.95
    assert mmcs_to_truth(D, T).item() > expected_random_mmcs(d, n) + 0.4


@pytest.mark.parametrize("call, name", [
    (lambda X: pca_dictionary(X, n_components=50), "n_components"),
    (lambda X: ica_dictionary(X, n_components=0), "n_components"),
    (lambda X: ksvd_dictionary(X, 10, 0), "n_nonzero"),
    (lambda X: ksvd_dictionary(X, 4, 5), "n_nonzero"),
    (lambda X: ksvd_dictionary(X, 10, 2, n_iter=0), "n_iter"),
    (lambda X: ksvd_dictionary(X, 500, 2), "n_components"),
    (lambda X: online_dictionary(X, 10, alpha=0), "alpha"),
    (lambda X: online_dictionary(X, 0, alpha=0.1), "n_components"),
    (lambda X: pca_dictionary(X[0]), "X"),
])
def test_bad_parameters_name_themselves(call, name):
    X = torch.randn(100, 8)
    with pytest.raises(ValueError, match=name):
        call(X)
