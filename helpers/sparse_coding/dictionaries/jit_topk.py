"""The exact row top-k of `kernels.topk_rows` as a compiled kernel (numba; see `dictionaries.jit`, whose switches
and thread count it follows): strided group maxima bound each row's k-th largest from below, a bisection among the
few values above the bound finds the cut, and the row is read from memory once (tests/dictionaries/test_jit.py
compares it with torch.topk on ties, -inf and +inf, NaN, signed zeros and widths with and without power-of-two
groups)."""

from __future__ import annotations

import torch

from .jit import CACHE, numba, set_threads

if numba is not None:
    import numpy as np
    from numba import njit, prange

    from .jit import _select

    @njit(cache=CACHE, nogil=True)
    def _kth(a, n, k, hist, scratch):
        """The k-th largest of a[0:n] (1 <= k <= n), exactly: a histogram over len(hist) equal buckets between
        the min and the max (a few vector passes), then a selection among the one bucket that holds it. With a NaN
        among them, a selection among all (some value: the callers look for NaN themselves)."""
        mn, mx = a[0], a[0]
        nan = a[0] != a[0]
        for i in range(1, n):
            mn = min(mn, a[i])
            mx = max(mx, a[i])
            nan |= a[i] != a[i]
        span = np.float64(mx) - np.float64(mn)
        if nan or not (span > 0 and span < np.inf):  # all equal, ±inf or NaN among them: select among all
            for i in range(n):
                scratch[i] = a[i]
            return _select(scratch, n, n - k)
        NB = hist.shape[0]
        scale = (NB - 0.5) / span  # the max lands in the last bucket, below NB
        hist[:] = 0
        for i in range(n):
            hist[np.int64((np.float64(a[i]) - mn) * scale)] += 1
        above, b = 0, NB - 1
        while above + hist[b] < k:
            above += hist[b]
            b -= 1
        m = 0
        for i in range(n):
            if np.int64((np.float64(a[i]) - mn) * scale) == b:
                scratch[m] = a[i]
                m += 1
        return _select(scratch, m, m - (k - above))

    @njit(cache=CACHE, inline="always")
    def _count_at_least(a, n, t):
        c = 0
        for i in range(n):
            c += a[i] >= t
        return c

    @njit(cache=CACHE, nogil=True)
    def _cut(a, n, k, lo):
        """A t with exactly k of a[0:n] at or above it, by bisection from lo (at least k at or above it) and the max;
        NaN where there is none (ties at the k-th largest) or bisection cannot find it (non-finite values)."""
        if n == k:
            return lo
        hi = a[0]
        for i in range(1, n):
            hi = max(hi, a[i])
        if _count_at_least(a, n, hi) >= k:
            return np.float32(np.nan)
        for _ in range(64):
            mid = lo + (hi - lo) * np.float32(0.5)
            if not (lo < mid and mid < hi):
                break
            c = _count_at_least(a, n, mid)
            if c == k:
                return mid
            if c > k:
                lo = mid
            else:
                hi = mid
        return np.float32(np.nan)

    @njit(parallel=True, cache=CACHE, nogil=True)
    def _topk(x, bias, per_bias, relu, k, g, sort, out_v, out_i):
        """Each row's k largest of x [R, n] + bias[r // per_bias] (bias [R / per_bias, n]: one row per ensemble
        member, added in float32 as it is read) into out_v, out_i [R, k], ReLU'd with relu. Any t with k of the g
        strided group maxima {j, j+g, ...} at or above it bounds the row's k-th largest from below (k groups reach
        it): a few bisection steps over the maxima give one, the values at or above it are the candidates, and
        a bisection among those finds a cut with exactly k above it (where ties at the k-th largest leave none, the
        k-th largest by `_kth`, ties at it: the lower indices). With sort, descending (ties: the lower index
        first), else those above the k-th largest in index order, then those equal to it. Returns the number of
        rows holding a NaN (left unwritten: the caller falls back)."""
        R, n = x.shape
        m = n // g
        bad = 0
        for blk in prange((R + 31) // 32):
            gm, cv, scratch = np.empty(g, x.dtype), np.empty(n, x.dtype), np.empty(n, x.dtype)
            buf, hist = np.empty(n, np.int64), np.empty(64, np.int64)
            sv, si, row = np.empty(n, x.dtype), np.empty(n, np.int64), np.empty(n, x.dtype)
            for r in range(blk * 32, min(R, blk * 32 + 32)):
                xr, br = x[r], bias[r // per_bias]
                for j in range(g):
                    row[j] = gm[j] = xr[j] + br[j]
                nan = 0
                for j in range(g):
                    nan |= gm[j] != gm[j]
                for q in range(1, m):  # each group's row as slices: indexing with a run-time base does not vectorise
                    seg, bseg, out = xr[q * g:(q + 1) * g], br[q * g:(q + 1) * g], row[q * g:(q + 1) * g]
                    for j in range(g):
                        v = seg[j] + bseg[j]
                        out[j] = v
                        nan |= v != v
                        gm[j] = v if v > gm[j] else gm[j]
                if nan:  # before any selection: a NaN has no place in the order (torch.topk's own rule applies)
                    bad += 1
                    continue
                # lo keeps k maxima at or above it: the least of those above -inf where k are (groups of -inf
                # fills), else -inf; an infinite end leaves it where it is
                lo, hi = np.float32(np.inf), gm[0]
                for j in range(g):
                    lo = min(lo, gm[j]) if gm[j] > -np.inf else lo
                    hi = max(hi, gm[j])
                if _count_at_least(gm, g, lo) < k:
                    lo = np.float32(-np.inf)
                for _ in range(6):
                    mid = lo * np.float32(0.5) + hi * np.float32(0.5)  # (hi - lo could overflow)
                    if _count_at_least(gm, g, mid) >= k:
                        lo = mid
                    else:
                        hi = mid
                c = 0
                for j in range(n):
                    buf[c] = j
                    c += row[j] >= lo
                for j in range(c):
                    cv[j] = row[buf[j]]
                t = _cut(cv, c, k, lo)
                o = 0
                if t == t:  # the k values at or above t, as the selection below orders them (no ties across t)
                    vk = np.inf
                    for j in range(c):
                        vk = min(vk, cv[j]) if cv[j] >= t else vk
                    for j in range(c):
                        sv[o], si[o] = cv[j], buf[j]
                        o += cv[j] > vk
                    for j in range(c):
                        sv[o], si[o] = cv[j], buf[j]
                        o += cv[j] == vk
                else:
                    vk = _kth(cv, c, k, hist, scratch)
                    for j in range(c):
                        if cv[j] > vk:
                            sv[o], si[o] = cv[j], buf[j]
                            o += 1
                    for j in range(c):
                        if o < k and cv[j] == vk:
                            sv[o], si[o] = cv[j], buf[j]
                            o += 1
                for i in range(k):  # rank = values above, then equal values at lower indices
                    rank = i
                    if sort:
                        rank = 0
                        for j in range(k):
                            rank += sv[j] > sv[i]
                            rank += (sv[j] == sv[i]) & (si[j] < si[i])
                    out_v[r, rank] = max(sv[i], np.float32(0)) if relu else sv[i]
                    out_i[r, rank] = si[i]
        return bad


def topk(x: torch.Tensor, k: int, g: int, sort: bool = True, bias: torch.Tensor | None = None, relu: bool = False
         ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """x [R, n] float32 contiguous (n divisible by g, g >= k), bias [E, n] float32 (E dividing R: the first R / E
    rows take bias[0], ...) or None -> each row's k largest values of x + bias and their indices [R, k] (torch.topk's
    values; ties at the cut: the lower indices), descending if sort (ties: the lower index first), else those above
    the k-th largest in index order, then those equal to it; ReLU'd if relu; or None where a row holds a NaN."""
    R, n = x.shape
    # no bias: -0.0 added, which leaves every float as it is (+0.0 would turn -0.0 into +0.0)
    bias = torch.full((1, n), -0.0) if bias is None else bias.detach().float().contiguous()
    if bias.shape != (len(bias), n) or R % len(bias):
        raise ValueError(f"bias must be [E, {n}] with E dividing the {R} rows, got {tuple(bias.shape)}")
    values, idx = torch.empty(R, k), torch.empty(R, k, dtype=torch.int64)
    set_threads()
    bad = _topk(x.numpy(), bias.numpy(), R // len(bias), relu, k, g, sort, values.numpy(), idx.numpy())
    return None if bad else (values, idx)
