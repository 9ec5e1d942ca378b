"""Notebook 07's summary: per layer and method the explain-simulate-score mean with its interval, detection and
fuzzing balanced accuracies, the ceiling of the token-table form, paired differences to the SAE and to the neuron
basis (an ordering is stated only where the paired interval excludes 0), and the score against firing frequency."""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import pandas as pd

from ..analyses.interpretability import bootstrap_ci
from ..analyses.paired import paired_difference

FREQ_EDGES = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # firing frequency bins (share of tokens) of the frequency figure


def interval(values, seed: int = 0) -> dict[str, float | int]:
    """{"mean", "low", "high", "n"}: mean and 95 % percentile bootstrap interval over directions (NaNs left out)."""
    v = [float(x) for x in values if x == x]
    mean, lo, hi, _ = bootstrap_ci(v, seed=seed)
    return {"mean": mean, "low": lo, "high": hi, "n": len(v)}


def summarize(table: pd.DataFrame, seed: int = 0) -> dict[str, float]:
    """score_mean / score_ci_low / score_ci_high (bootstrap 95 % over directions) / score_se95 (1.96·SE) of the
    top-and-random score, the top-only and random-only means, n_scored, n_skipped (fewer than 20 firing fragments
    on a side)."""
    vals = table["top_and_random"].tolist() if len(table) else []
    mean, lo, hi, se95 = bootstrap_ci(vals, seed=seed)
    nan = float("nan")
    return {"score_mean": mean, "score_ci_low": lo, "score_ci_high": hi, "score_se95": se95,
            "top_mean": float(table["top"].mean()) if len(table) else nan,
            "random_mean": float(table["random"].mean()) if len(table) else nan,
            "n_scored": int(len(table)), "n_skipped": int(table.attrs.get("skipped", 0))}


def _by_layer(tables: Mapping[str, pd.DataFrame], fn) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key, t in tables.items():
        layer, method = key.split("/")
        out.setdefault(layer, {})[method] = fn(t)
    return out


def column(tables: Mapping[str, pd.DataFrame], name: str, seed: int = 0) -> dict[str, dict[str, dict]]:
    """{layer: {method: interval(column)}} for a per-direction column (detection, fuzzing, ceiling, ...)."""
    return _by_layer(tables, lambda t: interval(t[name] if len(t) else [], seed))


def paired(tables: Mapping[str, pd.DataFrame], reference: str, seed: int = 0, n_boot: int = 2000
           ) -> dict[str, dict[str, dict]]:
    """{layer: {method: paired_difference(method − reference)}} of the top-and-random score (see
    `analyses.paired`); the reference method itself left out."""
    out: dict[str, dict[str, dict]] = {}
    for key, t in tables.items():
        layer, method = key.split("/")
        ref = tables.get(f"{layer}/{reference}")
        if method == reference or ref is None:
            continue
        a = (list(t["sums"]), list(t["docs"])) if len(t) else ([], [])
        b = (list(ref["sums"]), list(ref["docs"])) if len(ref) else ([], [])
        out.setdefault(layer, {})[method] = paired_difference(*a, *b, n_boot=n_boot, seed=seed)
    return out


def separated_ordering(scores: Mapping[str, Mapping[str, Mapping[str, float]]],
                       to_sae: Mapping[str, Mapping[str, Mapping]]) -> dict[str, list[str]]:
    """Per layer, sentences of what the paired intervals separate from the SAE: "sae > pca" where the interval of
    pca − sae lies below 0, "pca > sae" above, "sae ~ pca (not separated)" otherwise."""
    out = {}
    for layer, diffs in to_sae.items():
        lines = []
        for m, d in sorted(diffs.items(), key=lambda kv: -np.nan_to_num(scores[layer][kv[0]]["score_mean"], nan=-9)):
            lines.append(f"{m} > sae" if d["separated"] and d["low"] > 0 else
                         f"sae > {m}" if d["separated"] else f"sae ~ {m} (not separated)")
        out[layer] = lines
    return out


def ordering(scores: Mapping[str, Mapping[str, Mapping[str, float]]]) -> dict[str, list[str]]:
    """Per layer, the methods sorted by mean score, best first (an ordering of means, not of separated ones)."""
    return {layer: sorted(ms, key=lambda m: -np.nan_to_num(ms[m]["score_mean"], nan=-9)) for layer, ms in scores.items()}


def score_by_frequency(tables: Mapping[str, pd.DataFrame], edges=FREQ_EDGES) -> dict[str, dict[str, list]]:
    """{method: {"edges", "mean", "n"}}: the mean top-and-random score of the method's scored directions (all
    layers pooled) per firing-frequency bin, so a reader sees whether a ranking is a frequency effect."""
    out: dict[str, dict[str, list]] = {}
    for key, t in tables.items():
        method = key.split("/")[1]
        entry = out.setdefault(method, {"edges": list(edges), "_f": [], "_s": []})
        if len(t):
            entry["_f"] += t["frequency"].tolist()
            entry["_s"] += t["top_and_random"].tolist()
    for entry in out.values():
        f, s = np.asarray(entry.pop("_f")), np.asarray(entry.pop("_s"))
        b = np.digitize(f, edges[1:-1]) if f.size else f
        entry["mean"] = [float(np.nanmean(s[b == i])) if (b == i).any() else math.nan for i in range(len(edges) - 1)]
        entry["n"] = [int((b == i).sum()) for i in range(len(edges) - 1)]
    return out


def shuffled_means(shuffled: Mapping[str, pd.DataFrame]) -> dict[str, dict[str, float]]:
    """{"layer/method": {"score", "detection", "fuzzing"}} means under the shuffled-explanation control."""
    return {k: {c: float(t[c].mean()) if len(t) else math.nan for c in ("top_and_random", "detection", "fuzzing")}
            for k, t in shuffled.items()}


def scores(tables: Mapping[str, pd.DataFrame], seed: int = 0) -> dict[str, dict[str, dict]]:
    """{layer: {method: summarize(table)}} (the `scores` key of 07_metrics.json)."""
    return _by_layer(tables, lambda t: summarize(t, seed))


def frequency_points(tables: Mapping[str, pd.DataFrame]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{method: (firing frequency [n], top-and-random score [n])} of every scored direction, layers pooled."""
    out: dict[str, tuple[list, list]] = {}
    for key, t in tables.items():
        f, s = out.setdefault(key.split("/")[1], ([], []))
        if len(t):
            f += t["frequency"].tolist()
            s += t["top_and_random"].tolist()
    return {m: (np.asarray(f), np.asarray(s)) for m, (f, s) in out.items()}


def paired_by_frequency(tables: Mapping[str, pd.DataFrame], reference: str = "sae", edges=FREQ_EDGES,
                        seed: int = 0, n_boot: int = 2000, min_n: int = 10) -> dict[str, dict[str, dict]]:
    """{"lo-hi" frequency bin: {method: paired_difference(method − reference)}} with every layer's directions
    pooled and only those firing within the bin kept on both sides: the comparison at matched firing frequency.
    Bins where either side has fewer than `min_n` directions are left out."""
    parts: dict[str, list[pd.DataFrame]] = {}
    for key, t in tables.items():
        parts.setdefault(key.split("/")[1], []).append(t)
    pooled = {m: pd.concat([t for t in ts if len(t)]) if any(len(t) for t in ts) else ts[0] for m, ts in parts.items()}
    out: dict[str, dict[str, dict]] = {}
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = {m: t[(t["frequency"] >= lo) & (t["frequency"] < hi)] if len(t) else t for m, t in pooled.items()}
        ref = inside.get(reference)
        if ref is None or len(ref) < min_n:
            continue
        for m, t in inside.items():
            if m != reference and len(t) >= min_n:
                out.setdefault(f"{lo:g}-{hi:g}", {})[m] = paired_difference(
                    list(t["sums"]), list(t["docs"]), list(ref["sums"]), list(ref["docs"]), n_boot=n_boot, seed=seed)
    return out


def save_tables(tables: Mapping[str, pd.DataFrame], shuffled: Mapping[str, pd.DataFrame], path) -> Any:
    """Every scored direction's row (its explanation and scores; the fragment sums left out) of both passes as
    JSON at `path` ({"layer/method": [row, ...]}, NaN as null), so that a reader can audit any summary number."""
    from ..files import save_json

    def rows(t: pd.DataFrame) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "sums"} for r in t.to_dict("records")] if len(t) else []
    return save_json(path, {"own": {k: rows(t) for k, t in tables.items()},
                            "shuffled": {k: rows(t) for k, t in shuffled.items()}})
