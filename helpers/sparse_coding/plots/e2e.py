"""Figures of notebook 08: end-to-end SAEs against local ones (Braun et al. 2024, arXiv 2405.12241): the CE loss
increase against L0 and alive latents, the MSE at the hook and every later layer, and how alike the dictionaries
are across seeds and across kinds of loss."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from ..arguments import checked


def _colors(losses: Sequence[str]) -> dict[str, tuple]:
    return dict(zip(losses, sns.color_palette("deep", len(losses))))


@checked
def plot_ce_vs_l0(table: pd.DataFrame, matched_ce: float = math.nan, title: str = "") -> "plt.Figure":
    """The paper's Pareto plot: CE loss increase (nats/token, log scale) against L0 (left) and against alive latents
    (right), one line per kind of loss (table: one row per SAE with columns loss, seed, l0, alive, ce_increase);
    SAEs of other seeds as open markers; the matched CE increase as a dotted line when given."""
    losses = list(dict.fromkeys(table["loss"]))
    colors = _colors(losses)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, x, label in zip(axes, ("l0", "alive"), ("L0 (active latents per token)", "alive latents")):
        for loss in losses:
            sub = table[table["loss"] == loss]
            first = sub[sub["seed"] == sub["seed"].min()].sort_values(x)
            ax.plot(first[x], first["ce_increase"], "o-", color=colors[loss], label=loss)
            other = sub[sub["seed"] != sub["seed"].min()]
            if len(other):
                ax.plot(other[x], other["ce_increase"], "o", mfc="none", color=colors[loss],
                        label=f"{loss}, other seed")
        if math.isfinite(matched_ce):
            ax.axhline(matched_ce, ls=":", color="grey", label=f"matched CE increase {matched_ce:.3f}")
        ax.set_xlabel(label)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("CE loss increase (nats/token)")
    axes[0].legend(fontsize="small")
    fig.suptitle(title or "CE loss increase when the reconstruction is spliced in (lower left is better)")
    fig.tight_layout()
    return fig


@checked
def plot_downstream_mse(per_layer: Mapping[str, Mapping[str, float]], title: str = "") -> "plt.Figure":
    """Normalised MSE (MSE over the clean activations' variance) at the SAE's hook and at every later layer, one
    line per kind of loss: per_layer {loss: {hook: nmse}}, hooks in order from the SAE's own."""
    losses = list(per_layer)
    colors = _colors(losses)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for loss in losses:
        hooks = list(per_layer[loss])
        ax.plot(range(len(hooks)), [per_layer[loss][h] for h in hooks], "o-", color=colors[loss], label=loss)
    hooks = list(per_layer[losses[0]]) if losses else []
    ax.set_xticks(range(len(hooks)), [h.replace(".hook_", "\n") for h in hooks], fontsize="small")
    ax.set_ylabel("MSE / variance of the clean activations")
    ax.set_xlabel("layer (the SAE's hook first)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(title or "How far the spliced activations are from the clean ones")
    fig.tight_layout()
    return fig


@checked
def plot_geometry(geometry: Mapping[str, Any], title: str = "") -> "plt.Figure":
    """Grouped bars: for each pair of dictionaries (`studies.nb08_e2e.geometry`: the same kind from two seeds,
    two kinds from different seeds, two kinds from one seed (shared initialisation), each against its own
    initialisation), the mean max cosine ("mmcs") beside the mean cosine of a 1:1 matching ("matched"); the random
    null as a dotted line."""
    groups = (("within", "{}\nseed vs seed"), ("across", "{}\n(other seed)"),
              ("across_same_init", "{}\n(same init)"), ("to_init", "{}\nvs its init"))
    pairs = [(fmt.format(k.replace(" vs ", " vs\n")), v) for key, fmt in groups
             for k, v in (geometry.get(key) or {}).items()]
    fig, ax = plt.subplots(figsize=(max(7, 1.05 * len(pairs)), 4.2))
    x = np.arange(len(pairs))
    for i, (key, label) in enumerate((("mmcs", "max cosine (MMCS)"), ("matched", "1:1 matched"))):
        vals = [p[1].get(key, math.nan) for p in pairs]
        ax.bar(x + (i - 0.5) * 0.38, vals, 0.38, label=label)
        for xi, v in zip(x, vals):
            ax.text(xi + (i - 0.5) * 0.38, v + 0.01, f"{v:.2f}", ha="center", fontsize="x-small")
    null = geometry.get("null")
    if isinstance(null, (int, float)) and math.isfinite(null):
        ax.axhline(null, ls=":", color="grey", label=f"random directions, max cosine {null:.2f}")
    ax.set_xticks(x, [p[0] for p in pairs], fontsize="x-small")
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("mean cosine")
    ax.legend(fontsize="small", loc="upper left")
    ax.set_title(title or "How alike the dictionaries are: across seeds and across kinds of loss")
    fig.tight_layout()
    return fig
