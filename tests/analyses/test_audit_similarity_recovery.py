"""Audit fixes in `analyses.similarity` (rows normalised in float64 after scaling by their largest entry, so huge and
tiny rows are directions like any other) and `analyses.recovery` (dead rows left out, as `similarity.mcs` does)."""

import math

import pytest
import torch

from sparse_coding.analyses import (hungarian_match, mcs, mmcs, mmcs_from_learned, mmcs_to_truth, mmcs_vs_larger,
                                    recovery_report, share_recovered)

B = torch.tensor([[3.0, 4.0], [0.0, 1.0]])


def test_huge_rows_do_not_overflow():
    A = torch.tensor([[3e20, 4e20], [0.0, 1.0]])  # (3e20)² overflows float32
    res = mcs(A, B)
    assert res.mmcs == pytest.approx(1.0, abs=1e-6)
    assert res.alive_a.tolist() == [True, True]
    assert mmcs(A, B) == pytest.approx(1.0, abs=1e-6)
    # even float64 overflows at 1e200 squared: the scaling by the largest entry handles it
    A64 = torch.tensor([[3e200, 4e200], [0.0, 1e-300]], dtype=torch.float64)
    assert mcs(A64, B.double(), dtype=torch.float64).a_to_b.tolist() == pytest.approx([1.0, 1.0], abs=1e-12)


def test_tiny_rows_do_not_underflow():
    res = mcs(torch.tensor([[3e-30, 4e-30]]), B)  # (3e-30)² underflows float32
    assert res.alive_a.tolist() == [True]
    assert res.a_to_b.tolist() == pytest.approx([1.0], abs=1e-6)
    sub = torch.tensor([[1e-40, 0.0], [0.0, 1.0]])  # a subnormal float32 row is still the direction (1, 0)
    assert mcs(sub, B).a_to_b.tolist() == pytest.approx([0.6, 1.0], abs=1e-6)


def test_hungarian_match_with_a_subnormal_row():
    m = hungarian_match(torch.tensor([[1e-40, 0.0], [0.0, 1.0]]), B)
    assert m.rows.tolist() == [0, 1] and m.cols.tolist() == [0, 1]
    assert m.cos.tolist() == pytest.approx([0.6, 1.0], abs=1e-6)
    huge = hungarian_match(torch.tensor([[3e20, 4e20], [1.0, 0.0]]), B)
    assert float(huge.cos.sum()) == pytest.approx(1.4, abs=1e-6)  # (3,4)->(0,1): 0.8, (1,0)->(3,4): 0.6


def test_non_finite_rows_are_dead():
    A = torch.tensor([[math.inf, 1.0], [math.nan, 0.0], [1.0, 0.0]])
    res = mcs(A, B)
    assert res.alive_a.tolist() == [False, False, True] and res.n_dead_a == 2
    assert res.mmcs == pytest.approx(0.6, abs=1e-6)


def _unit(n, d, seed):
    D = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return D / D.norm(dim=1, keepdim=True)


def test_dead_learned_atom_is_left_out_not_nan():
    truth = _unit(4, 8, 0)
    learned = torch.cat([truth, torch.zeros(1, 8)])
    assert mmcs_from_learned(learned, truth).item() == pytest.approx(1.0, abs=1e-6)  # was NaN
    assert mmcs_to_truth(learned, truth).item() == pytest.approx(1.0, abs=1e-6)
    assert share_recovered(learned, truth).item() == 1.0
    ens = mmcs_from_learned(torch.stack([learned, learned]), truth)
    assert ens.shape == (2,) and ens.tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    rep = recovery_report(learned, truth)
    assert rep["mmcs_reverse"] == pytest.approx(1.0, abs=1e-6)


def test_dead_truth_row_is_neither_match_nor_miss():
    truth = _unit(4, 8, 0)
    with_dead = torch.cat([truth, torch.zeros(1, 8)])
    assert share_recovered(truth, with_dead).item() == 1.0  # was 0.8: the zero row counted as a miss
    assert mmcs_to_truth(truth, with_dead).item() == pytest.approx(1.0, abs=1e-6)  # was NaN
    assert share_recovered(truth, with_dead).item() == mcs(with_dead, truth).share_above(0.9)


def test_mmcs_vs_larger_skips_dead_rows_of_the_smaller():
    truth = _unit(5, 8, 0)
    small = torch.cat([truth[:3], torch.zeros(1, 8)])
    out = mmcs_vs_larger([small, truth])
    assert list(out) == [0] and out[0].item() == pytest.approx(1.0, abs=1e-6)  # was NaN
