"""Figures of notebook 07: interpretability scores per method and layer with 95 % intervals (the paper's Figure 2
analogue) and the ceiling, top-only vs random-only scores, detection and fuzzing, score against firing frequency,
score against MCS to the same recipe's other seed, and the controls."""

from __future__ import annotations

import math
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
def plot_scores_by_layer(scores: Mapping[str, Mapping[str, Any]], methods: Sequence[str], explainer: str,
                         ceiling: Mapping[str, Mapping[str, Any]] | None = None) -> "plt.Figure":
    """Mean top-and-random score per method (bars) and layer (groups), 95 % bootstrap intervals over directions;
    with `ceiling` ({layer: {method: {"mean"}}}) a black tick per bar at the 8-entry token table fitted on the same
    test fragments."""
    fig, ax = plt.subplots(figsize=(12, 4.5))
    _grouped(ax, scores, methods, "score_mean", "score_ci_low", "score_ci_high")
    if ceiling:
        _ticks(ax, list(scores), methods, lambda L, m: (ceiling.get(L, {}).get(m) or {}).get("mean"),
               "ceiling (token table fitted on the test fragments)")
    ax.set(ylabel="interpretability score (Pearson r)",
           title=f"Explain-simulate-score per method and layer ({explainer} explainer; 95 % intervals)")
    ax.legend(fontsize=8, ncol=4, loc="upper right")
    return fig


def _ticks(ax, layers: Sequence[str], methods: Sequence[str], value, label: str) -> None:
    """A black tick across each bar of `_grouped` at value(layer, method) (None or NaN: no tick), labelled once."""
    width, first = 0.8 / len(methods), True
    for i, L in enumerate(layers):
        for j, m in enumerate(methods):
            v = value(L, m)
            if v is not None and v == v:
                x = i + (j - (len(methods) - 1) / 2) * width
                ax.plot([x - width / 2, x + width / 2], [v, v], color="k", lw=1.5, label=label if first else None)
                first = False


def _grouped_iv(ax, ivs: Mapping[str, Mapping[str, Mapping[str, float]]], methods: Sequence[str]) -> None:
    """Bars per layer (groups) and method with their {"mean", "low", "high"} intervals."""
    flat = {L: {m: {"v": iv["mean"], "lo": iv["low"], "hi": iv["high"]} for m, iv in ms.items()}
            for L, ms in ivs.items()}
    _grouped(ax, flat, methods, "v", "lo", "hi")


@checked
def plot_top_vs_random(top: Mapping[str, Mapping[str, Any]], random: Mapping[str, Mapping[str, Any]],
                       methods: Sequence[str]) -> "plt.Figure":
    """Top-only (left) and random-only (right) mean scores per method and layer, each {layer: {method: {"mean",
    "low", "high"}}} with its 95 % bootstrap interval over directions."""
    fig, axes = plt.subplots(1, 2, figsize=(15, 4.2), sharey=True)
    for ax, ivs, name in ((axes[0], top, "top-only"), (axes[1], random, "random-only")):
        _grouped_iv(ax, ivs, methods)
        ax.set_title(f"{name} score (95 % intervals)")
    axes[0].set_ylabel("mean Pearson r")
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


@checked
def plot_detection_fuzzing(detection: Mapping[str, Mapping[str, Any]], fuzzing: Mapping[str, Mapping[str, Any]],
                           methods: Sequence[str], control: Mapping[str, Mapping[str, float]] | None = None
                           ) -> "plt.Figure":
    """Detection (left) and fuzzing (right) balanced accuracy per method and layer (arXiv 2410.13928), 95 %
    intervals; chance is 0.5. control ({"layer/method": {"detection", "fuzzing"}}): the same scores with another
    direction's explanation, drawn as a black tick on each bar — a bar is read against its tick, not against 0.5."""
    fig, axes = plt.subplots(1, 2, figsize=(15, 4.2), sharey=True)
    for ax, ivs, key, name in ((axes[0], detection, "detection", "detection: activating vs silent contexts"),
                               (axes[1], fuzzing, "fuzzing", "fuzzing: most active vs random silent tokens")):
        _grouped_iv(ax, ivs, methods)
        if control:
            _ticks(ax, list(ivs), methods, lambda L, m: (control.get(f"{L}/{m}") or {}).get(key),
                   "with another direction's explanation")
        ax.axhline(0.5, color="grey", ls="--", lw=0.8)
        ax.set_title(name)
        ax.set_ylim(0, 1.05)
    axes[0].set_ylabel("balanced accuracy")
    axes[1].legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    return fig


@checked
def plot_score_vs_frequency(points: Mapping[str, tuple[np.ndarray, np.ndarray]],
                            binned: Mapping[str, Mapping[str, list]]) -> "plt.Figure":
    """Each scored direction's score against its firing frequency (share of tokens, log scale), one colour per
    method (points: {method: (frequency [n], score [n])}), with the binned means (`nb07_summary.score_by_frequency`)
    as lines: is a ranking a frequency effect?"""
    fig, ax = plt.subplots(figsize=(9, 4.8))
    for (m, (f, sc)), c in zip(points.items(), sns.color_palette("deep", len(points))):
        ax.scatter(np.clip(f, 1e-6, 1), sc, s=6, alpha=0.25, color=c)
        e = np.asarray(binned[m]["edges"])
        mids = np.sqrt(e[:-1] * e[1:])
        mean = np.asarray(binned[m]["mean"], dtype=float)
        ax.plot(mids, mean, "-o", color=c, ms=3, label=LABELS.get(m, m))
    ax.set(xscale="log", xlabel="firing frequency (share of tokens)", ylabel="top-and-random score",
           title="Score against firing frequency (points: directions, all layers; lines: binned means)")
    ax.legend(fontsize=7, ncol=2)
    return fig


@checked
def plot_score_vs_mcs(score: np.ndarray, mcs: np.ndarray, rho: float, title: str,
                      xlabel: str = "MCS with the same recipe trained from another seed") -> "plt.Figure":
    """Each scored SAE feature's score against its MCS with the reference dictionary."""
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.scatter(mcs, score, s=12, alpha=0.6)
    ax.set(xlabel=xlabel, ylabel="interpretability score",
           title=f"{title}\nSpearman ρ = {rho:.2f} over {len(score)} features")
    return fig


@checked
def plot_controls(real: Mapping[str, Mapping[str, float]], shuffled: Mapping[str, float],
                  step0: Mapping[str, Mapping[str, float]], layer: str) -> "plt.Figure":
    """Left: each method's mean score ({method: {"mean", "low", "high"}}, 95 % intervals) with its own explanations
    and with shuffled ones. Right: the SAE recipe on the trained model vs on the randomly initialised one (step0),
    same token budget, at one layer ({"trained": iv, "step0": iv})."""
    for name, ivs in (("real", real), ("step0", step0)):
        bad = [k for k, iv in ivs.items() for v in (iv["mean"], iv["low"], iv["high"]) if math.isinf(v)]
        if bad:
            raise ValueError(f"{name}[{bad[0]!r}] holds an infinite value: pass finite means and interval ends, or "
                             f"NaN for what was not measured")
    fig, (a0, a1) = plt.subplots(1, 2, figsize=(13, 4), gridspec_kw={"width_ratios": [3, 1]})
    methods = list(real)
    xs = np.arange(len(methods))
    v = np.array([real[m]["mean"] for m in methods])
    err = np.vstack([v - [real[m]["low"] for m in methods], np.array([real[m]["high"] for m in methods]) - v])
    a0.bar(xs - 0.2, v, 0.4, yerr=err, capsize=2, label="own explanation")
    a0.bar(xs + 0.2, [shuffled[m] for m in methods], 0.4, label="another direction's explanation")
    a0.set_xticks(xs, [LABELS.get(m, m) for m in methods], rotation=25, ha="right", fontsize=8)
    a0.axhline(0, color="k", lw=0.6)
    a0.set(ylabel="mean score", title="Shuffled explanations (95 % intervals)")
    a0.legend(fontsize=8)
    names = [k for k in ("trained", "step0") if k in step0]
    v1 = np.array([step0[k]["mean"] for k in names])
    e1 = np.vstack([v1 - [step0[k]["low"] for k in names], np.array([step0[k]["high"] for k in names]) - v1])
    a1.bar(["trained model" if k == "trained" else "step0 (random init)" for k in names], v1, yerr=e1, capsize=3,
           color=["tab:blue", "tab:grey"][:len(names)])
    a1.axhline(0, color="k", lw=0.6)
    a1.set_title(f"SAE recipe, layer {layer}, same tokens")
    fig.tight_layout()
    return fig
