"""Comparing dictionaries: max cosine similarity (MCS), 1:1 matching, and the random-direction null.

A dictionary here is a [n_features, d] tensor of feature directions (decoder rows); rows are unit-normed on the way
in. The MCS of a feature of A is its largest cosine with any feature of B; MMCS is the mean of that over A's live
features. Cosines are signed: a decoder direction and its negation are different features (activations are >= 0).

Three design points, each for a stated reason:

* Bounded memory. Nothing ever holds the full [n_A, n_B] cosine matrix; A is processed in row chunks of at most
  `chunk_size` rows against all of B (16384 x 16384 float32 would be 1 GiB, float64 2 GiB).
* Chunking never changes a number. Every cosine is produced by a matmul over one fixed block of `_ROW_BLOCK` rows of
  A (chunks are whole numbers of blocks), because BLAS sums in a different order for different row counts, so
  `A[:7] @ B.T` is not bitwise `(A @ B.T)[:7]`. Hence chunked and unchunked results agree exactly, and the
  optimality check of the matching sees the very same values the solver saw.
* Exact 1:1 matching without a dense cost matrix (`hungarian_match`). Keep each row's and each column's top-m
  candidates, solve the sparse assignment with scipy's `min_weight_full_bipartite_matching`, then prove the result
  optimal for the *full* matrix with LP duality: dual potentials v (one per B-feature) are recovered from the sparse
  optimum as shortest-path distances, and one more chunked pass checks every excluded pair's reduced cost. Pairs that
  violate it are added and the sparse problem is solved again (column generation), so the answer is the dense
  Hungarian optimum, with the certificate's slack reported as a bound on the gap.

Dead features (all-zero / non-finite rows, or rows marked dead by `alive_a`/`alive_b`) are excluded from every
computation and reported as NaN / -1 and in the `n_dead_*` counts; they are never counted as matches or misses.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

# Rows of A per matmul call. Fixed so that every cosine value is computed the same way whatever the chunk size.
_ROW_BLOCK = 256
# Default working-set budget for one chunk of the cosine matrix.
_CHUNK_BYTES = 128 * 2**20


# ----------------------------------------------------------------------------------------------------------------
# input checking and chunked cosines


def _as_matrix(D: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(D, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape [n_features, d], got {type(D).__name__}; "
                         f"wrap it with torch.as_tensor(...)")
    if D.ndim != 2:
        raise ValueError(f"{name} must be [n_features, d], got shape {tuple(D.shape)}; for an SAE pass W_dec "
                         f"([d_sae, d_in]) or W_enc.T")
    if D.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 features); pass a dictionary with at least one feature")
    if D.shape[1] == 0:
        raise ValueError(f"{name} has width d=0; pass [n_features, d] with d >= 1")
    if not (D.is_floating_point()):
        raise ValueError(f"{name} must be a floating-point tensor, got {D.dtype}; convert with .float()")
    return D


def _alive_mask(D: torch.Tensor, alive: torch.Tensor | None, name: str) -> torch.Tensor:
    """Live rows: those the caller marks alive, minus rows that cannot be a direction (zero or non-finite)."""
    norms = D.detach().double().norm(dim=1)
    usable = torch.isfinite(norms) & (norms > 0)
    if alive is not None:
        alive = torch.as_tensor(alive, device=D.device)
        if alive.dtype != torch.bool or alive.shape != (D.shape[0],):
            raise ValueError(f"alive mask for {name} must be a bool tensor of shape [{D.shape[0]}], got "
                             f"{alive.dtype} {tuple(alive.shape)}; e.g. alive = feature_frequency > 0")
        usable = usable & alive
    if not bool(usable.any()):
        raise ValueError(f"all {D.shape[0]} features of {name} are dead (marked dead, zero or non-finite); "
                         f"nothing to compare — check the alive mask or the checkpoint you loaded")
    return usable


def _prepare(A, B, alive_a, alive_b, dtype):
    A = _as_matrix(A, "A")
    B = _as_matrix(B, "B")
    if A.shape[1] != B.shape[1]:
        raise ValueError(f"dictionaries have different widths: A has d={A.shape[1]}, B has d={B.shape[1]}; "
                         f"compare dictionaries trained on the same activation space")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    B = B.to(A.device)
    ma, mb = _alive_mask(A, alive_a, "A"), _alive_mask(B, alive_b, "B")
    ia, ib = ma.nonzero().squeeze(1), mb.nonzero().squeeze(1)
    Au = A.detach()[ia].to(dtype)
    Bu = B.detach()[ib].to(dtype)
    Au = Au / Au.norm(dim=1, keepdim=True)
    Bu = Bu / Bu.norm(dim=1, keepdim=True)
    return Au.contiguous(), Bu.contiguous(), ma, mb, ia, ib


def _chunk_rows(chunk_size: int | None, n_b: int, itemsize: int) -> int:
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_BYTES // max(1, n_b * itemsize))
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size}")
    # Whole blocks only (see _ROW_BLOCK): rounding up keeps every value identical to the unchunked computation.
    return -(-int(chunk_size) // _ROW_BLOCK) * _ROW_BLOCK


def _cos_chunks(A: torch.Tensor, B: torch.Tensor, chunk_size: int | None):
    """Yield (start, cos[start:start+c, :]) over row chunks of A; the buffer is reused between chunks."""
    rows = _chunk_rows(chunk_size, B.shape[0], A.element_size())
    rows = min(rows, -(-A.shape[0] // _ROW_BLOCK) * _ROW_BLOCK)
    buf = torch.empty(rows, B.shape[0], dtype=A.dtype, device=A.device)
    Bt = B.T
    for start in range(0, A.shape[0], rows):
        stop = min(start + rows, A.shape[0])
        for s in range(start, stop, _ROW_BLOCK):
            e = min(s + _ROW_BLOCK, stop)
            torch.matmul(A[s:e], Bt, out=buf[s - start:e - start])
        yield start, buf[:stop - start]


def _cos_blocks(A: torch.Tensor, B: torch.Tensor, blocks):
    """Yield (start, cos) for the chosen _ROW_BLOCK-row blocks of A only; same matmul shapes as _cos_chunks, so the
    same values."""
    buf = torch.empty(_ROW_BLOCK, B.shape[0], dtype=A.dtype, device=A.device)
    Bt = B.T
    for b in blocks:
        s, e = b * _ROW_BLOCK, min((b + 1) * _ROW_BLOCK, A.shape[0])
        torch.matmul(A[s:e], Bt, out=buf[:e - s])
        yield s, buf[:e - s]


# ----------------------------------------------------------------------------------------------------------------
# MCS (max only, both directions in one pass)


@dataclass
class MCSResult:
    """MCS in both directions. Dead features hold NaN (values) and -1 (argmax) and are left out of every mean/share."""

    a_to_b: torch.Tensor      # [n_A] max cosine of each A-feature over live B-features
    a_argmax: torch.Tensor    # [n_A] index into B of that max
    b_to_a: torch.Tensor      # [n_B]
    b_argmax: torch.Tensor    # [n_B] index into A
    alive_a: torch.Tensor     # [n_A] bool
    alive_b: torch.Tensor     # [n_B] bool

    @property
    def n_dead_a(self) -> int:
        return int((~self.alive_a).sum())

    @property
    def n_dead_b(self) -> int:
        return int((~self.alive_b).sum())

    @property
    def mmcs(self) -> float:
        """Mean MCS of A's live features over B (the usual MMCS, e.g. A = ground truth, B = learned)."""
        return float(self.a_to_b[self.alive_a].double().mean())

    @property
    def mmcs_b_to_a(self) -> float:
        return float(self.b_to_a[self.alive_b].double().mean())

    def share_above(self, threshold: float = 0.9, direction: str = "a_to_b") -> float:
        """Share of live features whose MCS is >= threshold (e.g. 0.9: features 'found again')."""
        if direction == "a_to_b":
            v = self.a_to_b[self.alive_a]
        elif direction == "b_to_a":
            v = self.b_to_a[self.alive_b]
        else:
            raise ValueError(f"direction must be 'a_to_b' or 'b_to_a', got {direction!r}")
        return float((v >= threshold).double().mean())


def mcs(A: torch.Tensor, B: torch.Tensor, alive_a: torch.Tensor | None = None, alive_b: torch.Tensor | None = None,
        chunk_size: int | None = None, dtype: torch.dtype = torch.float32) -> MCSResult:
    """Max cosine similarity of every feature of A over B and of every feature of B over A, in one chunked pass.

    Memory: the dictionaries plus one [chunk_size, n_B] block (default about 128 MiB), so two 65536-feature
    dictionaries work in bounded memory. Runs on the device of A."""
    Au, Bu, ma, mb, ia, ib = _prepare(A, B, alive_a, alive_b, dtype)
    dev = Au.device
    row_val = torch.empty(Au.shape[0], dtype=dtype, device=dev)
    row_arg = torch.empty(Au.shape[0], dtype=torch.long, device=dev)
    col_val = torch.full((Bu.shape[0],), -math.inf, dtype=dtype, device=dev)
    col_arg = torch.zeros(Bu.shape[0], dtype=torch.long, device=dev)
    for start, cos in _cos_chunks(Au, Bu, chunk_size):
        v, i = cos.max(dim=1)
        row_val[start:start + len(v)], row_arg[start:start + len(v)] = v, i
        cv, ci = cos.max(dim=0)
        better = cv > col_val  # strict: on ties the earliest A-row wins, as in an unchunked argmax
        col_val = torch.where(better, cv, col_val)
        col_arg = torch.where(better, ci + start, col_arg)

    def scatter(n, idx, val, arg, other_idx):
        out_v = torch.full((n,), math.nan, dtype=dtype, device=dev)
        out_a = torch.full((n,), -1, dtype=torch.long, device=dev)
        out_v[idx] = val
        out_a[idx] = other_idx[arg]
        return out_v, out_a

    a_v, a_a = scatter(A.shape[0], ia, row_val, row_arg, ib)
    b_v, b_a = scatter(B.shape[0], ib, col_val, col_arg, ia)
    return MCSResult(a_v, a_a, b_v, b_a, ma, mb)


def max_cosine(A: torch.Tensor, B: torch.Tensor, chunk_size: int = 4096) -> torch.Tensor:
    """For each row of A, its max cosine similarity over the rows of B (shape [len(A)]; NaN for dead rows of A)."""
    return mcs(A, B, chunk_size=chunk_size).a_to_b


def mmcs(A: torch.Tensor, B: torch.Tensor) -> float:
    """Mean max cosine similarity of A's features over B (e.g. A = ground truth, B = learned)."""
    return mcs(A, B).mmcs


# ----------------------------------------------------------------------------------------------------------------
# exact 1:1 matching


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
    Au, Bu, ma, mb, ia, ib = _prepare(A, B, alive_a, alive_b, dtype)
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
    for start, cos in _cos_chunks(R, C, chunk_size):
        S[start:start + cos.shape[0]] = cos.cpu().numpy()
    r, c = linear_sum_assignment(S, maximize=True)
    return r, c, S[r, c], {"certified": True}


def _candidate_edges(R, C, chunk_size, m, columns):
    """Top-m cosines of every row (and, if `columns`, of every column) in one chunked pass.

    Returns edges (rows, cols, cos) as numpy and the bounds t (per row) and s (per column, +inf when not collected):
    every pair left out has cos <= min(t_i, s_j). Column top-m is a reduction along the slow axis (~4x a row top-m
    here), so it is only collected when the row lists alone admit no full matching."""
    m_r, m_c = min(m, C.shape[0]), min(m, R.shape[0])
    rr, rc, rv, t = [], [], [], []
    col_v = col_i = None
    for start, cos in _cos_chunks(R, C, chunk_size):
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
    n_blocks = -(-n_r // _ROW_BLOCK)
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
        blocks = np.unique(unsafe // _ROW_BLOCK)
        info["blocks_rechecked"].append(f"{len(blocks)}/{n_blocks}")
        v32 = torch.as_tensor(v, dtype=R.dtype, device=R.device)
        screen = torch.as_tensor(theta - margin, dtype=R.dtype, device=R.device)
        new_r, new_c, new_v = [], [], []
        n_viol = 0
        for start, cos in _cos_blocks(R, C, blocks):
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


# ----------------------------------------------------------------------------------------------------------------
# the random-direction null


def _cos_tail(t, d):
    """P(cos > t) for the cosine between a fixed unit vector and a uniform random one in R^d: (1 + cos) / 2 is
    Beta((d-1)/2, (d-1)/2)."""
    from scipy.stats import beta

    a = (d - 1) / 2.0
    return beta.sf((np.asarray(t, dtype=np.float64) + 1.0) / 2.0, a, a)


def null_mcs_cdf(t, n_ref: int, d: int, absolute: bool = False):
    """P(MCS <= t) for one random direction against n_ref independent random directions in R^d (exact).

    absolute=False: MCS = max cos (what `mcs` computes); absolute=True: max |cos|."""
    _check_null_args(n_ref, d)
    t = np.asarray(t, dtype=np.float64)
    tail = 2.0 * _cos_tail(np.abs(t), d) if absolute else _cos_tail(t, d)
    # F^n = exp(n log(1 - tail)) keeps precision when tail is tiny and n is large
    with np.errstate(divide="ignore"):  # tail == 1 (t at the bottom of the range) gives log 0 = -inf -> CDF 0
        out = np.exp(n_ref * np.log1p(-np.clip(tail, 0.0, 1.0)))
    return np.where(t < 0, 0.0, out) if absolute else out


def null_mcs_mean(n_ref: int, d: int, absolute: bool = False) -> float:
    """Expected MCS of a random direction against n_ref random directions in R^d (numerical integral of 1 - CDF)."""
    from scipy.integrate import quad

    _check_null_args(n_ref, d)
    upper = lambda t: 1.0 - float(null_mcs_cdf(t, n_ref, d, absolute))  # noqa: E731
    pts = [null_mcs_quantile(q, n_ref, d, absolute) for q in (0.01, 0.5, 0.99)]
    pos = quad(upper, 0.0, 1.0, points=pts, limit=200)[0]
    if absolute:
        return pos
    neg = quad(lambda t: float(null_mcs_cdf(t, n_ref, d, False)), -1.0, 0.0, limit=200)[0]
    return pos - neg


def null_mcs_quantile(q, n_ref: int, d: int, absolute: bool = False):
    """Inverse of `null_mcs_cdf` (e.g. q=0.99: an MCS above this is unlikely to be chance)."""
    from scipy.stats import beta

    _check_null_args(n_ref, d)
    q = np.asarray(q, dtype=np.float64)
    if np.any((q <= 0) | (q >= 1)):
        raise ValueError(f"quantiles must lie strictly between 0 and 1, got {q}")
    tail = -np.expm1(np.log(q) / n_ref)  # 1 - q^(1/n), accurate for large n
    if absolute:
        tail = tail / 2.0
    a = (d - 1) / 2.0
    t = 2.0 * beta.isf(tail, a, a) - 1.0
    return float(t) if t.ndim == 0 else t


def _check_null_args(n_ref, d):
    if int(n_ref) < 1:
        raise ValueError(f"n_ref (number of reference directions) must be >= 1, got {n_ref}")
    if int(d) < 2:
        raise ValueError(f"width d must be >= 2 for a cosine null, got {d}")


@dataclass
class NullBaseline:
    samples: torch.Tensor       # [n_features] sampled MCS of random directions against n_ref random directions
    mean: float                 # analytic expectation
    q01: float                  # analytic 1 % and 99 % quantiles
    q99: float
    n_ref: int
    d: int
    absolute: bool


def random_null(n_features: int, d: int, n_ref: int | None = None, seed: int = 0, absolute: bool = False,
                chunk_size: int | None = None, device: str | torch.device = "cpu") -> NullBaseline:
    """The MCS you get by chance: n_features random unit directions against n_ref (default n_features) others of
    the same width, sampled, next to the exact distribution. Plot it behind an MCS histogram as the null."""
    n_ref = n_features if n_ref is None else n_ref
    _check_null_args(n_ref, d)
    if int(n_features) < 1:
        raise ValueError(f"n_features must be >= 1, got {n_features}")
    g = torch.Generator(device="cpu").manual_seed(seed)
    X = torch.randn(n_features, d, generator=g).to(device)
    Y = torch.randn(n_ref, d, generator=g).to(device)
    if absolute:
        Y = torch.cat([Y, -Y])  # max over ±y is max |cos|
    samples = mcs(X, Y, chunk_size=chunk_size).a_to_b
    return NullBaseline(samples, null_mcs_mean(n_ref, d, absolute), null_mcs_quantile(0.01, n_ref, d, absolute),
                        null_mcs_quantile(0.99, n_ref, d, absolute), n_ref, d, absolute)
