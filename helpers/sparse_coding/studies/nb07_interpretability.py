"""Notebook 07: interpretability scores of SAE features against the neuron basis, random directions, PCA and ICA
(Cunningham et al. 2023, arXiv 2309.08600, Figure 2), offline by default.

The dictionaries: notebook 03's best recipe (its kind, size and hyperparameters) at every layer — 03's own SAE at its
layer, one trained here (under `<data_dir>/07_interpretability/`) at the others — and the paper's recipe, a tied
ReLU + L1 SAE at ratio 2. One streaming pass of the model over the fragment pool mines every direction of every
method at every layer (`analyses.mining`, whole fragments as windows), then each sampled direction is explained,
simulated and scored (`analyses.interpretability`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .. import activations, dictionaries, lm
from ..analyses import directions as D
from ..analyses.features import sae_picks_encoder
from ..analyses.detection import evaluate_direction, matched_negatives
from ..analyses.interpretability import Record, document_sides, split_by_document
from ..analyses.mining import Mined, mine
from ..analyses.similarity import mcs
from ..analyses.statistics import spearman
# The recipe helpers moved to `recipes` (notebook 06 trains the same recipe with another seed); the notebook still
# reaches them through this module.
from .recipes import SUBDIR, best_recipe, paper_recipe, recipe_settings, train_recipe  # noqa: F401

METHODS = ("sae", "sae_paper", "neurons", "random", "pca", "ica", "pca_topk", "ica_topk")


def layer_encoders(sae_best: Any, sae_paper: Any, sample: torch.Tensor, top_k: int, seed: int = 0
                   ) -> dict[str, Any]:
    """{method: encoder} for one layer (see METHODS): every baseline centred on `sample` [rows, d] and split into
    both signs (`analyses.directions`), PCA and ICA fitted on it, top-K on whitened scores."""
    return {"sae": sae_picks_encoder(sae_best), "sae_paper": sae_picks_encoder(sae_paper),
            "neurons": D.neuron_encoder(sample), "random": D.random_encoder(sample, seed=seed),
            "pca": D.pca_encoder(sample, seed=seed), "ica": D.ica_encoder(sample, seed=seed), "pca_topk": D.pca_encoder(sample, top_k=top_k, seed=seed),
            "ica_topk": D.ica_encoder(sample, top_k=top_k, seed=seed)}


def fit_info(encoders: Mapping[str, tuple[str, Any]]) -> dict[str, dict]:
    """{"layer/method": the encoder's fit record (ICA iterations and convergence, PCA variance, ...)}."""
    return {k: dict(getattr(enc, "info", {})) for k, (_, enc) in encoders.items() if getattr(enc, "info", None)}


@dataclass
class Sides:
    """One method's mining results on the explanation side and on the test side (`document_sides`), with each
    side's fragment indices into the pool and the test fragments' per-direction maxima [n_test, n]."""

    explain: Mined
    test: Mined
    explain_index: torch.Tensor
    test_index: torch.Tensor
    test_maxima: torch.Tensor

    def frequency(self) -> torch.Tensor:
        """[n] firing frequency over both sides' kept tokens."""
        n = self.explain.meta.get("n_kept", self.explain.n_tokens) + self.test.meta.get("n_kept", self.test.n_tokens)
        return (self.explain.count + self.test.count).double() / max(1, n)


def mine_sides(model, encoders: Mapping[str, tuple[str, Any]], fragments: torch.Tensor, doc: torch.Tensor, *,
               n_random: int = 15, batch_size: int = 64, seed: int = 0, exclude: Any = None,
               progress: bool = True) -> dict[str, Sides]:
    """Split the pool by document (`analyses.document_sides`) and mine every {name: (hook, encoder)} on each side
    (whole fragments as windows, the top 20 and `n_random` random firing fragments per direction); the test side's
    pass also keeps each fragment's max per direction (for the detection score's silent contexts). exclude:
    positions left out of the dictionaries' inputs (each fragment's first token is the model's position 0)."""
    hooks = sorted({h for h, _ in encoders.values()})
    read = lm.hook_reader(model, hooks)
    dev = next(model.parameters()).device
    reader = lambda tb: read(tb.to(dev))  # noqa: E731
    sides = document_sides(doc, seed)
    ie, it = sides.nonzero().squeeze(1), (~sides).nonzero().squeeze(1)
    mined = [mine(reader, encoders, fragments[i], batch_size=batch_size, n_top=20, n_random=n_random, per_bin=0,
                  window=None, seed=seed, exclude=exclude, progress=progress, keep_context_max=test)
             for i, test in ((ie, False), (it, True))]
    return {k: Sides(mined[0][k], mined[1][k], ie, it, mined[1][k].context_max) for k in encoders}


def _records(mined: Mined, latent: int, texts: Sequence[str], index: torch.Tensor, random: bool = False
             ) -> tuple[dict[int, Record], list[int]]:
    records, order = {}, []
    for e in (mined.random_examples(latent) if random else mined.top_examples(latent)):
        g = int(index[e.context])
        records[g] = Record([texts[t] for t in e.tokens], [float(a) for a in e.acts])
        order.append(g)
    return records, order


def prepare(sides: Sides, latent: int, texts: Sequence[str]) -> tuple[dict[int, Record], Any]:
    """(records by pool fragment, the document-level split or None) of one direction."""
    rec_e, ranked_e = _records(sides.explain, latent, texts, sides.explain_index)
    rec_t, ranked_t = _records(sides.test, latent, texts, sides.test_index)
    rec_r, firing_t = _records(sides.test, latent, texts, sides.test_index, random=True)
    return {**rec_r, **rec_t, **rec_e}, split_by_document(ranked_e, ranked_t, firing_t)


def score_method(sides: Sides, texts: Sequence[str], explainer, simulator, fragments: torch.Tensor,
                 doc: torch.Tensor, *, n_directions: int = 150, seed: int = 0, shuffled: bool = False,
                 explanations: Mapping[int, str] | None = None) -> tuple[pd.DataFrame, int]:
    """(one row per scored direction, the number skipped) for a seeded sample of `n_directions` live directions.
    Row: latent, frequency, explanation, top / random / top_and_random (explain-simulate-score), ceiling (the best
    token-table fit on the test fragments), detection and fuzzing (balanced accuracy), sums and docs (per test
    fragment, for the paired bootstrap). shuffled=True uses the next sampled direction's explanation: the control.
    explanations: {latent: text} already written (the unshuffled pass's), reused instead of explaining again."""
    freq = sides.frequency()
    live = (freq > 0).nonzero().squeeze(1)
    g = torch.Generator().manual_seed(seed)
    sample = live[torch.randperm(len(live), generator=g)[:n_directions]].tolist()
    prepared = [(d, *prepare(sides, d, texts)) for d in sample]
    skipped = sum(split is None for _, _, split in prepared)
    prepared = [p for p in prepared if p[2] is not None]
    known = explanations or {}
    own = {d: known[d] if d in known else explainer.explain([records[j] for j in split.explain])
           for d, records, split in prepared}
    order = [d for d, _, _ in prepared]
    text_of = {d: own[order[(i + 1) % len(order)]] for i, d in enumerate(order)} if shuffled and len(order) > 1 \
        else own
    rows = []
    for d, records, split in prepared:
        test_ids = list(split.top) + list(split.random)
        silent = sides.test_index[(sides.test_maxima[:, d] == 0)].tolist()
        neg = [[texts[t] for t in fragments[f].tolist()] for f in matched_negatives(test_ids, silent, doc, seed + d)]
        e = evaluate_direction(records, split, explainer, simulator, neg, text_of[d], seed + d, ceiling=not shuffled)
        rows.append({"latent": d, "frequency": float(freq[d]), **{k: v for k, v in e.items() if k != "fragments"},
                     "docs": [int(doc[f]) for f in e["fragments"]]})
    return pd.DataFrame(rows), skipped


def score_methods(sides: Mapping[str, Sides], texts: Sequence[str], explainer, simulator, fragments: torch.Tensor,
                  doc: torch.Tensor, *, n_directions: int, seed: int = 0, progress: bool = True) -> tuple[dict, dict]:
    """Every mined method ("layer/method" keys) scored with its own explanations and with shuffled ones:
    (tables {key: score_method rows}, shuffled {key: rows under the shuffled-explanation control})."""
    tables, shuffled = {}, {}
    for key, s in tqdm(sides.items(), desc="scoring", unit="method", disable=not progress):
        tables[key], skipped = score_method(s, texts, explainer, simulator, fragments, doc,
                                            n_directions=n_directions, seed=seed)
        tables[key].attrs["skipped"] = skipped
        own = dict(zip(tables[key]["latent"], tables[key]["explanation"])) if len(tables[key]) else None
        shuffled[key], _ = score_method(s, texts, explainer, simulator, fragments, doc, n_directions=n_directions,
                                        seed=seed, shuffled=True, explanations=own)
    return tables, shuffled


def score_vs_mcs(sae: Any, reference: str | os.PathLike | None, table: pd.DataFrame) -> tuple[np.ndarray, float]:
    """(each scored direction's MCS against the reference dictionary [rows of table], Spearman's rho between score
    and MCS), NaN without a reference or scored directions."""
    if reference is None or not len(table):
        return np.full(len(table), np.nan), float("nan")
    res = mcs(sae.W_dec.detach()[0], dictionaries.load_sae(reference).W_dec.detach()[0])
    feature_mcs = res.a_to_b[torch.as_tensor(table["latent"].to_numpy(copy=True))].numpy()
    return feature_mcs, spearman(table["top_and_random"].values, feature_mcs)



def step0_control(tl, model: str, recipe: Mapping[str, Any], trained: pd.DataFrame, store: Any, fragments: torch.Tensor,
                  doc: torch.Tensor, texts: Sequence[str], explainer, simulator, data_dir: str | os.PathLike, *,
                  n_tokens: int | None = None, n_directions: int = 150, seed: int = 0, n_boot: int = 2000,
                  exclude: Any = None, device: str = "cpu") -> dict[str, Any]:
    """The recipe trained on the randomly initialised model (revision step0) and on the trained model (`tl`, its
    `store` at the recipe's hook) with the same token budget `n_tokens` (default the recipe's own: then 03's SAE, scored in
    `trained`, is the trained side), each mined on its own model and scored alike: {"trained", "step0": {"mean",
    "low", "high", "n"}, "difference": paired interval of step0 − trained, "n_tokens", "recipe_n_tokens"};
    "step0" a sentence for a model with no step0 revision (a GGUF file)."""
    from .nb07_summary import interval, paired

    budget = int(n_tokens or recipe["n_tokens"])
    hook = recipe["hook"]

    def scored(tl, sae, exclusion) -> pd.DataFrame:
        sides = mine_sides(tl, {"0/x": (hook, sae_picks_encoder(sae))}, fragments, doc, seed=seed, exclude=exclusion)
        return score_method(sides["0/x"], texts, explainer, simulator, fragments, doc, n_directions=n_directions,
                            seed=seed)[0]

    if budget != int(recipe["n_tokens"]):  # the trained model's SAE at the same budget as step0's
        trained = scored(tl, train_recipe(store, recipe, data_dir, n_tokens=budget, device=device), exclude)
    out = {"trained": interval(trained["top_and_random"] if len(trained) else []), "n_tokens": budget,
           "recipe_n_tokens": int(recipe["n_tokens"]), "layer": int(lm.hook_layer(hook))}
    if lm.is_gguf(model):  # a GGUF file holds the final weights only: no random-init revision to compare
        out["step0"] = "none: the model has no step0 (random-init) revision"
        return out
    store0 = activations.revision_store(model, "step0", hook, budget, data_dir=data_dir, device=device, seed=seed,
                                        exclude=exclude)  # the trained model's exclusion
    tl0 = lm.load_model(lm.model_source(model, data_dir), "step0", device=device)
    table0 = scored(tl0, train_recipe(store0, recipe, data_dir, n_tokens=budget, device=device), store0.exclusion)
    out["step0"] = interval(table0["top_and_random"] if len(table0) else [])
    out["difference"] = paired({"0/step0": table0, "0/trained": trained}, "trained", seed, n_boot)["0"]["step0"]
    return out
