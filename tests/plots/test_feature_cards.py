"""The feature cards of notebook 06 (`plots.plot_feature_cards`): each card's title names the role, the feature and
its firing frequency in % of tokens; the histogram shows only the occupied bins of the mining grid, and its tick
labels do not overlap, whatever the range the activations span (less than a factor 2, a few decades, twenty)."""

from __future__ import annotations

import itertools

import matplotlib
import pytest
import torch

matplotlib.use("Agg")

from sparse_coding.analyses.mining import Example, mine  # noqa: E402
from sparse_coding.plots import plot_feature_cards  # noqa: E402


class Effect:
    def top_drops(self, k):
        return [(1, -0.5), (2, -0.25)][:k]


def studies() -> dict:
    """Four case studies whose activations span 0.3-0.5, 0.05-20, 1e-4-1e4 and one value (mined on the grid)."""
    g = torch.Generator().manual_seed(0)
    spans = [(0.3, 0.5), (0.05, 20.0), (1e-4, 1e4), (0.8, 0.8)]
    values = torch.stack([torch.exp(torch.empty(40, 8).uniform_(float(torch.tensor(a).log()),
                                                                float(torch.tensor(b).log()), generator=g))
                          for a, b in spans], -1)
    values *= torch.rand(40, 8, 1, generator=g) < 0.5
    tokens = torch.arange(40 * 8).reshape(40, 8)
    mined = mine(lambda tb: {"h": values.reshape(-1, 4)[tb]}, {"x": ("h", lambda x: x)}, tokens, batch_size=8,
                 progress=False)["x"]
    texts = [f"t{i}" for i in range(40 * 8)]
    ex = Example(0, 3, 0.5, [0, 1, 2, 3, 4], [0.0, 0.1, 0.2, 0.5, 0.0], 3)
    out = {}
    for f, role in enumerate(["closing_paren", "single_token", "dense", "random"]):
        m = {k: float(v[f]) for k, v in mined.moments().items()}
        out[role] = {"feature": 100 + f, "frequency": float(mined.frequency()[f]) / 10 ** f, "max": float(mined.max[f]),
                     **m, "edges": mined.bin_edges(f), "hist": mined.hist[f], "top": [ex] * 3,
                     "quantiles": [(0.0, 0.5, [ex])], "logit_lens_up": [("a", 1.0)], "logit_lens_down": [("b", -1.0)],
                     "effects": {"zero": Effect()}, "texts": texts}
    return out


def test_titles_name_the_frequency_and_ticks_do_not_overlap():
    cards = studies()
    fig = plot_feature_cards(cards)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax, (role, s) in zip(fig.axes[::4], cards.items()):
        title = ax.get_title()
        assert f"{role}: feature {s['feature']}" in title
        assert f"fires on {100 * s['frequency']:.3g}% of tokens" in title
        hist = s["hist"].numpy()
        lo, hi = hist.nonzero()[0][[0, -1]]
        assert ax.get_xlim() == pytest.approx((float(s["edges"][lo]), float(s["edges"][hi + 1])))
        labels = [t for t in ax.get_xticklabels(minor=False) + ax.get_xticklabels(minor=True)
                  if t.get_visible() and t.get_text() and ax.get_xlim()[0] <= t.get_position()[0] <= ax.get_xlim()[1]]
        assert 2 <= len(labels) <= 4, [t.get_text() for t in labels]
        boxes = [t.get_window_extent(renderer) for t in labels]
        for a, b in itertools.combinations(boxes, 2):
            assert not a.overlaps(b), (role, [t.get_text() for t in labels])
    # The frequency of a rare feature keeps its digits: 0.0123 % is not rounded to 0.00 %.
    rare = fig.axes[12].get_title()
    assert "0.00%" not in rare and "%" in rare
