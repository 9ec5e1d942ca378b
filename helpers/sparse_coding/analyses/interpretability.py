"""Explain–simulate–score (Bills et al. 2023; the protocol of Cunningham et al. 2023, arXiv 2309.08600, Appendix A):
how well a direction's activations can be predicted from a short explanation of its top examples.

For each direction: rank the pool's fragments by the direction's max activation and keep the top 20; ranks 0, 4, 8,
12, 16 go to the explainer, ranks 2, 6, 10, 14, 18 are the "top" test set, and 5 fragments where the direction fires,
drawn at random among the others, are the "random" test set (explanation and test fragments never overlap). A
simulator predicts every test token's activation from the explanation text alone; the score is the Pearson
correlation of predictions and true activations pooled over tokens (top, random, and top-and-random, the paper's
default). Directions firing on fewer than 20 fragments are skipped and counted.

The offline explainer and simulator here need no model: the explainer writes which tokens (and which previous token
before them) carry the activation and how strongly, on the 0-10 scale of the explanation records, choosing greedily
the entries that best reproduce the records' activations; the simulator reads that text back — only the text — and
predicts each token's activation as the strength of the entry it matches (0 for none). An LLM explainer and
simulator with the same interface live in `analyses.llm`."""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from ..arguments import checked


EXPLAIN_RANKS = (0, 4, 8, 12, 16)
TOP_RANKS = (2, 6, 10, 14, 18)
N_RANDOM = 5
MIN_FRAGMENTS = 20


@dataclass
class Record:
    """One fragment as the explainer or simulator sees it: token texts and the direction's true activations."""

    tokens: list[str]
    acts: list[float]


@runtime_checkable  # so that a wrong object is refused by name (arguments.checked)
class Explainer(Protocol):
    name: str

    def explain(self, records: Sequence[Record]) -> str: ...


@runtime_checkable
class Simulator(Protocol):
    name: str

    def simulate(self, explanation: str, fragments: Sequence[Sequence[str]]) -> list[list[float]]: ...


def _known(a: float) -> bool:
    """False for a NaN activation (a mined window's token past its context's edge): no activation is known there."""
    return a == a


def scale_0_10(records: Sequence[Record]) -> list[list[int]]:
    """Activations as integers 0-10 relative to the records' max (negatives clipped), as OpenAI's explainer sees them;
    NaN (past a context's edge in a mined window) counts as no activation, 0."""
    top = max((a for r in records for a in r.acts if _known(a)), default=0.0)
    if not top > 0:
        return [[0] * len(r.acts) for r in records]
    return [[int(round(10 * max(0.0, a) / top)) if _known(a) else 0 for a in r.acts] for r in records]


def _quote(t: str) -> str:
    return '"' + t.replace("\\", "\\\\").replace('"', '\\"') + '"'


_ITEM = re.compile(r'(?:"((?:[^"\\]|\\.)*)"\s+then\s+)?"((?:[^"\\]|\\.)*)"\s*≈\s*(\d+(?:\.\d+)?)')


def _unquote(t: str) -> str:
    return re.sub(r"\\(.)", r"\1", t)


@checked
class TokenTableExplainer:
    """Explanations like `fires on "·(" ≈9; "·print" then "·(" ≈6` (see the module docstring). `max_items` entries at
    most; an entry is a token, or (bigrams=True) a token after a given previous token."""

    name = "token-table"

    def __init__(self, max_items: int = 8, bigrams: bool = True):
        self.max_items, self.bigrams = max_items, bigrams
        # Part of the cache key (analyses.llm): a cached explanation is reused only by the same explainer version.
        self.version = f"2:{max_items}:{int(bigrams)}"

    def explain(self, records: Sequence[Record]) -> str:
        scaled = scale_0_10(records)
        toks = [t for r in records for t in r.tokens]
        prev = [p for r in records for p in [None] + r.tokens[:-1]]
        y = np.array([a for s in scaled for a in s], dtype=np.float64)
        # NaN tokens (past a context's edge) carry no activation: left out of the fit, still a previous token.
        w = np.array([_known(a) for r in records for a in r.acts], dtype=np.float64)
        if not len(y) or y.max() <= 0:
            return "fires on nothing in these examples"
        cands = {}
        for i in np.nonzero(y >= 2)[0]:
            cands.setdefault((None, toks[i]), None)
            if self.bigrams and prev[i] is not None:
                cands.setdefault((prev[i], toks[i]), None)
        keys = list(cands)
        ids: dict[str, int] = {}
        tok_id = np.array([ids.setdefault(t, len(ids)) for t in toks])
        prev_id = np.array([-1 if p is None else ids.setdefault(p, len(ids)) for p in prev])
        key_tok = np.array([ids[k[1]] for k in keys])
        key_prev = np.array([-1 if k[0] is None else ids[k[0]] for k in keys])
        # [keys, tokens]: the token matches and so does the previous one where the entry names it
        masks = (tok_id[None] == key_tok[:, None]) & ((key_prev[:, None] == -1) | (prev_id[None] == key_prev[:, None]))
        strength = np.array([y[m].sum() / max(w[m].sum(), 1.0) for m in masks])  # 0 for a key seen only at NaN
        chosen, pred = [], np.zeros_like(y)
        for _ in range(self.max_items):
            trial = np.maximum(pred[None], masks * strength[:, None])
            err = (w * (trial - y[None]) ** 2).sum(1)
            best = int(err.argmin())
            if err[best] >= (w * (pred - y) ** 2).sum() - 1e-9:
                break
            chosen.append(best)
            pred = trial[best]
        if not chosen:
            return "fires on nothing in these examples"
        items = []
        for c in sorted(chosen, key=lambda c: -strength[c]):
            p, t = keys[c]
            level = max(1, int(round(strength[c])))
            items.append((f"{_quote(p)} then " if p is not None else "") + f"{_quote(t)} ≈{level}")
        return "fires on " + "; ".join(items)


@checked
class TokenTableSimulator:
    """Reads a `TokenTableExplainer` explanation — the text only — and predicts each token's activation: the
    largest strength among the entries it matches, else 0."""

    name = "token-table"
    version = "2"

    def simulate(self, explanation: str, fragments: Sequence[Sequence[str]]) -> list[list[float]]:
        items = [(_unquote(p) if p else None, _unquote(t), float(v)) for p, t, v in _ITEM.findall(explanation)]
        out = []
        for frag in fragments:
            pred = []
            for i, t in enumerate(frag):
                p = frag[i - 1] if i else None
                pred.append(max((v for ip, it, v in items if it == t and (ip is None or ip == p)), default=0.0))
            out.append(pred)
        return out


def _check_aligned(true: Sequence[Sequence[float]], pred: Sequence[Sequence[float]]) -> None:
    """ValueError unless pred holds one fragment per fragment of true, each with one value per token."""
    if len(pred) != len(true):
        raise ValueError(f"pred has {len(pred)} fragments but true has {len(true)}: pass one list of predictions "
                         f"per fragment, in the fragments' order (the simulator's output for exactly these tokens)")
    for i, (t, p) in enumerate(zip(true, pred)):
        if np.size(p) != np.size(t):
            raise ValueError(f"pred[{i}] has {np.size(p)} values but fragment {i} of true has {np.size(t)} tokens: "
                             f"pass one predicted activation per token of each fragment")


def _pooled(true: Sequence[Sequence[float]], pred: Sequence[Sequence[float]]) -> float:
    """Pearson correlation over all tokens of all fragments; 0 when either side is constant (a simulator that
    predicts nothing explains nothing)."""
    _check_aligned(true, pred)
    t = np.concatenate([np.asarray(a, dtype=np.float64) for a in true]) if len(true) else np.zeros(0)
    p = np.concatenate([np.asarray(a, dtype=np.float64) for a in pred]) if len(pred) else np.zeros(0)
    if t.shape != p.shape:
        raise ValueError(f"predictions cover {p.size} tokens but the fragments have {t.size}")
    if t.size < 2 or t.std() == 0 or p.std() == 0:
        return 0.0
    return float(np.corrcoef(t, p)[0, 1])


@checked
def pooled_correlation(true: Sequence[Sequence[float]], pred: Sequence[Sequence[float]]) -> float:
    """Pearson correlation over all tokens of all fragments; 0 when either side is constant (a simulator that
    predicts nothing explains nothing). Raises ValueError unless pred has one fragment per fragment of true and
    one value per token of each."""
    return _pooled(true, pred)


@dataclass
class Split:
    """One direction's fragments (indices into the pool): explanation, top test and random test sets."""

    explain: list[int]
    top: list[int]
    random: list[int]


@checked
def split_fragments(ranked: Sequence[int], firing: Sequence[int]) -> Split | None:
    """The protocol's split from the fragments ranked by max activation (descending, at least MIN_FRAGMENTS) and a
    random order of the fragments where the direction fires; None (skip) when fewer than MIN_FRAGMENTS fire. The
    random set avoids every explanation fragment (and the top test set, so the three never overlap). ValueError
    when `ranked` or `firing` repeats a fragment."""
    for name, idx in (("ranked", ranked), ("firing", firing)):
        if len(set(idx)) != len(idx):
            raise ValueError(f"{name} repeats fragment indices ({len(idx) - len(set(idx))} repeats): pass each "
                             f"fragment once (e.g. the ranking of distinct fragments, not of tokens)")
    if len(ranked) < MIN_FRAGMENTS:
        return None
    explain = [ranked[i] for i in EXPLAIN_RANKS]
    top = [ranked[i] for i in TOP_RANKS]
    used = set(explain) | set(top)
    rnd = [f for f in firing if f not in used][:N_RANDOM]
    return Split(explain, top, rnd)


@checked
def document_sides(doc: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """[n_fragments] bool, True for the explanation side: every document's fragments go to one side (a seeded half
    of the documents), so that no document is explained and tested — an identifier-specific direction would
    otherwise be explained and tested on the same module. doc: [n_fragments] document index of each fragment."""
    if not isinstance(doc, torch.Tensor) or doc.ndim != 1:
        raise ValueError("doc must be a 1-D tensor of document indices, one per fragment (lm.document_fragments)")
    ids = torch.unique(doc)
    if len(ids) < 2:
        raise ValueError(f"the fragments come from {len(ids)} document(s): a document-level split needs at least 2; "
                         f"read more held-out text")
    g = torch.Generator().manual_seed(seed)
    explain_ids = ids[torch.randperm(len(ids), generator=g)[: len(ids) // 2]]
    return torch.isin(doc, explain_ids)


@checked
def split_by_document(ranked_explain: Sequence[int], ranked_test: Sequence[int], firing_test: Sequence[int]
                      ) -> Split | None:
    """The protocol's split when explanation and test fragments come from different documents (`document_sides`):
    explanation = ranks EXPLAIN_RANKS of the explanation side's ranking, top test = ranks TOP_RANKS of the test
    side's, random test = N_RANDOM firing test-side fragments outside the top test set. None (skip) when either
    side has fewer than MIN_FRAGMENTS firing fragments."""
    if len(ranked_explain) < MIN_FRAGMENTS or len(ranked_test) < MIN_FRAGMENTS:
        return None
    overlap = set(ranked_explain) & (set(ranked_test) | set(firing_test))
    if overlap:
        raise ValueError(f"fragments {sorted(overlap)[:5]} are on both sides: pass explanation and test fragments "
                         f"from disjoint document sets (document_sides)")
    top = [ranked_test[i] for i in TOP_RANKS]
    return Split([ranked_explain[i] for i in EXPLAIN_RANKS], top,
                 [f for f in firing_test if f not in set(top)][:N_RANDOM])


@dataclass
class Score:
    """One direction's scores, and per test fragment (top then random, as `fragments`) the sums a pooled
    correlation is made of (`fragment_sums`), so that a bootstrap can reweight fragments."""

    explanation: str
    top: float
    random: float
    top_and_random: float
    fragments: list[int] = field(default_factory=list)
    sums: np.ndarray | None = None
    predictions: list[list[float]] = field(default_factory=list)


def _sums(true: Sequence[Sequence[float]], pred: Sequence[Sequence[float]]) -> np.ndarray:
    """[n_fragments, 6]: per fragment n, Σt, Σp, Σt², Σp², Σtp (float64) — `correlation_from_sums` of their
    column sums is `pooled_correlation` of the fragments."""
    _check_aligned(true, pred)
    out = np.zeros((len(true), 6))
    for i, (t, p) in enumerate(zip(true, pred)):
        t, p = np.asarray(t, dtype=np.float64), np.asarray(p, dtype=np.float64)
        out[i] = [t.size, t.sum(), p.sum(), (t * t).sum(), (p * p).sum(), (t * p).sum()]
    return out


@checked
def fragment_sums(true: Sequence[Sequence[float]], pred: Sequence[Sequence[float]]) -> np.ndarray:
    """[n_fragments, 6]: per fragment n, Σt, Σp, Σt², Σp², Σtp (float64) — `correlation_from_sums` of their
    column sums is `pooled_correlation` of the fragments. ValueError unless pred lines up with true fragment by
    fragment and token by token."""
    return _sums(true, pred)


@checked
def correlation_from_sums(S: np.ndarray) -> np.ndarray:
    """Pearson r from summed `fragment_sums` [..., 6] -> [...]; 0 where either side is constant (as
    `pooled_correlation`), NaN where no token is left."""
    n, st, sp, stt, spp, stp = np.moveaxis(np.asarray(S, dtype=np.float64), -1, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        vt, vp = stt - st * st / n, spp - sp * sp / n
        r = (stp - st * sp / n) / np.sqrt(vt * vp)
        flat = (vt <= 1e-12 * np.maximum(stt, 1e-300)) | (vp <= 1e-12 * np.maximum(spp, 1e-300))
    return np.where(n > 1, np.where(flat, 0.0, np.clip(r, -1, 1)), np.nan)


@checked
def score_direction(records: dict[int, Record], split: Split, explainer: Explainer, simulator: Simulator,
                    explanation: str | None = None, negatives: Sequence[Sequence[str]] = ()) -> Score:
    """Explain from the split's explanation records (or use `explanation`, e.g. another direction's for the
    shuffled control), simulate the test records from the text alone, and correlate. `negatives` (token texts of
    contexts where the direction is 0, for `analyses.detection`) are simulated in the same call; the predictions
    are kept in `Score.predictions` (top, random, then negatives)."""
    text = explainer.explain([records[i] for i in split.explain]) if explanation is None else explanation
    top = [records[i] for i in split.top]
    rnd = [records[i] for i in split.random]
    pred = simulator.simulate(text, [r.tokens for r in top + rnd] + [list(n) for n in negatives])
    p_top, p_rnd = pred[:len(top)], pred[len(top):len(top) + len(rnd)]
    true_top, true_rnd = [r.acts for r in top], [r.acts for r in rnd]
    return Score(text, _pooled(true_top, p_top), _pooled(true_rnd, p_rnd) if rnd else math.nan,
                 _pooled(true_top + true_rnd, p_top + p_rnd), list(split.top) + list(split.random),
                 _sums(true_top + true_rnd, p_top + p_rnd), pred)


@checked
def bootstrap_ci(scores: Sequence[float], level: float = 0.95, n_boot: int = 2000, seed: int = 0
                 ) -> tuple[float, float, float, float]:
    """(mean, low, high, 1.96·SE) of the mean score: a percentile bootstrap over directions at `level`, and the
    normal interval's half-width for comparison with the paper's 1.96·SE. level is a share in (0, 1), e.g. 0.95."""
    if isinstance(level, bool) or not isinstance(level, numbers.Real) or not 0 < level < 1:
        raise ValueError(f"level must be a share in (0, 1), e.g. 0.95 for a 95% interval, got {level!r}")
    s = np.asarray([v for v in scores if v == v], dtype=np.float64)
    if s.size == 0:
        return math.nan, math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = s[rng.integers(0, s.size, size=(n_boot, s.size))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    se = s.std(ddof=1) / math.sqrt(s.size) if s.size > 1 else math.nan
    return float(s.mean()), float(lo), float(hi), 1.96 * se
