"""Notebook 04's summary of the comparisons: one table row per (comparison, size), the metrics file's numbers, a
sentence built from them, and the inputs of the figures."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd

from .. import analyses
from ..analyses.statistics import BIMODAL_SARLE, sarle_bimodality
from .nb04_mcs import Comparison, pooled

def summary_table(comparisons: Sequence[Comparison], threshold: float = 0.9) -> pd.DataFrame:
    """One row per (comparison, ratio), pooling the seeds: features of A (n, n_alive, n_dead), mmcs,
    share_above (share of live features with MCS >= threshold), share_random (MCS below the random null's 99 %
    quantile), sarle; the null's mean (null_mmcs, for random directions against B's live count); Hungarian
    mmcs_1to1 / share_above_1to1 where computed."""
    rows = []
    keys = dict.fromkeys((c.name, c.a.ratio) for c in comparisons)
    for name, ratio in keys:
        group = pooled(comparisons, name, ratio)
        v = np.concatenate([c.values for c in group])
        d = group[0].a.directions.shape[1]
        null_q99 = np.concatenate([np.full(c.values.size, analyses.null_mcs_quantile(0.99, c.n_ref, d))
                                   for c in group])
        null_mean = float(np.mean([analyses.null_mcs_mean(c.n_ref, d) for c in group]))
        row = {"comparison": name, "ratio": ratio, "n": group[0].a.n, "n_b": group[0].b.n,
               "n_alive": int(v.size), "n_dead": int(sum(c.a.n_dead for c in group)), "pairs": len(group),
               "mmcs": float(v.mean()), "share_above": float((v >= threshold).mean()),
               "share_random": float((v < null_q99).mean()), "sarle": sarle_bimodality(v),
               "null_mmcs": null_mean, "null_q99": float(null_q99.mean())}
        if all(c.matched is not None for c in group):
            m = np.concatenate([c.matched.numpy() for c in group])
            m = m[np.isfinite(m)]
            row["mmcs_1to1"] = float(m.mean())
            row["share_above_1to1"] = float((m >= threshold).mean())
        rows.append(row)
    return pd.DataFrame(rows)


def study_metrics(table: pd.DataFrame, threshold: float = 0.9) -> dict[str, Any]:
    """The 04_metrics.json keys, per dictionary size (number of features, as a string key):
    mmcs_vs_larger, share_above_<threshold> (of live features, vs the next-larger dictionary of the other seed),
    mmcs_across_seeds (+ _mean), random_baseline_mmcs (null for the vs-larger reference; _same_size for the
    across-seed one), the same-seed numbers, share_random and sarle for vs_larger, Hungarian 1:1 numbers, dead
    counts."""
    def per_size(name: str, col: str) -> dict[str, float]:
        sub = table[table["comparison"] == name]
        return {str(int(n)): float(v) for n, v in zip(sub["n"], sub[col]) if col in sub}

    out: dict[str, Any] = {
        "mmcs_vs_larger": per_size("vs_larger", "mmcs"),
        f"share_above_{threshold:g}": per_size("vs_larger", "share_above"),
        "mmcs_across_seeds": per_size("across_seeds", "mmcs"),
        "random_baseline_mmcs": per_size("vs_larger", "null_mmcs"),
        "random_baseline_mmcs_same_size": per_size("across_seeds", "null_mmcs"),
        "mmcs_vs_larger_same_seed": per_size("vs_larger_same_seed", "mmcs"),
        f"share_above_{threshold:g}_same_seed": per_size("vs_larger_same_seed", "share_above"),
        f"share_above_{threshold:g}_across_seeds": per_size("across_seeds", "share_above"),
        "share_like_random_vs_larger": per_size("vs_larger", "share_random"),
        "sarle_vs_larger": per_size("vs_larger", "sarle"),
    }
    if "mmcs_1to1" in table:
        out["mmcs_vs_larger_hungarian"] = per_size("vs_larger", "mmcs_1to1")
        out[f"share_above_{threshold:g}_hungarian"] = per_size("vs_larger", "share_above_1to1")
    seeds = out["mmcs_across_seeds"]
    out["mmcs_across_seeds_mean"] = float(np.mean(list(seeds.values()))) if seeds else float("nan")
    first = table.drop_duplicates("n")
    out["bimodal_vs_larger"] = {n: bool(b > BIMODAL_SARLE) for n, b in out["sarle_vs_larger"].items()}
    out["note"] = summary_sentence(table, threshold)
    # Summed over the seeds (each dictionary once): dead features are reported, never scored.
    out["dead_features"] = {str(int(n)): int(v) for n, v in zip(first["n"], first["n_dead"])}
    out["dead_fraction"] = {str(int(n)): float(v / (n * p)) for n, v, p in
                            zip(first["n"], first["n_dead"], first["pairs"])}
    return _rounded(out)


def _rounded(obj: Any, digits: int = 4) -> Any:
    """Floats to `digits` decimals (the write-up shows these tables; more digits would be noise)."""
    if isinstance(obj, dict):
        return {k: _rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, float):
        return round(obj, digits) if np.isfinite(obj) else obj
    return obj


def _span(values: Sequence[float], pct: bool = True) -> str:
    lo, hi = min(values), max(values)
    f = (lambda v: f"{100 * v:.0f}") if pct else (lambda v: f"{v:.2f}")
    return f"{f(lo)}{'%' if pct else ''}" if f(lo) == f(hi) else f"{f(lo)}-{f(hi)}{'%' if pct else ''}"


def summary_sentence(table: pd.DataFrame, threshold: float = 0.9) -> str:
    """What the run shows, in one sentence built from the numbers (for the metrics file and the write-up)."""
    vs = table[table["comparison"] == "vs_larger"]
    if not len(vs):
        return "no vs-larger comparison (one ratio only)"
    bimodal = int((vs["sarle"] > BIMODAL_SARLE).sum())
    text = (f"MCS vs the next-larger dictionary (other seed) is bimodal (Sarle > 5/9) at {bimodal} of {len(vs)} "
            f"sizes (Sarle {_span(list(vs['sarle']), pct=False)}); {_span(list(vs['share_above']))} of live "
            f"features reach {threshold:g}, {_span(list(vs['share_random']))} are no better than random directions")
    seeds = table[table["comparison"] == "across_seeds"]
    if len(seeds):
        text += f"; across seeds at the same size {_span(list(seeds['share_above']))} reach {threshold:g}"
    same = table[table["comparison"] == "vs_larger_same_seed"]
    if len(same):
        text += (f"; with the same seed (shared initialisation) {_span(list(same['share_above']))} reach it, an "
                 f"overestimate")
    return text + "."


# ----------------------------------------------------------------------------------------------------------------
# inputs for the figures


def histogram_panels(comparisons: Sequence[Comparison], names: Sequence[str], null_seed: int = 0
                     ) -> list[dict[str, Any]]:
    """One panel per ratio with the pooled MCS of each named comparison and a sampled random null (as many random
    directions as A's live features against as many as B's live features), for `plots.plot_mcs_panels`."""
    panels = []
    ratios = sorted({c.a.ratio for c in comparisons if c.name == names[0]})
    labels = {"vs_larger": "vs next-larger (other seed)", "vs_larger_same_seed": "vs next-larger (same seed)",
              "across_seeds": "vs same size (other seed)"}
    for r in ratios:
        series, first = {}, None
        for name in names:
            group = pooled(comparisons, name, r)
            if group:
                first = first or group[0]
                series[labels.get(name, name)] = np.concatenate([c.values for c in group])
        n_live = len(next(iter(series.values())))
        null = analyses.random_null(n_live, first.a.directions.shape[1], n_ref=first.n_ref, seed=null_seed)
        dead = sum(c.a.n_dead for c in pooled(comparisons, names[0], r))
        panels.append({"title": f"{first.a.n} vs {first.b.n} features", "series": series,
                       "null": null.samples.numpy(), "null_q99": null.q99, "n_dead": dead})
    return panels


def frequency_panels(comparisons: Sequence[Comparison], name: str = "vs_larger") -> list[dict[str, Any]]:
    """One panel per ratio: (log10 firing frequency, MCS) of A's live features, seeds pooled."""
    panels = []
    for r in sorted({c.a.ratio for c in comparisons if c.name == name}):
        group = pooled(comparisons, name, r)
        freq = np.concatenate([c.freq for c in group])
        panels.append({"title": f"{group[0].a.n} vs {group[0].b.n} features", "log10_freq": np.log10(freq),
                       "mcs": np.concatenate([c.values for c in group])})
    return panels


def bimodality_note(table: pd.DataFrame, threshold: float = 0.9) -> str:
    """One line per size saying whether MCS against the larger dictionary looks bimodal, with the numbers."""
    lines = []
    for _, row in table[table["comparison"] == "vs_larger"].iterrows():
        b = row["sarle"]
        verdict = "bimodal" if b > BIMODAL_SARLE else "not clearly bimodal"
        lines.append(f"{int(row['n'])} vs {int(row['n_b'])}: Sarle {b:.2f} ({verdict}); "
                     f"{row['share_above']:.0%} of live features >= {threshold:g}, {row['share_random']:.0%} "
                     f"no better than random directions, {int(row['n_dead'])} dead left out")
    return "\n".join(lines)
