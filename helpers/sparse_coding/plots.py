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


# ----------------------------------------------------------------------------------------------------------------
# notebook 05 (tracking features across SAE training and across model checkpoints)


def _quantile_band(ax, x, sim, colour, label):
    """Median and 10-90 % band over features (columns of sim [T, n]; NaN ignored)."""
    import numpy as np

    s = sim.double().numpy()
    ok = ~np.all(np.isnan(s), axis=1)
    x = np.asarray(x)[ok]
    q10, q50, q90 = (np.nanquantile(s[ok], q, axis=1) for q in (0.1, 0.5, 0.9))
    ax.fill_between(x, q10, q90, color=colour, alpha=0.2, lw=0)
    ax.plot(x, q50, color=colour, lw=2, label=label)


def plot_self_similarity(traj, high: float = 0.9, low: float = 0.6, max_traces: int = 12) -> "plt.Figure":
    """Part (a): one SAE across its training snapshots (feature_tracking.TrainingTrajectory). Left: cosine of each
    feature with itself at the previous snapshot, middle: with its final direction (median and 10-90 % band over
    the features alive at the end; thin lines: features that reached `high` and later fell below `low`), right:
    live features and births/deaths per snapshot."""
    import numpy as np
    import torch

    steps = np.array(traj.steps, dtype=float)
    x = np.maximum(steps, 0.5)  # step 0 on a log axis
    keep = traj.alive[-1]
    tr = traj.track
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for ax, sim, fell, name in ((axes[0], tr.self_sim.to_previous, tr.reached_then_fell_previous, "previous snapshot"),
                                (axes[1], tr.self_sim.to_final, tr.reached_then_fell_final, "final direction")):
        _quantile_band(ax, x, sim[:, keep], "tab:blue", "median, 10-90 % band")
        idx = torch.nonzero(fell & keep).squeeze(1)[:max_traces]
        for j, i in enumerate(idx.tolist()):
            ax.plot(x, sim[:, i].numpy(), color="tab:red", lw=0.7, alpha=0.6,
                    label=f"reached {high:g} then < {low:g}" if j == 0 else None)
        for y in (high, low):
            ax.axhline(y, color="grey", ls=":", lw=1)
        share = float(fell[keep].double().mean()) if bool(keep.any()) else float("nan")
        ax.set(xscale="log", xlabel="SAE training step", ylabel="cosine", ylim=(-0.05, 1.05),
               title=f"cos with itself at the {name}\n{share:.0%} reached {high:g} then fell below {low:g}")
        ax.legend(fontsize=8, loc="lower right")
    bd = tr.birth_death
    ax = axes[2]
    w = np.diff(np.log(x), prepend=np.log(x[0]) - 0.5) * 0.35
    ax.bar(x, bd.births.numpy(), width=x * w, color="tab:green", alpha=0.7, label="births")
    ax.bar(x, -bd.deaths.numpy(), width=x * w, color="tab:red", alpha=0.7, label="deaths")
    ax.set(xscale="log", xlabel="SAE training step", ylabel="features born (+) / died (-) since previous",
           title=f"Alive = fires on >= 1 of {traj.n_eval} evaluation tokens")
    ax2 = ax.twinx()
    ax2.plot(x, bd.n_alive.numpy(), color="black", lw=2, label="alive")
    ax2.set(ylabel="alive features", ylim=(0, traj.alive.shape[1] * 1.05))
    ax2.grid(False)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="center right")
    fig.tight_layout()
    return fig


def plot_emergence(em, labels, thresholds=(0.9, 0.7)) -> "plt.Figure":
    """Part (b): left, the share of the final model's live SAE features that already have a 1:1 match >= threshold
    in the SAE of each model checkpoint (and the share of each checkpoint's features matched in the next one);
    right, the distribution of each final feature's match per checkpoint."""
    import numpy as np

    K = len(labels)
    xs = np.arange(K)
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.4))
    ax = axes[0]
    for t, ls in zip(thresholds, ("-", "--", ":")):
        ax.plot(xs, em.matching.share_present(t).numpy(), marker="o", ls=ls, color="tab:blue",
                label=f"final features present (match >= {t:g})")
    cons = em.matching.consecutive_share_above(thresholds[0]).numpy()
    ax.plot(xs[:-1] + 0.5, cons, marker="s", color="tab:orange", ls="-",
            label=f"features matched >= {thresholds[0]:g} in the next checkpoint")
    ax.set_xticks(xs, labels, rotation=30, ha="right")
    ax.set(ylim=(-0.02, 1.02), xlabel="model checkpoint", ylabel="share of features",
           title="When do the final model's features emerge?")
    ax.legend(fontsize=8, loc="best")
    ax = axes[1]
    live = em.alive[-1]
    data = [v[~np.isnan(v)] for v in em.matching.to_final[:, live].numpy()]
    ax.violinplot([d if len(d) else np.array([np.nan]) for d in data], positions=xs, showmedians=True, widths=0.8)
    ax.axhline(thresholds[0], color="grey", ls=":", lw=1)
    ax.set_xticks(xs, labels, rotation=30, ha="right")
    ax.set(ylim=(-0.05, 1.05), xlabel="model checkpoint", ylabel="cosine with 1:1 partner",
           title="Each final feature's best 1:1 match in each checkpoint's SAE")
    fig.tight_layout()
    return fig


def plot_feature_trajectories(em, labels, features, examples, threshold: float = 0.9) -> "plt.Figure":
    """Top: cosine of a few final-model features with their 1:1 partner at each model checkpoint. Below: a table,
    one column per tracked feature, one row per checkpoint, with the partner's top-activating tokens there
    (the activating token in brackets, after the tokens before it)."""
    import numpy as np
    import torch

    K, n = len(labels), max(1, len(features))
    xs = np.arange(K)
    first = em.emergence_index(threshold)
    colours = plt.get_cmap("tab10")
    lines_per = max((len(e) for per in examples.values() for e in per), default=1) or 1
    row_h = 0.28 * (lines_per + 0.6)
    fig = plt.figure(figsize=(max(10, 3.6 * n + 1.6), 3.4 + row_h * K))
    gs = fig.add_gridspec(2, 1, height_ratios=[2.6, row_h * K + 0.4], hspace=0.25)
    ax = fig.add_subplot(gs[0])
    for j, f in enumerate(features):
        e = int(first[f])
        ax.plot(xs, em.matching.to_final[:, f].numpy(), marker="o", color=colours(j),
                label=f"feature {f} (present from {labels[e] if e >= 0 else 'never'})")
    ax.axhline(threshold, color="grey", ls=":", lw=1)
    ax.set_xticks(xs, labels)
    ax.set(ylim=(-0.05, 1.05), ylabel="cos with final feature", title="Tracked final-model features across model "
           "checkpoints, with their partners' top-activating tokens")
    ax.legend(fontsize=8, loc="lower right")
    tab = fig.add_subplot(gs[1])
    tab.axis("off")
    tab.set_xlim(0, 1.0)
    tab.set_ylim(K + 0.5, -0.6)
    col_w = (1 - 0.12) / n
    for j, f in enumerate(features):
        tab.text(0.12 + j * col_w, -0.4, f"feature {f}", color=colours(j), fontsize=9, weight="bold")
    for k in range(K):
        tab.text(0, k, labels[k], fontsize=9, va="top", weight="bold")
        tab.axhline(k - 0.1, color="lightgrey", lw=0.6)
        for j, f in enumerate(features):
            ex = examples[f][k]
            cos = em.matching.to_final[k, f]
            head = "(no partner)" if not ex and bool(torch.isnan(cos)) else f"cos {float(cos):.2f}"
            body = "\n".join(f"{s}  {a:.2g}" for s, a in ex) if ex else "(never fires)"
            tab.text(0.12 + j * col_w, k, f"{head}\n{body}", fontsize=7.5, va="top", family="monospace")
    return fig


# ----------------------------------------------------------------------------------------------------------------
# notebook 04 (MCS between dictionaries)


def plot_mcs_panels(panels, title: str, threshold: float = 0.9, bins: int = 40) -> "plt.Figure":
    """MCS histograms, one panel per dictionary size: each series (live features only) as the share of its
    features per bin, the sampled random null in grey with its 99 % quantile dotted, the threshold dashed.
    `panels` as built by mcs_study.histogram_panels (title, series {label: values}, null, null_q99, n_dead)."""
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


def plot_high_mcs_vs_size(table, threshold: float = 0.9) -> "plt.Figure":
    """MMCS (left) and share of live features with MCS >= threshold (right) against dictionary size, one line per
    comparison, the random null's MMCS in grey. `table` from mcs_study.summary_table."""
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
    a0.plot(null.sort_values("n")["n"], null.sort_values("n")["null_mmcs"], "-", color="grey", label="random directions")
    for ax in (a0, a1):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("dictionary size (features)")
        ax.set_ylim(0, 1.02)
    a0.set(ylabel="MMCS (live features)", title="Mean max cosine similarity")
    a1.set(ylabel=f"share of live features with MCS >= {threshold:g}", title=f"Features found again (>= {threshold:g})")
    a0.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_mcs_vs_frequency(panels, threshold: float = 0.9) -> "plt.Figure":
    """MCS against log10 firing frequency per feature (one panel per size), with the median in equal-count bins.
    `panels` from mcs_study.frequency_panels."""
    from .mcs_study import binned_median

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
