"""Notebook 05: following features across an SAE's training snapshots and across model revisions, on real activations.

`analyses.tracking` holds the maths (pure functions of decoder matrices); this module is the plumbing around it:

* one SAE per model revision, same configuration, trained with `dictionaries.train_lm_sweep` into
  `<data_dir>/tracking/dictionaries/...` (apart from notebook 03's sweeps, so the two never collide) and reused on
  rerun; the final revision's SAE also keeps weight snapshots during training (`train_sae(state_dir=...)`), at
  log-spaced steps plus evenly spaced ones (`dictionaries.tracking_schedule`), for part (a);
* alive masks and firing frequencies measured by running each SAE (or snapshot) on one fixed set of evaluation rows;
  a feature is *alive* when it fires (code > 0) on at least `min_fires` of them;
* 1:1 matching (Hungarian) of the final model's features into every earlier revision's dictionary, keeping the
  partner indices, so a tracked feature's top-activating tokens can be shown at every step;
* top examples (`nb05_examples`): the evaluation rows where a feature fires most, decoded with the tokenizer.

Every revision's activations come from the same token contexts in the same order (the harvest reads them in order),
so evaluation row r is the same token at every revision; `eval_rows` checks this."""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .. import analyses, dictionaries, lm
from ..activations import ActivationStore
from ..analyses import hungarian_match
from ..dictionaries.training import load_snapshot, snapshot_steps
from ..files import load_json

TRACKING_SUBDIR = "tracking"


# ----------------------------------------------------------------------------------------------------------------
# revisions and schedules


def revision_step(model: str, revision: str, data_dir: str | os.PathLike = "data") -> int | None:
    """The training step of a model revision: "step512" -> 512; "final" of the offline model -> the step its
    training_state.json records; None when unknown (e.g. a hub model's "main")."""
    m = re.fullmatch(r"step(\d+)", str(revision))
    if m:
        return int(m.group(1))
    if model == "offline" and revision in ("final", "main", None):
        try:
            folder = lm.resolve_revision(lm.offline_dir(data_dir), "final")
        except FileNotFoundError:
            return None
        state = folder / "training_state.json"
        if state.exists():
            return int(load_json(state)["step"])
    return None


def revision_labels(model: str, revisions: Sequence[str], data_dir: str | os.PathLike = "data") -> list[str]:
    """Tick labels: "step64", "final (1000)"."""
    out = []
    for r in revisions:
        s = revision_step(model, r, data_dir)
        out.append(r if s is None or r == f"step{s}" else f"{r} ({s})")
    return out


def check_revisions(revisions: Sequence[str]) -> list[str]:
    revisions = [str(r) for r in revisions]
    if not revisions:
        raise ValueError("revisions is empty: give the model's revisions oldest first, the final model last (one, "
                         "['final'], for a model without training revisions: part (a) only)")
    if len(set(revisions)) != len(revisions):
        raise ValueError(f"revisions has duplicates: {revisions}")
    bad = [r for r in revisions if not re.fullmatch(r"step\d+|final|main", r)]
    if bad:
        raise ValueError(f"revisions must be 'stepN', 'final' or 'main', got {bad}")
    steps = [int(r[4:]) for r in revisions if r.startswith("step")]
    if steps != sorted(steps) or any(r in ("final", "main") for r in revisions[:-1]):
        raise ValueError(f"revisions must be oldest first with the final model last, e.g. ['step0', 'step64', "
                         f"'step512', 'final'], got {revisions}")
    return revisions


# ----------------------------------------------------------------------------------------------------------------
# activations and SAEs per revision


def eval_rows(stores: Sequence[ActivationStore], n_rows: int) -> torch.Tensor:
    """Row indices 0..n-1 (the first contexts, whole) for firing statistics and examples; checks that every store
    holds the same tokens there, so row r means the same token at every revision."""
    n = min(int(n_rows), *(s.n_tokens for s in stores))
    if n < 1:
        raise ValueError(f"n_rows must be >= 1, got {n_rows}")
    ref = stores[0].tokens[:n]
    for s in stores[1:]:
        if not torch.equal(s.tokens[:n], ref):
            raise ValueError(f"{s.folder} holds other tokens than {stores[0].folder} in its first {n} rows: harvest "
                             f"every revision from the same contexts (same model tokenizer, corpus and seed)")
    return torch.arange(n)


@torch.no_grad()
def feature_codes(sae, x: torch.Tensor, member: int = 0, features: torch.Tensor | None = None,
                  batch_size: int = 8192) -> torch.Tensor:
    """Codes [rows, d_sae] (or [rows, len(features)]) of one member on raw activations x, in batches."""
    sae.eval()
    out = []
    for i in range(0, x.shape[0], batch_size):
        c = sae.encode(x[i:i + batch_size].to(sae.device))[member]
        out.append((c if features is None else c[:, features]).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def firing_counts(sae, x: torch.Tensor, member: int = 0, batch_size: int = 8192) -> torch.Tensor:
    """[d_sae] long: on how many rows of x each feature fires (code > 0)."""
    sae.eval()
    counts = torch.zeros(sae.d_sae, dtype=torch.long)
    for i in range(0, x.shape[0], batch_size):
        c = sae.encode(x[i:i + batch_size].to(sae.device))[member]
        counts += (c > 0).sum(0).cpu()
    return counts


# ----------------------------------------------------------------------------------------------------------------
# (a) one SAE across its own training


@dataclass
class TrainingTrajectory:
    steps: list[int]                  # SAE training steps of the snapshots
    W_dec: torch.Tensor               # [T, d_sae, d_in]
    fires: torch.Tensor               # [T, d_sae] firing counts on the evaluation rows
    alive: torch.Tensor               # [T, d_sae] bool: fires >= min_fires
    track: analyses.TrainingTrack     # self-similarity, reached-then-fell, settling, birth/death
    n_eval: int

    def summary(self, high: float = 0.9, low: float = 0.6) -> dict[str, Any]:
        """Shares over the features alive at the end of training (dead ones have no direction worth following)."""
        alive_final = self.alive[-1]
        n = int(alive_final.sum())
        tr = self.track
        bd = tr.birth_death

        def share(mask):
            return float(mask[alive_final].double().mean()) if n else float("nan")

        return {"n_features": int(self.alive.shape[1]), "n_alive_final": n,
                f"share_reached_{high:g}_then_below_{low:g}": share(tr.reached_then_fell_previous),
                f"share_reached_{high:g}_then_below_{low:g}_to_final": share(tr.reached_then_fell_final),
                "share_settled_by_half": share((tr.settled >= 0) & (tr.settled <= (len(self.steps) - 1) // 2)),
                "n_births_after_start": int(bd.births[1:].sum()), "n_deaths": int(bd.deaths.sum()),
                "n_never_alive": bd.n_never_alive, "n_died_for_good": bd.n_died_for_good,
                "snapshot_steps": list(self.steps)}


def snapshot_sae(run, step: int):
    """The run's SAE with the weights of training snapshot `step`, the input scale folded in (it takes raw
    activations, like the saved sweep)."""
    weights = load_snapshot(dictionaries.state_dir(run.folder), step, fold=True, device=run.sae.device)
    sae = copy.deepcopy(run.sae)
    sae.load_state_dict(weights, strict=False)
    return sae


def training_trajectory(run, x_eval: torch.Tensor, member: int = 0, min_fires: int = 1, high: float = 0.9,
                        low: float = 0.6, settle: float = 0.9) -> TrainingTrajectory:
    """Part (a) for a run trained with snapshots: decoder directions at every snapshot, alive masks from firing on
    x_eval (raw activations), then analyses.track_training."""
    folder = dictionaries.state_dir(run.folder)
    steps = snapshot_steps(folder)
    if len(steps) < 2:
        raise ValueError(f"{folder} holds {len(steps)} training snapshots; train the final revision's SAE with "
                         f"dictionaries.train_revision_sae(..., snapshots=True)")
    W, fires = [], []
    for s in steps:
        sae = snapshot_sae(run, s)
        W.append(sae.W_dec.detach()[member].float().cpu())
        fires.append(firing_counts(sae, x_eval, member))
    W, fires = torch.stack(W), torch.stack(fires)
    alive = fires >= min_fires
    track = analyses.track_training(list(W), alive=alive, high=high, low=low, settle=settle)
    return TrainingTrajectory(steps, W, fires, alive, track, int(x_eval.shape[0]))


# ----------------------------------------------------------------------------------------------------------------
# (b) the same SAE configuration across model revisions


@dataclass
class Emergence:
    revisions: list[str]
    matching: analyses.RevisionMatching   # to_final [K, n_final], consecutive matches
    partner: torch.Tensor                   # [K, n_final] long: index of each final feature's 1:1 partner (-1: none)
    fires: torch.Tensor                     # [K, d_sae] firing counts on the evaluation rows
    alive: torch.Tensor                     # [K, d_sae] bool

    def present_by_revision(self, threshold: float = 0.9) -> dict[str, float]:
        """{revision: share of the final model's live features with a match >= threshold there}."""
        return dict(zip(self.revisions, self.matching.share_present(threshold).tolist()))

    def count_by_revision(self, threshold: float = 0.9) -> dict[str, int]:
        live = self.alive[-1]
        counts = (self.matching.to_final[:, live] >= threshold).sum(dim=1)
        return dict(zip(self.revisions, counts.tolist()))

    def emergence_index(self, threshold: float = 0.9) -> torch.Tensor:
        """[n_final] first revision index from which the feature is present at every later one (-1: dead)."""
        return self.matching.emergence_step(threshold)


def match_revisions(revisions: Sequence[str], runs: Sequence[Any], x_evals: Sequence[torch.Tensor],
                    member: int = 0, min_fires: int = 1, **match_kw) -> Emergence:
    """Hungarian 1:1 matching of the final revision's SAE features into every revision's SAE (and each revision
    into the next), among features alive on that revision's evaluation rows."""
    if not len(revisions) == len(runs) == len(x_evals):
        raise ValueError(f"need one run and one evaluation set per revision, got {len(revisions)} revisions, "
                         f"{len(runs)} runs, {len(x_evals)} evaluation sets")
    D = [r.sae.W_dec.detach()[member].float().cpu() for r in runs]
    fires = torch.stack([firing_counts(r.sae, x, member) for r, x in zip(runs, x_evals)])
    alive = fires >= min_fires
    K, F = len(D), D[-1]
    to_final = torch.full((K, F.shape[0]), float("nan"), dtype=torch.float64)
    partner = torch.full((K, F.shape[0]), -1, dtype=torch.long)
    for k in range(K):
        m = hungarian_match(F, D[k], alive[-1], alive[k], **match_kw)
        to_final[k, m.rows], partner[k, m.rows] = m.cos, m.cols
    consecutive = [hungarian_match(D[k], D[k + 1], alive[k], alive[k + 1], **match_kw).a_to_b()
                   for k in range(K - 1)]
    return Emergence(list(revisions), analyses.RevisionMatching(consecutive, to_final, "hungarian"), partner,
                     fires, alive)


def pick_tracked(em: Emergence, n: int = 4, threshold: float = 0.9) -> list[int]:
    """Up to n final features that emerge at different revisions, earliest first: the distinct emergence indices
    (features that exist only at the final revision included) spread evenly, and in each the feature that fires
    most often at the final revision (ties: lowest index)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    first = em.emergence_index(threshold)
    groups = sorted({int(v) for v in first.tolist() if v >= 0})
    if not groups:
        return []
    chosen = [groups[round(i * (len(groups) - 1) / max(1, n - 1))] for i in range(min(n, len(groups)))]
    out = []
    fires = em.fires[-1]
    for g in dict.fromkeys(chosen):
        idx = torch.nonzero(first == g).squeeze(1)
        out.append(int(idx[torch.argmax(fires[idx])]))  # argmax returns the first maximum
    return out


def tracking_metrics(traj: TrainingTrajectory, em: Emergence | None, labels: Sequence[str] | None = None,
                     high: float = 0.9, low: float = 0.6, threshold: float = 0.9) -> dict[str, Any]:
    """The 05_metrics.json keys: part (a)'s shares and births/deaths, part (b)'s share and count of final-model
    features present (match >= threshold) at each revision, and the consecutive matches. em=None (a model with
    one revision, e.g. a GGUF file): part (a) only, with ``revisions`` saying so."""
    def r4(values):
        return [round(float(v), 4) for v in values]

    out = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in traj.summary(high, low).items()}
    if em is None:
        out["revisions"] = "none: the model has one revision, so part (b) (across model revisions) is not run"
        return out
    out["final_features_present_by_step"] = dict(zip(em.revisions, r4(em.present_by_revision(threshold).values())))
    out["final_features_present_count_by_step"] = em.count_by_revision(threshold)
    out["n_final_features_alive"] = int(em.alive[-1].sum())
    out["consecutive_share_matched"] = dict(zip([f"{a}->{b}" for a, b in zip(em.revisions, em.revisions[1:])],
                                                r4(em.matching.consecutive_share_above(threshold))))
    out["median_match_to_final_by_step"] = dict(zip(em.revisions, r4(em.matching.to_final[:, em.alive[-1]]
                                                                      .nanmedian(dim=1).values)))
    out["revisions"] = list(em.revisions) if labels is None else list(labels)
    return out
