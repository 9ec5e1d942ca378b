"""Figures of notebook 05: features across an SAE's training snapshots and across model revisions."""

from __future__ import annotations

from typing import Any, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch

from ..arguments import checked



def _quantile_band(ax, x, sim, colour, label):
    """Median and 10-90 % band over features (columns of sim [T, n]; NaN ignored)."""
    s = sim.double().numpy()
    ok = ~np.all(np.isnan(s), axis=1)
    x = np.asarray(x)[ok]
    q10, q50, q90 = (np.nanquantile(s[ok], q, axis=1) for q in (0.1, 0.5, 0.9))
    ax.fill_between(x, q10, q90, color=colour, alpha=0.2, lw=0)
    ax.plot(x, q50, color=colour, lw=2, label=label)


@checked
def plot_self_similarity(traj: Any, high: float = 0.9, low: float = 0.6, max_traces: int = 12) -> "plt.Figure":
    """Part (a): one SAE across its training snapshots (studies.nb05_tracking.TrainingTrajectory). Left: cosine of each
    feature with itself at the previous snapshot, middle: with its final direction (median and 10-90 % band over
    the features alive at the end; thin lines: features that reached `high` and later fell below `low`), right:
    live features and births/deaths per snapshot."""
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


@checked
def plot_emergence(em: Any, labels: Sequence[str], thresholds: Sequence[float] = (0.9, 0.7)) -> "plt.Figure":
    """Part (b): left, the share of the final model's live SAE features that already have a 1:1 match >= threshold
    in the SAE of each model checkpoint (and the share of each checkpoint's features matched in the next one);
    right, the distribution of each final feature's match per checkpoint."""
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


@checked
def plot_feature_trajectories(em: Any, labels: Sequence[str], latents: Sequence[int], examples: Any,
                              threshold: float = 0.9) -> "plt.Figure":
    """Top: cosine of a few final-model features with their 1:1 partner at each model checkpoint. Below: a table,
    one column per tracked feature, one row per checkpoint, with the partner's top-activating tokens there
    (the activating token in brackets, after the tokens before it)."""
    K, n = len(labels), max(1, len(latents))
    xs = np.arange(K)
    first = em.emergence_index(threshold)
    colours = plt.get_cmap("tab10")
    lines_per = max((len(e) for per in examples.values() for e in per), default=1) or 1
    row_h = 0.28 * (lines_per + 0.6)
    fig = plt.figure(figsize=(max(10, 3.6 * n + 1.6), 3.4 + row_h * K))
    gs = fig.add_gridspec(2, 1, height_ratios=[2.6, row_h * K + 0.4], hspace=0.25)
    ax = fig.add_subplot(gs[0])
    for j, f in enumerate(latents):
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
    for j, f in enumerate(latents):
        tab.text(0.12 + j * col_w, -0.4, f"feature {f}", color=colours(j), fontsize=9, weight="bold")
    for k in range(K):
        tab.text(0, k, labels[k], fontsize=9, va="top", weight="bold")
        tab.axhline(k - 0.1, color="lightgrey", lw=0.6)
        for j, f in enumerate(latents):
            ex = examples[f][k]
            cos = em.matching.to_final[k, f]
            head = "(no partner)" if not ex and bool(torch.isnan(cos)) else f"cos {float(cos):.2f}"
            body = "\n".join(f"{s}  {a:.2g}" for s, a in ex) if ex else "(never fires)"
            tab.text(0.12 + j * col_w, k, f"{head}\n{body}", fontsize=7.5, va="top", family="monospace")
    return fig
