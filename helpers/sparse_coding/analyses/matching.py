"""Exact 1:1 matching of two dictionaries' features (the Hungarian assignment of maximum total cosine), without a
dense cost matrix.

Keep each row's and each column's top-m candidates, solve the sparse assignment with scipy's
`min_weight_full_bipartite_matching`, then prove the result optimal for the *full* matrix with LP duality: dual
potentials v (one per B-feature) are recovered from the sparse optimum as shortest-path distances, and one more
chunked pass checks every excluded pair's reduced cost. Pairs that violate it are added and the sparse problem is
solved again (column generation), so the answer is the dense Hungarian optimum, with the certificate's slack
reported as a bound on the gap."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..arguments import checked
from .similarity import ROW_BLOCK, cos_blocks, cos_chunks, prepare

@dataclass
class MatchResult:
    """An exact max-total-cosine 1:1 matching between the live features of A and B (min(n_A, n_B) pairs)."""

    rows: torch.Tensor          # [k] indices into A, sorted
    cols: torch.Tensor          # [k] indices into B
    cos: torch.Tensor           # [k] cosine of each matched pair (float64)
    n_a: int
    n_b: int
    method: str                 # "dense" or "sparse"
    info: dict = field(default_factory=dict)  # sparse route: candidates, edges, rounds, certificate slack

    @property
    def total(self) -> float:
        return float(self.cos.sum())

    def a_to_b(self) -> torch.Tensor:
        """[n_A] matched cosine per A-feature (NaN where unmatched or dead), for histograms and share-above."""
        out = torch.full((self.n_a,), math.nan, dtype=torch.float64)
        out[self.rows] = self.cos
        return out

    def share_above(self, threshold: float = 0.9) -> float:
        """Share of matched pairs with cosine >= threshold."""
        return float((self.cos >= threshold).double().mean())


@checked
def hungarian_match(A: torch.Tensor, B: torch.Tensor, alive_a: torch.Tensor | None = None,
                    alive_b: torch.Tensor | None = None, *, method: str = "auto", candidates: int = 16,
                    chunk_size: int | None = None, dtype: torch.dtype = torch.float32, dense_limit: int = 2048**2,
                    tol: float = 1e-9, max_rounds: int = 20) -> MatchResult:
    """The 1:1 matching of live A- and B-features that maximises the total cosine (Hungarian assignment).

    method="dense": scipy's linear_sum_assignment on the full cosine matrix (float64; fine up to a few thousand).
    method="sparse": top-`candidates` per row and per column, scipy's min_weight_full_bipartite_matching, then the
    LP-duality certificate over all pairs (see the module docstring); pairs that break it are added and the sparse
    problem re-solved, so the result equals the dense optimum (up to `info["gap_bound"]`, from rounding only).
    method="auto": dense when n_A * n_B <= dense_limit, else sparse.
    Both routes see the same cosine values (computed in `dtype`, block by block)."""
    if method not in ("auto", "dense", "sparse"):
        raise ValueError(f"method must be 'auto', 'dense' or 'sparse', got {method!r}")
    if int(candidates) < 1:
        raise ValueError(f"candidates must be >= 1, got {candidates}")
    Au, Bu, ma, mb, ia, ib = prepare(A, B, alive_a, alive_b, dtype)
    # Solve with rows = the smaller side, so every row is matched (scipy's convention and the dual below).
    swap = Au.shape[0] > Bu.shape[0]
    R, C = (Bu, Au) if swap else (Au, Bu)
    if method == "auto":
        method = "dense" if R.shape[0] * C.shape[0] <= dense_limit else "sparse"
    if method == "dense":
        r, c, v, info = _dense_assignment(R, C, chunk_size)
    else:
        r, c, v, info = _sparse_assignment(R, C, chunk_size, int(candidates), tol, max_rounds)
    r, c, v = torch.as_tensor(r), torch.as_tensor(c), torch.as_tensor(v, dtype=torch.float64)
    if swap:
        r, c = c, r
    rows, cols = ia.cpu()[r], ib.cpu()[c]
    order = torch.argsort(rows)
    return MatchResult(rows[order], cols[order], v[order], A.shape[0], B.shape[0], method, info)


def _dense_assignment(R, C, chunk_size):
    from scipy.optimize import linear_sum_assignment

    S = np.empty((R.shape[0], C.shape[0]), dtype=np.float64)
    for start, cos in cos_chunks(R, C, chunk_size):
        S[start:start + cos.shape[0]] = cos.cpu().numpy()
    r, c = linear_sum_assignment(S, maximize=True)
    return r, c, S[r, c], {"certified": True}


def _candidate_edges(R, C, chunk_size, m, columns):
    """Top-m cosines of every row (and, if `columns`, of every column) in one chunked pass.

    Returns edges (rows, cols, cos) as numpy and the bounds t (per row) and s (per column, +inf when not collected):
    every pair left out has cos <= min(t_i, s_j). Column top-m is a reduction along the slow axis (several times a row
    top-m), so it is only collected when the row lists alone admit no full matching."""
    m_r, m_c = min(m, C.shape[0]), min(m, R.shape[0])
    rr, rc, rv, t = [], [], [], []
    col_v = col_i = None
    for start, cos in cos_chunks(R, C, chunk_size):
        v, j = cos.topk(m_r, dim=1)
        t.append(v[:, -1] if m_r < C.shape[0] else torch.full_like(v[:, 0], -math.inf))
        rr.append(torch.arange(start, start + cos.shape[0], device=cos.device).repeat_interleave(m_r))
        rc.append(j.reshape(-1))
        rv.append(v.reshape(-1))
        if columns:
            k = min(m_c, cos.shape[0])
            cv, ci = cos.topk(k, dim=0)
            ci = ci + start
            if col_v is not None:
                cv, sel = torch.cat([col_v, cv]).topk(min(m_c, col_v.shape[0] + k), dim=0)
                ci = torch.cat([col_i, ci]).gather(0, sel)
            col_v, col_i = cv, ci
    if columns:
        rr.append(col_i.reshape(-1))
        rc.append(torch.arange(C.shape[0], device=C.device).repeat(col_i.shape[0]))
        rv.append(col_v.reshape(-1))
        s = col_v[-1].cpu().double().numpy() if m_c < R.shape[0] else np.full(C.shape[0], -math.inf)
    else:
        s = np.full(C.shape[0], math.inf)
    t = torch.cat(t).cpu().double().numpy()
    return (torch.cat(rr).cpu().numpy(), torch.cat(rc).cpu().numpy(),
            torch.cat(rv).cpu().double().numpy()), t, s


def _initial_slack_bound(t, s, v):
    """Upper bound, per row, on cos_ij + v_j over the pairs left out of the candidate lists.

    A left-out pair has cos_ij <= min(t_i, s_j), so the bound is max_j [min(t_i, s_j) + v_j]; with columns sorted by
    s it is max(t_i + max{v_j : s_j >= t_i}, max{s_j + v_j : s_j < t_i}), O(n log n) via prefix/suffix maxima. On a
    planted or well-separated matching this alone certifies (almost) every row: no second pass over the matrix."""
    order = np.argsort(s, kind="stable")
    s_sorted, v_sorted = s[order], v[order]
    pre = np.maximum.accumulate(s_sorted + v_sorted)
    suf = np.maximum.accumulate(v_sorted[::-1])[::-1]
    idx = np.searchsorted(s_sorted, t, side="left")
    low = np.where(idx > 0, pre[np.maximum(idx - 1, 0)], -np.inf)
    high = np.where(idx < len(s), t + suf[np.minimum(idx, len(s) - 1)], -np.inf)
    return np.maximum(low, high)


def _dedup(er, ec, ev, n_c):
    """Unique (row, col) edges sorted by row-major key. A duplicate always carries the very same cosine (it comes
    from the same block computation), so keeping the first is exact."""
    key = er.astype(np.int64) * n_c + ec
    ukey, first = np.unique(key, return_index=True)
    return er[first], ec[first], ev[first], ukey


def _solve_sparse(n_r, n_c, er, ec, ev):
    """Min-cost full matching on the candidate graph (scipy LAPJVsp). Cost 2 - cos is in [1, 3]: never zero,
    which scipy requires, and minimising it maximises the total cosine because every row is matched once."""
    import scipy.sparse as sp
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    G = sp.csr_array((2.0 - ev, (er, ec)), shape=(n_r, n_c))
    return min_weight_full_bipartite_matching(G)


def _dual_potentials(n_c, er, ec, ev, match_col_of_row, match_cos_of_row):
    """Column potentials v <= 0 of the assignment LP, from the optimal matching on the candidate graph.

    With u_i = c_{i,M(i)} - v_{M(i)} (cost c = -cos), dual feasibility on a candidate edge is the difference
    constraint v_j <= v_{M(i)} + (cos_{i,M(i)} - cos_ij); the LP also needs v_j <= 0 everywhere and v_j = 0 on
    unmatched columns. Shortest-path distances from a root joined to every column by 0-cost arcs satisfy all of it:
    Bellman-Ford, vectorised, relaxing only arcs out of columns that changed in the last sweep. A negative distance
    at an unmatched column or no convergence within n_c sweeps would mean a negative cycle, i.e. the matching is not
    optimal even on its own candidate graph; scipy's optimum never is, so we raise rather than certify wrongly."""
    src = match_col_of_row[er]
    w = match_cos_of_row[er] - ev
    matched = np.zeros(n_c, dtype=bool)
    matched[match_col_of_row] = True
    d = np.zeros(n_c, dtype=np.float64)
    active = np.ones(n_c, dtype=bool)
    for it in range(n_c + 1):
        sel = active[src]
        if not sel.any():
            break
        new = d.copy()
        np.minimum.at(new, ec[sel], d[src[sel]] + w[sel])
        active = new < d
        d = new
    else:
        raise RuntimeError("dual potentials did not converge (negative cycle): the sparse matching is not optimal "
                           "on its own candidate graph — please report this")
    if np.any(d[~matched] < 0):
        raise RuntimeError("an unmatched column has a negative potential: the sparse matching is not optimal")
    return d, it


def _sparse_assignment(R, C, chunk_size, m, tol, max_rounds, margin=0.02):
    """Candidate solve + LP-duality certificate, adding violating pairs until certified (column generation).

    Per row we keep an upper bound on cos_ij + v_j over every pair outside the candidate graph. Row i is certified
    when that bound <= theta_i + tol, theta_i = cos_{i,M(i)} + v_{M(i)} (then every reduced cost of row i is
    >= -tol). Rows the bound cannot certify are rechecked exactly, block by block: a float32 screen flags pairs within
    `margin` of theta_i, those are evaluated in float64, violators (and the near pairs) join the candidate graph,
    and the row's bound becomes theta_i - margin (+ rounding), valid for the potentials of that round; later rounds
    shift it by max_j (v_new_j - v_old_j), so only rows whose situation changed need another pass."""
    n_r, n_c = R.shape[0], C.shape[0]
    sec = {"candidates": 0.0, "solve": 0.0, "duals": 0.0, "check": 0.0}
    info = {"candidates": m, "column_candidates": False, "rounds": 0, "edges": [], "added": [], "bf_sweeps": [],
            "blocks_rechecked": [], "seconds": sec}
    columns = False
    while True:
        clock = time.perf_counter()
        edges, t_bound, s_bound = _candidate_edges(R, C, chunk_size, m, columns)
        er, ec, ev, key = _dedup(*edges, n_c)
        sec["candidates"] += time.perf_counter() - clock
        try:
            clock = time.perf_counter()
            r, c = _solve_sparse(n_r, n_c, er, ec, ev)
            sec["solve"] += time.perf_counter() - clock
            break
        except ValueError:
            # No full matching among the row lists (hub features): add column lists, then widen m.
            if columns and m >= n_c:
                raise
            if columns:
                m = min(2 * m, n_c)
            columns = True
            info.update(candidates=m, column_candidates=True)
    n_blocks = -(-n_r // ROW_BLOCK)
    checked_bound = np.full(n_r, np.inf)   # bound on cos+v over excluded pairs, w.r.t. potentials of its round
    checked_round = np.full(n_r, -1)
    v_history = []
    for rnd in range(max_rounds):
        info["rounds"] = rnd + 1
        info["edges"].append(int(len(er)))
        mcol = np.empty(n_r, dtype=np.int64)
        mcol[r] = c
        mcos = np.empty(n_r, dtype=np.float64)
        mcos[r] = ev[np.searchsorted(key, r.astype(np.int64) * n_c + c)]  # the exact values the solver saw
        clock = time.perf_counter()
        v, sweeps = _dual_potentials(n_c, er, ec, ev, mcol, mcos)
        sec["duals"] += time.perf_counter() - clock
        info["bf_sweeps"].append(sweeps)
        clock = time.perf_counter()
        theta = mcos + v[mcol]
        bound = _initial_slack_bound(t_bound, s_bound, v)
        for past, v_old in enumerate(v_history):
            rows = checked_round == past
            if rows.any():
                bound[rows] = np.minimum(bound[rows], checked_bound[rows] + float(np.max(v - v_old)))
        v_history.append(v)
        unsafe = np.nonzero(bound > theta + tol)[0]
        blocks = np.unique(unsafe // ROW_BLOCK)
        info["blocks_rechecked"].append(f"{len(blocks)}/{n_blocks}")
        v32 = torch.as_tensor(v, dtype=R.dtype, device=R.device)
        screen = torch.as_tensor(theta - margin, dtype=R.dtype, device=R.device)
        new_r, new_c, new_v = [], [], []
        n_viol = 0
        for start, cos in cos_blocks(R, C, blocks):
            stop = start + cos.shape[0]
            near = (cos + v32) > screen[start:stop, None]
            ii, jj = near.nonzero(as_tuple=True)
            cv = cos[ii, jj].double().cpu().numpy()
            ii, jj = ii.cpu().numpy() + start, jj.cpu().numpy()
            n_viol += int(np.sum(cv + v[jj] > theta[ii] + tol))
            new_r.append(ii)
            new_c.append(jj)
            new_v.append(cv)
            # float32 screen error is ~1e-7; 1e-6 keeps the bound rigorous
            checked_bound[start:stop] = theta[start:stop] - margin + 1e-6
            checked_round[start:stop] = rnd
        sec["check"] += time.perf_counter() - clock
        if n_viol == 0:
            # LP duality: every pair has reduced cost >= -tol, so no full matching beats this one by more than
            # n_rows * tol (tol only absorbs float64 rounding in the potentials).
            info["certified"] = True
            info["gap_bound"] = n_r * tol
            return r, c, mcos[r], info
        info["added"].append(n_viol)
        er, ec, ev, key = _dedup(np.concatenate([er, *new_r]), np.concatenate([ec, *new_c]),
                                 np.concatenate([ev, *new_v]), n_c)
        clock = time.perf_counter()
        r, c = _solve_sparse(n_r, n_c, er, ec, ev)
        sec["solve"] += time.perf_counter() - clock
    raise RuntimeError(f"matching not certified optimal after {max_rounds} rounds; raise max_rounds or candidates")
