"""Notebook 03's summary: each kind's best member within the L0 budget, the frontier against ReLU at the same L0,
and the metrics file's headline numbers."""

import numpy as np
import pandas as pd

from sparse_coding.analyses import best_members
from sparse_coding.studies.nb03_frontier import frontier_metrics, fvu_vs_reference


def _table():
    return pd.DataFrame({"kind": ["relu"] * 3 + ["topk"] * 2, "l0": [4.0, 16.0, 64.0, 8.0, 100.0],
                         "fvu": [0.4, 0.2, 0.1, 0.15, 0.01], "dead_frac": [0, 0.1, 0.0, 0.02, 0.0],
                         "ppl_clean": [10.0] * 5, "ppl_spliced": [20, 15, 12, 14, 11.0],
                         "loss_recovered": [0.5, 0.7, 0.9, 0.8, 0.99]})


def test_best_members_respects_the_l0_budget():
    best = best_members(_table(), l0_budget=20)
    assert best.loc["relu", "l0"] == 16.0 and best.loc["topk", "l0"] == 8.0
    # nothing within budget: the sparsest member
    assert best_members(_table(), l0_budget=2).loc["relu", "l0"] == 4.0


def test_fvu_vs_reference_interpolates_in_log_log():
    t = _table()
    # relu at L0=8 interpolates log-linearly between (4, 0.4) and (16, 0.2): sqrt(0.4 * 0.2); topk 0.15 is below.
    expected = float(np.log2(0.15 / np.sqrt(0.4 * 0.2)))
    assert abs(fvu_vs_reference(t, "topk") - expected) < 1e-9  # L0=100 is outside relu's range: ignored
    m = frontier_metrics(t, best_members(t, 20), l0_budget=20)
    # the headline splice is the sweep's best SAE within the budget: topk at L0 8 (FVU 0.15 < relu's 0.2)
    assert m["max_dead_fraction"] == 0.1 and m["clean_perplexity"] == 10.0 and m["spliced_perplexity"] == 14.0
    assert m["spliced_perplexity_kind"] == "topk" and m["best_relu_spliced_perplexity"] == 15.0
    # topk has nothing within L0 <= 5: its fallback (L0 8) may not win the headline however low its FVU
    m5 = frontier_metrics(t, best_members(t, 5), l0_budget=5)
    assert m5["spliced_perplexity_kind"] == "relu" and m5["spliced_perplexity"] == 20.0
    assert m["topk_log2_fvu_vs_relu_at_same_l0"] < 0
