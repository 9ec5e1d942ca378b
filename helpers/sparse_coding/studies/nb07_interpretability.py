"""Notebook 07: interpretability scores of SAE features against the neuron basis, random directions, PCA and ICA
(Cunningham et al. 2023, arXiv 2309.08600, Figure 2), offline by default.

The dictionaries: notebook 03's best recipe (its kind, size and hyperparameters) at every layer — 03's own SAE at its
layer, one trained here (under `<data_dir>/07_interpretability/`) at the others — and the paper's recipe, a tied
ReLU + L1 SAE at ratio 2. One streaming pass of the model over the fragment pool mines every direction of every
method at every layer (`analyses.mining`, whole fragments as windows), then each sampled direction is explained,
simulated and scored (`analyses.interpretability`)."""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from .. import dictionaries, lm
from ..analyses import directions as D
from ..analyses.features import sae_encoder
from ..analyses.interpretability import Record, bootstrap_ci, score_direction, split_fragments
from ..analyses.mining import Mined, mine
from ..analyses.similarity import mcs
from ..analyses.statistics import spearman
# The recipe helpers moved to `recipes` (notebook 06 trains the same recipe with another seed); the notebook still
# reaches them through this module.
from .recipes import SUBDIR, best_recipe, paper_recipe, recipe_settings, train_recipe  # noqa: F401

METHODS = ("sae", "sae_paper", "neurons", "random", "pca", "ica", "pca_topk", "ica_topk")


def layer_encoders(sae_best: Any, sae_paper: Any, sample: torch.Tensor, top_k: int, seed: int = 0
                   ) -> dict[str, Any]:
    """{method: encoder} for one layer (see METHODS); PCA and ICA fitted on `sample` [rows, d]."""
    d = int(sample.shape[1])
    return {"sae": sae_encoder(sae_best), "sae_paper": sae_encoder(sae_paper), "neurons": D.neuron_encoder(),
            "random": D.random_encoder(d, d, seed=seed), "pca": D.pca_encoder(sample, seed=seed),
            "ica": D.ica_encoder(sample, seed=seed), "pca_topk": D.pca_encoder(sample, top_k=top_k, seed=seed),
            "ica_topk": D.ica_encoder(sample, top_k=top_k, seed=seed)}


def mine_methods(model, encoders: Mapping[str, tuple[str, Any]], fragments: torch.Tensor, *, n_random: int = 15,
                 batch_size: int = 64, seed: int = 0, exclude: Any = None, progress: bool = True) -> dict[str, Mined]:
    """One pass of `model` over the fragments for every {name: (hook, encoder)}: whole fragments as windows, the
    top 20 fragments and `n_random` random firing fragments per direction. exclude: positions left out of the
    dictionaries' inputs (the stores' `exclusion`; each fragment's first token is the model's position 0)."""
    hooks = sorted({h for h, _ in encoders.values()})
    read = lm.hook_reader(model, hooks)
    dev = next(model.parameters()).device
    return mine(lambda tb: read(tb.to(dev)), encoders, fragments, batch_size=batch_size, n_top=20,
                n_random=n_random, per_bin=1, window=None, seed=seed, exclude=exclude, progress=progress)


def direction_records(mined: Mined, latent: int, texts: Sequence[str]) -> tuple[dict[int, Record], list, list]:
    """(records by fragment, fragments ranked by max activation, random firing fragments) of one direction."""
    records, ranked, firing = {}, [], []
    for e in mined.top_examples(latent):
        records[e.context] = Record([texts[t] for t in e.tokens], [float(a) for a in e.acts])
        ranked.append(e.context)
    for e in mined.random_examples(latent):
        records.setdefault(e.context, Record([texts[t] for t in e.tokens], [float(a) for a in e.acts]))
        firing.append(e.context)
    return records, ranked, firing


def score_method(mined: Mined, texts: Sequence[str], explainer, simulator, *, n_directions: int = 150,
                 seed: int = 0, shuffled: bool = False) -> tuple[pd.DataFrame, int]:
    """(one row per scored direction: latent (its index), explanation, top, random, top_and_random; the number skipped) for
    a seeded sample of `n_directions` live directions. shuffled=True scores each direction with the explanation of
    the next sampled one (the shuffled-explanation control)."""
    live = (mined.count > 0).nonzero().squeeze(1)
    g = torch.Generator().manual_seed(seed)
    sample = live[torch.randperm(len(live), generator=g)[:n_directions]].tolist()
    rows, skipped, prepared = [], 0, []
    for d in sample:
        records, ranked, firing = direction_records(mined, d, texts)
        split = split_fragments(ranked, firing)
        if split is None:
            skipped += 1
            continue
        prepared.append((d, records, split))
    texts_of = {}
    if shuffled and len(prepared) > 1:
        for i, (d, records, split) in enumerate(prepared):
            nd, nrec, nsplit = prepared[(i + 1) % len(prepared)]
            texts_of[d] = explainer.explain([nrec[j] for j in nsplit.explain])
    for d, records, split in prepared:
        s = score_direction(records, split, explainer, simulator, explanation=texts_of.get(d))
        rows.append({"latent": d, "explanation": s.explanation, "top": s.top, "random": s.random,
                     "top_and_random": s.top_and_random})
    return pd.DataFrame(rows), skipped


def summarize(table: pd.DataFrame, skipped: int, seed: int = 0) -> dict[str, float]:
    """score_mean / score_ci_low / score_ci_high (bootstrap 95 % over directions) / score_se95 (1.96·SE) of the
    top-and-random score, the top-only and random-only means, n_scored, n_skipped."""
    vals = table["top_and_random"].tolist() if len(table) else []
    mean, lo, hi, se95 = bootstrap_ci(vals, seed=seed)
    return {"score_mean": mean, "score_ci_low": lo, "score_ci_high": hi, "score_se95": se95,
            "top_mean": float(table["top"].mean()) if len(table) else float("nan"),
            "random_mean": float(table["random"].mean()) if len(table) else float("nan"),
            "n_scored": int(len(table)), "n_skipped": int(skipped)}


def ordering(scores: Mapping[str, Mapping[str, Mapping[str, float]]]) -> dict[str, list[str]]:
    """Per layer, the methods sorted by mean score, best first."""
    return {layer: sorted(ms, key=lambda m: -np.nan_to_num(ms[m]["score_mean"], nan=-9)) for layer, ms in scores.items()}


def score_methods(mined: Mapping[str, Mined], texts: Sequence[str], explainer, simulator, *, n_directions: int,
                  seed: int = 0) -> tuple[dict, dict, dict]:
    """Every mined method ("layer/method" keys) scored: (scores {layer: {method: summarize(...)}}, tables {key: one
    row per scored direction}, shuffled {key: mean score when each direction is simulated from another direction's
    explanation: the control}). With the offline explainer, or an LLM's through `analyses.scorers`."""
    scores, tables, shuffled = {}, {}, {}
    for key, m in mined.items():
        layer, method = key.split("/")
        tables[key], skipped = score_method(m, texts, explainer, simulator, n_directions=n_directions, seed=seed)
        scores.setdefault(layer, {})[method] = summarize(tables[key], skipped, seed)
        sh, _ = score_method(m, texts, explainer, simulator, n_directions=n_directions, seed=seed, shuffled=True)
        shuffled[key] = float(sh["top_and_random"].mean()) if len(sh) else float("nan")
    return scores, tables, shuffled


def score_vs_mcs(sae: Any, reference: str | os.PathLike | None, table: pd.DataFrame) -> tuple[np.ndarray, float]:
    """(each scored direction's MCS against the reference dictionary [rows of table], Spearman's rho between score
    and MCS), NaN without a reference or scored directions."""
    if reference is None or not len(table):
        return np.full(len(table), np.nan), float("nan")
    res = mcs(sae.W_dec.detach()[0], dictionaries.load_sae(reference).W_dec.detach()[0])
    feature_mcs = res.a_to_b[table["latent"].values].numpy()
    return feature_mcs, spearman(table["top_and_random"].values, feature_mcs)

