"""One batch of codes as `analyses.mining_stream.Stream` reads it: dense codes [B, T, n], or each token's picks
(`RowPicks`: e.g. a TopK SAE's k values and latents per token), so that mining a wide dictionary never builds the
[tokens, d_sae] matrix (a TopK SAE of 32768 latents: 512 MB per 4096 tokens, and a pass over all of it to find the
firing pairs). Both sources give the stream the same firing pairs, context maxima, columns and windows."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..arguments import checked


@checked
@dataclass(frozen=True)
class RowPicks:
    """Codes [rows, n] held as each row's picks: `values` [rows, w] (0 = not active) at `latents` [rows, w] (int,
    distinct within a row, in [0, n)); `n` the number of directions. An encoder may give these to `mining.mine`
    instead of dense codes (`features.sae_picks_encoder` does for a TopK SAE)."""

    values: torch.Tensor
    latents: torch.Tensor
    n: int


def checked_picks(picks: RowPicks, rows: int, name: str, distinct: bool = False) -> RowPicks:
    """`picks` as float32 values and int64 latents on the CPU, after checking shapes and the latents' range (and
    with `distinct`, that no row names a latent twice among its nonzero picks: `mine` checks an encoder's first
    batch); ValueError naming the encoder otherwise."""
    v, lat, n = picks.values, picks.latents, picks.n
    if not (isinstance(v, torch.Tensor) and isinstance(lat, torch.Tensor) and v.ndim == 2 and v.shape == lat.shape
            and v.shape[0] == rows and not lat.dtype.is_floating_point and isinstance(n, int) and n >= 1):
        raise ValueError(f"encoder {name!r} gave RowPicks that are not values and integer latents of one shape "
                         f"[{rows} rows, picks per row] with n >= 1 directions: values "
                         f"{getattr(v, 'shape', type(v).__name__)}, latents {getattr(lat, 'shape', type(lat).__name__)}"
                         f", n {n!r}")
    lat = lat.long().cpu()
    ln = lat.numpy()  # numpy: no parallel region to wake a passive OpenMP thread for (sparse_coding.threads)
    if lat.numel() and not (0 <= int(ln.min()) and int(ln.max()) < n):
        raise ValueError(f"encoder {name!r} gave latents outside [0, {n}) (n, the number of directions, is {n})")
    v = v.float().cpu()
    if distinct and lat.shape[1] > 1:  # a latent twice in a row would be counted twice
        key = torch.where(v != 0, lat, -1 - torch.arange(lat.shape[1]))  # zero-valued picks never collide
        key = key.sort(dim=1).values
        if bool((key[:, 1:] == key[:, :-1]).any()):
            raise ValueError(f"encoder {name!r} gave RowPicks naming one latent twice in a row among its nonzero "
                             f"picks: give each row's latents once (e.g. a top-k's indices)")
    return RowPicks(v, lat, n)


def _windowed(read, p: torch.Tensor, offsets: torch.Tensor, T: int) -> torch.Tensor:
    """read(positions [m, W], clamped into the context) -> codes [m, W], with NaN where p + offsets lies past the
    context's edges: a source's windows around positions p [m]."""
    pos = p[:, None] + offsets[None]
    ok = (pos >= 0) & (pos < T)
    w = read(pos.clamp(0, T - 1))
    return torch.where(ok, w, torch.full_like(w, math.nan))


class DenseSource:
    """Codes A [B, T, n]."""

    def __init__(self, A: torch.Tensor):
        self.A = A
        self.B, self.T, self.n = A.shape

    def pairs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows [P] = b·T + t, directions [P], values [P]) of the nonzero codes, row-major."""
        flat = self.A.reshape(-1, self.n)
        rows, f = flat.nonzero(as_tuple=True)
        return rows, f, flat[rows, f]

    def context_max(self) -> torch.Tensor:
        """[B, n] each context's max of each direction (0 where it never fires)."""
        return self.A.amax(dim=1)

    def columns(self, b: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """[m, T] direction f[i]'s codes over context b[i]."""
        if len(b) > 4096:  # many (the first batches): through a transposed copy, each column one contiguous row
            return self.A.transpose(1, 2).reshape(-1, self.T).index_select(0, b * self.n + f)
        return self.A[b, :, f]

    def windows(self, b: torch.Tensor, p: torch.Tensor, f: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """[m, len(offsets)] direction f[i]'s codes in context b[i] at positions p[i] + offsets, NaN past the edges."""
        return _windowed(lambda pos: self.A[b[:, None], pos, f[:, None]], p, offsets, self.T)


# Up to this many codes per batch (64 MB of float32), a PickSource scatters its picks into the dense codes for the
# columns and windows (one pass, then plain gathers); past it (a wide dictionary), each request finds the picks of
# the requested (context, direction) pairs by a search over all the batch's firing pairs instead.
DENSE_BELOW = 1 << 24


class PickSource:
    """Codes as picks: `RowPicks` of values and latents [B, T, w] (checked by `checked_picks`)."""

    def __init__(self, picks: RowPicks):
        self.values, self.latents, self.n = picks.values, picks.latents, picks.n
        self.B, self.T, self.w = self.values.shape
        self._pairs = self._dense = None

    def pairs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._pairs is None:
            v, f = self.values.reshape(-1), self.latents.reshape(-1)
            live = (v != 0).nonzero().squeeze(1)
            self._pairs = live // self.w, f[live], v[live]
        return self._pairs

    def context_max(self) -> torch.Tensor:
        where = (torch.arange(self.B).view(-1, 1, 1) * self.n + self.latents).reshape(-1)
        out = torch.zeros(self.B * self.n)
        return out.scatter_reduce_(0, where, self.values.reshape(-1), "amax").view(self.B, self.n)

    def _as_dense(self) -> DenseSource | None:
        if self._dense is None and self.B * self.T * self.n <= DENSE_BELOW:
            rows, f, v = self.pairs()
            A = torch.zeros(self.B * self.T * self.n).index_put_((rows * self.n + f,), v)
            self._dense = DenseSource(A.view(self.B, self.T, self.n))
        return self._dense

    def columns(self, b: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        dense = self._as_dense()
        if dense is not None:
            return dense.columns(b, f)
        if not len(b):
            return torch.zeros(0, self.T)
        # the requested (context, direction) keys, sorted; every firing pair looks its own key up among them
        want, slot = torch.unique(b * self.n + f, return_inverse=True)
        rows, ff, v = self.pairs()
        key = (rows // self.T) * self.n + ff
        at = torch.searchsorted(want, key).clamp_(max=len(want) - 1)
        hit = (want[at] == key).nonzero().squeeze(1)
        col = torch.zeros(len(want), self.T).index_put_((at[hit], rows[hit] % self.T), v[hit])
        return col[slot]

    def windows(self, b: torch.Tensor, p: torch.Tensor, f: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        dense = self._as_dense()
        if dense is not None:
            return dense.windows(b, p, f, offsets)
        return _windowed(lambda pos: self.columns(b, f).gather(1, pos), p, offsets, self.T)
