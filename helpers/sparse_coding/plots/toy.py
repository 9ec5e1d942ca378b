"""Figures of notebook 01: recovery of known features on toy data (heatmaps over α × size, MMCS against the
next-larger dictionary, MMCS against L0 per kind, one bar per method, K-SVD under a mis-set k)."""

from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import matplotlib.ticker as mticker
import numpy as np
import pandas as pd
import seaborn as sns

from ..arguments import checked



def _alpha_label(a: float) -> str:
    return f"{a:.3g}"


@checked
def plot_sweep_heatmap(grid: pd.DataFrame, title: str, cbar_label: str, fmt: str = ".2f", cmap: str = "viridis",
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


@checked
def plot_mmcs_vs_larger(table: pd.DataFrame, chance: float | None = None) -> "plt.Figure":
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


@checked
def plot_method_bars(names: Sequence[str], values: Sequence[float], chance: float | None = None, title: str = "",
                     l0s: Sequence[float | None] | None = None) -> "plt.Figure":
    """One bar per method (MMCS against the truth), value written on each bar; l0s (optional, one per bar, None
    where a method has no L0) adds each method's mean active features per sample under its value."""
    fig, ax = plt.subplots(figsize=(1.2 + 1.05 * len(names), 4))
    bars = ax.bar(list(names), list(values), color=sns.color_palette("deep", len(names)))
    l0s = list(l0s) if l0s is not None else [None] * len(names)
    for b, v, l0 in zip(bars, values, l0s):
        label = f"{v:.3f}" if l0 is None else f"{v:.3f}\nL0 {l0:.1f}"
        ax.annotate(label, (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=8,
                    xytext=(0, 2), textcoords="offset points")
    if chance is not None:
        ax.axhline(chance, color="grey", lw=1, ls="--", label="random directions")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_ylim(0, 1.14)
    ax.set_ylabel("MMCS with the true features")
    ax.set_title(title)
    ax.tick_params(axis="x", labelrotation=20)
    return fig


KIND_COLOURS = {"relu": "C0", "topk": "C1", "batchtopk": "C2", "jumprelu": "C3"}


@checked
def plot_mmcs_vs_l0(tables: Mapping[str, pd.DataFrame], chance: float | None = None, true_l0: float | None = None) -> "plt.Figure":
    """The toy version of the frontier: MMCS with the truth against held-out L0 for every SAE of every kind's grid
    (faint points), each kind's best (dictionary size, lr) joined by a line over its sparsity setting, the best
    cell circled. `tables`: {kind: ToySweepResult.table} (columns per_true, lr, l0, mmcs)."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for kind, t in tables.items():
        c = KIND_COLOURS.get(kind, "C4")
        ax.scatter(t["l0"], t["mmcs"], s=12, color=c, alpha=0.3)
        best = t.loc[t["mmcs"].idxmax()]
        line = t[(t["per_true"] == best["per_true"]) & (t["lr"] == best["lr"])].sort_values("l0")
        ax.plot(line["l0"], line["mmcs"], "-o", ms=4, color=c,
                label=f"{kind} (size {best['per_true']:g}×, lr {best['lr']:g})")
        ax.scatter([best["l0"]], [best["mmcs"]], s=110, facecolors="none", edgecolors=c, linewidths=1.5)
    low = min(float(t["mmcs"].min()) for t in tables.values()) - 0.05
    if chance is not None and chance >= low:
        ax.axhline(chance, color="grey", lw=1, ls="--", label="random directions")
    if true_l0 is not None:
        ax.axvline(true_l0, color="black", lw=0.8, ls=":", label=f"true L0 ≈ {true_l0:g}")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(mticker.FuncFormatter(lambda v, _: f"{v:g}" if str(v)[0] in "2358" else ""))
    ax.set_ylim(max(0.0, low), 1.01)
    ax.set_xlabel("L0 (mean active latents per held-out sample)")
    ax.set_ylabel("MMCS with the true features")
    ax.set_title("Recovery against sparsity, every kind's grid (faint) and its best line")
    ax.legend(fontsize=7, loc="lower right")
    return fig


@checked
def plot_ksvd_wrong_k(trajectories: pd.DataFrame, sae_mmcs: Sequence[float] | None = None, active: int | None = None) -> "plt.Figure":
    """Left: K-SVD's MMCS with the truth per round (epoch), one line per run, coloured by the k it was told;
    right: the final MMCS per k (one dot per seed, bar = median) with the SAE's on the same data.
    trajectories: columns k, seed, round, mmcs (studies.nb01_ksvd.ksvd_wrong_k)."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [1.6, 1]})
    ks = sorted(trajectories["k"].unique())
    colours = dict(zip(ks, sns.color_palette("flare", len(ks))))
    for (k, seed), g in trajectories.groupby(["k", "seed"]):
        a1.plot(g["round"], g["mmcs"], color=colours[k], lw=1.2, alpha=0.85,
                label=f"k={k}" + (" (true)" if k == active else "") if seed == trajectories["seed"].min() else None)
    a1.set_xlabel("K-SVD round (epoch)")
    a1.set_ylabel("MMCS with the true features")
    a1.set_ylim(0, 1.02)
    a1.legend(fontsize=8, loc="lower right")
    a1.set_title("K-SVD told k nonzeros per sample")
    final = trajectories.sort_values("round").groupby(["k", "seed"])["mmcs"].last().reset_index()
    med = final.groupby("k")["mmcs"].median()
    labels = [f"K-SVD k={k}" for k in med.index]
    a2.bar(labels, med.values, color=[colours[k] for k in med.index], alpha=0.6)
    for i, k in enumerate(med.index):
        a2.scatter([i] * (final.k == k).sum(), final[final.k == k]["mmcs"], color="black", s=10, zorder=3)
    if sae_mmcs is not None:
        a2.bar(["SAE (defaults)"], [float(np.median(sae_mmcs))], color="C0", alpha=0.6)
        a2.scatter([len(med)] * len(sae_mmcs), sae_mmcs, color="black", s=10, zorder=3)
    a2.set_ylim(0, 1.05)
    a2.tick_params(axis="x", labelrotation=30)
    a2.set_title("final MMCS (dots: seeds, bars: median)")
    fig.tight_layout()
    return fig
