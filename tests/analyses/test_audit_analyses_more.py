"""Bad-input audit of analyses (statistics, logit lens, downstream, detection, sweep table, null,
tracking): each test failed before its fix.

Faults fixed:
- sarle_bimodality / spearman: a bfloat16 tensor, or one that requires grad, failed inside np.asarray with torch's
  message; they now read any tensor (through torch) and give the value of its numbers.
- binned_median: NaN in x or y made a bin's medians NaN (argsort puts NaN last); non-finite pairs are left out.
- top_tokens: 2-d logits (a logit_lens_matrix, or [1, d_vocab]) gave an IndexError from torch; NaN logits headed the
  promoted list. Both refused by name.
- at_ce_increase: one NaN row made every answer NaN (it sorted last and became the range's top); an empty table gave
  an IndexError and a missing column a KeyError. matched_ce_increase: {} gave "max() arg is an empty sequence", a
  missing column a KeyError.
- downstream_loss: an exclusion that leaves no prediction to score gave a ZeroDivisionError.
- fuzzing_from_predictions (and fuzzing_score, evaluate_direction): predictions not aligned with the records gave an
  IndexError; NaN (unknown) activations were drawn as silent tokens. detection_score: a simulator returning another
  number of contexts silently moved negatives into positives.
- matched_negatives: a negative index silently read another fragment's document, an index out of range gave a torch
  IndexError, a 2-d doc an obscure one, and a fragment in both lists could be its own negative.
- best_members: an empty table or a missing column gave a KeyError, a kind whose in-budget FVUs were all NaN gave
  pandas' "Encountered all NA values", and a NaN-FVU member could be picked as the sparsest fallback.
- null_mcs_quantile: NaN q came back as a NaN quantile.
- settled_step: a 3-d tensor was read as [T, n] per slice, silently.
- match_across_revisions: dictionaries of different widths gave the matcher's message, naming neither revision.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from sparse_coding import analyses
from sparse_coding.analyses import statistics as stats

pytestmark = pytest.mark.usefixtures("one_thread")


def test_sarle_and_spearman_read_bfloat16_and_grad_tensors():
    v = torch.cat([torch.randn(200, generator=torch.Generator().manual_seed(0)) - 3, torch.randn(200) + 3])
    b = v.bfloat16()
    assert stats.sarle_bimodality(b) == pytest.approx(stats.sarle_bimodality(b.double().numpy()))
    g = v.clone().requires_grad_(True)
    assert stats.sarle_bimodality(g) == pytest.approx(stats.sarle_bimodality(v.numpy()))
    assert stats.spearman(b, g) == pytest.approx(stats.spearman(b.double().numpy(), v.numpy()))


def test_binned_median_leaves_out_non_finite_pairs():
    x = np.array([1.0, 2.0, np.nan, 4.0, 5.0, 6.0])
    y = np.array([1.0, 2.0, 3.0, 4.0, np.nan, 6.0])
    cx, cy = stats.binned_median(x, y, bins=2)   # pairs left: (1,1) (2,2) | (4,4) (6,6)
    np.testing.assert_allclose(cx, [1.5, 5.0])
    np.testing.assert_allclose(cy, [1.5, 5.0])


def test_top_tokens_refuses_2d_and_nan_logits():
    with pytest.raises(ValueError, match=r"logits must have 1 dimensions.*\[d_vocab\].*got shape \(1, 50\)"):
        analyses.top_tokens(torch.randn(1, 50), k=3)
    with pytest.raises(ValueError, match="logits contains 1 NaN"):
        analyses.top_tokens(torch.tensor([0.0, float("nan"), 1.0]), k=1)
    up, down = analyses.top_tokens(torch.tensor([0.0, 2.0, -1.0]), k=1)   # a good call is unchanged
    assert up == [(1, 2.0)] and down == [(2, -1.0)]


def _front(ce, l0):
    return pd.DataFrame({"ce_increase": ce, "l0": l0})


def test_at_ce_increase_leaves_out_nan_rows_and_names_missing_columns():
    clean = _front([0.1, 0.4], [100.0, 20.0])
    expected = analyses.at_ce_increase(clean, 0.2)
    assert expected == pytest.approx(60.0)
    assert analyses.at_ce_increase(_front([0.1, np.nan, 0.4], [100.0, 30.0, 20.0]), 0.2) == pytest.approx(expected)
    assert analyses.at_ce_increase(_front([0.1, 0.3, 0.4], [100.0, np.nan, 20.0]), 0.2) == pytest.approx(expected)
    assert math.isnan(analyses.at_ce_increase(_front([], []), 0.2))
    with pytest.raises(ValueError, match="table has no column 'alive'"):
        analyses.at_ce_increase(clean, 0.2, column="alive")


def test_matched_ce_increase_refuses_no_frontiers_and_missing_columns():
    with pytest.raises(ValueError, match="frontiers is empty"):
        analyses.matched_ce_increase({})
    with pytest.raises(ValueError, match=r"frontiers\['b'\] has no column 'ce_increase'"):
        analyses.matched_ce_increase({"a": _front([0.1], [1.0]), "b": pd.DataFrame({"ce": [0.2]})})


def test_downstream_loss_refuses_an_exclusion_that_scores_nothing(tiny_model):
    from sparse_coding.activations import Exclusion
    from sparse_coding.dictionaries import make_sae

    model, contexts, _ = tiny_model
    d = int(model.cfg.d_model)
    sae = make_sae("relu", d, 2 * d)
    with pytest.raises(ValueError, match="exclude leaves no next-token prediction to score"):
        analyses.downstream_loss(model, contexts[:2, :2], "blocks.0.hook_resid_post", sae,
                                 exclude=Exclusion(positions=(0,)), progress=False)


R = analyses.Record(tokens=["a", "b", "c", "d"], acts=[0.0, 1.0, 0.0, 2.0])


def test_fuzzing_refuses_predictions_not_aligned_with_the_records():
    with pytest.raises(ValueError, match="pred has 1 fragments but true has 2"):
        analyses.fuzzing_from_predictions([R, R], [[0, 9, 0, 9]])
    with pytest.raises(ValueError, match=r"pred\[0\] has 2 values but fragment 0 of true has 4"):
        analyses.fuzzing_from_predictions([R], [[0, 9]])
    assert analyses.fuzzing_from_predictions([R], [[0, 9, 0, 9]]) == 1.0


def test_fuzzing_never_draws_unknown_activations_as_silent():
    # tokens 2 and 3 lie past the context's edge (NaN: unknown); the simulator fires on them and on the firing
    # token: only token 1 is silent, so the answer is perfect whatever the seed
    rec = analyses.Record(tokens=["x", "y", "", ""], acts=[1.0, 0.0, math.nan, math.nan])
    for seed in range(6):
        assert analyses.fuzzing_from_predictions([rec], [[9.0, 0.0, 9.0, 9.0]], seed=seed) == 1.0


class _Dropping:
    """A simulator that loses the last context (as a truncated LLM answer would)."""

    name = "dropping"

    def simulate(self, explanation, fragments):
        return [[0.0] * len(f) for f in fragments[:-1]]


def test_detection_score_refuses_a_simulator_that_drops_contexts():
    with pytest.raises(ValueError, match="pred has 2 fragments but true has 3"):
        analyses.detection_score("x", _Dropping(), [["a", "b"], ["c"]], [["d"]])


def test_matched_negatives_checks_its_indices():
    doc = torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match=r"positives must be fragment indices in \[0, 4\).*\[-1\]"):
        analyses.matched_negatives([-1], [0, 1, 2], doc)
    with pytest.raises(ValueError, match=r"silent must be fragment indices in \[0, 4\).*\[9\]"):
        analyses.matched_negatives([0], [1, 9], doc)
    with pytest.raises(ValueError, match=r"fragments \[0\] are in both positives and silent"):
        analyses.matched_negatives([0], [0, 1, 2], doc)
    with pytest.raises(ValueError, match=r"doc must be \[n_fragments\].*\(2, 2\)"):
        analyses.matched_negatives([0], [1, 2], doc.reshape(2, 2))


def test_best_members_skips_unmeasured_members_and_names_bad_tables():
    t = pd.DataFrame({"kind": ["a"] * 3 + ["b"] * 2, "l0": [5.0, 6.0, 50.0, 3.0, 40.0],
                      "fvu": [np.nan, np.nan, 0.1, np.nan, 0.2]})
    best = analyses.best_members(t, l0_budget=10)
    assert best.loc["a", "l0"] == 50.0 and best.loc["b", "l0"] == 40.0   # the measured ones
    with pytest.raises(ValueError, match=r"got 0 rows"):
        analyses.best_members(t.iloc[:0], l0_budget=10)
    with pytest.raises(ValueError, match=r"missing \['fvu'\]"):
        analyses.best_members(t.drop(columns="fvu"), l0_budget=10)
    with pytest.raises(ValueError, match="kind 'c' has no member with both fvu and l0 measured"):
        analyses.best_members(pd.DataFrame({"kind": ["c"], "l0": [2.0], "fvu": [np.nan]}), l0_budget=10)


def test_null_quantile_refuses_nan_q():
    with pytest.raises(ValueError, match="quantiles q must lie strictly between 0 and 1"):
        analyses.null_mcs_quantile(np.array([0.5, np.nan]), 10, 16)


def test_settled_step_refuses_a_3d_stack():
    with pytest.raises(ValueError, match=r"to_final must be \[T, n_features\].*\(3, 4, 5\)"):
        analyses.settled_step(torch.rand(3, 4, 5))


def test_match_across_revisions_names_the_revision_of_another_width():
    with pytest.raises(ValueError, match=r"different widths: dictionaries\[2\] has d=4 but dictionaries\[0\] has d=3"):
        analyses.match_across_revisions([torch.randn(5, 3), torch.randn(5, 3), torch.randn(5, 4)])
