"""Figures of notebook 03: SAEs on the residual stream (the FVU/loss-recovered vs L0 frontier, dead and dense
features, feature-density histograms)."""

from __future__ import annotations

from typing import Any, Sequence

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
import torch

from ..arguments import checked
from ..analyses.reconstruction import density_histogram


@checked
def plot_density_histogram(ax: Any, feature_freq: torch.Tensor, labels: Sequence[str] | None = None, bins: int = 50) -> Any:
    """Draw the log10 feature-density histogram of each member on a matplotlib Axes (step outlines, one per member;
    the legend gives each member's dead count). feature_freq [E, d_sae] (or [d_sae]) fractions of tokens."""
    edges, counts, n_dead = density_histogram(feature_freq, bins=bins)
    labels = list(labels) if labels is not None else [f"member {i}" for i in range(len(counts))]
    if len(labels) != len(counts):
        raise ValueError(f"got {len(labels)} labels for {len(counts)} members")
    for c, lab, dead in zip(counts, labels, n_dead):
        ax.stairs(c, edges, label=f"{lab} ({dead} dead)")
    ax.set_xlabel("log10 feature density (fraction of tokens a feature fires on)")
    ax.set_ylabel("features")
    ax.legend(fontsize="small")
    return ax


def _by_kind(table):
    kinds = list(dict.fromkeys(table["kind"]))
    return kinds, dict(zip(kinds, sns.color_palette("deep", len(kinds))))


@checked
def plot_frontier(table: pd.DataFrame, y: str = "fvu", ylabel: str = "fraction of variance unexplained",
                  title: str = "Sparsity-reconstruction frontier", logy: bool = True) -> "plt.Figure":
    """`y` against L0, one line per SAE kind (members sorted by L0), marker size by dictionary ratio: the
    MSE-vs-L0 frontier Gao et al. recommend reading results on (lower-left is better)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    kinds, colour = _by_kind(table)
    ratios = sorted(table["ratio"].unique())
    markers = dict(zip(ratios, "osD^v<>p"))
    for kind in kinds:
        for ratio in ratios:
            sub = table[(table["kind"] == kind) & (table["ratio"] == ratio)].sort_values("l0")
            if len(sub):
                ax.plot(sub["l0"], sub[y], "-", marker=markers[ratio], color=colour[kind], ms=6,
                        label=f"{kind} (R={ratio:g})")
    ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set(xlabel="L0 (active features per token)", ylabel=ylabel, title=title)
    ax.legend(fontsize=8)
    return fig


@checked
def plot_dead_features(table: pd.DataFrame, labels: Sequence[str]) -> "plt.Figure":
    """Share of dead and of dense features per SAE (bars), coloured by kind."""
    _, colour = _by_kind(table)
    fig, ax = plt.subplots(figsize=(1.5 + 0.45 * len(table), 4))
    xs = range(len(table))
    ax.bar(xs, table["dead_frac"], color=[colour[k] for k in table["kind"]], label="dead")
    ax.bar(xs, table["dense_frac"], bottom=table["dead_frac"], color="lightgrey", label="dense (>10 % of tokens)")
    ax.set_xticks(list(xs), labels, rotation=60, ha="right", fontsize=8)
    ax.set(ylabel="share of features", title="Dead (never fired on the evaluation tokens) and dense features")
    ax.legend(fontsize=8)
    return fig


@checked
def plot_density_panels(freqs: Sequence[torch.Tensor], titles: Sequence[str],
                        labels: Sequence[Sequence[str]]) -> "plt.Figure":
    """One panel per sweep (feature_freq [E, n] each), members overlaid as log10-density histograms."""
    n = len(freqs)
    cols = min(n, 2)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 3.4 * rows), squeeze=False, sharex=True)
    for ax, f, title, labs in zip(axes.flat, freqs, titles, labels):
        plot_density_histogram(ax, f, labels=labs)
        ax.set_title(title, fontsize=10)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig
