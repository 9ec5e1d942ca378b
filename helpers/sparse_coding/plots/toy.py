"""Figures of notebook 01: recovery of known features on toy data (heatmaps over α × size, MMCS against the
next-larger dictionary, one bar per method)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import seaborn as sns


def _alpha_label(a: float) -> str:
    return f"{a:.3g}"


def plot_sweep_heatmap(grid, title: str, cbar_label: str, fmt: str = ".2f", cmap: str = "viridis",
                       vmin: float | None = None, vmax: float | None = None) -> "plt.Figure":
    """A size × α matrix (a DataFrame: index = per_true, the dictionary's features per true feature; columns = L1
    coefficient) as an annotated heatmap, largest dictionary on top."""
    grid = grid.sort_index(ascending=False)
    fig, ax = plt.subplots(figsize=(1.0 + 0.62 * grid.shape[1], 1.2 + 0.5 * grid.shape[0]))
    sns.heatmap(grid, annot=True, fmt=fmt, cmap=cmap, vmin=vmin, vmax=vmax, ax=ax, annot_kws={"fontsize": 8},
                cbar_kws={"label": cbar_label},
                xticklabels=[_alpha_label(a) for a in grid.columns], yticklabels=[f"{r:g}" for r in grid.index])
    ax.set_xlabel("L1 coefficient α")
    ax.set_ylabel("dictionary size / true features")
    ax.set_title(title)
    return fig


def plot_mmcs_vs_larger(table, chance: float | None = None) -> "plt.Figure":
    """MMCS of each dictionary against the next-larger one (no ground truth used) next to its MMCS against the
    truth, one line per size, over α. `table` has columns per_true, l1_coef, mmcs, mmcs_vs_larger."""
    fig, ax = plt.subplots(figsize=(7, 4))
    sizes = sorted(table["per_true"].unique())
    colours = sns.color_palette("viridis", len(sizes))
    for size, c in zip(sizes, colours):
        sub = table[table["per_true"] == size].sort_values("l1_coef")
        if sub["mmcs_vs_larger"].notna().any():
            ax.plot(sub["l1_coef"], sub["mmcs_vs_larger"], "-o", color=c, ms=4, label=f"{size:g}× vs next larger")
        ax.plot(sub["l1_coef"], sub["mmcs"], ":", color=c, alpha=0.8, label=f"{size:g}× vs truth")
    if chance is not None:
        ax.axhline(chance, color="grey", lw=1, ls="--", label="random directions")
    ax.set_xscale("log")
    alphas = sorted(table["l1_coef"].unique())
    ax.set_xticks(alphas, [_alpha_label(a) for a in alphas], fontsize=8)
    ax.minorticks_off()
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("L1 coefficient α")
    ax.set_ylabel("mean max cosine similarity")
    ax.set_title("MMCS against the next-larger dictionary (solid) and against the truth (dotted)")
    ax.legend(fontsize=7, ncol=2, loc="lower left")
    return fig


def plot_method_bars(names, values, chance: float | None = None, title: str = "") -> "plt.Figure":
    """One bar per method (MMCS against the truth), value written on each bar."""
    fig, ax = plt.subplots(figsize=(1.2 + 1.05 * len(names), 4))
    bars = ax.bar(list(names), list(values), color=sns.color_palette("deep", len(names)))
    for b, v in zip(bars, values):
        ax.annotate(f"{v:.3f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=9,
                    xytext=(0, 2), textcoords="offset points")
    if chance is not None:
        ax.axhline(chance, color="grey", lw=1, ls="--", label="random directions")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("MMCS with the true features")
    ax.set_title(title)
    ax.tick_params(axis="x", labelrotation=20)
    return fig
