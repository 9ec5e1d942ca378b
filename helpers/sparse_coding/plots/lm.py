"""Figures of notebooks 00 and 02: the offline model's loss curves, and the residual stream's norms and PCA spectrum
per layer."""

from __future__ import annotations

from typing import Mapping

import matplotlib.pyplot as plt
import numpy as np
import torch

from ..arguments import checked



@checked
def plot_lm_loss(metrics: Mapping, history: Mapping, smooth: int = 20) -> "plt.Figure":
    """Training loss (per step, faint; smoothed, solid), the periodic validation estimate and the final validation
    loss against step, with the unigram entropy and the 0.55 × target, and ticks at the saved revisions.
    metrics / history: `train_offline_model(...)["metrics"]` and `["history"]`."""
    fig, ax = plt.subplots(figsize=(7, 4))
    tl = np.array(history["train_loss"])
    sm = np.convolve(tl, np.ones(smooth) / smooth, mode="valid") if len(tl) >= smooth else tl
    ax.plot(history["step"], tl, color="C0", alpha=0.25, lw=0.8)
    ax.plot(history["step"][len(history["step"]) - len(sm):], sm, color="C0", label="train (smoothed)")
    ax.plot(history["val_step"], history["val_loss"], "o-", color="C1", ms=3, label="validation estimate")
    ax.plot(history["val_step"][-1], metrics["val_loss"], "*", color="C3", ms=12,
            label=f"final validation, all {metrics['val_tokens']} tokens")
    H = metrics["unigram_entropy"]
    ax.axhline(H, ls="--", color="k", label=f"unigram entropy {H:.2f}")
    ax.axhline(0.55 * H, ls=":", color="k", label="0.55 × unigram entropy")
    for c in metrics["checkpoints"]:
        ax.axvline(int(c[4:]), ymax=0.03, color="grey", lw=0.8)
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)",
           title=f"{metrics['n_layers']}-layer d={metrics['d_model']} GPT-NeoX on stdlib source")
    ax.legend(fontsize=8)
    return fig


@checked
def plot_activation_norms(samples: Mapping[str, torch.Tensor], layers: list[int], title: str) -> "plt.Figure":
    """Violin plot of ‖x‖₂ per token (log scale), one violin per hook. samples: {hook: [rows, d]}."""
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.violinplot([x.norm(dim=1).numpy() for x in samples.values()], showmedians=True)
    ax.set_yscale("log")
    ax.set_xticks(range(1, len(samples) + 1), [f"L{L}" for L in layers], fontsize=9)
    ax.set(xlabel="layer", ylabel="‖x‖₂ per token (log)", title=title)
    return fig


@checked
def pca_spectrum(x: torch.Tensor) -> np.ndarray:
    """Explained-variance ratio of each principal direction of x [rows, d], descending."""
    ev = torch.linalg.svdvals(x - x.mean(0)).pow(2)
    return (ev / ev.sum()).numpy()


@checked
def plot_pca_spectra(samples: Mapping[str, torch.Tensor], layers: list[int], title: str
                     ) -> tuple["plt.Figure", dict[str, int]]:
    """Explained-variance ratio per principal component (log-log), one line per hook; returns the figure and, per
    hook, how many directions hold 90 % of the variance."""
    fig, ax = plt.subplots(figsize=(7, 4))
    k90 = {}
    for (h, x), L in zip(samples.items(), layers):
        ev = pca_spectrum(x)
        k90[h] = int(np.searchsorted(np.cumsum(ev), 0.9) + 1)
        ax.plot(np.arange(1, len(ev) + 1), ev, label=f"L{L} (90 % in {k90[h]} dims)")
    ax.set(xscale="log", yscale="log", xlabel="principal component", ylabel="explained variance ratio", title=title)
    ax.legend(fontsize=8)
    return fig, k90
