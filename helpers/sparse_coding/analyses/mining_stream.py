"""The running state of `analyses.mining.mine` for one encoder (what it keeps per direction is in mining's
docstring): counts, power sums, the fixed-grid histogram, the top contexts and the bottom-k samples of contexts and
of tokens per histogram bin.

Shaped for speed (issue #25), with the same result as keeping every window in dense tables:
  - the per-token windows of the kept examples are the one large payload (a whole-context window is ctx_len floats),
    so they are gathered only for the candidates that enter a table (the first batch offers every firing token to
    the empty samples; few of them stay), into one pool the tables point into: merging a table moves pointers, not
    windows; the pool is compacted when full (amortised, bounded by what the tables hold), and the dense
    [directions, ..., window] tensors are filled once, in `result`;
  - a token sample key hashes (seed, context, position) once per token and only the direction per firing pair;
  - each context's max comes from `amax`, its position from an argmax over the few (context, direction) pairs that
    need it (the first maximal position, as `max(dim)` gives), not from `max(dim)` over the whole batch;
  - negative activations are looked for among the nonzero values only;
  - the codes come dense or as each token's picks (`mining_sources`): a TopK SAE's k values and latents per token
    give the same firing pairs, context maxima and windows without the [tokens, d_sae] matrix;
  - where numba runs (`mining_kernels.available`), a batch is one compiled pass over its firing pairs and a few
    compiled merges (`_update_compiled`), keeping exactly the tables the torch passes below keep."""

from __future__ import annotations

import math

import numpy as np
import torch

from . import mining_kernels, mining_windows
from .mining_sources import DenseSource, PickSource, RowPicks, _windowed
from .sketch_keys import hash_states, keys_of, sketch_keys

BINS_PER_OCTAVE = 4
LOWEST_OCTAVE, HIGHEST_OCTAVE = -16, 16  # bin 0 also takes the values below, the last bin those above
N_BINS = (HIGHEST_OCTAVE - LOWEST_OCTAVE) * BINS_PER_OCTAVE
_OFFSET = -LOWEST_OCTAVE * BINS_PER_OCTAVE  # the bin whose lower edge is 1.0


def _bottom_k(keys: torch.Tensor, payloads: list[torch.Tensor], groups: torch.Tensor, new_keys: torch.Tensor,
              new_payloads: list) -> None:
    """Merge candidates into per-group tables keeping the k smallest keys (tables [G, k, ...], keys ascending per
    group, +inf = empty), in place; only the groups that received candidates are touched. A callable among
    new_payloads is called once with the indices of the candidates that enter the tables and returns their payloads
    (so that windows are gathered for those only)."""
    if not len(groups):
        return
    k = keys.shape[1]
    touched, u_new = torch.unique(groups, return_inverse=True)
    U = len(touched)
    all_u = torch.cat([torch.arange(U).repeat_interleave(k), u_new])
    all_k = torch.cat([keys[touched].flatten(), new_keys])
    order = torch.argsort(all_k, stable=True)
    order = order[torch.argsort(all_u[order], stable=True)]
    su = all_u[order]
    rank = torch.arange(len(su)) - torch.searchsorted(su, torch.arange(U))[su]
    m = rank < k
    sel, r_u, r_rank = order[m], su[m], rank[m]
    table = torch.full((U, k), math.inf, dtype=keys.dtype)
    table[r_u, r_rank] = all_k[sel]
    keys[touched] = table
    for old, new in zip(payloads, new_payloads):
        fill = math.nan if old.is_floating_point() else -1
        if callable(new):
            entering = sel[sel >= U * k] - U * k
            new = torch.full((len(new_keys), *old.shape[2:]), fill, dtype=old.dtype).index_put_((entering,),
                                                                                                  new(entering))
        merged = torch.cat([old[touched].flatten(0, 1), new])
        t = torch.full((U, k, *old.shape[2:]), fill, dtype=old.dtype)
        t[r_u, r_rank] = merged[sel]
        old[touched] = t


class Stream:
    """One encoder's directions (`name` for error messages); `update` per batch, then `result`."""

    def __init__(self, n: int, n_top: int, n_random: int, per_bin: int, window: tuple[int, int] | None, T: int,
                 seed: int, name: str = "", keep_context_max: bool = False):
        self.n, self.n_top, self.window, self.T, self.name = n, n_top, window, T, name
        self.context_max: list[torch.Tensor] | None = [] if keep_context_max else None  # each batch's [B, n]
        self.seed = (seed & 0xFFFFFFFF, seed >> 32 & 0xFFFFFFFF)  # the seed as two 32-bit hash parts
        self.token_prefix = hash_states(0, *self.seed)  # the token keys' leading parts, hashed once
        self.context_prefix = hash_states(1, *self.seed)  # the context keys' (compiled path)
        self.offsets = torch.arange(T) if window is None else torch.arange(-window[0], window[1] + 1)
        self.W = len(self.offsets)
        self.count = torch.zeros(n, dtype=torch.long)
        self.power = torch.zeros(4, n, dtype=torch.float64)
        self.hist = torch.zeros(n * N_BINS, dtype=torch.long)
        self.top_v = torch.full((n_top, n), -1.0)
        self.top_c = torch.full((n_top, n), -1, dtype=torch.long)
        self.top_p = torch.zeros((n_top, n), dtype=torch.long)
        self.top_w = torch.full((n_top, n), -1, dtype=torch.long)  # rows of the window pool, -1 = none
        self.rnd_key = torch.full((n, n_random), math.inf, dtype=torch.float64)
        self.rnd = [torch.full((n, n_random), -1.0), torch.full((n, n_random), -1, dtype=torch.long),
                    torch.zeros((n, n_random), dtype=torch.long), torch.full((n, n_random), -1, dtype=torch.long)]
        self.smp_key = torch.full((n * N_BINS, per_bin), math.inf, dtype=torch.float64)
        self.smp = [torch.full((n * N_BINS, per_bin), -1.0), torch.full((n * N_BINS, per_bin), -1, dtype=torch.long),
                    torch.zeros((n * N_BINS, per_bin), dtype=torch.long),
                    torch.full((n * N_BINS, per_bin), -1, dtype=torch.long)]
        self.pool, self.used = torch.empty((0, self.W)), 0
        # the samples' k-th smallest keys, kept contiguous by the compiled merges (read once per firing pair); the
        # torch passes leave them as they are: higher than the tables' after a torch batch, which stays correct
        # (a merge checks each key against its table)
        self.smp_last = self.smp_key[:, -1].contiguous() if per_bin else torch.empty(0, dtype=torch.float64)
        self.rnd_last = self.rnd_key[:, -1].contiguous()
        self.buffers: dict = {}  # the compiled pass's scratch arrays, kept from batch to batch

    def _store(self, src: DenseSource | PickSource, b: torch.Tensor, p: torch.Tensor, f: torch.Tensor,
               columns: torch.Tensor | None = None) -> torch.Tensor:
        """Pool rows [m] now holding the windows of (b, p, f) (`columns`: src.columns(b, f) when already gathered);
        may compact the pool (and rewrite the tables)."""
        m = len(b)
        if self.used + m > len(self.pool):
            tables = [self.top_w, self.rnd[3], self.smp[3]]
            live = torch.cat([t.flatten() for t in tables])
            live = torch.unique(live[live >= 0])
            pool = torch.empty((2 * (len(live) + m) + 64, self.W))  # room to double: compaction stays amortised
            torch.index_select(self.pool, 0, live, out=pool[:len(live)])
            remap = torch.full((self.used + 1,), -1, dtype=torch.long)  # remap[-1] (empty) stays -1
            remap[live] = torch.arange(len(live))
            for t in tables:
                t.copy_(remap[t])
            self.pool, self.used = pool, len(live)
        out = self.pool[self.used:self.used + m]
        if self.window is not None:
            out[:] = src.windows(b, p, f, self.offsets)
        elif columns is not None:
            out[:] = columns
        elif isinstance(src, mining_windows.PickColumns):  # straight into the pool
            src.columns(b, f, out=out)
        else:
            out[:] = src.columns(b, f)
        self.used += m
        return torch.arange(self.used - m, self.used)

    def _acts(self, rows: torch.Tensor) -> torch.Tensor:
        """[*rows.shape, W] the pool's windows at `rows`, NaN where -1."""
        # one gather from the pool with a NaN row after the used ones (-1 points there): the [..., W] result (the
        # token sample's, mostly empty bins, is the largest) is written once, not filled and then scattered into
        if self.used < len(self.pool):  # a free row: no copy of the pool
            pool = self.pool
            pool[self.used] = math.nan
        else:
            pool = torch.cat([self.pool, torch.full((1, self.W), math.nan)])
        at = torch.where(rows >= 0, rows, self.used).reshape(-1)
        return pool.index_select(0, at).view(*rows.shape, self.W)

    def update(self, A: torch.Tensor | RowPicks, c0: int) -> None:
        """A: non-negative activations of contexts c0 .. c0 + B - 1 (global indices: the keys hash them), dense
        [B, T, n] or as `RowPicks` of values and latents [B, T, w] (checked by `checked_picks`). ValueError naming
        the encoder for a negative or non-finite activation (before anything is kept)."""
        src = PickSource(A) if isinstance(A, RowPicks) else DenseSource(A)
        B, T, n = src.B, src.T, src.n
        compiled = mining_kernels.available()
        if compiled and isinstance(src, PickSource):  # the compiled pass reads the picks as they are (zeros skipped)
            rows, f, v, w = None, src.latents.reshape(-1), src.values.reshape(-1), src.w
        else:
            (rows, f, v), w = src.pairs(), 0
            rows = rows.contiguous()  # (nonzero's columns are strided views)
        # a negative, NaN or infinite value is nonzero: looking among these is enough (NaN fails v >= 0); in numpy,
        # which starts no parallel region (waking a passive OpenMP thread costs more than this pass)
        vn = v.numpy()
        if not bool(((vn >= 0) & (vn < math.inf)).all()):
            if bool((v < 0).any()):
                raise ValueError(f"encoder {self.name!r} gave negative activations; pass non-negative ones (split a "
                                 f"signed direction into its positive and negative halves)")
            raise ValueError(f"encoder {self.name!r} gave non-finite activations (NaN or inf) in contexts "
                             f"{c0}..{c0 + B - 1}: check the model's activations at the hook and the encoder's "
                             f"weights for NaN/inf")
        if compiled:
            return self._update_compiled(src, rows, f.contiguous(), v.contiguous(), w, c0)
        self.count += torch.bincount(f, minlength=n)
        vd = v.double()
        v2 = vd * vd  # the powers as products (the compiled pass forms them alike): v, v², v²·v, v²·v²
        h = int(mining_kernels.halves(B, T, rows, 0, len(v))[1])  # summed per half batch, as the compiled pass sums
        for i, power in enumerate((vd, v2, v2 * vd, v2 * v2)):
            self.power[i] += (torch.bincount(f[:h], weights=power[:h], minlength=n)
                              + torch.bincount(f[h:], weights=power[h:], minlength=n))
        # log2 in float64: a value one float32 step off a bin edge stays on its own side
        g = f * N_BINS + (vd.log2() * BINS_PER_OCTAVE).floor().clamp_(-_OFFSET, N_BINS - 1 - _OFFSET).long() + _OFFSET
        self.hist += torch.bincount(g, minlength=n * N_BINS)
        if self.smp_key.shape[1]:  # per_bin=0: no quantile samples (notebook 07 reads top and random ones only)
            # the token's key: (context, position) hashed per token, the direction per firing pair; the first
            # hash state alone rules out most pairs (key >= h1 / 2^32), the second is hashed for the rest only
            t1, t2 = (h.reshape(-1) for h in hash_states(c0 + torch.arange(B)[:, None], torch.arange(T),
                                                          states=self.token_prefix))
            (h1,) = hash_states(f, states=(t1[rows],))
            thr = self.smp_key[g, -1]
            maybe = (h1.double() * 2.0 ** -32 < thr).nonzero().squeeze(1)
            keys = keys_of((h1[maybe], *hash_states(f[maybe], states=(t2[rows[maybe]],))))
            ok = keys < thr[maybe]
            keep, keys = maybe[ok], keys[ok]
            r, fk = rows[keep], f[keep]
            b, p = r // T, r % T
            _bottom_k(self.smp_key, self.smp, g[keep], keys,
                      [v[keep], c0 + b, p, lambda i: self._store(src, b[i], p[i], fk[i])])

        cmax = src.context_max()  # [B, n]
        if self.context_max is not None:
            self.context_max.append(cmax)
        cand = torch.where(cmax > 0, cmax, torch.full_like(cmax, -1.0))
        # stable over (kept, then this batch in order): ties go to the lower context index, whatever the batch size
        vals, sel = torch.cat([self.top_v, cand]).sort(dim=0, descending=True, stable=True)
        vals, sel = vals[:self.n_top], sel[:self.n_top]
        old = sel.clamp(max=self.n_top - 1)
        j, ff = (sel >= self.n_top).nonzero(as_tuple=True)
        bb = sel[j, ff] - self.n_top
        columns = src.columns(bb, ff)
        pp = columns.argmax(dim=1)  # where the max is: its first position
        rows_new = self._store(src, bb, pp, ff, columns)  # before the gathers below: storing may rewrite the tables
        top_c, top_p, top_w = self.top_c.gather(0, old), self.top_p.gather(0, old), self.top_w.gather(0, old)
        top_c[j, ff], top_p[j, ff], top_w[j, ff] = c0 + bb, pp, rows_new
        self.top_v, self.top_c, self.top_p, self.top_w = vals, top_c, top_p, top_w

        ckeys = sketch_keys(1, *self.seed, torch.arange(c0, c0 + B)[:, None], torch.arange(n))  # [B, n]: the context's
        ok = (cmax > 0) & (ckeys < self.rnd_key[:, -1].unsqueeze(0))
        bb, ff = ok.nonzero(as_tuple=True)
        columns = src.columns(bb, ff)
        pp = columns.argmax(dim=1)
        _bottom_k(self.rnd_key, self.rnd, ff, ckeys[bb, ff],
                  [cmax[bb, ff], c0 + bb, pp, lambda i: self._store(src, bb[i], pp[i], ff[i], columns[i])])

    def _update_compiled(self, src: DenseSource | PickSource, rows: torch.Tensor | None, f: torch.Tensor,
                         v: torch.Tensor, w: int, c0: int) -> None:
        """`update` through `mining_kernels` (the same tables): one pass over the firing pairs, then the merges;
        the windows of what entered all three tables are stored together after them (`_store_all`), from the picks
        or the dense codes."""
        B, T, n = src.B, src.T, src.n
        cmax, cpos = torch.zeros(B, n), torch.zeros(B, n, dtype=torch.long)
        t1, t2, s1, s2 = mining_kernels.row_states(self.token_prefix, self.context_prefix, c0, B, T)
        r, fc, vc, keys, groups = mining_kernels.pairs_pass(rows, f, v, w, T, BINS_PER_OCTAVE, _OFFSET, N_BINS,
                                                            self.count, self.power, self.hist, cmax, cpos, t1, t2,
                                                            self.smp_last, self.buffers)
        if self.context_max is not None:
            self.context_max.append(cmax)
        slots, j = mining_kernels.merge(self.smp_key, self.smp, groups, keys, vc, c0 + r // T, r % T, self.smp_last)
        wanted = [(self.smp[3], slots, r[j] // T, r[j] % T, fc[j])]
        slots, b = mining_kernels.top_merge(self.top_v, self.top_c, self.top_p, self.top_w, cmax, cpos, c0)
        wanted.append((self.top_w, slots, b, self.top_p.view(-1)[slots], slots % n))
        bb, ff, ckeys, cv, cp = mining_kernels.context_keys(cmax, cpos, s1, s2, self.rnd_last)
        slots, j = mining_kernels.merge(self.rnd_key, self.rnd, ff, ckeys, cv, c0 + bb, cp, self.rnd_last)
        wanted.append((self.rnd[3], slots, bb[j], cp[j], ff[j]))
        cols = mining_windows.PickColumns(src.values, src.latents, n) if isinstance(src, PickSource) else src
        self._store_all(cols, wanted, B)

    def _store_all(self, cols, wanted: list[tuple[torch.Tensor, ...]], B: int) -> None:
        """Store the windows the merges asked for, [(wrow, flat slots of wrow, contexts in the batch b (of B),
        positions p, directions f)], and point those entries (left -1 by the merge: a compaction of the pool while
        storing remaps the tables) to them: one read of the batch's codes for all, each distinct window stored once
        (the tables may share a pool row; whole-context windows differ only by (b, f))."""
        b, p, f = (torch.cat([w[i] for w in wanted]) for i in (2, 3, 4))
        if not len(b):
            return
        if self.window is None:  # whole contexts: one window per (context, direction)
            first, inverse = mining_windows.first_of(b * self.n + f, B * self.n, self.buffers)
        else:  # numpy: no parallel region to wake a passive OpenMP thread for (sparse_coding.threads)
            _, first, inverse = np.unique(((b * self.n + f) * self.T + p).numpy(), return_index=True,
                                          return_inverse=True)
            first, inverse = torch.from_numpy(first), torch.from_numpy(inverse.reshape(-1))
        b, p, f = b[first], p[first], f[first]
        source = cols if self.window is None or isinstance(cols, DenseSource) else _Windows(cols, self.T)
        rows = self._store(source, b, p, f)
        at = 0
        for wrow, slots, *_ in wanted:
            wrow.view(-1)[slots] = rows[inverse[at:at + len(slots)]]
            at += len(slots)

    def result(self) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """(the tensors of `mining.Mined` from count to sample_acts, in its field order, direction axis first;
        the context maxima [n_contexts, n] or None)."""
        n = self.n
        top_c = torch.where(self.top_v > 0, self.top_c, torch.full_like(self.top_c, -1))
        smp = [t.view(n, N_BINS, *t.shape[1:]) for t in self.smp[:3]]
        tensors = [self.count, self.power.T.contiguous(), self.hist.view(n, N_BINS), self.top_v.T.contiguous(),
                   top_c.T.contiguous(), self.top_p.T.contiguous(), self._acts(self.top_w.T), *self.rnd[:3],
                   self._acts(self.rnd[3]), *smp, self._acts(self.smp[3]).view(n, N_BINS, self.smp[3].shape[1], self.W)]
        return tensors, torch.cat(self.context_max) if self.context_max is not None else None


class _Windows:
    """`windows` of a source that gives only `columns` (`mining_windows.PickColumns`), for `Stream._store`."""

    def __init__(self, cols, T: int):
        self.cols, self.T = cols, T

    def windows(self, b: torch.Tensor, p: torch.Tensor, f: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        columns = self.cols.columns(b, f)
        return _windowed(lambda pos: columns.gather(1, pos), p, offsets, self.T)
