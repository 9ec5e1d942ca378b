"""Figures of notebook 07: interpretability scores per method and layer with 95 % intervals (the paper's Figure 2
analogue), top-only vs random-only scores, score against MCS to another seed, and the controls."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns

from ..arguments import checked


LABELS = {"sae": "SAE (best of 03)", "sae_paper": "SAE (tied ReLU, R=2)", "neurons": "neuron basis",
          "random": "random directions", "pca": "PCA", "ica": "ICA", "pca_topk": "top-K PCA", "ica_topk": "top-K ICA"}


def _grouped(ax, scores: Mapping[str, Mapping[str, Any]], methods: Sequence[str], key: str,
             lo_key: str | None, hi_key: str | None) -> None:
    layers = list(scores)
    width = 0.8 / len(methods)
    colours = sns.color_palette("deep", len(methods))
    for j, (m, c) in enumerate(zip(methods, colours)):
        xs = np.arange(len(layers)) + (j - (len(methods) - 1) / 2) * width
        v = np.array([scores[L][m][key] if m in scores[L] else np.nan for L in layers])
        err = None
        if lo_key:
            lo = np.array([scores[L][m][lo_key] if m in scores[L] else np.nan for L in layers])
            hi = np.array([scores[L][m][hi_key] if m in scores[L] else np.nan for L in layers])
            err = np.vstack([v - lo, hi - v])
        ax.bar(xs, v, width, color=c, label=LABELS.get(m, m), yerr=err, capsize=2, error_kw={"lw": 0.8})
    ax.set_xticks(range(len(layers)), [f"layer {L}" for L in layers])
    ax.axhline(0, color="k", lw=0.6)


@checked
def plot_scores_by_layer(scores: Mapping[str, Mapping[str, Any]], methods: Sequence[str], explainer: str) -> "plt.Figure":
    """Mean top-and-random score per method (bars) and layer (groups), 95 % bootstrap intervals over directions."""
    fig, ax = plt.subplots(figsize=(12, 4.5))
    _grouped(ax, scores, methods, "score_mean", "score_ci_low", "score_ci_high")
    ax.set(ylabel="interpretability score (Pearson r)",
           title=f"Explain-simulate-score per method and layer ({explainer} explainer; 95 % intervals)")
    ax.legend(fontsize=8, ncol=4, loc="upper right")
    return fig


@checked
def plot_top_vs_random(scores: Mapping[str, Mapping[str, Any]], methods: Sequence[str]) -> "plt.Figure":
    """Top-only (left) and random-only (right) mean scores per method and layer."""
    fig, axes = plt.subplots(1, 2, figsize=(15, 4.2), sharey=True)
    for ax, key, name in ((axes[0], "top_mean", "top-only"), (axes[1], "random_mean", "random-only")):
        _grouped(ax, scores, methods, key, None, None)
        ax.set_title(f"{name} score")
    axes[0].set_ylabel("mean Pearson r")
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


@checked
def plot_score_vs_mcs(score: np.ndarray, mcs: np.ndarray, rho: float, title: str) -> "plt.Figure":
    """Each scored SAE feature's score against its MCS with another seed's dictionary."""
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.scatter(mcs, score, s=12, alpha=0.6)
    ax.set(xlabel="MCS with the other seed's dictionary", ylabel="interpretability score",
           title=f"{title}\nSpearman ρ = {rho:.2f} over {len(score)} features")
    return fig


@checked
def plot_controls(real: Mapping[str, float], shuffled: Mapping[str, float], trained: float, step0: float,
                  layer: str) -> "plt.Figure":
    """Left: each method's mean score with its own explanations and with shuffled ones. Right: the SAE recipe on
    the trained model vs on the randomly initialised one (step0) at one layer."""
    fig, (a0, a1) = plt.subplots(1, 2, figsize=(13, 4), gridspec_kw={"width_ratios": [3, 1]})
    methods = list(real)
    xs = np.arange(len(methods))
    a0.bar(xs - 0.2, [real[m] for m in methods], 0.4, label="own explanation")
    a0.bar(xs + 0.2, [shuffled[m] for m in methods], 0.4, label="another direction's explanation")
    a0.set_xticks(xs, [LABELS.get(m, m) for m in methods], rotation=25, ha="right", fontsize=8)
    a0.axhline(0, color="k", lw=0.6)
    a0.set(ylabel="mean score", title="Shuffled explanations")
    a0.legend(fontsize=8)
    a1.bar(["trained model", "step0 (random init)"], [trained, step0], color=["tab:blue", "tab:grey"])
    a1.axhline(0, color="k", lw=0.6)
    a1.set_title(f"SAE recipe, layer {layer}")
    fig.tight_layout()
    return fig
