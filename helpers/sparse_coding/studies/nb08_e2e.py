"""Notebook 08's glue: train the sweeps of every kind of loss (and the other seeds at the matched setting), evaluate
them downstream on held-out contexts, and reduce the table to the metrics file's numbers."""

from __future__ import annotations

import math
from itertools import combinations
from typing import Any, Mapping, Sequence

import pandas as pd
import torch

from .. import dictionaries
from ..analyses.downstream import at_ce_increase, dictionary_similarity, downstream_loss, matched_ce_increase
from ..analyses.null import null_mcs_mean
from ..dictionaries.base import init_decoder


def train_all(tl: torch.nn.Module, tokens: torch.Tensor, hook: str, kind: str, ratio: float,
              coefficients: Mapping[str, list], matched: Mapping[str, Any], seeds: Sequence[int],
              loss_options: Mapping[str, dict], *, model: str, revision: str, data_dir: str,
              **train: Any) -> list[tuple[str, Any]]:
    """[(loss, LMSweep)]: for each kind of loss, one ensemble over `coefficients[loss]` (the kind's sparsity knob)
    initialised from the first seed, plus one member at `matched[loss]` initialised from each other seed: every
    member on the same batches, in one pass over the data (other seed = other initialisation)."""
    knob = dictionaries.SAE_KINDS[kind].sparsity_knob
    runs = []
    for loss, values in coefficients.items():
        vals = list(values) + [matched[loss]] * (len(seeds) - 1)
        member_seeds = [seeds[0]] * len(values) + list(seeds[1:])
        run = dictionaries.train_e2e_sweep(tl, tokens, hook, kind, ratio, {knob: vals, "seed": member_seeds},
                                           model_name=model, revision=revision, data_dir=data_dir, seed=seeds[0],
                                           loss=loss, **{**train, **loss_options.get(loss, {})})
        runs.append((loss, run))
        print(f"{run.name}: {run.sae.n_members} SAEs, "
              f"{'reused' if run.reused else f'trained in {run.seconds:.0f} s'}")
    return runs


def evaluate_all(tl: torch.nn.Module, tokens: torch.Tensor, hook: str, runs: Sequence[tuple[str, Any]],
                 batch_size: int = 8, exclude: Any = None) -> pd.DataFrame:
    """One row per SAE: loss, seed (its initialisation), sweep, member, the knob's value and
    `analyses.downstream_loss`'s columns; `exclude` (the positions training left out) is left out here too."""
    tables = []
    for loss, run in runs:
        t = downstream_loss(tl, tokens, hook, run.sae, batch_size=batch_size, exclude=exclude, progress=False)
        t.insert(0, "loss", loss)
        t.insert(1, "seed", t.pop("seed").astype(int))
        t.insert(2, "sweep", run.name)
        tables.append(t)
    return pd.concat(tables, ignore_index=True)


def matched_member(runs: Sequence[tuple[str, Any]], loss: str, seed: int, knob: str, value: Any) -> Any:
    """The decoder directions [d_sae, d_in] of the SAE of `loss` initialised from `seed` whose knob is `value`."""
    for lo, run in runs:
        if lo == loss:
            for m, h in enumerate(run.sae.hparams):
                if h[knob] == value and h["seed"] == seed:
                    return run.sae.decoder_directions()[m].detach()
    raise KeyError(f"no SAE of loss {loss!r}, seed {seed} with {knob}={value!r}")


def geometry(runs: Sequence[tuple[str, Any]], kind: str, matched: Mapping[str, Any], seeds: Sequence[int]
             ) -> dict[str, Any]:
    """How alike the dictionaries at the matched setting are, each pair by `dictionary_similarity` ({"mmcs",
    "matched"}):
      "within": {loss: its first two seeds' SAEs, the mean of both ways round};
      "across": {"a vs b": kind a from one seed against kind b from another, the mean of both ways round} (another
        seed, so that a shared initialisation cannot make two kinds look alike); with one seed, empty;
      "across_same_init": the same pairs from the first seed (what the shared initialisation adds);
      "to_init": {loss: the first seed's SAE against its own initial decoder} (how far training moved it);
      "null": the expected max cosine of a random direction against d_sae random ones (`null_mcs_mean`): the floor
        of the max-cosine summary (a 1:1 matching's floor is lower).
    Every decoder row counts, dead latents' too (they keep their initial direction)."""
    knob = dictionaries.SAE_KINDS[kind].sparsity_knob
    two = list(seeds[:2])
    dirs = {(loss, s): matched_member(runs, loss, s, knob, matched[loss]) for loss in matched for s in two}
    first = dirs[(next(iter(matched)), two[0])]
    init = init_decoder(first.shape[1], first.shape[0], two[0])  # every member of one seed starts from it
    pairs = list(combinations(list(matched), 2))

    def mean(a: dict, b: dict) -> dict:
        return {k: (a[k] + b[k]) / 2 for k in a}

    out: dict[str, Any] = {
        "within": {loss: mean(dictionary_similarity(dirs[(loss, two[0])], dirs[(loss, two[1])]),
                              dictionary_similarity(dirs[(loss, two[1])], dirs[(loss, two[0])]))
                   for loss in matched if len(two) > 1},
        "across": {f"{a} vs {b}": mean(dictionary_similarity(dirs[(a, two[0])], dirs[(b, two[1])]),
                                       dictionary_similarity(dirs[(a, two[1])], dirs[(b, two[0])]))
                   for a, b in pairs if len(two) > 1},
        "across_same_init": {f"{a} vs {b}": dictionary_similarity(dirs[(a, two[0])], dirs[(b, two[0])])
                             for a, b in pairs},
        "to_init": {loss: dictionary_similarity(dirs[(loss, two[0])], init) for loss in matched},
        "null": null_mcs_mean(first.shape[0], first.shape[1])}
    return out


SPREAD_COLUMNS = ("l0", "alive", "nmse_at_hook", "nmse_last_layer")


def seed_spread(table: pd.DataFrame, knob: str, matched: Mapping[str, Any]) -> dict[str, dict]:
    """How far a second initialisation moves what the metrics read at one CE increase, per kind of loss:
    {loss: {knob: value, "seeds": [...], "ce_increase": [...], and for l0, alive, nmse_at_hook, nmse_last_layer
    the raw values [...] and "<column>_offset" [...]}}, one entry per seed, for the SAEs at the kind's matched
    setting. An offset is the SAE's value minus the first seed's frontier at the SAE's own CE increase
    (`at_ce_increase`): how far off that frontier the other initialisation lands, in the units the kinds are
    compared in (the first seed's own SAE lies on its frontier: offset 0); NaN where its CE increase is outside the
    frontier. With two initialisations, max − min of the offsets is a lower bound on the noise of a value read
    off a frontier (one draw; data order, eval sample and hyperparameters held fixed)."""
    last = [c for c in table.columns if c.startswith("nmse:")][-1:] or ["nmse_at_hook"]
    table = table.assign(nmse_last_layer=table[last[0]])
    first_seed = table["seed"].min()
    out = {}
    for loss, value in matched.items():
        front = table[(table["loss"] == loss) & (table["seed"] == first_seed)]
        rows = table[(table["loss"] == loss) & (table[knob] == value)].sort_values("seed")
        entry: dict[str, Any] = {knob: value, "seeds": rows["seed"].astype(int).tolist(),
                                 "ce_increase": rows["ce_increase"].astype(float).tolist()}
        for c in SPREAD_COLUMNS:
            entry[c] = rows[c].astype(float).tolist()
            entry[f"{c}_offset"] = [float(v) - at_ce_increase(front, float(ce), c) for v, ce in
                                    zip(rows[c], rows["ce_increase"])]
        out[loss] = entry
    return out


def frontier_metrics(table: pd.DataFrame, hook: str) -> dict[str, Any]:
    """The metrics file's frontier numbers: the matched CE increase (`matched_ce_increase` over the first seed's
    frontiers), and at it, per kind of loss, L0, alive latents, the MSE at the hook (raw: `mse_at_hook`, and
    normalised: `nmse_at_hook`), and `downstream_mse` {hook: normalised MSE} at the SAE's hook and every later
    layer (MSE over the clean activations' variance there; interpolated on each frontier, `at_ce_increase`)."""
    first = table[table["seed"] == table["seed"].min()]
    fronts = {loss: first[first["loss"] == loss] for loss in dict.fromkeys(first["loss"])}
    ce = matched_ce_increase(fronts)
    later = [c.removeprefix("nmse:") for c in table.columns if c.startswith("nmse:")]
    def at(t: pd.DataFrame, column: str) -> float:  # NaN where the frontiers share no CE increase
        return at_ce_increase(t, ce, column) if math.isfinite(ce) else math.nan

    out: dict[str, Any] = {"matched_ce_increase": ce, "l0_at_matched_ce": {}, "alive_at_matched_ce": {},
                           "mse_at_hook": {}, "nmse_at_hook": {}, "downstream_mse": {}}
    for loss, t in fronts.items():
        out["l0_at_matched_ce"][loss] = at(t, "l0")
        out["alive_at_matched_ce"][loss] = at(t, "alive")
        out["mse_at_hook"][loss] = at(t, "mse_at_hook")
        out["nmse_at_hook"][loss] = at(t, "nmse_at_hook")
        out["downstream_mse"][loss] = {hook: out["nmse_at_hook"][loss], **{h: at(t, f"nmse:{h}") for h in later}}
    out["nmse_last_layer"] = {loss: list(v.values())[-1] for loss, v in out["downstream_mse"].items()}
    out["ce_clean"] = float(table["ce_clean"].iloc[0])
    return out
