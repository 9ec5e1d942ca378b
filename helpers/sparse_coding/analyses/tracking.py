"""Tracking features over time: across an SAE's training snapshots and across a model's revisions.

(a) SAE training snapshots: one SAE saved at several steps, so feature i is row i of every snapshot. We follow
    each feature's cosine with itself at the previous snapshot and at the final one, count features that reached a
    high self-similarity and later fell (the original work saw 20-40 % reach >= 0.9 and later drop below 0.6), and
    feature birth and death from per-snapshot alive masks.
(b) Model revisions: the same SAE configuration trained separately on activations of each model revision, so
    features are NOT index-aligned; they are matched (1:1 Hungarian or plain max cosine, `matching` / `mcs`) between
    consecutive revisions and to the final model's dictionary, and we count how many final-model features already
    exist (match >= 0.9) at each revision: when features emerge.

Everything here is a pure function of tensors (lists of [n_features, d] decoder directions, [T, n] similarity or
alive matrices), so a notebook loads snapshots and dictionaries however it likes and passes W_dec in. Dead or all-zero rows give
NaN similarities, which every comparison below treats as "no" (never as a match or a fall)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..arguments import checked
from .matching import hungarian_match
from .similarity import mcs


def _stack_snapshots(snapshots: Sequence[torch.Tensor], name: str = "snapshots") -> torch.Tensor:
    if isinstance(snapshots, torch.Tensor):
        if snapshots.ndim != 3:
            raise ValueError(f"{name} as one tensor must be [T, n_features, d], got shape {tuple(snapshots.shape)}")
        snapshots = list(snapshots)
    if len(snapshots) == 0:
        raise ValueError(f"{name} is empty: pass a list of [n_features, d] decoder matrices, oldest first")
    shapes = {tuple(c.shape) for c in snapshots}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"{name} must all be [n_features, d] with one shape (the same SAE saved at several steps); "
                         f"got shapes {sorted(shapes)}. For independently trained dictionaries use "
                         f"match_across_revisions")
    X = torch.stack([c.detach().double() for c in snapshots])
    if X.shape[1] == 0:
        raise ValueError(f"{name} have 0 features")
    norms = X.norm(dim=2, keepdim=True)
    # zero rows (dead / never initialised) become NaN so that they are never counted as similar or dissimilar
    return torch.where(norms > 0, X / norms, torch.full_like(X, float("nan")))


# ----------------------------------------------------------------------------------------------------------------
# (a) one SAE across its training snapshots


@dataclass
class SelfSimilarity:
    to_previous: torch.Tensor   # [T, n] cos(feature i at t, feature i at t-1); row 0 is NaN
    to_final: torch.Tensor      # [T, n] cos(feature i at t, feature i at the last snapshot); last row is 1


@checked
def self_similarity(snapshots: Sequence[torch.Tensor]) -> SelfSimilarity:
    """Each feature's cosine with itself at the previous and at the final snapshot (oldest snapshot first)."""
    X = _stack_snapshots(snapshots)
    prev = torch.full(X.shape[:2], float("nan"), dtype=torch.float64)
    prev[1:] = (X[1:] * X[:-1]).sum(-1)
    final = (X * X[-1:]).sum(-1)
    return SelfSimilarity(prev, final)


@checked
def reached_then_fell(sim: torch.Tensor, high: float = 0.9, low: float = 0.6) -> torch.Tensor:
    """[n] bool: the feature's similarity reached >= `high` at some snapshot and was < `low` at a later one.

    `sim` is [T, n] (e.g. SelfSimilarity.to_previous or .to_final); NaN entries count neither way."""
    if sim.ndim != 2 or sim.shape[0] == 0:
        raise ValueError(f"sim must be [T, n_features] with T >= 1, got shape {tuple(sim.shape)}")
    if not low <= high:
        raise ValueError(f"need low <= high, got low={low}, high={high}")
    reached = sim >= high
    # reached strictly before t: cumulative OR of the rows above, shifted down by one snapshot
    before = torch.zeros_like(reached)
    before[1:] = reached.cummax(dim=0).values[:-1]
    return ((sim < low) & before).any(dim=0)


@checked
def settled_step(to_final: torch.Tensor, threshold: float = 0.9) -> torch.Tensor:
    """[n] long: the first snapshot from which the feature stays >= threshold with its final self to the end
    (-1 if it never does, e.g. a dead feature). The step at which a feature took its final form. to_final is
    [T, n_features] (or one feature's [T]); raises ValueError for more dimensions."""
    if to_final.ndim not in (1, 2):  # a 3-d stack would be read as [T, n] per leading slice, silently
        raise ValueError(f"to_final must be [T, n_features] (SelfSimilarity.to_final), got shape "
                         f"{tuple(to_final.shape)}; track one SAE (one ensemble member) at a time")
    ok = (to_final >= threshold).int()
    suffix_all = ok.flip(0).cumprod(dim=0).flip(0).bool()   # ok at t and at every later snapshot
    first = suffix_all.int().argmax(dim=0)
    return torch.where(suffix_all.any(dim=0), first, torch.full_like(first, -1))


@dataclass
class BirthDeath:
    births: torch.Tensor        # [T] features alive at t that were dead at t-1 (t=0: alive at the start)
    deaths: torch.Tensor        # [T] features dead at t that were alive at t-1 (t=0: 0)
    n_alive: torch.Tensor       # [T]
    first_alive: torch.Tensor   # [n] first snapshot alive, -1 if never
    last_alive: torch.Tensor    # [n] last snapshot alive, -1 if never
    n_never_alive: int
    n_died_for_good: int        # alive at some snapshot, dead at the final one


@checked
def birth_death(alive: torch.Tensor) -> BirthDeath:
    """Feature birth and death from [T, n] alive masks (e.g. fired at least once in an evaluation batch)."""
    alive = torch.as_tensor(alive)
    if alive.dtype != torch.bool or alive.ndim != 2 or alive.shape[0] == 0:
        raise ValueError(f"alive must be a bool tensor [T, n_features] with T >= 1, got {alive.dtype} "
                         f"{tuple(alive.shape)}; e.g. torch.stack([freq_t > 0 for freq_t in frequencies])")
    T = alive.shape[0]
    births = torch.zeros(T, dtype=torch.long)
    deaths = torch.zeros(T, dtype=torch.long)
    births[0] = alive[0].sum()
    births[1:] = (alive[1:] & ~alive[:-1]).sum(dim=1)
    deaths[1:] = (~alive[1:] & alive[:-1]).sum(dim=1)
    ever = alive.any(dim=0)
    t_idx = torch.arange(T)[:, None].expand_as(alive)
    first = torch.where(alive, t_idx, T).min(dim=0).values
    last = torch.where(alive, t_idx, -1).max(dim=0).values
    first = torch.where(ever, first, torch.full_like(first, -1))
    return BirthDeath(births, deaths, alive.sum(dim=1), first, last, int((~ever).sum()),
                      int((ever & ~alive[-1]).sum()))


@dataclass
class TrainingTrack:
    self_sim: SelfSimilarity
    reached_then_fell_previous: torch.Tensor   # [n] bool, on to_previous
    reached_then_fell_final: torch.Tensor      # [n] bool, on to_final
    settled: torch.Tensor                      # [n] settled_step(to_final)
    birth_death: BirthDeath | None


@checked
def track_training(snapshots: Sequence[torch.Tensor], alive: torch.Tensor | None = None, high: float = 0.9,
                   low: float = 0.6, settle: float = 0.9) -> TrainingTrack:
    """Everything of part (a) in one call: self-similarity, reached-then-fell (on both references), settling step,
    and birth/death if per-snapshot alive masks are given."""
    ss = self_similarity(snapshots)
    bd = None
    if alive is not None:
        bd = birth_death(alive)
        if bd.n_alive.shape[0] != ss.to_final.shape[0] or alive.shape[1] != ss.to_final.shape[1]:
            raise ValueError(f"alive is {tuple(alive.shape)} but snapshots are {tuple(ss.to_final.shape)} "
                             f"[T, n_features]; pass one alive mask per snapshot")
    return TrainingTrack(ss, reached_then_fell(ss.to_previous, high, low), reached_then_fell(ss.to_final, high, low),
                         settled_step(ss.to_final, settle), bd)


# ----------------------------------------------------------------------------------------------------------------
# (b) independently trained dictionaries across model revisions


def _match_values(A, B, alive_a, alive_b, method, **kw) -> torch.Tensor:
    """[n_A] cosine of each A-feature with its partner in B (NaN for dead or unmatched A-features)."""
    if method == "hungarian":
        return hungarian_match(A, B, alive_a, alive_b, **kw).a_to_b()
    if method == "max":
        return mcs(A, B, alive_a, alive_b, **kw).a_to_b.double().cpu()
    raise ValueError(f"method must be 'hungarian' (1:1) or 'max' (plain MCS), got {method!r}")


@dataclass
class RevisionMatching:
    consecutive: list[torch.Tensor]   # K-1 tensors: [n_k] match of each D_k feature in D_{k+1}
    to_final: torch.Tensor            # [K, n_final]: each final feature's match in D_k (last row: itself, 1)
    method: str

    def present(self, threshold: float = 0.9) -> torch.Tensor:
        """[K] number of final-model features that already exist (match >= threshold) at each revision."""
        return (self.to_final >= threshold).sum(dim=1)

    def share_present(self, threshold: float = 0.9) -> torch.Tensor:
        alive = ~torch.isnan(self.to_final[-1])
        return (self.to_final[:, alive] >= threshold).double().mean(dim=1)

    def emergence_step(self, threshold: float = 0.9) -> torch.Tensor:
        """[n_final] first revision index from which the feature is present at every later revision (-1: never)."""
        return settled_step(self.to_final, threshold)

    def consecutive_share_above(self, threshold: float = 0.9) -> torch.Tensor:
        """[K-1] share of D_k's live features with a match >= threshold in D_{k+1}."""
        return torch.tensor([float((c[~torch.isnan(c)] >= threshold).double().mean()) for c in self.consecutive])


@checked
def match_across_revisions(dictionaries: Sequence[torch.Tensor], alive: Sequence[torch.Tensor | None] | None = None,
                             method: str = "hungarian", **match_kw) -> RevisionMatching:
    """Match dictionaries trained on successive model revisions (oldest first, the final model last): each to the
    next one, and the final one's features into every earlier one. `alive`: optional per-dictionary masks.
    Extra keywords go to `hungarian_match` / `mcs` (e.g. chunk_size, candidates)."""
    if len(dictionaries) < 2:
        raise ValueError(f"need at least 2 dictionaries (revisions) to match, got {len(dictionaries)}")
    widths = [D.shape[-1] if isinstance(D, torch.Tensor) and D.ndim else None for D in dictionaries]
    for k, w in enumerate(widths[1:], 1):
        if w != widths[0]:  # named here: the matcher's own message cannot say which revisions differ
            raise ValueError(f"dictionaries have different widths: dictionaries[{k}] has d={w} but "
                             f"dictionaries[0] has d={widths[0]}; every revision's dictionary must be trained at "
                             f"the same site (one activation width)")
    alive = [None] * len(dictionaries) if alive is None else list(alive)
    if len(alive) != len(dictionaries):
        raise ValueError(f"got {len(alive)} alive masks for {len(dictionaries)} dictionaries; pass one per "
                         f"dictionary (None for all alive)")
    consecutive = [_match_values(dictionaries[k], dictionaries[k + 1], alive[k], alive[k + 1], method, **match_kw)
                   for k in range(len(dictionaries) - 1)]
    F, aF = dictionaries[-1], alive[-1]
    to_final = torch.stack([_match_values(F, D, aF, aD, method, **match_kw) for D, aD in zip(dictionaries, alive)])
    return RevisionMatching(consecutive, to_final, method)
