"""Known answers for sparse_coding.similarity: self-MCS is 1, a permuted noisy copy is matched back, the sparse
certified matching equals dense Hungarian, chunking changes no number, random directions follow the exact null."""

import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from sparse_coding import analyses as S
from sparse_coding.analyses.similarity import prepare


def unit(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g)
    return X / X.norm(dim=1, keepdim=True)


def dense_reference(A, B):
    """Plain dense Hungarian on float64 cosines: the answer the sparse route must reproduce."""
    C = (prepare(A, B, None, None, torch.float64)[0] @ prepare(A, B, None, None, torch.float64)[1].T).numpy()
    r, c = linear_sum_assignment(C, maximize=True)
    return r, c, C[r, c].sum()


def test_self_mcs_is_one_and_argmax_is_identity():
    A = unit(500, 64, 0) * torch.rand(500, 1) * 3  # norms must not matter
    res = S.mcs(A, A)
    assert torch.allclose(res.a_to_b, torch.ones(500), atol=1e-6)
    assert torch.equal(res.a_argmax, torch.arange(500))
    assert torch.equal(res.b_argmax, torch.arange(500))
    assert res.mmcs == pytest.approx(1.0, abs=1e-6) and res.share_above(0.9) == 1.0
    # the legacy helpers other modules already call
    assert torch.allclose(S.max_cosine(A, A, chunk_size=100), torch.ones(500), atol=1e-6)
    assert S.mmcs(A, A) == pytest.approx(1.0, abs=1e-6)


def test_mcs_both_directions_match_brute_force():
    A, B = unit(300, 32, 1), unit(450, 32, 2)
    C = A @ B.T
    res = S.mcs(A, B)
    assert torch.allclose(res.a_to_b, C.max(1).values) and torch.equal(res.a_argmax, C.max(1).indices)
    assert torch.allclose(res.b_to_a, C.max(0).values) and torch.equal(res.b_argmax, C.max(0).indices)
    assert res.share_above(0.5, "b_to_a") == pytest.approx(float((C.max(0).values >= 0.5).double().mean()))


def test_chunked_and_unchunked_agree_exactly():
    A, B = unit(1100, 128, 3), unit(900, 128, 4)
    full = S.mcs(A, B, chunk_size=10**6)
    for cs in (1, 256, 300, 1024):
        part = S.mcs(A, B, chunk_size=cs)
        for name in ("a_to_b", "a_argmax", "b_to_a", "b_argmax"):
            assert torch.equal(getattr(part, name), getattr(full, name)), (cs, name)
    m1 = S.hungarian_match(A, B, method="sparse", chunk_size=1)
    m2 = S.hungarian_match(A, B, method="sparse", chunk_size=10**6)
    assert torch.equal(m1.cols, m2.cols) and torch.equal(m1.cos, m2.cos)


@pytest.mark.parametrize("method", ["dense", "sparse"])
def test_hungarian_recovers_a_noisy_permutation(method):
    n, d = 800, 64
    A = unit(n, d, 5)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(6))
    B = A[perm] + 0.05 * torch.randn(n, d, generator=torch.Generator().manual_seed(7))
    m = S.hungarian_match(A, B, method=method)
    # A[i] sits at B[j] with perm[j] = i
    inv = torch.argsort(perm)
    assert torch.equal(m.rows, torch.arange(n)) and torch.equal(m.cols, inv)
    assert m.cos.min() > 0.7 and m.share_above(0.7) == 1.0
    assert m.info["certified"]


@pytest.mark.parametrize("shape", [(600, 600), (300, 500), (500, 300)])
def test_sparse_matching_equals_dense_hungarian_on_random_dictionaries(shape):
    # Random vs random is the hardest case for candidate pruning; candidates=3 forces the duality check to add pairs.
    A, B = unit(shape[0], 48, 8), unit(shape[1], 48, 9)
    sp = S.hungarian_match(A, B, method="sparse", candidates=3, dtype=torch.float64)
    dn = S.hungarian_match(A, B, method="dense", dtype=torch.float64)
    r, c, total = dense_reference(A, B)
    assert len(sp.rows) == min(shape)
    assert sp.total == pytest.approx(total, abs=1e-9) and dn.total == pytest.approx(total, abs=1e-9)
    assert torch.equal(sp.rows, dn.rows) and torch.equal(sp.cols, dn.cols)
    assert sp.info["certified"] and sp.info["rounds"] >= 2 and sum(sp.info["added"]) > 0


def test_hub_dictionary_needs_column_candidates_and_still_matches_dense():
    # Every A-feature's top lists point at the same few B-features, so the row lists admit no full matching.
    d = 32
    B = unit(200, d, 10)
    A = B[:5].repeat(40, 1) + 0.01 * torch.randn(200, d, generator=torch.Generator().manual_seed(11))
    sp = S.hungarian_match(A, B, method="sparse", candidates=2, dtype=torch.float64)
    _, _, total = dense_reference(A, B)
    assert sp.info["column_candidates"] and sp.total == pytest.approx(total, abs=1e-9)


def test_dead_features_are_excluded_and_flagged():
    A, B = unit(50, 16, 12), unit(60, 16, 13)
    A[3] = 0.0
    alive_b = torch.ones(60, dtype=torch.bool)
    alive_b[[0, 1]] = False
    res = S.mcs(A, B, alive_b=alive_b)
    assert res.n_dead_a == 1 and res.n_dead_b == 2
    assert math.isnan(res.a_to_b[3]) and res.a_argmax[3] == -1 and math.isnan(res.b_to_a[0])
    assert not torch.isin(res.a_argmax, torch.tensor([0, 1])).any()
    live = torch.cat([torch.arange(3), torch.arange(4, 50)])
    assert res.mmcs == pytest.approx(float((A[live] @ B[2:].T).max(1).values.double().mean()), abs=1e-6)
    m = S.hungarian_match(A, B, alive_b=alive_b, method="sparse")
    assert len(m.rows) == 49 and 3 not in m.rows.tolist() and not set(m.cols.tolist()) & {0, 1}


@pytest.mark.parametrize("call,msg", [
    (lambda: S.mcs(torch.randn(5, 8), torch.randn(5, 9)), "different widths"),
    (lambda: S.mcs(torch.randn(0, 8), torch.randn(5, 8)), "empty"),
    (lambda: S.mcs(torch.zeros(4, 8), torch.randn(5, 8)), "dead"),
    (lambda: S.mcs(torch.randn(4, 8), torch.randn(5, 8), alive_b=torch.zeros(5, dtype=torch.bool)), "dead"),
    (lambda: S.mcs(torch.randn(4, 8), torch.randn(5, 8), alive_a=torch.ones(3, dtype=torch.bool)), "alive mask"),
    (lambda: S.mcs(torch.randn(8), torch.randn(5, 8)), r"\[n_features, d\]"),
    (lambda: S.hungarian_match(torch.randn(5, 8), torch.randn(5, 8), method="fast"), "method"),
    (lambda: S.null_mcs_mean(0, 8), "n_ref"),
])
def test_bad_inputs_raise_clear_errors(call, msg):
    with pytest.raises(ValueError, match=msg):
        call()


@pytest.mark.parametrize("absolute", [False, True])
def test_random_directions_follow_the_analytic_null(absolute):
    n, n_ref, d = 2000, 3000, 64
    null = S.random_null(n, d, n_ref=n_ref, seed=14, absolute=absolute)
    # mean of 2000 samples: standard error ~ sd/sqrt(2000) ~ 0.0005
    assert float(null.samples.double().mean()) == pytest.approx(null.mean, abs=0.003)
    assert null.q01 < null.mean < null.q99
    frac_below = float((null.samples <= S.null_mcs_quantile(0.5, n_ref, d, absolute)).double().mean())
    assert frac_below == pytest.approx(0.5, abs=0.04)
    assert float(S.null_mcs_cdf(null.q99, n_ref, d, absolute)) == pytest.approx(0.99, abs=1e-6)


def test_null_has_the_known_small_cases():
    # d=3: cos of uniform directions on the sphere is Uniform[-1, 1]; max of one is its mean 0, |cos| mean 1/2;
    # max of n uniforms on [-1, 1] has mean (n - 1) / (n + 1).
    assert S.null_mcs_mean(1, 3) == pytest.approx(0.0, abs=1e-7)
    assert S.null_mcs_mean(1, 3, absolute=True) == pytest.approx(0.5, abs=1e-7)
    assert S.null_mcs_mean(9, 3) == pytest.approx(0.8, abs=1e-7)
    # wider spaces and fewer references give smaller chance similarities
    assert S.null_mcs_mean(16384, 512) < S.null_mcs_mean(16384, 128) < 1
    assert S.null_mcs_mean(1000, 512) < S.null_mcs_mean(16384, 512)
