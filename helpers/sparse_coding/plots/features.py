"""Figures of notebook 06: a "feature card" per case study (activation histogram, examples with coloured tokens,
logit-lens bars, ablation-effect bars), the ablation effects side by side, token ablation over a context, and the
loss with part of the dictionary. The inputs are the dicts `studies.nb06_case_studies.case_study` returns."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib import colormaps

from ..arguments import checked


_CMAP = colormaps["Oranges"]


def token_strip(ax, texts: Sequence[str], acts: Sequence[float], target: int | None, vmax: float, y: float,
                fontsize: float = 7.5) -> None:
    """Draw tokens left to right at height y (axes coordinates), each on a background whose colour grows with its
    activation (0 = white, vmax = dark); the target token is boxed. Monospace: a character is 0.6 em wide, so the
    tokens sit edge to edge; the strip stops at the axes' right edge."""
    fig = ax.figure
    width_in = ax.get_position().width * fig.get_figwidth()
    step = 0.6 * fontsize / 72 / width_in  # one character, in axes coordinates
    x = 0.0
    for i, (t, a) in enumerate(zip(texts, acts)):
        if x + step * len(t) > 1.0:
            break
        a = 0.0 if a is None or not np.isfinite(a) else float(a)
        colour = _CMAP(min(1.0, a / vmax) * 0.85) if vmax > 0 and a > 0 else (1, 1, 1, 1)
        edge = "black" if i == target else "none"
        ax.text(x, y, t, transform=ax.transAxes, family="monospace", fontsize=fontsize, va="center", ha="left",
                bbox={"boxstyle": "square,pad=0.05", "fc": colour, "ec": edge, "lw": 0.8})
        x += step * len(t)


def _example_text(study: Mapping[str, Any], ex) -> list[str]:
    texts = study["texts"]
    return [texts[t] if t >= 0 else "" for t in ex.tokens]


def _bars(ax, items: Sequence[tuple[str, float]], title: str, colour: str) -> None:
    labels = [t for t, _ in items][::-1]
    vals = [v for _, v in items][::-1]
    ax.barh(range(len(vals)), vals, color=colour)
    ax.set_yticks(range(len(vals)), labels, family="monospace", fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.tick_params(axis="x", labelsize=7)
    ax.xaxis.set_major_locator(plt.MaxNLocator(4))  # a narrow panel: the default 0.25 steps run into each other


@checked
def plot_feature_cards(studies: Mapping[str, Mapping[str, Any]], n_examples: int = 5) -> "plt.Figure":
    """One row (card) per case study ({role: study}), titled with the role, the feature's index and its firing
    frequency (% of tokens): the histogram of its activations over the occupied range of the mining grid's bins
    (lowest to highest non-empty; log-spaced bins, count log scale, at most 4 round tick values), the top and some
    quantile examples as coloured tokens, the logit lens (up and down), the zero-ablation log-prob drops."""
    from matplotlib.ticker import NullFormatter

    def log_ticks(a: float, b: float) -> list[float]:
        # Round values (1-2-5, then 1-3, then 1 per decade, then every k-th) that fit in [a, b]: the grid's bins
        # are a quarter octave wide, so matplotlib's own minor labels (2x10^-1, 3x10^-1, ...) collide.
        decades = range(int(np.floor(np.log10(a))), int(np.ceil(np.log10(b))) + 1)
        for mults in ((1, 2, 5), (1, 3), (1,)):
            ticks = [m * 10.0 ** e for e in decades for m in mults if a <= m * 10.0 ** e <= b]
            if len(ticks) <= 4:
                break
        ticks = ticks[::int(np.ceil(len(ticks) / 4))] if ticks else []
        return ticks if len(ticks) >= 2 else [float(f"{t:.2g}") for t in np.geomspace(a, b, 4)[1:3]]

    n = len(studies)
    fig, axes = plt.subplots(n, 4, figsize=(20, 3.3 * n), squeeze=False,
                             gridspec_kw={"width_ratios": [1.1, 3.2, 1.1, 1.1]})
    for row, (role, s) in zip(axes, studies.items()):
        edges, hist = np.asarray(s["edges"]), np.asarray(s["hist"])
        keep = hist > 0
        ax = row[0]
        if keep.any():  # the grid spans 2^-16 .. 2^16: only the occupied bins, or the card is all empty axis
            lo, hi = np.flatnonzero(keep)[[0, -1]]
            ax.stairs(hist[lo:hi + 1], edges[lo:hi + 2], fill=True, alpha=0.7)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlim(edges[lo], edges[hi + 1])
            ticks = log_ticks(edges[lo], edges[hi + 1])
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks], rotation=30, ha="right", fontsize=7)
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.tick_params(axis="y", which="both", labelsize=7)
        pct = 100 * s["frequency"]
        ax.set_title(f"{role}: feature {s['feature']}, fires on {pct:.3g}% of tokens\nskew {s['skew']:.1f}, "
                     f"kurtosis {s['kurtosis']:.0f}", fontsize=9)
        ax.set_xlabel("activation", fontsize=8)
        ax = row[1]
        ax.axis("off")
        vmax = s["max"]
        shown = [("top", e) for e in s["top"][:n_examples]]
        shown += [(f"{lo:.2g}-{hi:.2g}", exs[0]) for lo, hi, exs in s["quantiles"][::-3] if exs]
        for j, (label, e) in enumerate(shown[: 2 * n_examples]):
            y = 1 - (j + 0.5) / (2 * n_examples)
            ax.text(-0.01, y, f"{label} {e.value:.2f}", transform=ax.transAxes, fontsize=7, ha="right", va="center")
            token_strip(ax, _example_text(s, e), e.acts, e.target, vmax, y)
        ax.set_title("top examples, then examples from activation bins (boxed: the token the example is about)",
                     fontsize=9)
        _bars(row[2], s["logit_lens_up"][:6] + s["logit_lens_down"][:3][::-1], "logit lens (up / down)", "tab:blue")
        drops = s["effects"]["zero"].top_drops(6)
        _bars(row[3], [(s["texts"][t], v) for t, v in drops], "zero ablation: log-prob change", "tab:red")
    fig.tight_layout()
    return fig


@checked
def plot_ablation_effects(studies: Mapping[str, Mapping[str, Any]], k: int = 6) -> "plt.Figure":
    """Per case study (rows) and edit (columns: zero, rank_one, clamp): the output tokens whose mean log-probability
    falls (red) and rises (green) most at the edited positions, with the loss change in the title."""
    modes = ("zero", "rank_one", "clamp")
    fig, axes = plt.subplots(len(studies), 3, figsize=(14, 2.8 * len(studies)), squeeze=False)
    for row, (role, s) in zip(axes, studies.items()):
        for ax, mode in zip(row, modes):
            e = s["effects"][mode]
            items = [(s["texts"][t], v) for t, v in e.top_drops(k)] + [(s["texts"][t], v) for t, v in e.top_gains(k)]
            items.sort(key=lambda tv: tv[1])
            ax.barh(range(len(items)), [v for _, v in items],
                    color=["tab:red" if v < 0 else "tab:green" for _, v in items])
            ax.set_yticks(range(len(items)), [t for t, _ in items], family="monospace", fontsize=7)
            ax.axvline(0, color="k", lw=0.6)
            ax.set_title(f"{role} f{s['feature']} · {mode}: Δloss {e.loss_edited - e.loss_clean:+.4f} nats "
                         f"({e.n_positions} pos.)", fontsize=8)
            ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    return fig


@checked
def plot_token_ablation(studies: Mapping[str, Mapping[str, Any]], last: int = 24) -> "plt.Figure":
    """Per case study: the feature's activation drop at its strongest token when each earlier token (of the last
    `last`) is replaced by neutral tokens drawn from the corpus' unigram distribution (the mean over the draws,
    `ablation.token_ablation`), one bar per input token; the rightmost is the token itself."""
    fig, axes = plt.subplots(len(studies), 1, figsize=(12, 2.4 * len(studies)), squeeze=False)
    for ax, (role, s) in zip(axes[:, 0], studies.items()):
        drops = np.asarray(s["token_ablation"])[-last:]
        toks = [s["texts"][t] for t in s["token_ablation_tokens"]][-last:]
        ax.bar(range(len(drops)), drops, color=["tab:purple"] * (len(drops) - 1) + ["tab:orange"])
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xticks(range(len(toks)), toks, rotation=60, family="monospace", fontsize=7, ha="right")
        ax.set_ylabel("activation drop", fontsize=8)
        draws = s.get("token_ablation_draws")
        ax.set_title(f"{role} f{s['feature']}: which input tokens cause it (activation {s['top'][0].value:.2f}; "
                     f"each token replaced by corpus-frequency tokens, mean of {draws} draws)", fontsize=9)
    fig.tight_layout()
    return fig


@checked
def plot_loss_by_feature_set(loss: Mapping[str, Any]) -> "plt.Figure":
    """The fraction of the loss recovered (0: the error-only model, every feature ablated; 1: every feature kept,
    i.e. the clean model; the error term kept throughout) by only the high-MCS features, by frequency-matched random
    sets of the same size (their mean, error bars the 2.5-97.5 percentiles over the draws) and by every feature but
    the high-MCS ones. The inputs are `studies.nb06_case_studies.loss_by_feature_set`'s."""
    n, rnd = loss["n_high_mcs"], loss["loss_recovered_random_same_count"]
    labels = [f"only the {n}\nhigh-MCS features", f"{n} random features\n(frequency-matched,\n{rnd['draws']} draws)",
              f"all but the {n}\nhigh-MCS features"]
    vals = [loss["loss_recovered_high_mcs_only"], rnd["mean"], loss["loss_recovered_without_high_mcs"]]
    err = [[0, rnd["mean"] - rnd["low"], 0], [0, rnd["high"] - rnd["mean"], 0]]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    bars = ax.bar(labels, vals, yerr=err, capsize=6, color=["tab:green", "tab:orange", "tab:blue"])
    for b, v in zip(bars, vals):
        ax.annotate(f"{v:.3f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=9,
                    xytext=(12, 2), textcoords="offset points")
    ax.axhline(0, color="k", lw=0.8, ls="--")
    ax.axhline(1, color="k", lw=0.8, ls="--")
    ax.text(1.01, 0, f"error only\n({loss['loss_error_only']:.3f} nats)", transform=ax.get_yaxis_transform(),
            va="center", fontsize=8)
    ax.text(1.01, 1, f"all features\n({loss['loss_all_features_with_error']:.3f} nats)",
            transform=ax.get_yaxis_transform(), va="center", fontsize=8)
    data = [v for v in vals + [rnd["low"], rnd["high"]] if np.isfinite(v)]
    ax.set_ylim(min([0.0] + data) - 0.05, max([1.0] + data) + 0.08)
    ax.set_ylabel("fraction of loss recovered")
    ax.set_title(f"Do the features a same-recipe, other-seed dictionary also found (MCS >= "
                 f"{loss['mcs_threshold']:g}) carry the loss?", fontsize=10)
    fig.tight_layout()
    return fig
