"""analyses.statistics: Sarle's bimodality coefficient and medians in equal-count bins, with known values."""

import numpy as np
import pytest

from sparse_coding.analyses import statistics as ST


def test_sarle_known_values():
    rng = np.random.default_rng(0)
    assert abs(ST.sarle_bimodality(rng.normal(size=200_000)) - 1 / 3) < 0.01
    assert abs(ST.sarle_bimodality(rng.uniform(size=200_000)) - 5 / 9) < 0.01
    spikes = np.r_[np.zeros(5000), np.ones(5000)]
    assert abs(ST.sarle_bimodality(spikes) - 1.0) < 0.01
    mixture = np.r_[rng.normal(0.2, 0.05, 5000), rng.normal(0.95, 0.03, 5000)]
    assert ST.sarle_bimodality(mixture) > ST.BIMODAL_SARLE
    assert np.isnan(ST.sarle_bimodality([0.1, 0.2, 0.3])) and np.isnan(ST.sarle_bimodality(np.ones(10)))


def test_binned_median():
    x = np.arange(10.0)
    bx, by = ST.binned_median(x, 2 * x, bins=2)
    assert np.allclose(bx, [2, 7]) and np.allclose(by, [4, 14])
    with pytest.raises(ValueError, match="same length"):
        ST.binned_median(x, x[:3])


def test_spearman_known_values():
    assert ST.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert ST.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties get average ranks: ranks (1, 2.5, 2.5, 4) against (1, 2, 3, 4) -> r = 0.9487
    assert ST.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833, abs=1e-6)
    assert np.isnan(ST.spearman([1, 1, 1], [1, 2, 3]))  # a constant sample has no ranking
    with pytest.raises(ValueError, match="same length"):
        ST.spearman([1, 2, 3], [1, 2])
