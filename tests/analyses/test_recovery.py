import pytest
import torch

from sparse_coding.analyses import (dead_features, expected_random_mmcs, mmcs_from_learned, mmcs_to_truth,
                                    mmcs_vs_larger, recovery_report, share_recovered)


def _unit(n, d, seed):
    D = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return D / D.norm(dim=1, keepdim=True)


def test_self_and_permuted_copy_score_one():
    T = _unit(64, 16, 0)
    assert mmcs_to_truth(T, T).item() == pytest.approx(1.0, abs=1e-6)
    perm = T[torch.randperm(64, generator=torch.Generator().manual_seed(1))] * 3.0  # order and scale don't matter
    assert mmcs_to_truth(perm, T).item() == pytest.approx(1.0, abs=1e-6)
    assert mmcs_from_learned(perm, T).item() == pytest.approx(1.0, abs=1e-6)
    assert share_recovered(perm, T).item() == 1.0


def test_sign_flip_is_not_recovery():
    T = _unit(32, 64, 0)
    assert mmcs_to_truth(-T, T).item() < 0.5


def test_random_dictionary_matches_analytic_chance_level():
    d, n = 64, 256
    T = _unit(2000, d, 0)
    R = _unit(n, d, 1)
    expected = expected_random_mmcs(d, n)
    assert 0.25 < expected < 0.6
    assert mmcs_to_truth(R, T).item() == pytest.approx(expected, abs=0.01)
    assert share_recovered(R, T).item() == 0.0


def test_partial_recovery_counts_and_directions():
    # learned = the first half of the truth + junk: half the truth recovered; half the atoms are real
    T = _unit(40, 256, 0)
    junk = _unit(20, 256, 5)
    L = torch.cat([T[:20], junk])
    share = share_recovered(L, T).item()
    assert share == pytest.approx(0.5)
    fwd, rev = mmcs_to_truth(L, T).item(), mmcs_from_learned(L, T).item()
    chance = expected_random_mmcs(256, 40)
    assert fwd == pytest.approx(0.5 + 0.5 * expected_random_mmcs(256, 20), abs=0.05)
    assert rev == pytest.approx(0.5 + 0.5 * chance, abs=0.05)
    # an over-complete dictionary holding the truth plus junk: forward perfect, reverse not
    big = torch.cat([T, junk])
    assert mmcs_to_truth(big, T).item() == pytest.approx(1.0, abs=1e-6)
    assert mmcs_from_learned(big, T).item() < 0.8


def test_ensemble_scores_per_member():
    T = _unit(30, 8, 0)
    ens = torch.stack([T, _unit(30, 8, 9)])
    out = mmcs_to_truth(ens, T)
    assert out.shape == (2,)
    assert out[0].item() == pytest.approx(1.0, abs=1e-6) and out[1].item() < 0.95


def test_dead_features():
    codes = torch.zeros(10, 5)
    codes[3, 0] = 1.0
    codes[7, 2] = 0.5
    count, share = dead_features(codes)
    assert count.item() == 3 and share.item() == pytest.approx(0.6)
    ens = torch.stack([codes, torch.ones(10, 5)])
    count, share = dead_features(ens)
    assert count.tolist() == [3, 0]
    with pytest.raises(ValueError, match="codes"):
        dead_features(torch.zeros(5))


def test_mmcs_vs_larger_orders_by_size():
    T = _unit(64, 16, 0)
    small, large = T[:16], T  # small is contained in large
    out = mmcs_vs_larger({2.0: large, 0.5: small})
    assert list(out) == [0.5]
    assert out[0.5].item() == pytest.approx(1.0, abs=1e-6)
    ens = mmcs_vs_larger([torch.stack([small, _unit(16, 16, 3)]), torch.stack([large, large])])
    assert ens[0].shape == (2,) and ens[0][0] == pytest.approx(1.0, abs=1e-6) and ens[0][1] < 0.99
    with pytest.raises(ValueError, match="at least two"):
        mmcs_vs_larger([T])


def test_report_and_bad_inputs():
    T = _unit(20, 8, 0)
    rep = recovery_report(T, T, codes=torch.ones(4, 20))
    assert rep["mmcs"] == pytest.approx(1.0, abs=1e-6) and rep["dead_count"] == 0
    with pytest.raises(ValueError, match="learned"):
        mmcs_to_truth(torch.zeros(2, 3, 4, 5), T)
    with pytest.raises(ValueError, match="threshold"):
        share_recovered(T, T, threshold=2.0)
