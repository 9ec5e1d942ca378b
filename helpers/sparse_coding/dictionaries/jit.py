"""Compiled CPU kernels (numba) for the row-wise selections that torch runs as many passes of small ops: the bfloat16
screen's candidate search (`screening.screened_topk`) here, an exact row top-k (`kernels.topk_rows`) in `jit_topk`.
Each kernel reads its rows once, on numba's threads, and gives exactly what the torch passes it replaces give (tests
compare them, tests/dictionaries/test_jit.py); where numba is not installed, or `SPARSE_CODING_JIT=0` is set, or
`ENABLED` is set False, the callers keep their torch passes.

bfloat16 values are compared as integers: for the 16 bits x of a bfloat16 (read as int16),
    key(x) = (x ^ m) + (m & 1),  m = (x >> 15) & 0x7FFF
orders the keys as the floats (negatives have their magnitude bits flipped; -0 and +0 both map to 0); NaN maps
beyond ±inf and is looked for separately.
"""

from __future__ import annotations

import os

import torch

try:  # numba is a dependency, but the package keeps working (on torch's passes) where it cannot be imported
    import numba
    import numpy as np
    from numba import njit, prange
except ImportError:  # pragma: no cover - exercised where numba is missing
    numba = None


def _probe() -> int:
    return 0


# numba caches compiled kernels beside their source or in its user cache directory; where neither is writable (a
# read-only install without a home) its decorator raises at import, so the kernels compile once per process instead.
CACHE = False
if numba is not None:
    try:
        njit(cache=True)(_probe)
        CACHE = True
    except RuntimeError:
        pass

# False: every caller takes its torch passes (tests flip it to compare the two).
ENABLED: bool = numba is not None and os.environ.get("SPARSE_CODING_JIT", "1") not in ("0", "false", "False")


def available(t: torch.Tensor) -> bool:
    """Whether the kernels run for a tensor: numba present and enabled, t on the CPU."""
    return ENABLED and t.device.type == "cpu"


def set_threads() -> None:
    """numba's thread count follows torch's (e.g. 1 inside harvest's single-threaded workers)."""
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


if numba is not None:

    @njit(cache=CACHE, inline="always")
    def _key(x):
        """The order key of bfloat16 bits x (int16), in int16 arithmetic (vectorises where int64 would not)."""
        m = np.int16((x >> 15) & 0x7FFF)
        return np.int16(np.int16(x ^ m) + np.int16(m & 1))

    @njit(cache=CACHE, inline="always")
    def _select(a, n, q):
        """a[0:n] reordered so that a[q] is its q-th smallest (0-based), returned (quickselect, median of three)."""
        lo, hi = 0, n - 1
        while hi > lo:
            x, y, z = a[lo], a[(lo + hi) >> 1], a[hi]
            if x > y:
                x, y = y, x
            if y > z:
                y = z
            if x > y:
                y = x
            i, j = lo, hi
            while i <= j:
                while a[i] < y:
                    i += 1
                while a[j] > y:
                    j -= 1
                if i <= j:
                    a[i], a[j] = a[j], a[i]
                    i += 1
                    j -= 1
            if q <= j:
                hi = j
            elif q >= i:
                lo = i
            else:
                return a[q]
        return a[q]

    @njit(parallel=True, cache=CACHE, nogil=True)
    def _screen_maxima(screen, s, k, fold, group_max, kth):
        """screen [R, s·m] int16 (bfloat16 bits, no NaN) -> group_max [R, m]: keys of each strided group
        {g, g+m, ...}'s max; kth [R]: the key of the k-th largest group max (of the maxima of 8 strided groups of
        group maxima if fold)."""
        R, n = screen.shape
        m = n // s
        for r in prange(R):
            row = screen[r]
            gm = group_max[r]
            # _key written out, and each group's row as a slice: numba's inlined call, or indexing row[base + j]
            # with a run-time s, does not vectorise (4x slower)
            for j in range(m):
                x = row[j]
                h = np.int16((x >> 15) & 0x7FFF)
                gm[j] = np.int16(np.int16(x ^ h) + np.int16(h & 1))
            for q in range(1, s):
                seg = row[q * m:(q + 1) * m]
                for j in range(m):
                    x = seg[j]
                    h = np.int16((x >> 15) & 0x7FFF)
                    gm[j] = max(gm[j], np.int16(np.int16(x ^ h) + np.int16(h & 1)))
            if fold:
                f = m // 8
                work = gm[:f].copy()
                for q in range(1, 8):
                    seg = gm[q * f:(q + 1) * f]
                    for j in range(f):
                        work[j] = max(work[j], seg[j])
            else:
                f = m
                work = gm.copy()
            kth[r] = _select(work, f, f - k)

    @njit(parallel=True, cache=CACHE, nogil=True)
    def _screen_bounds(group_max, threshold, s, bounds):
        """bounds [R]: s x the groups whose max reaches the row's threshold key (the most candidates a row has)."""
        R, m = group_max.shape
        for r in prange(R):
            t = threshold[r]
            gm = group_max[r]
            c = 0
            for j in range(m):
                c += gm[j] >= t
            bounds[r] = c * s

    @njit(parallel=True, cache=CACHE, nogil=True)
    def _screen_fill(screen, s, group_max, threshold, starts, cols, counts):
        """Each row's candidates (members of the passing groups at or above the threshold key), in order, into
        cols[starts[r]:]; their number into counts."""
        R, n = screen.shape
        m = n // s
        for r in prange(R):
            t = threshold[r]
            gm = group_max[r]
            row = screen[r]
            o = starts[r]
            for j in range(m):
                if gm[j] >= t:
                    for q in range(s):
                        cols[o] = q * m + j
                        o += _key(row[q * m + j]) >= t
            counts[r] = o - starts[r]

    @njit(parallel=True, cache=CACHE, nogil=True)
    def _compact(src, starts, counts, dst_starts, rows, cols):
        R = starts.shape[0]
        for r in prange(R):
            a, o, c = starts[r], dst_starts[r], counts[r]
            for i in range(c):
                cols[o + i] = src[a + i]
                rows[o + i] = r


def keys_of(bits: torch.Tensor) -> torch.Tensor:
    """int16 order keys of bfloat16 bits (int16 tensor), as the kernels compute them."""
    x = bits.to(torch.int32)
    m = (x >> 15) & 0x7FFF
    return ((x ^ m) + (m & 1)).to(torch.int16)


def bits_of(keys: torch.Tensor) -> torch.Tensor:
    """The bfloat16 values [·] of order keys (int16; key 0 gives +0)."""
    keys = keys.to(torch.int32)
    x = torch.where(keys >= 0, keys, (keys - 1) ^ 0x7FFF)
    return x.to(torch.int16).view(torch.bfloat16)


def screen_maxima(screen: torch.Tensor, s: int, k: int, fold: bool, workspace=None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """screen [R, n] bfloat16 without NaN -> (group maxima [R, n / s] as int16 keys, each row's k-th largest group
    maximum (of the 8-fold maxima if fold) [R] as bfloat16)."""
    R, n = screen.shape
    m = n // s
    gm = workspace("jit_group_max", R, m, dtype=torch.int16) if workspace is not None else None
    gm = gm if gm is not None else torch.empty(R, m, dtype=torch.int16)
    kth = torch.empty(R, dtype=torch.int16)
    set_threads()
    _screen_maxima(screen.view(torch.int16).numpy(), s, k, fold, gm.numpy(), kth.numpy())
    return gm, bits_of(kth)


def _starts(counts: torch.Tensor) -> tuple[torch.Tensor, int]:
    starts = torch.zeros_like(counts)
    torch.cumsum(counts[:-1], 0, out=starts[1:])
    return starts, int(starts[-1] + counts[-1]) if len(counts) else 0


def screen_candidates(screen: torch.Tensor, s: int, group_max: torch.Tensor, threshold: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) [N] of the screen [R, n] entries at or above their row's threshold [R] (bfloat16), in the
    order of the torch passes: rows ascending, then strided groups ascending, then members."""
    R = screen.shape[0]
    t = keys_of(threshold.view(torch.int16)).numpy()
    bits, gm = screen.view(torch.int16).numpy(), group_max.numpy()
    bounds, counts = torch.empty(R, dtype=torch.int64), torch.empty(R, dtype=torch.int64)
    set_threads()
    _screen_bounds(gm, t, s, bounds.numpy())
    starts, total = _starts(bounds)
    spill = torch.empty(total, dtype=torch.int64)
    _screen_fill(bits, s, gm, t, starts.numpy(), spill.numpy(), counts.numpy())
    dst, N = _starts(counts)
    rows, cols = torch.empty(N, dtype=torch.int64), torch.empty(N, dtype=torch.int64)
    _compact(spill.numpy(), starts.numpy(), counts.numpy(), dst.numpy(), rows.numpy(), cols.numpy())
    return rows, cols
