"""Notebook 04: how much of a dictionary is found again by a larger one, by another seed, and by chance.

A *ladder* is one SAE kind trained at several dictionary ratios and seeds on one activation store. For every
dictionary we take its unit decoder directions and its firing frequency on held-out activation rows (rows no seed
trained on); features that never fire there are dead and are left out of every MCS number (and counted).

Three comparisons, each a max cosine similarity (MCS) per feature of the smaller / first dictionary:

* ``vs_larger``: size n against size 2n **of the other seed**. Same-seed dictionaries of different sizes start
  from the same random directions (the first n rows of the larger one's initial decoder *are* the smaller one's,
  since `dictionaries.base.init_decoder` draws them from one generator) and see the same batches, so a same-seed
  comparison partly measures the shared start. It is kept as ``vs_larger_same_seed`` to show how much that inflates the numbers.
* ``across_seeds``: the same size, the other seed (both directions).
* the random null: the MCS of random directions of the same width against as many random directions as the
  reference has live features (`analyses.null_mcs_mean` / `null_mcs_quantile`).

A feature "looks random" when its MCS is below the null's 99 % quantile. Bimodality is summarised by Sarle's
coefficient (> 5/9, the value of a uniform distribution, suggests two modes) and by the shares in each mode.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..paths import resolve
from .. import analyses, dictionaries
from ..activations import ActivationStore, row_order
from ..dictionaries import LMSweep
from ..dictionaries.saelens_io import SWEEP_FILE

OWN_SUBDIR = "04_mcs"
"""Where notebook 04 keeps its own sweeps (under data_dir), so it never takes a folder notebook 03 will want."""

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
                   **kwargs: Any) -> LMSweep:
    """One sweep: reused from data_dir's shared dictionaries (e.g. notebook 03's) when that folder holds exactly
    these settings, otherwise trained (or reused) under data_dir/04_mcs. Never writes into the shared folder, so
    a later notebook-03 run with its own settings cannot collide with ours. retrain=True replaces a sweep of
    ours (under 04_mcs) saved with other settings; without it that is a FileExistsError."""
    shared = dictionaries.sweep_dir(data_dir, store, kind, ratio, seed)
    if (shared / SWEEP_FILE).exists():
        try:
            return dictionaries.train_lm_sweep(store, kind, ratio, hparams, data_dir=data_dir, seed=seed, retrain=False,
                                        **kwargs)
        except FileExistsError:
            pass  # other settings there: not ours to reuse or replace
    return dictionaries.train_lm_sweep(store, kind, ratio, hparams, data_dir=resolve(data_dir) / OWN_SUBDIR, seed=seed,
                                retrain=retrain, **kwargs)


def train_ladder(store: ActivationStore, kind: str, hparams: Mapping[str, Any], ratios: Sequence[float],
                 seeds: Sequence[int], **kwargs: Any) -> dict[tuple[float, int], LMSweep]:
    """{(ratio, seed): LMSweep} for every ratio and seed (see `train_or_reuse`); kwargs go to
    `dictionaries.train_lm_sweep` (data_dir, n_tokens, batch_size, lr, device, progress, train options)."""
    ratios, seeds = _check_ladder(ratios, seeds)
    return {(r, s): train_or_reuse(store, kind, r, hparams, seed=s, **kwargs) for r in ratios for s in seeds}


# ----------------------------------------------------------------------------------------------------------------
# held-out rows and firing frequencies


def training_rows(n_rows: int, n_tokens: int, batch_size: int, seed: int) -> np.ndarray:
    """Bool mask [n_rows] of the store rows `dictionaries.train_lm_sweep` trains on: n_tokens // batch_size full batches
    of `ActivationStore.batches(batch_size, seed, drop_last=True)`, epoch e being `activations.row_order(n_rows,
    seed, e)`."""
    if n_rows < batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be in [1, n_rows={n_rows}], got {batch_size}")
    need = (int(n_tokens) // int(batch_size)) * int(batch_size)
    per_epoch = (n_rows // batch_size) * batch_size
    seen = np.zeros(n_rows, dtype=bool)
    epoch = 0
    while need > 0 and not seen.all():
        take = min(need, per_epoch)
        seen[row_order(n_rows, seed, epoch)[:take]] = True
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
    """[E, n] share of the given rows on which each feature fires (`analyses.sparsity_stats`)."""
    batches = (store.rows(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size))
    _, freq = analyses.sparsity_stats(sae, batches, progress=progress)
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


def ladder_dictionaries(runs: Mapping[tuple[float, int], LMSweep], store: ActivationStore, rows: np.ndarray,
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


@dataclass
class Comparison:
    """MCS of every feature of dictionary A against dictionary B (NaN where A's feature is dead)."""

    name: str            # one of COMPARISONS
    a: Dictionary
    b: Dictionary
    result: analyses.MCSResult
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
    res = analyses.mcs(a.directions, b.directions, a.alive, b.alive)
    matched = None
    if hungarian:
        matched = analyses.hungarian_match(a.directions, b.directions, a.alive, b.alive).a_to_b()
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
