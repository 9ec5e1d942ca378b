"""Detection and fuzzing scores (Paulo et al. 2024, "Automatically Interpreting Millions of Features in Large
Language Models", arXiv 2410.13928), and the ceiling of the token-table explanation form.

- Detection: given a direction's explanation, does the scorer tell held-out contexts where the direction fires from
  matched contexts where it is 0 everywhere? Balanced accuracy over as many non-activating contexts as activating
  ones, each drawn from the same document as its activating partner where the document has one (else any
  non-activating test context); every fragment has the same length, so length is matched by construction.
- Fuzzing: inside each activating context, are the tokens where the direction fires told from as many random tokens
  where it does not? Balanced accuracy over the contexts with both kinds of tokens.

Both go through the `Simulator` interface of `analyses.interpretability` (the offline token table or an LLM): the
scorer's answer is read off its simulated activations — a context is called activating when some token's simulated
activation exceeds `THRESHOLD` (on the explanation records' 0-10 scale); a set of marked tokens is called the
explanation's when at least half of them exceed it. delphi asks an LLM these yes/no questions directly; reading them
off the simulation keeps one interface for both explainers (a named deviation).

The ceiling: the explanation of the token-table form (at most 8 entries, each a token or a previous token then a
token) fitted on the test fragments themselves by the same greedy explainer, and scored on them: what an explanation
of this form could reach on those fragments (a table of every bigram would just memorise them)."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..arguments import checked
from .interpretability import (Explainer, Record, Simulator, Split, TokenTableExplainer, TokenTableSimulator,
                               _check_aligned, _pooled, score_direction)

THRESHOLD = 0.5


def _balanced(said_pos: Sequence[bool], said_neg: Sequence[bool]) -> float:
    if not len(said_pos) or not len(said_neg):
        return math.nan
    return 0.5 * (float(np.mean(said_pos)) + 1.0 - float(np.mean(said_neg)))


@checked
def detection_score(explanation: str, simulator: Simulator, positives: Sequence[Sequence[str]],
                    negatives: Sequence[Sequence[str]], threshold: float = THRESHOLD) -> float:
    """Balanced accuracy (0.5 = chance, 1 = perfect) of calling `positives` (token texts of contexts where the
    direction fires) activating and `negatives` (contexts where it is 0) not, from `explanation` alone. NaN when
    either list is empty. Raises ValueError when the simulator does not return one prediction per token of each
    context."""
    if not len(positives) or not len(negatives):
        return math.nan
    contexts = [list(p) for p in positives] + [list(n) for n in negatives]
    pred = simulator.simulate(explanation, contexts)
    # a simulator that drops or adds a context would shift negatives into positives without a trace
    _check_aligned(contexts, pred)
    return _detection(pred[:len(positives)], pred[len(positives):], threshold)


def _detection(positive, negative, threshold: float) -> float:
    return _balanced([max(p, default=0.0) > threshold for p in positive],
                     [max(p, default=0.0) > threshold for p in negative])


@checked
def detection_from_predictions(positive: Sequence[Sequence[float]], negative: Sequence[Sequence[float]],
                               threshold: float = THRESHOLD) -> float:
    """`detection_score` from simulated activations already made (per context, per token)."""
    return _detection(positive, negative, threshold)


def _marks(records: Sequence[Record], seed: int) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """Per usable record (index, its m most active tokens, m seeded random silent tokens). A NaN activation (a
    mined window's token past its context's edge) is unknown, neither firing nor silent: never drawn as silent."""
    rng = np.random.default_rng(seed)
    out = []
    for i, r in enumerate(records):
        acts = np.asarray(r.acts, dtype=np.float64)
        on, off = np.nonzero(acts > 0)[0], np.nonzero(acts <= 0)[0]
        m = min(len(on), len(off))
        if m:
            out.append((i, on[np.argsort(-acts[on], kind="stable")[:m]], rng.choice(off, m, replace=False)))
    return out


@checked
def fuzzing_score(explanation: str, simulator: Simulator, records: Sequence[Record], seed: int = 0,
                  threshold: float = THRESHOLD) -> float:
    """Balanced accuracy of telling, in each activating record, its m most active tokens (m = min(firing tokens,
    silent tokens)) from m seeded random tokens where the direction is 0, from `explanation` alone. Records with no
    firing or no silent token are left out; NaN when none is left."""
    if not _marks(records, seed):
        return math.nan
    return _fuzzing(records, simulator.simulate(explanation, [list(r.tokens) for r in records]), seed, threshold)


@checked
def fuzzing_from_predictions(records: Sequence[Record], predictions: Sequence[Sequence[float]], seed: int = 0,
                             threshold: float = THRESHOLD) -> float:
    """`fuzzing_score` from simulated activations already made for the records (per record, per token). Raises
    ValueError unless predictions holds one value per token of each record, in the records' order."""
    return _fuzzing(records, predictions, seed, threshold)


def _fuzzing(records, predictions, seed: int, threshold: float) -> float:
    # one prediction per token of each record, else the marks below index past them or into another record
    _check_aligned([r.acts for r in records], predictions)
    said_pos, said_neg = [], []
    for i, on, off in _marks(records, seed):
        p = np.asarray(predictions[i], dtype=np.float64)
        said_pos.append(float((p[on] > threshold).mean()) >= 0.5)
        said_neg.append(float((p[off] > threshold).mean()) >= 0.5)
    return _balanced(said_pos, said_neg) if said_pos else math.nan


@checked
def ceiling_score(records: Sequence[Record], context: str = "bigram", max_items: int = 8) -> float:
    """What an explanation of the token-table form could reach on these records: the `TokenTableExplainer` (at most
    `max_items` entries; context="unigram": single tokens only) fitted on the records themselves, simulated on them
    and correlated (pooled over tokens). Raises ValueError for another context."""
    if context not in ("bigram", "unigram"):
        raise ValueError(f"context must be 'bigram' or 'unigram', got {context!r}")
    return _ceiling(records, context, max_items)


def _ceiling(records, context: str = "bigram", max_items: int = 8) -> float:
    text = TokenTableExplainer(max_items, bigrams=context == "bigram").explain(records)
    return _pooled([r.acts for r in records], TokenTableSimulator().simulate(text, [r.tokens for r in records]))


@checked
def evaluate_direction(records: Mapping[int, Record], split: Split, explainer: Explainer, simulator: Simulator,
                       negatives: Sequence[Sequence[str]] = (), explanation: str | None = None, seed: int = 0,
                       threshold: float = THRESHOLD, ceiling: bool = True) -> dict[str, Any]:
    """Everything notebook 07 scores of one direction from one explanation and one simulation call: {"explanation",
    "top", "random", "top_and_random" (`score_direction`), "ceiling" (`ceiling_score` of the test records),
    "detection" (test records vs `negatives`, NaN without negatives), "fuzzing", "fragments" (the test fragments),
    "sums" ([n_test, 6] `fragment_sums`)}. explanation: another direction's, for the shuffled control (which needs
    no ceiling: ceiling=False leaves it NaN)."""
    s = score_direction(records, split, explainer, simulator, explanation, negatives)
    test = [records[f] for f in s.fragments]
    pred = s.predictions
    return {"explanation": s.explanation, "top": s.top, "random": s.random, "top_and_random": s.top_and_random,
            "ceiling": _ceiling(test) if ceiling else math.nan,
            "detection": _detection(pred[:len(test)], pred[len(test):], threshold) if negatives else math.nan,
            "fuzzing": _fuzzing(test, pred[:len(test)], seed, threshold), "fragments": s.fragments, "sums": s.sums}


@checked
def matched_negatives(positives: Sequence[int], silent: Sequence[int], doc: torch.Tensor, seed: int = 0
                      ) -> list[int]:
    """For each positive fragment (global index) a distinct silent fragment (the direction is 0 throughout) from
    the same document where one is left, else a seeded random silent one; fewer when silent ones run out.
    doc: [n_fragments] document index of every fragment. Raises ValueError unless doc is 1-d, every index lies in
    [0, n_fragments) and no fragment is both positive and silent."""
    if doc.ndim != 1:
        raise ValueError(f"doc must be [n_fragments] (one document index per fragment), got shape {tuple(doc.shape)}")
    silent, positives = [int(f) for f in silent], [int(f) for f in positives]
    for name, idx in (("positives", positives), ("silent", silent)):
        bad = [f for f in idx if not 0 <= f < len(doc)]
        if bad:  # a negative index would silently read another fragment's document (Python wraps it)
            raise ValueError(f"{name} must be fragment indices in [0, {len(doc)}) (doc's length), got {bad[:5]}")
    both = sorted(set(positives) & set(silent))
    if both:  # a positive could be handed back as its own negative
        raise ValueError(f"fragments {both[:5]} are in both positives and silent; a fragment is either one where "
                         f"the direction fires or one where it is 0 throughout")
    rng = np.random.default_rng(seed)
    by_doc: dict[int, list[int]] = {}
    for f in rng.permutation(silent).tolist() if silent else []:
        by_doc.setdefault(int(doc[f]), []).append(f)
    used, out = set(), []
    rest = [f for f in rng.permutation(silent).tolist()] if silent else []
    for p in positives:
        same = [f for f in by_doc.get(int(doc[p]), []) if f not in used]
        pick = same[0] if same else next((f for f in rest if f not in used), None)
        if pick is None:
            break
        used.add(pick)
        out.append(pick)
    return out
