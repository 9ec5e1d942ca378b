"""Audit fixes in `analyses.interpretability` and `analyses.paired`: predictions must line up with the fragments,
split indices must be distinct, NaN activations (past a mined window's context edge) are no activation, and
interval levels are shares."""

import math

import numpy as np
import pytest

from sparse_coding.analyses import (Record, TokenTableExplainer, bootstrap_ci, fragment_sums, paired_difference,
                                    pooled_correlation, split_fragments)
from sparse_coding.analyses.interpretability import scale_0_10


def test_fragment_sums_refuse_predictions_of_other_lengths():
    with pytest.raises(ValueError, match=r"pred\[0\] has 1 values but fragment 0 of true has 2 tokens"):
        fragment_sums([[1.0, 2.0]], [[5.0]])  # used to broadcast 5 over both tokens
    with pytest.raises(ValueError, match="pred has 1 fragments but true has 2"):
        fragment_sums([[1.0, 2.0], [3.0, 4.0]], [[1.0, 2.0]])
    assert fragment_sums([[1.0, 2.0]], [[3.0, 4.0]]).tolist() == [[2, 3, 7, 5, 25, 11]]


def test_pooled_correlation_refuses_misaligned_fragments():
    with pytest.raises(ValueError, match=r"pred\[0\] has 1 values"):
        pooled_correlation([[1.0, 0.0], [0.0]], [[1.0], [0.0, 0.0]])  # same total length: used to give 1.0
    with pytest.raises(ValueError, match="fragments"):
        pooled_correlation([[1.0, 0.0]], [[1.0], [0.0]])
    assert pooled_correlation([[1.0, 0.0], [0.0]], [[1.0, 0.0], [0.0]]) == pytest.approx(1.0)


def test_split_fragments_requires_distinct_indices():
    with pytest.raises(ValueError, match="ranked repeats fragment indices"):
        split_fragments([0] * 20, [0, 1])
    with pytest.raises(ValueError, match="firing repeats"):
        split_fragments(list(range(20)), [30, 30])
    s = split_fragments(list(range(20)), [30, 31])
    assert s.random == [30, 31]


def test_explainer_skips_nan_activations():
    assert TokenTableExplainer().explain([Record(["a", "b", "c"], [math.nan, 1.0, 0.0])]) == 'fires on "b" ≈10'
    # the NaN "b" is left out of the fit (as 0 it would halve the entry's strength to ≈5)
    assert TokenTableExplainer().explain([Record(["b", "b", "c"], [math.nan, 1.0, 0.0])]) == 'fires on "b" ≈10'
    assert scale_0_10([Record(["a", "b"], [math.nan, 2.0])]) == [[0, 10]]
    assert TokenTableExplainer().explain([Record(["a"], [math.nan])]) == "fires on nothing in these examples"


def test_interval_levels_are_shares():
    with pytest.raises(ValueError, match=r"level must be a share in \(0, 1\)"):
        bootstrap_ci([0.1, 0.2, 0.3], level=95)
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci([0.1, 0.2, 0.3], level=0.0)
    sums = [np.array([[2.0, 3.0, 7.0, 5.0, 25.0, 11.0]])]
    with pytest.raises(ValueError, match="level"):
        paired_difference(sums, [[0]], sums, [[0]], level=95)
    mean, lo, hi, _ = bootstrap_ci([0.1, 0.2, 0.3], level=0.5)
    assert mean == pytest.approx(0.2) and lo <= mean <= hi
