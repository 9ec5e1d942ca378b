"""Max cosine similarity (MCS) between dictionaries, in bounded memory.

A dictionary here is a [n_features, d] tensor of feature directions (decoder rows); rows are unit-normed on the way
in. The MCS of a feature of A is its largest cosine with any feature of B; MMCS is the mean of that over A's live
features. Cosines are signed: a decoder direction and its negation are different features (codes are >= 0).

* Bounded memory. Nothing ever holds the full [n_A, n_B] cosine matrix; A is processed in row chunks of at most
  `chunk_size` rows against all of B.
* Chunking never changes a number. Every cosine is produced by a matmul over one fixed block of `ROW_BLOCK` rows of
  A (chunks are whole numbers of blocks), because BLAS sums in a different order for different row counts, so
  `A[:7] @ B.T` is not bitwise `(A @ B.T)[:7]`. Hence chunked and unchunked results agree exactly, and the exact
  matching (`analyses.matching`) sees the very same values.

Rows are normalised in the working dtype; a row of very large (1e20) or very small (1e-40) entries first in float64
after division by its largest entry, so it is a direction like any other (`unit_rows`).

Dead features (all-zero / non-finite rows, or rows marked dead by `alive_a`/`alive_b`) are excluded from every
computation and reported as NaN / -1 and in the `n_dead_*` counts; they are never counted as matches or misses."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..arguments import checked


# Rows of A per matmul call, fixed so that every cosine is computed the same way whatever the chunk size.
ROW_BLOCK = 256
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


def unit_rows(D: torch.Tensor, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """(D's rows at unit norm in `dtype`, bool [n]: the rows that are a direction). A row whose largest |entry| lies
    in [1e-15, 1e15] is cast and divided by its norm in `dtype` (squares stay far inside float32's range); a row
    outside it (e.g. 1e20 or 1e-40) is first divided by its largest entry and normalised in float64, so it neither
    overflows nor underflows. A zero row or a row with a non-finite entry is not a direction (its output row is 0)."""
    D = D.detach()
    scale = D.abs().amax(dim=1) if D.shape[1] else torch.zeros(D.shape[0], dtype=D.dtype, device=D.device)
    safe = torch.isfinite(scale) & (scale >= 1e-15) & (scale <= 1e15)  # NaN anywhere in a row: its max is NaN
    U = D.to(dtype)
    U = U / U.norm(dim=1, keepdim=True)
    usable = safe.clone()
    rest = (~safe & torch.isfinite(scale) & (scale > 0)).nonzero().squeeze(1)
    if len(rest):
        X = D[rest].double()
        X = X / X.abs().amax(dim=1, keepdim=True)
        X = X / X.norm(dim=1, keepdim=True)
        usable[rest] = torch.isfinite(X).all(dim=1)
        U[rest] = X.to(dtype)
    return torch.where(usable[:, None], U, torch.zeros_like(U)), usable


def _alive_mask(D: torch.Tensor, alive: torch.Tensor | None, name: str,
                usable: torch.Tensor | None = None) -> torch.Tensor:
    """Live rows: those the caller marks alive, minus rows that cannot be a direction (zero or non-finite)."""
    if usable is None:
        usable = unit_rows(D)[1]
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


def prepare(A, B, alive_a, alive_b, dtype):
    A = _as_matrix(A, "A")
    B = _as_matrix(B, "B")
    if A.shape[1] != B.shape[1]:
        raise ValueError(f"dictionaries have different widths: A has d={A.shape[1]}, B has d={B.shape[1]}; "
                         f"compare dictionaries trained on the same activation space")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    B = B.to(A.device)
    # Unit rows, extreme ones through float64 (`unit_rows`).
    (UA, ua), (UB, ub) = unit_rows(A, dtype), unit_rows(B, dtype)
    ma, mb = _alive_mask(A, alive_a, "A", ua), _alive_mask(B, alive_b, "B", ub)
    ia, ib = ma.nonzero().squeeze(1), mb.nonzero().squeeze(1)
    Au, Bu = UA[ia], UB[ib]
    return Au.contiguous(), Bu.contiguous(), ma, mb, ia, ib


def _chunk_rows(chunk_size: int | None, n_b: int, itemsize: int) -> int:
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_BYTES // max(1, n_b * itemsize))
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size}")
    # Whole blocks only (see ROW_BLOCK): rounding up keeps every value identical to the unchunked computation.
    return -(-int(chunk_size) // ROW_BLOCK) * ROW_BLOCK


def cos_chunks(A: torch.Tensor, B: torch.Tensor, chunk_size: int | None):
    """Yield (start, cos[start:start+c, :]) over row chunks of A; the buffer is reused between chunks."""
    rows = _chunk_rows(chunk_size, B.shape[0], A.element_size())
    rows = min(rows, -(-A.shape[0] // ROW_BLOCK) * ROW_BLOCK)
    buf = torch.empty(rows, B.shape[0], dtype=A.dtype, device=A.device)
    Bt = B.T
    for start in range(0, A.shape[0], rows):
        stop = min(start + rows, A.shape[0])
        for s in range(start, stop, ROW_BLOCK):
            e = min(s + ROW_BLOCK, stop)
            torch.matmul(A[s:e], Bt, out=buf[s - start:e - start])
        yield start, buf[:stop - start]


def cos_blocks(A: torch.Tensor, B: torch.Tensor, blocks):
    """Yield (start, cos) for the chosen ROW_BLOCK-row blocks of A only; same matmul shapes as cos_chunks, so the
    same values."""
    buf = torch.empty(ROW_BLOCK, B.shape[0], dtype=A.dtype, device=A.device)
    Bt = B.T
    for b in blocks:
        s, e = b * ROW_BLOCK, min((b + 1) * ROW_BLOCK, A.shape[0])
        torch.matmul(A[s:e], Bt, out=buf[:e - s])
        yield s, buf[:e - s]


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


    def share_above(self, threshold: float = 0.9, direction: str = "a_to_b") -> float:
        """Share of live features whose MCS is >= threshold (e.g. 0.9: features 'found again')."""
        if direction == "a_to_b":
            v = self.a_to_b[self.alive_a]
        elif direction == "b_to_a":
            v = self.b_to_a[self.alive_b]
        else:
            raise ValueError(f"direction must be 'a_to_b' or 'b_to_a', got {direction!r}")
        return float((v >= threshold).double().mean())


@checked
def mcs(A: torch.Tensor, B: torch.Tensor, alive_a: torch.Tensor | None = None, alive_b: torch.Tensor | None = None,
        chunk_size: int | None = None, dtype: torch.dtype = torch.float32) -> MCSResult:
    """Max cosine similarity of every feature of A over B and of every feature of B over A, in one chunked pass.

    Memory: the dictionaries plus one [chunk_size, n_B] block (default about 128 MiB), so two 65536-feature
    dictionaries work in bounded memory. Runs on the device of A."""
    Au, Bu, ma, mb, ia, ib = prepare(A, B, alive_a, alive_b, dtype)
    dev = Au.device
    row_val = torch.empty(Au.shape[0], dtype=dtype, device=dev)
    row_arg = torch.empty(Au.shape[0], dtype=torch.long, device=dev)
    col_val = torch.full((Bu.shape[0],), -math.inf, dtype=dtype, device=dev)
    col_arg = torch.zeros(Bu.shape[0], dtype=torch.long, device=dev)
    for start, cos in cos_chunks(Au, Bu, chunk_size):
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


@checked
def max_cosine(A: torch.Tensor, B: torch.Tensor, chunk_size: int = 4096) -> torch.Tensor:
    """For each row of A, its max cosine similarity over the rows of B (shape [len(A)]; NaN for dead rows of A)."""
    return mcs(A, B, chunk_size=chunk_size).a_to_b


@checked
def mmcs(A: torch.Tensor, B: torch.Tensor) -> float:
    """Mean max cosine similarity of A's features over B (e.g. A = ground truth, B = learned)."""
    return mcs(A, B).mmcs
