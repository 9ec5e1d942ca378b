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

The ceiling: the best explanation of the token-table form, fitted on the test fragments themselves — each token
predicted by the mean activation of its (previous token, token) pair in those fragments, the conditional mean that
maximises the correlation any function of that pair can reach."""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from ..activations import Exclusion
from ..arguments import checked
from .interpretability import Record, Simulator, pooled_correlation

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
    either list is empty."""
    if not len(positives) or not len(negatives):
        return math.nan
    pred = simulator.simulate(explanation, [list(p) for p in positives] + [list(n) for n in negatives])
    said = [max(p, default=0.0) > threshold for p in pred]
    return _balanced(said[:len(positives)], said[len(positives):])


@checked
def fuzzing_score(explanation: str, simulator: Simulator, records: Sequence[Record], seed: int = 0,
                  threshold: float = THRESHOLD) -> float:
    """Balanced accuracy of telling, in each activating record, its m most active tokens (m = min(firing tokens,
    silent tokens)) from m seeded random tokens where the direction is 0, from `explanation` alone. Records with no
    firing or no silent token are left out; NaN when none is left."""
    rng = np.random.default_rng(seed)
    marks = []
    for r in records:
        acts = np.asarray(r.acts, dtype=np.float64)
        on, off = np.nonzero(acts > 0)[0], np.nonzero(~(acts > 0))[0]
        m = min(len(on), len(off))
        if m == 0:
            continue
        marks.append((r, on[np.argsort(-acts[on], kind="stable")[:m]], rng.choice(off, m, replace=False)))
    if not marks:
        return math.nan
    pred = simulator.simulate(explanation, [list(r.tokens) for r, _, _ in marks])
    said_pos, said_neg = [], []
    for p, (_, on, off) in zip(pred, marks):
        p = np.asarray(p, dtype=np.float64)
        said_pos.append(float((p[on] > threshold).mean()) >= 0.5)
        said_neg.append(float((p[off] > threshold).mean()) >= 0.5)
    return _balanced(said_pos, said_neg)


@checked
def ceiling_score(records: Sequence[Record], context: str = "bigram") -> float:
    """Pooled correlation between the records' activations and the mean activation of each token's (previous
    token, token) pair within the same records (context="bigram"; "unigram": of the token alone): what an
    explanation of the token-table form could reach on these fragments. Raises ValueError for another context."""
    if context not in ("bigram", "unigram"):
        raise ValueError(f"context must be 'bigram' or 'unigram', got {context!r}")
    keys = [(r.tokens[i - 1] if i and context == "bigram" else None, t) for r in records for i, t in enumerate(r.tokens)]
    y = np.asarray([a for r in records for a in r.acts], dtype=np.float64)
    if len(keys) != len(y):
        raise ValueError("every record needs one activation per token")
    ids = {}
    inv = np.asarray([ids.setdefault(k, len(ids)) for k in keys], dtype=np.int64)
    means = np.bincount(inv, weights=y, minlength=len(ids)) / np.bincount(inv, minlength=len(ids))
    return pooled_correlation([y], [means[inv]])


@checked
@torch.no_grad()
def context_maxima(read: Callable[[torch.Tensor], Mapping[str, torch.Tensor]],
                   encoders: Mapping[str, tuple[str, Callable[[torch.Tensor], torch.Tensor]]], tokens: torch.Tensor,
                   *, batch_size: int = 64, exclude: Exclusion | None = None) -> dict[str, torch.Tensor]:
    """{name: [n_contexts, n] float32} each direction's max activation over each context of `tokens`
    [n_contexts, ctx_len] (excluded positions count as 0, as in `analyses.mining.mine`), for drawing contexts where
    a direction is 0. read/encoders as for `mine`."""
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2 or tokens.dtype.is_floating_point:
        raise ValueError("tokens must be integer token ids [n_contexts, ctx_len]")
    out: dict[str, list[torch.Tensor]] = {name: [] for name in encoders}
    for c0 in range(0, tokens.shape[0], batch_size):
        tb = tokens[c0:c0 + batch_size]
        xs = read(tb)
        for name, (hook, encode) in encoders.items():
            x = xs[hook]
            B, T = x.shape[:2]
            a = encode(x.reshape(B * T, -1)).float().reshape(B, T, -1).cpu()
            if exclude:
                a = a * exclude.keep(tb, x, hook)[..., None].float().cpu()
            out[name].append(a.amax(1))
    return {name: torch.cat(v) for name, v in out.items()}


@checked
def matched_negatives(positives: Sequence[int], silent: Sequence[int], doc: torch.Tensor, seed: int = 0
                      ) -> list[int]:
    """For each positive fragment (global index) a distinct silent fragment (the direction is 0 throughout) from
    the same document where one is left, else a seeded random silent one; fewer when silent ones run out.
    doc: [n_fragments] document index of every fragment."""
    rng = np.random.default_rng(seed)
    silent = list(silent)
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
