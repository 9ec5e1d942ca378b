"""Compiled kernels (numba) for `mining_stream.Stream.update`: the per-batch work of feature mining as a few
sequential loops over the batch's firing pairs instead of some sixty torch passes (issue #25: mining within 0.8 of
the model's forward plus the encoder matmul). Each gives exactly what the torch passes give (the same sums in the
same order, the same hashes, the same stable merges; tests/analyses/test_mining_kernels.py compares the two on every
field of `Mined`); `available()` is False without numba or with the kernels switched off (`dictionaries.jit`), and
the stream then runs its torch passes.

    pairs_pass   firing pairs -> counts, power sums, histogram, each context's max and its first position, and
                 the token-sample candidates (keys below their bin's current k-th smallest)
    merge        bottom-k insertion of candidates into per-group tables, payload rows marked for the windows
    top_merge    each direction's top contexts (stable: kept entries first, then lower contexts)
    context_keys the context sample's candidates (hash keys below each direction's current k-th smallest)
    row_states   the token and context hash states of a batch
The windows of what entered the tables are deduplicated and read from the picks in `mining_windows`.
"""

from __future__ import annotations

import numpy as np
import torch

from ..dictionaries import jit

numba = jit.numba
if numba is not None:
    from numba import njit, prange


def available() -> bool:
    """Whether the stream takes these kernels (numba importable and `dictionaries.jit.ENABLED`)."""
    return jit.ENABLED


if numba is not None:
    _M32 = 0xFFFFFFFF
    # ceil((2^(j/4) - 1)·2^23) for j = 1, 2, 3 (floor(4·log2 v) at 4 bins per octave; exact decimals)
    _QUARTERS = (1587185, 3474676, 5719293)

    @njit(cache=jit.CACHE, nogil=True)
    def _mix(h, part):
        """`sketch_keys._mix` on int64 scalars: the same 32-bit hash step."""
        h = h ^ (part & _M32)
        for _ in range(2):
            h = ((h >> 16) ^ h) * 0x45D9F3B & _M32
        return (h >> 16) ^ h

    @njit(parallel=True, cache=jit.CACHE, nogil=True)
    def _pairs_pass(rows, f, v, vbits, w, T, offset, n_bins, count, power, hist, parts, cmax, cpos, t1, t2,
                    thr_of, bounds, out_r, out_f, out_v, out_key, out_g, found):
        """Pairs bounds[h] .. bounds[h + 1] - 1 (two halves of the batch's contexts, one thread each), each half in
        pair order into its own counts, power sums and histogram (parts), then the halves' sums added to count,
        power, hist (the torch pass sums its bincounts per half alike, so the float64 sums round alike). Pairs are
        rows, f, v, or with w > 0 flat picks of w per row (f, v; row i // w, zero values skipped). Each half's
        token-sample candidates go to out_* from bounds[h] on; found[h] says how many."""
        per = thr_of.shape[0] > 0
        n = count.shape[0]
        for h in prange(2):
            c_h, p_h, hist_h = parts[0][h], parts[1][h], parts[2][h]
            c_h[:] = 0
            p_h[:] = 0.0
            hist_h[:] = 0
            m = lo = bounds[h]
            # rows and their (context, position) followed as i advances: an integer division per pair costs more
            # than the rest of the pair's work
            r_next, s_next = (lo // w, lo % w) if w > 0 else (0, 0)
            prev, b, t = -1, 0, 0
            for i in range(lo, bounds[h + 1]):
                vi = v[i]
                if w > 0:
                    r = r_next
                    s_next += 1
                    if s_next == w:
                        s_next = 0
                        r_next += 1
                    if vi == 0:
                        continue
                else:
                    r = rows[i]
                if r != prev:
                    prev, b, t = r, r // T, r % T
                fi = f[i]
                c_h[fi] += 1
                vd = np.float64(vi)
                v2 = vd * vd
                p_h[0, fi] += vd
                p_h[1, fi] += v2
                p_h[2, fi] += v2 * vd
                p_h[3, fi] += v2 * v2
                # floor(4·log2 v) from v's float32 bits: 4·(exponent) + the quarter octaves the mantissa has
                # passed (_QUARTERS: the least mantissas at or above 2^(j/4), j = 1, 2, 3; each 0.2 ulp or more
                # away from it, so float64 log2 lands on the same side: test_the_bins_are_the_torch_formula_everywhere)
                bits = vbits[i]
                mant = bits & 0x7FFFFF
                lg = 4 * ((bits >> 23) - 127) + (mant >= _QUARTERS[0]) + (mant >= _QUARTERS[1]) + (
                    mant >= _QUARTERS[2])
                lg = min(max(lg, -offset), n_bins - 1 - offset)
                g = fi * n_bins + np.int64(lg) + offset
                hist_h[g] += 1
                if vi > cmax[b, fi]:  # pairs come in position order: the first maximal position is kept
                    cmax[b, fi] = vi
                    cpos[b, fi] = t
                if per:
                    thr = thr_of[g]
                    h1 = _mix(t1[r], fi)
                    if h1 * 2.0 ** -32 < thr:  # the first state bounds the key from below
                        key = (h1 * 2 ** 21 + (_mix(t2[r], fi) >> 11)) * 2.0 ** -53
                        if key < thr:
                            out_r[m], out_f[m], out_v[m], out_key[m], out_g[m] = r, fi, vi, key, g
                            m += 1
            found[h] = m - bounds[h]
        for fi in range(n):
            count[fi] += parts[0][0][fi] + parts[0][1][fi]
            for q in range(4):
                power[q, fi] += parts[1][0][q, fi] + parts[1][1][q, fi]
        for g in range(hist.shape[0]):
            hist[g] += parts[2][0][g] + parts[2][1][g]

    @njit(cache=jit.CACHE, nogil=True)
    def _merge(keys, vals, ctx, pos, wrow, groups, new_keys, new_vals, new_ctx, new_pos, entered, last):
        """Insert candidate j (in order) into group groups[j]'s table of the K smallest keys (ascending, +inf
        empty; an equal key goes after those kept: arrival order breaks ties), its window row marked -2 - j.
        The groups entered are listed in `entered` (repeats possible); returns how many. last [G] follows each
        group's K-th smallest key (the threshold `_pairs_pass` reads)."""
        K = keys.shape[1]
        m = 0
        for j in range(groups.shape[0]):
            g, key = groups[j], new_keys[j]
            if not key < keys[g, K - 1]:
                continue
            entered[m] = g
            m += 1
            s = K - 1
            while s > 0 and keys[g, s - 1] > key:
                keys[g, s], vals[g, s], ctx[g, s] = keys[g, s - 1], vals[g, s - 1], ctx[g, s - 1]
                pos[g, s], wrow[g, s] = pos[g, s - 1], wrow[g, s - 1]
                s -= 1
            keys[g, s], vals[g, s], ctx[g, s], pos[g, s], wrow[g, s] = key, new_vals[j], new_ctx[j], new_pos[j], -2 - j
            last[g] = keys[g, K - 1]
        return m

    @njit(cache=jit.CACHE, nogil=True)
    def _take_marked(wrow, groups, slots, marks):
        """The marked entries (window row <= -2) of the listed groups of wrow [G, K]: flat slots and marks, each
        entry once (its mark is cleared to -1, empty, as it is taken); returns how many."""
        K = wrow.shape[1]
        m = 0
        for g in groups:
            for s in range(K):
                if wrow[g, s] <= -2:
                    slots[m], marks[m] = g * K + s, wrow[g, s]
                    wrow[g, s] = -1
                    m += 1
        return m

    @njit(cache=jit.CACHE, nogil=True)
    def _top_merge(top_v, top_c, top_p, top_w, cmax, cpos, c0, entered):
        """Each direction's n_top largest context maxima, descending; a new context enters below the kept ones
        of its value and below lower contexts (the torch pass's stable sort); its window row marked -2 - b.
        Lists the directions entered in `entered`; returns how many."""
        n_top, n = top_v.shape
        m = 0
        for fi in range(n):
            hit = False
            for b in range(cmax.shape[0]):
                cand = cmax[b, fi]
                if not (cand > 0 and cand > top_v[n_top - 1, fi]):
                    continue
                hit = True
                s = n_top - 1
                while s > 0 and top_v[s - 1, fi] < cand:
                    top_v[s, fi], top_c[s, fi] = top_v[s - 1, fi], top_c[s - 1, fi]
                    top_p[s, fi], top_w[s, fi] = top_p[s - 1, fi], top_w[s - 1, fi]
                    s -= 1
                top_v[s, fi], top_c[s, fi], top_p[s, fi], top_w[s, fi] = cand, c0 + b, cpos[b, fi], -2 - b
            if hit:
                entered[m] = fi
                m += 1
        return m

    @njit(cache=jit.CACHE, nogil=True)
    def _context_keys(cmax, cpos, s1, s2, last, out_b, out_f, out_key, out_v, out_p):
        """(context, direction) pairs that fire, row-major, whose key (the hash states s1, s2 [B] of each context
        continued by the direction) is below the direction's current k-th smallest (last [n]), with their max and
        its position; returns how many."""
        B, n = cmax.shape
        m = 0
        for b in range(B):
            for fi in range(n):
                if cmax[b, fi] > 0:
                    key = (_mix(s1[b], fi) * 2 ** 21 + (_mix(s2[b], fi) >> 11)) * 2.0 ** -53
                    if key < last[fi]:
                        out_b[m], out_f[m], out_key[m], out_v[m], out_p[m] = b, fi, key, cmax[b, fi], cpos[b, fi]
                        m += 1
        return m

    @njit(cache=jit.CACHE, nogil=True)
    def _row_states(p1, p2, q1, q2, c0, B, T, t1, t2, s1, s2):
        """`hash_states(c0 + b, t, states=(p1, p2))` for every row b·T + t of the batch, and
        `hash_states(c0 + b, states=(q1, q2))` for every context b."""
        for b in range(B):
            s1[b], s2[b] = _mix(q1, c0 + b), _mix(q2, c0 + b)
            h1, h2 = _mix(p1, c0 + b), _mix(p2, c0 + b)
            for t in range(T):
                t1[b * T + t], t2[b * T + t] = _mix(h1, t), _mix(h2, t)


def halves(B: int, T: int, rows: torch.Tensor | None, w: int, P: int) -> np.ndarray:
    """[3] bounds of the batch's two halves of contexts (the first (B + 1) // 2 contexts, then the rest) among its P
    pairs: with w > 0 the pairs are flat picks, w per row, else `rows` [P] (ascending) gives each pair's row."""
    h = (B + 1) // 2 * T
    mid = h * w if w > 0 else int(np.searchsorted(rows.contiguous().numpy(), h))
    return np.array([0, min(mid, P), P], dtype=np.int64)


def _buffer(buffers: dict | None, name: str, size: int, dtype) -> np.ndarray:
    """np.empty(size) kept in `buffers` from call to call (grown when short): the candidate and per-half arrays
    are megabytes per batch, and fresh ones each batch cost page faults (in the model's forward too, as the
    allocator trims and regrows its heap)."""
    if buffers is None:
        return np.empty(size, dtype)
    b = buffers.get(name)
    if b is None or len(b) < size:
        b = buffers[name] = np.empty(size, dtype)
    return b[:size]


def pairs_pass(rows, f, v, w, T, bins_per_octave, offset, n_bins, count, power, hist, cmax, cpos, t1, t2,
               thresholds, buffers: dict | None = None):
    """See `_pairs_pass`: the firing pairs (rows, f, v) [P], or with w > 0 the flat picks f, v [R·w] (rows None),
    of a batch of cmax.shape[0] contexts; thresholds [n · n_bins] each bin's current k-th smallest token-sample key
    (empty without a token sample); buffers, a dict the caller keeps for the scratch arrays. Returns the
    token-sample candidates (rows, directions, values, keys, flat bins) as tensors, in pair order: views into
    `buffers` when given (valid until its next use)."""
    if bins_per_octave != 4 or v.dtype != torch.float32:
        raise ValueError(f"the compiled pairs pass bins float32 values at 4 per octave, got {v.dtype} values and "
                         f"{bins_per_octave} bins per octave")
    P = len(v)
    rows = rows if rows is not None else torch.empty(0, dtype=torch.long)
    bounds = halves(cmax.shape[0], T, rows, w, P)
    C = P if len(thresholds) else 0  # per_bin = 0: no token sample, no candidates
    # numpy throughout: each torch call here costs microseconds, sixty-four batches a run
    out = [_buffer(buffers, name, C, dtype) for name, dtype in
           (("r", np.int64), ("f", np.int64), ("v", np.float32), ("key", np.float64), ("g", np.int64))]
    n, H = len(count), len(hist)
    parts = (_buffer(buffers, "count", 2 * n, np.int64).reshape(2, n),
             _buffer(buffers, "power", 8 * n, np.float64).reshape(2, 4, n),
             _buffer(buffers, "hist", 2 * H, np.int32).reshape(2, H))
    found = np.zeros(2, dtype=np.int64)
    jit.set_threads()
    _pairs_pass(rows.numpy(), f.numpy(), v.numpy(), v.view(torch.int32).numpy(), w, T, offset, n_bins,
                count.numpy(), power.numpy(), hist.numpy(), parts, cmax.numpy(), cpos.numpy(), t1.numpy(), t2.numpy(),
                thresholds.numpy(), bounds, *out, found)
    b, (m0, m1) = int(bounds[1]), found.tolist()
    for t in out:  # the second half's candidates after the first's (the first's start at 0)
        t[m0:m0 + m1] = t[b:b + m1]
    return tuple(torch.from_numpy(t[:m0 + m1]) for t in out)


def merge(keys, tables, groups, new_keys, new_vals, new_ctx, new_pos, last) -> tuple[torch.Tensor, torch.Tensor]:
    """See `_merge`; tables = [values, contexts, positions, window rows] as the stream keeps them, last = keys[:, -1]
    kept contiguous. Returns the entries that entered, (flat slots into the tables, candidate indices), their
    window rows left -1 (empty)."""
    vals, ctx, pos, wrow = tables
    entered = torch.empty(len(groups), dtype=torch.long)
    m = _merge(keys.numpy(), vals.numpy(), ctx.numpy(), pos.numpy(), wrow.numpy(), groups.numpy(), new_keys.numpy(),
               new_vals.numpy(), new_ctx.numpy(), new_pos.numpy(), entered.numpy(), last.numpy())
    return take_marked(wrow, entered[:m])


def take_marked(wrow: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """See `_take_marked`: (flat slots, candidate indices j) of the marked entries (mark -2 - j) in `groups`."""
    K = wrow.shape[1]
    slots, marks = torch.empty(len(groups) * K, dtype=torch.long), torch.empty(len(groups) * K, dtype=torch.long)
    m = _take_marked(wrow.numpy(), groups.numpy(), slots.numpy(), marks.numpy())
    return slots[:m], -2 - marks[:m]


def top_merge(top_v, top_c, top_p, top_w, cmax, cpos, c0: int) -> tuple[torch.Tensor, torch.Tensor]:
    """See `_top_merge`: the entries that entered, (flat slots into the [n_top, n] tables, contexts in the batch),
    their window rows left -1 (empty)."""
    entered = torch.empty(top_v.shape[1], dtype=torch.long)
    m = _top_merge(top_v.numpy(), top_c.numpy(), top_p.numpy(), top_w.numpy(), cmax.numpy(), cpos.numpy(), c0,
                   entered.numpy())
    # take_marked reads [G, K] groups: the [n_top, n] tables' columns are the directions
    slots, b = take_marked(top_w.T, entered[:m])  # slots index top_w.T: f * n_top + s
    n_top = top_w.shape[0]
    return (slots % n_top) * top_w.shape[1] + slots // n_top, b


def context_keys(cmax, cpos, s1, s2, last):
    """See `_context_keys` (last [n]: each direction's current k-th smallest context-sample key, as `merge` keeps
    it): (contexts in the batch, directions, keys, context maxima, their positions) of the context-sample
    candidates."""
    N = cmax.numel()
    out = [np.empty(N, np.int64), np.empty(N, np.int64), np.empty(N), np.empty(N, np.float32), np.empty(N, np.int64)]
    m = _context_keys(cmax.numpy(), cpos.numpy(), s1.numpy(), s2.numpy(), last.numpy(), *out)
    return tuple(torch.from_numpy(t[:m]) for t in out)


def row_states(prefix: tuple[torch.Tensor, torch.Tensor], context_prefix: tuple[torch.Tensor, torch.Tensor], c0: int,
               B: int, T: int) -> tuple[torch.Tensor, ...]:
    """The token hash states [B·T] of a batch's rows and the context hash states [B] (see `_row_states`)."""
    t1, t2 = torch.empty(B * T, dtype=torch.long), torch.empty(B * T, dtype=torch.long)
    s1, s2 = torch.empty(B, dtype=torch.long), torch.empty(B, dtype=torch.long)
    _row_states(int(prefix[0]), int(prefix[1]), int(context_prefix[0]), int(context_prefix[1]), c0, B, T,
                t1.numpy(), t2.numpy(), s1.numpy(), s2.numpy())
    return t1, t2, s1, s2
