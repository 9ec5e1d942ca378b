"""How well a learned dictionary recovers known features (toy data), and how stable it is across sizes.

Direction conventions (all use `similarity.mcs`, which takes the signed cosine: an atom pointing the opposite way
does not count, as a ReLU/TopK code can only add a decoder row with a positive coefficient):
- `mmcs_to_truth(learned, truth)`: for each TRUE feature, its best cosine with any learned atom, averaged
  (Sharkey et al.'s MMCS: "is every real feature somewhere in the dictionary?").
- `mmcs_from_learned(learned, truth)`: the reverse, for each learned atom its best true feature ("are the atoms real
  features, or filler?"); an over-complete dictionary with junk atoms scores high on the first and low on this.
Dead rows (all zero or non-finite, e.g. a latent whose decoder row was zeroed) are left out of every mean and share,
as in `similarity.mcs` (`MCSResult.mmcs`, `MCSResult.share_above`): they are neither matches nor misses.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from ..arguments import checked
from .similarity import mcs
from .null import null_mcs_mean


def _as_dicts(learned: torch.Tensor) -> torch.Tensor:
    """[n, d] or [E, n, d] -> [E, n, d] (an ensemble's members score one by one)."""
    if learned.ndim == 2:
        return learned[None]
    if learned.ndim == 3:
        return learned
    raise ValueError(f"learned must be [n, d] or [E, n, d], got shape {tuple(learned.shape)}")


def _per_member(learned: torch.Tensor, truth: torch.Tensor, score, from_learned: bool = False) -> torch.Tensor:
    """score(mcs(truth, member)) (from_learned: mcs(member, truth)) for each member of `learned`: [E] float32, or
    0-d for one dictionary."""
    pairs = [(D.to(truth.device), truth) if from_learned else (truth, D.to(truth.device)) for D in _as_dicts(learned)]
    out = torch.tensor([score(mcs(a, b)) for a, b in pairs], dtype=torch.float32, device=truth.device)
    return out if learned.ndim == 3 else out[0]


@checked
def mmcs_to_truth(learned: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Mean over live true features of the max cosine with any live learned atom; [E] for an ensemble, 0-d for one
    dict. Dead rows on either side are left out (`MCSResult.mmcs`)."""
    return _per_member(learned, truth, lambda r: r.mmcs)


@checked
def mmcs_from_learned(learned: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Mean over live learned atoms of the max cosine with any live true feature; [E] or 0-d like `mmcs_to_truth`.
    Dead atoms (zero or non-finite rows) are left out, not counted as 0 or NaN (`MCSResult.mmcs`)."""
    return _per_member(learned, truth, lambda r: r.mmcs, from_learned=True)


@checked
def share_recovered(learned: torch.Tensor, truth: torch.Tensor, threshold: float = 0.9) -> torch.Tensor:
    """Share of live true features whose best live learned atom has cosine >= threshold; [E] or 0-d. Dead true
    features (zero or non-finite rows) count neither as recovered nor as missed (`MCSResult.share_above`)."""
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold is a cosine and must be in [-1, 1], got {threshold}")
    return _per_member(learned, truth, lambda r: r.share_above(threshold))


@checked
def dead_features(codes: torch.Tensor, eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(count, share) of features that never exceed `eps` on the given (held-out) codes.

    codes: [B, n] for one dictionary or [E, B, n] for an ensemble (as `sae.encode` returns); count and share are
    then per member, shape [E]."""
    if codes.ndim not in (2, 3):
        raise ValueError(f"codes must be [batch, n] or [E, batch, n], got shape {tuple(codes.shape)}")
    if codes.shape[-2] == 0:
        raise ValueError("codes has an empty batch: pass held-out samples to decide which features are dead")
    alive = (codes > eps).any(dim=-2)
    count = (~alive).sum(dim=-1)
    return count, count.float() / codes.shape[-1]


@checked
def mmcs_vs_larger(dictionaries: Mapping[float, torch.Tensor] | Sequence[torch.Tensor]) -> dict:
    """MMCS of each dictionary against the next-larger one in the sweep: {size_key: mmcs} (the largest has none).

    Without ground truth, a feature that reappears in a bigger dictionary trained independently is taken as real.
    dictionaries: {key (e.g. ratio): [n, d] or [E, n, d]} or a list; ordered by number of atoms. Ensembles are
    compared member by member (same α in both), giving [E]. Dead rows are left out, as in `similarity.mcs`."""
    items = list(dictionaries.items()) if isinstance(dictionaries, Mapping) else list(enumerate(dictionaries))
    if len(items) < 2:
        raise ValueError("mmcs_vs_larger needs at least two dictionaries of different sizes")
    items.sort(key=lambda kv: kv[1].shape[-2])
    out = {}
    for (key, small), (_, large) in zip(items, items[1:]):
        S, L = _as_dicts(small), _as_dicts(large).to(small.device)
        if S.shape[0] != L.shape[0]:
            raise ValueError(f"ensembles differ in size ({S.shape[0]} vs {L.shape[0]} members); compare like with like")
        vals = torch.tensor([mcs(s, l).mmcs for s, l in zip(S, L)], dtype=torch.float32, device=small.device)
        out[key] = vals if small.ndim == 3 else vals[0]
    return out


@checked
def expected_random_mmcs(d: int, n: int) -> float:
    """Chance level for MMCS: the expected best signed cosine of a true feature with n random unit directions in
    d dimensions (exact, `similarity.null_mcs_mean`)."""
    return null_mcs_mean(n, d)


@checked
def recovery_report(learned: torch.Tensor, truth: torch.Tensor, codes: torch.Tensor | None = None,
                    threshold: float = 0.9) -> dict:
    """All truth-based metrics for one dictionary or ensemble, as plain lists/floats for tables and JSON."""
    rep = {
        "mmcs": mmcs_to_truth(learned, truth).tolist(),
        "mmcs_reverse": mmcs_from_learned(learned, truth).tolist(),
        f"share_above_{threshold}": share_recovered(learned, truth, threshold).tolist(),
    }
    if codes is not None:
        count, share = dead_features(codes)
        rep["dead_count"], rep["dead_share"] = count.tolist(), share.tolist()
    return rep
