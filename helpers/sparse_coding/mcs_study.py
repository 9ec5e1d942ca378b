"""Notebook 04: how much of a dictionary is found again by a larger one, by another seed, and by chance.

A *ladder* is one SAE kind trained at several dictionary ratios and seeds on one activation store. For every
dictionary we take its unit decoder directions and its firing frequency on held-out activation rows (rows no seed
trained on); features that never fire there are dead and are left out of every MCS number (and counted).

Three comparisons, each a max cosine similarity (MCS) per feature of the smaller / first dictionary:

* ``vs_larger``: size n against size 2n **of the other seed**. Same-seed dictionaries of different sizes start
  from the same random directions (the first n rows of the larger one's initial decoder *are* the smaller one's, since
  `sae._init_member` draws them from one generator) and see the same batches, so a same-seed comparison partly
  measures the shared start. It is kept as ``vs_larger_same_seed`` to show how much that inflates the numbers.
* ``across_seeds``: the same size, the other seed (both directions).
* the random null: the MCS of random directions of the same width against as many random directions as the
  reference has live features (`similarity.null_mcs_mean` / `null_mcs_quantile`).

A feature "looks random" when its MCS is below the null's 99 % quantile. Bimodality is summarised by Sarle's
coefficient (> 5/9, the value of a uniform distribution, suggests two modes) and by the shares in each mode.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from . import evaluate, similarity, sweep
from .activations import ActivationStore
from .sae_io import SWEEP_FILE

OWN_SUBDIR = "04_mcs"
"""Where notebook 04 keeps its own sweeps (under data_dir), so it never takes a folder notebook 03 will want."""

BIMODAL_SARLE = 5 / 9
COMPARISONS = ("vs_larger", "vs_larger_same_seed", "across_seeds")


# ----------------------------------------------------------------------------------------------------------------
# training the ladder


def _check_ladder(ratios: Sequence[float], seeds: Sequence[int]) -> tuple[list[float], list[int]]:
    ratios = [float(r) for r in ratios]
    if len(ratios) < 2 or any(not r > 0 for r in ratios) or sorted(set(ratios)) != ratios:
        raise ValueError(f"ratios must be at least two distinct positive values in increasing order, e.g. "
                         f"[1, 2, 4, 8]; got {ratios}")
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be one or more distinct ints, e.g. [0, 1] (two seeds give the cross-seed "
                         f"comparisons); got {seeds}")
    return ratios, seeds


def train_or_reuse(store: ActivationStore, kind: str, ratio: float, hparams: Mapping[str, Any], *,
                   data_dir: str | os.PathLike = "data", seed: int = 0, retrain: bool = False,
                   **kwargs: Any) -> sweep.LMSweep:
    """One sweep: reused from data_dir's shared dictionaries (e.g. notebook 03's) when that folder holds exactly
    these settings, otherwise trained (or reused) under data_dir/04_mcs. Never writes into the shared folder, so
    a later notebook-03 run with its own settings cannot collide with ours. retrain=True replaces a sweep of
    ours (under 04_mcs) saved with other settings; without it that is a FileExistsError."""
    shared = sweep.sweep_dir(data_dir, store, kind, ratio, seed)
    if (shared / SWEEP_FILE).exists():
        try:
            return sweep.train_lm_sweep(store, kind, ratio, hparams, data_dir=data_dir, seed=seed, retrain=False,
                                        **kwargs)
        except FileExistsError:
            pass  # other settings there: not ours to reuse or replace
    return sweep.train_lm_sweep(store, kind, ratio, hparams, data_dir=Path(data_dir) / OWN_SUBDIR, seed=seed,
                                retrain=retrain, **kwargs)


def train_ladder(store: ActivationStore, kind: str, hparams: Mapping[str, Any], ratios: Sequence[float],
                 seeds: Sequence[int], **kwargs: Any) -> dict[tuple[float, int], sweep.LMSweep]:
    """{(ratio, seed): LMSweep} for every ratio and seed (see `train_or_reuse`); kwargs go to
    `sweep.train_lm_sweep` (data_dir, n_tokens, batch_size, lr, device, progress, train options)."""
    ratios, seeds = _check_ladder(ratios, seeds)
    return {(r, s): train_or_reuse(store, kind, r, hparams, seed=s, **kwargs) for r in ratios for s in seeds}


# ----------------------------------------------------------------------------------------------------------------
# held-out rows and firing frequencies


def training_rows(n_rows: int, n_tokens: int, batch_size: int, seed: int) -> np.ndarray:
    """Bool mask [n_rows] of the store rows `sweep.train_lm_sweep` trains on: n_tokens // batch_size full batches
    of `ActivationStore.batches(batch_size, seed, drop_last=True)`, whose epoch e is the permutation drawn from
    numpy's default_rng([seed, e])."""
    if n_rows < batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be in [1, n_rows={n_rows}], got {batch_size}")
    need = (int(n_tokens) // int(batch_size)) * int(batch_size)
    per_epoch = (n_rows // batch_size) * batch_size
    seen = np.zeros(n_rows, dtype=bool)
    epoch = 0
    while need > 0 and not seen.all():
        take = min(need, per_epoch)
        seen[np.random.default_rng([seed, epoch]).permutation(n_rows)[:take]] = True
        need -= take
        epoch += 1
    return seen


def held_out_rows(store: ActivationStore, n_tokens: int, batch_size: int, seeds: Sequence[int], n_rows: int,
                  seed: int = 0) -> tuple[np.ndarray, bool]:
    """(sorted row indices, held_out): n_rows rows that none of the seeds trained on, drawn with `seed`. When the
    store has fewer such rows (training covered it), a seeded sample of all rows with held_out=False: report that
    flag next to dead-feature counts, since rows seen in training can only make features look more alive."""
    if isinstance(n_rows, bool) or not isinstance(n_rows, int) or n_rows < 1:
        raise ValueError(f"n_rows must be a positive int (rows for the firing frequencies), got {n_rows!r}")
    seen = np.zeros(store.n_tokens, dtype=bool)
    for s in seeds:
        seen |= training_rows(store.n_tokens, n_tokens, batch_size, int(s))
    pool, held_out = np.nonzero(~seen)[0], True
    if pool.size < n_rows:
        pool, held_out = np.arange(store.n_tokens), False
    rng = np.random.default_rng([seed, 4])
    return np.sort(rng.choice(pool, size=min(n_rows, pool.size), replace=False)), held_out


def firing_frequency(sae: Any, store: ActivationStore, rows: np.ndarray, batch_size: int = 4096,
                     progress: bool = False) -> torch.Tensor:
    """[E, n] share of the given rows on which each feature fires (`evaluate.sparsity_stats`)."""
    batches = (store.rows(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size))
    _, freq = evaluate.sparsity_stats(sae, batches, progress=progress)
    return freq


@dataclass
class Dictionary:
    """One trained dictionary: unit directions [n, d] (CPU), firing frequency [n] on held-out rows, alive mask."""

    ratio: float
    seed: int
    directions: torch.Tensor
    freq: torch.Tensor

    @property
    def n(self) -> int:
        return self.directions.shape[0]

    @property
    def alive(self) -> torch.Tensor:
        return self.freq > 0

    @property
    def n_dead(self) -> int:
        return int((~self.alive).sum())


def dictionaries(runs: Mapping[tuple[float, int], sweep.LMSweep], store: ActivationStore, rows: np.ndarray,
                 member: int = 0, progress: bool = False) -> dict[tuple[float, int], Dictionary]:
    """The `member`-th SAE of every sweep as a `Dictionary` with its firing frequency on `rows`."""
    out = {}
    for key, run in runs.items():
        E = run.sae.n_members
        if isinstance(member, bool) or not isinstance(member, int) or not 0 <= member < E:
            raise ValueError(f"member must be an index into the sweep's {E} members (one per hyperparameter "
                             f"value), got {member!r}")
        freq = firing_frequency(run.sae, store, rows, progress=progress)[member]
        out[key] = Dictionary(key[0], key[1], run.sae.decoder_directions()[member].float().cpu(), freq.cpu())
    return out


# ----------------------------------------------------------------------------------------------------------------
# comparisons


def sarle_bimodality(values: np.ndarray | torch.Tensor) -> float:
    """Sarle's bimodality coefficient (skew² + 1) / (excess kurtosis + 3 (n−1)² / ((n−2)(n−3))), with the
    bias-corrected sample skewness and kurtosis: 1/3 for a normal, 5/9 for a uniform, 1 for two equal spikes.
    Above 5/9 suggests two modes. NaN for fewer than 4 finite values or a constant sample."""
    from scipy.stats import kurtosis, skew

    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    n = v.size
    if n < 4 or np.ptp(v) == 0:
        return float("nan")
    g, k = skew(v, bias=False), kurtosis(v, bias=False)
    return float((g * g + 1) / (k + 3 * (n - 1) ** 2 / ((n - 2) * (n - 3))))


@dataclass
class Comparison:
    """MCS of every feature of dictionary A against dictionary B (NaN where A's feature is dead)."""

    name: str            # one of COMPARISONS
    a: Dictionary
    b: Dictionary
    result: similarity.MCSResult
    matched: torch.Tensor | None = None   # [n_A] Hungarian 1:1 cosine (NaN unmatched/dead), if computed

    @property
    def values(self) -> np.ndarray:
        """MCS of A's live features (dead ones left out)."""
        return self.result.a_to_b[self.result.alive_a].double().cpu().numpy()

    @property
    def freq(self) -> np.ndarray:
        """Firing frequency of the same live features, in the same order as `values`."""
        return self.a.freq[self.result.alive_a.cpu()].double().numpy()

    @property
    def n_ref(self) -> int:
        """Live features of B: the number of directions A's features had to choose from."""
        return int(self.result.alive_b.sum())


def compare(name: str, a: Dictionary, b: Dictionary, hungarian: bool = False) -> Comparison:
    res = similarity.mcs(a.directions, b.directions, a.alive, b.alive)
    matched = None
    if hungarian:
        matched = similarity.hungarian_match(a.directions, b.directions, a.alive, b.alive).a_to_b()
    return Comparison(name, a, b, res, matched)


def compare_ladder(dicts: Mapping[tuple[float, int], Dictionary], hungarian: bool = True) -> list[Comparison]:
    """Every comparison of the ladder: vs_larger (next ratio, next seed in the list; the same seed when there is
    only one), vs_larger_same_seed (with two or more seeds), and across_seeds (same ratio, seed s against the next
    seed, cyclically, so with seeds [0, 1] both 0→1 and 1→0). Hungarian 1:1 cosines for vs_larger if asked."""
    ratios = sorted({r for r, _ in dicts})
    seeds = sorted({s for _, s in dicts}, key=[s for _, s in dicts].index)
    missing = [(r, s) for r in ratios for s in seeds if (r, s) not in dicts]
    if missing:
        raise ValueError(f"the ladder is incomplete: no dictionary for (ratio, seed) {missing}; train every ratio "
                         f"at every seed (train_ladder)")
    _check_ladder(ratios, seeds)
    out = []
    for r, R in zip(ratios[:-1], ratios[1:]):
        for j, s in enumerate(seeds):
            t = seeds[(j + 1) % len(seeds)]
            out.append(compare("vs_larger", dicts[r, s], dicts[R, t], hungarian=hungarian))
            if len(seeds) > 1:
                out.append(compare("vs_larger_same_seed", dicts[r, s], dicts[R, s]))
    if len(seeds) > 1:
        for r in ratios:
            for j, s in enumerate(seeds):
                out.append(compare("across_seeds", dicts[r, s], dicts[r, seeds[(j + 1) % len(seeds)]]))
    return out


def pooled(comparisons: Sequence[Comparison], name: str, ratio: float) -> list[Comparison]:
    return [c for c in comparisons if c.name == name and c.a.ratio == ratio]


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
        null_q99 = np.concatenate([np.full(c.values.size, similarity.null_mcs_quantile(0.99, c.n_ref, d))
                                   for c in group])
        null_mean = float(np.mean([similarity.null_mcs_mean(c.n_ref, d) for c in group]))
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
        null = similarity.random_null(n_live, first.a.directions.shape[1], n_ref=first.n_ref, seed=null_seed)
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


def binned_median(x: np.ndarray, y: np.ndarray, bins: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Median of y in `bins` equal-count bins of x: (bin centres as medians of x, medians of y)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-d arrays of the same length, got {x.shape} and {y.shape}")
    if x.size == 0:
        return np.empty(0), np.empty(0)
    order = np.argsort(x, kind="stable")
    parts = [p for p in np.array_split(order, min(int(bins), x.size)) if p.size]
    return np.array([np.median(x[p]) for p in parts]), np.array([np.median(y[p]) for p in parts])


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
