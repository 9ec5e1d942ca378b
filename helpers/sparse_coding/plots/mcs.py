"""Figures of notebook 04: MCS histograms against larger dictionaries, other seeds and random directions."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from ..arguments import checked
from ..analyses.statistics import binned_median


@checked
def plot_mcs_panels(panels: Sequence[Mapping[str, Any]], title: str, threshold: float = 0.9, bins: int = 40) -> "plt.Figure":
    """MCS histograms, one panel per dictionary size: each series (live features only) as the share of its
    features per bin, the sampled random null in grey with its 99 % quantile dotted, the threshold dashed.
    `panels` as built by studies.nb04_mcs.histogram_panels (title, series {label: values}, null, null_q99, n_dead)."""
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.6), squeeze=False, sharey=False)
    edges = [i / bins * 1.1 - 0.1 for i in range(bins + 1)]
    colours = sns.color_palette("deep", 4)
    for ax, p in zip(axes.flat, panels):
        share = lambda v: [1.0 / max(1, len(v))] * len(v)  # noqa: E731  (bars sum to 1 whatever the count)
        ax.hist(p["null"], bins=edges, weights=share(p["null"]), color="lightgrey", label="random directions")
        for (label, v), c in zip(p["series"].items(), colours):
            ax.hist(v, bins=edges, weights=share(v), histtype="step", lw=2, color=c, label=f"{label} (n={len(v)})")
        ax.axvline(threshold, color="k", ls="--", lw=1)
        ax.axvline(p["null_q99"], color="grey", ls=":", lw=1)
        ax.set(xlim=(-0.1, 1.0), xlabel="max cosine similarity", title=f"{p['title']} ({p['n_dead']} dead left out)")
        ax.title.set_fontsize(10)
    axes.flat[0].set_ylabel("share of live features")
    axes.flat[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


@checked
def plot_high_mcs_vs_size(table: pd.DataFrame, threshold: float = 0.9) -> "plt.Figure":
    """MMCS (left) and share of live features with MCS >= threshold (right) against dictionary size, one line per
    comparison, the random null's MMCS in grey. `table` from studies.nb04_mcs.summary_table."""
    fig, (a0, a1) = plt.subplots(1, 2, figsize=(10, 3.8))
    labels = {"vs_larger": "vs next-larger, other seed", "vs_larger_same_seed": "vs next-larger, same seed",
              "across_seeds": "vs same size, other seed"}
    styles = {"vs_larger": "-o", "vs_larger_same_seed": ":s", "across_seeds": "--D"}
    for (name, sub), c in zip(table.groupby("comparison", sort=False), sns.color_palette("deep", 4)):
        sub = sub.sort_values("n")
        a0.plot(sub["n"], sub["mmcs"], styles.get(name, "-o"), color=c, label=labels.get(name, name))
        a1.plot(sub["n"], sub["share_above"], styles.get(name, "-o"), color=c, label=labels.get(name, name))
        if name == "vs_larger" and "share_above_1to1" in sub:
            a1.plot(sub["n"], sub["share_above_1to1"], "-x", color=c, alpha=0.5, label="vs next-larger, 1:1 matched")
    null = table[table["comparison"] == "across_seeds"]
    null = null if len(null) else table
    null = null.sort_values("n")
    a0.plot(null["n"], null["null_mmcs"], "-", color="grey", label="random directions")
    for ax in (a0, a1):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("dictionary size (features)")
        ax.set_ylim(0, 1.02)
    a0.set(ylabel="MMCS (live features)", title="Mean max cosine similarity")
    a1.set(ylabel=f"share of live features with MCS >= {threshold:g}", title=f"Features found again (>= {threshold:g})")
    a0.legend(fontsize=7)
    fig.tight_layout()
    return fig


@checked
def plot_mcs_vs_frequency(panels: Sequence[Mapping[str, Any]], threshold: float = 0.9) -> "plt.Figure":
    """MCS against log10 firing frequency per feature (one panel per size), with the median in equal-count bins.
    `panels` from studies.nb04_mcs.frequency_panels."""
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.6), squeeze=False, sharey=True)
    for ax, p in zip(axes.flat, panels):
        ax.scatter(p["log10_freq"], p["mcs"], s=6, alpha=0.4, lw=0)
        bx, by = binned_median(p["log10_freq"], p["mcs"])
        ax.plot(bx, by, "-o", color="C3", ms=4, label="median (equal-count bins)")
        ax.axhline(threshold, color="k", ls="--", lw=1)
        ax.set(xlabel="log10 firing frequency (held-out rows)", title=p["title"])
        ax.title.set_fontsize(10)
    axes.flat[0].set(ylabel="MCS vs next-larger (other seed)", ylim=(-0.05, 1.02))
    axes.flat[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig
