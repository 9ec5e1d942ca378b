"""Plot helpers shared by the notebooks: one style, atomic PNG writes into the figures folder."""

from __future__ import annotations

import io as _io
import os
from pathlib import Path

import matplotlib

matplotlib.use(os.environ.get("MPLBACKEND", "Agg") if not os.environ.get("JPY_PARENT_PID") else matplotlib.get_backend())
import matplotlib.pyplot as plt  # noqa: E402
import seaborn as sns  # noqa: E402

from .io import atomic_write_bytes  # noqa: E402
from .paths import resolve  # noqa: E402

sns.set_theme(context="notebook", style="whitegrid")


def savefig(fig: "plt.Figure", figures_dir: str | os.PathLike, name: str, dpi: int = 120) -> Path:
    """Write `fig` as figures_dir/name (PNG) atomically and return the path. The figure stays open for display."""
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return atomic_write_bytes(resolve(figures_dir) / name, buf.getvalue())


# ----------------------------------------------------------------------------------------------------------------
# notebook 01 (toy data)


def _alpha_label(a: float) -> str:
    return f"{a:.3g}"


def plot_sweep_heatmap(grid, title: str, cbar_label: str, fmt: str = ".2f", cmap: str = "viridis",
                       vmin: float | None = None, vmax: float | None = None) -> "plt.Figure":
    """A ratio × α matrix (a DataFrame: index = dictionary ratio, columns = L1 coefficient) as an annotated
    heatmap, largest dictionary on top."""
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
    truth, one line per ratio, over α. `table` has columns ratio, l1_coef, mmcs, mmcs_vs_larger."""
    fig, ax = plt.subplots(figsize=(7, 4))
    ratios = sorted(table["ratio"].unique())
    colours = sns.color_palette("viridis", len(ratios))
    for ratio, c in zip(ratios, colours):
        sub = table[table["ratio"] == ratio].sort_values("l1_coef")
        if sub["mmcs_vs_larger"].notna().any():
            ax.plot(sub["l1_coef"], sub["mmcs_vs_larger"], "-o", color=c, ms=4, label=f"R={ratio:g} vs next larger")
        ax.plot(sub["l1_coef"], sub["mmcs"], ":", color=c, alpha=0.8, label=f"R={ratio:g} vs truth")
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


# ----------------------------------------------------------------------------------------------------------------
# notebook 03 (SAEs on language-model activations)


def _by_kind(table):
    kinds = list(dict.fromkeys(table["kind"]))
    return kinds, dict(zip(kinds, sns.color_palette("deep", len(kinds))))


def plot_frontier(table, y: str = "fvu", ylabel: str = "fraction of variance unexplained",
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


def plot_dead_features(table, labels) -> "plt.Figure":
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


def plot_density_panels(freqs, titles, labels) -> "plt.Figure":
    """One panel per sweep (feature_freq [E, n] each), members overlaid as log10-density histograms."""
    from .evaluate import plot_density_histogram

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
