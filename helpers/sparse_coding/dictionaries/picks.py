"""Picks with a different count in every row, in the fixed-width form the sparse kernels take (`kernels.SparseEncode`,
`kernels.SparseDecode`), and BatchTopK's choice of them.

BatchTopK (Bussmann et al. 2024, arXiv 2412.06410) keeps each member's k·B largest entries of the whole batch, and
JumpReLU (Rajamanoharan et al. 2024, arXiv 2407.14435) every entry above its latent's threshold: a few tens per row
on average, but a row of large norm can hold hundreds. Padding every row to the largest count would multiply the
sparse passes' work by that spread, so rows are cut into chunks of `width` picks ("slices"): each slice is a row of
the kernels' [E, S, width] picks, `rows` [E, S] says which input row it belongs to, and the padding (value 0, latent
0) is marked not kept; its gradient is zeroed by the kinds, so it adds nothing anywhere.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .screening import bf16_screen, rescore, screen_floor, screen_radius


class Picks(NamedTuple):
    """values, latents and keep [E, S, width]; rows [E, S]: the input row of each slice (0 on padding slices)."""

    values: torch.Tensor
    idx: torch.Tensor
    keep: torch.Tensor
    rows: torch.Tensor


def chunk_rows(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, E: int, B: int, width: int) -> Picks:
    """Entries (rows [N] ascending in 0..E·B-1 = member·B + row, cols [N] latents, values [N]) -> `Picks`: each
    row's entries in ceil(count / width) slices of `width`; a row with none takes no slice."""
    N = rows.shape[0]
    counts = torch.bincount(rows, minlength=E * B)
    start = counts.cumsum(0) - counts
    slot = torch.arange(N, device=rows.device) - start[rows]
    slices = (counts + width - 1) // width  # [E·B]
    per_member = slices.view(E, B).sum(-1)
    S = max(1, int(per_member.max())) if N else 1
    first = (slices.view(E, B).cumsum(-1) - slices.view(E, B)).view(-1)  # each row's first slice, within its member
    s_of = first[rows] + slot // width
    flat = (rows // B) * S + s_of  # [N]: slice index in the flattened [E·S]
    pos = slot % width
    out_v = values.new_zeros(E * S, width).index_put_((flat, pos), values)
    out_i = cols.new_zeros(E * S, width).index_put_((flat, pos), cols)
    keep = torch.zeros(E * S, width, dtype=torch.bool, device=rows.device).index_put_(
        (flat, pos), torch.ones_like(rows, dtype=torch.bool))
    row_of = torch.zeros(E * S, dtype=torch.long, device=rows.device).index_put_((flat,), rows % B)
    return Picks(out_v.view(E, S, width), out_i.view(E, S, width), keep.view(E, S, width), row_of.view(E, S))


def slice_rows(xs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """xs [E, B, d] -> [E, S, d]: each slice's input row (differentiable)."""
    return xs.gather(1, rows.unsqueeze(-1).expand(*rows.shape, xs.shape[-1]))


def sum_slices(out: torch.Tensor, rows: torch.Tensor, B: int) -> torch.Tensor:
    """[E, S, d] per slice -> [E, B, d] per input row, summed (differentiable)."""
    E, S, d = out.shape
    return out.new_zeros(E, B, d).scatter_add(1, rows.unsqueeze(-1).expand(E, S, d), out)


# Past 1/DENSE_SHARE of all entries as picks (e.g. a JumpReLU early in training, its thresholds still low), the
# dense maths is cheaper than sparse passes over the picks, and their row slices ([E, S, d_in]) would be large.
DENSE_SHARE = 8


def _too_many(count: int, E: int, B: int, n: int) -> bool:
    return count * DENSE_SHARE > E * B * n


def above(pre: torch.Tensor, floor: torch.Tensor, width: int) -> Picks | None:
    """Entries of pre [E, B, n] strictly above floor [E, n] (per member and latent), as `Picks`; None when more
    than 1/DENSE_SHARE of all entries are (the dense maths is then the cheaper) or pre holds NaN or inf."""
    E, B, n = pre.shape
    if not bool(torch.isfinite(torch.stack(torch.aminmax(pre))).all()):
        return None
    rows, cols = (pre > floor.unsqueeze(1)).view(E * B, n).nonzero(as_tuple=True)
    if _too_many(rows.numel(), E, B, n):
        return None
    return chunk_rows(rows, cols, pre.view(E * B, n)[rows, cols], E, B, width)


def screened_above(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, floor: torch.Tensor, width: int,
                   workspace) -> Picks:
    """`above` of the float32 pre-activations x W + b (x [E, B, d_in], W [E, d_in, n], b, floor [E, n]; float32)
    without computing them densely: the screen of x W + (b − floor) (`screening.bf16_screen`, the floor folded into
    the bias, so one bound per row covers every latent) keeps every entry that may be above its floor, and those are
    rescored exactly in float32 (values to a few ulps of the dense matmul's: dot products summed in another order).
    None, as `above`, when too many entries may be above their floors or an input is not finite."""
    E, B, _ = x.shape
    n = W.shape[-1]
    shifted = b - floor
    screen, xa = bf16_screen(x, W, shifted, workspace)
    radius = screen_radius(x, xa, W, shifted)
    if not bool(torch.isfinite(radius).all()):
        return None
    zero = torch.zeros_like(radius)
    least = screen_floor(zero, radius, zero).view(E * B, 1)  # every entry at or above its floor reaches this
    rows, cols = (screen.view(E * B, n) >= least).nonzero(as_tuple=True)
    if _too_many(rows.numel(), E, B, n):
        return None
    values, _ = rescore(x, W, b, rows, cols)
    keep = values > floor.reshape(-1)[cols + (rows // B) * n]
    return chunk_rows(rows[keep], cols[keep], values[keep], E, B, width)


class DenseSource:
    """The float32 pre-activations [E, B, n], computed densely: `batch_top`'s view of them."""

    def __init__(self, pre: torch.Tensor):
        self.pre = pre

    def sample(self, stride: int) -> torch.Tensor:
        """[E, ~B·n / stride]: every stride-th pre-activation of each member."""
        return self.pre.view(self.pre.shape[0], -1)[:, ::stride]

    def at_least(self, level: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every entry at least its member's level [E]: rows [N] ascending (member·B + row), latents, values."""
        E, B, n = self.pre.shape
        rows, cols = (self.pre >= level.view(E, 1, 1)).view(E * B, n).nonzero(as_tuple=True)
        return rows, cols, self.pre.view(E * B, n)[rows, cols]


class ScreenSource:
    """The float32 pre-activations x W + b seen through the bfloat16 screen (`screening`): sampled from the screen,
    and every entry whose float32 value may reach a level found from it and rescored exactly in float32."""

    def __init__(self, x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, workspace):
        self.x, self.W, self.b = x, W, b
        self.screen, xa = bf16_screen(x, W, b, workspace)
        self.radius = screen_radius(x, xa, W, b)  # [E, B]

    def sample(self, stride: int) -> torch.Tensor:
        return self.screen.view(self.screen.shape[0], -1)[:, ::stride].float()

    def at_least(self, level: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every entry whose float32 pre-activation is at least its member's level [E]: rows [N] ascending (member·B
        + row), latents [N], float32 values [N]. Where the screen cannot tell (an input not finite, or more than
        1/DENSE_SHARE of all entries within its bound of the level) the float32 pass decides instead."""
        E, B, n = self.screen.shape
        lower = level.view(E, 1).expand(E, B)
        floor = screen_floor(lower, self.radius, lower).view(E * B, 1)
        rows, cols = (self.screen.view(E * B, n) >= floor).nonzero(as_tuple=True)
        if not bool(torch.isfinite(self.radius).all()) or _too_many(rows.numel(), E, B, n):
            pre = torch.baddbmm(self.b.unsqueeze(1), self.x, self.W)
            return DenseSource(pre).at_least(level)
        values, _ = rescore(self.x, self.W, self.b, rows, cols)
        keep = values >= level.repeat_interleave(B)[rows]
        return rows[keep], cols[keep], values[keep]


# A strided sample of every SAMPLE_STRIDE-th pre-activation (a prime: no alias with power-of-two widths) estimates the
# batch's cut; the level tried first keeps MARGIN more than k·B, so that one pass usually suffices.
SAMPLE_STRIDE = 61
MARGIN = 1.15


def batch_top(source: DenseSource | ScreenSource, ks: torch.Tensor, k_max: int, B: int, n: int, width: int) -> Picks:
    """BatchTopK's choice: per member e, the ks[e]·B largest entries of the batch's float32 pre-activations that are
    positive (kept entries that are not would be zeros after the ReLU), as `Picks` of raw pre-activations: the same
    set as a top-k over the flattened [B·n] pre-activations, up to the order of exact ties.

    A level per member is estimated from a strided sample, every entry at or above it is gathered (exactly, in
    float32), and when that is at least ks·B entries their top ks·B are the answer; otherwise the level is lowered
    (the sample's rank doubled) and tried again, down to taking every entry."""
    E = ks.shape[0]
    K = (ks.long() * B).clamp_max(B * n)  # [E]
    sample = source.sample(SAMPLE_STRIDE)
    m = sample.shape[1]
    rank = torch.ceil(K.double() * MARGIN * m / (B * n)).long() + 4
    while True:
        if bool((rank >= m).any()):
            level = torch.full((E,), -math.inf, device=sample.device)
        else:
            top = sample.topk(int(rank.max()), dim=-1).values
            level = top.gather(1, (rank - 1).view(E, 1)).squeeze(1)
        rows, cols, values = source.at_least(level)
        member = rows // B
        found = torch.bincount(member, minlength=E)
        if bool((found >= K).all()) or bool(torch.isinf(level).all()):
            break
        rank = rank * 2
    keep = _top_per_member(values, member, K, E, int(found.max())) & (values > 0)
    return chunk_rows(rows[keep], cols[keep], values[keep], E, B, width)


def _top_per_member(values: torch.Tensor, member: torch.Tensor, K: torch.Tensor, E: int, width: int) -> torch.Tensor:
    """[N] bool: the K[e] largest of values whose member is e (member ascending)."""
    counts = torch.bincount(member, minlength=E)
    start = counts.cumsum(0) - counts
    slot = torch.arange(values.shape[0], device=values.device) - start[member]
    padded = values.new_full((E, max(1, width)), -math.inf).index_put_((member, slot), values)
    k = int(K.max())
    _, j = padded.topk(min(k, padded.shape[1]), dim=-1, sorted=True)
    take = torch.arange(j.shape[1], device=j.device) < K.view(E, 1)
    chosen = torch.zeros_like(padded, dtype=torch.bool).scatter_(1, j, take)
    return chosen[member, slot]


class SparseCodes:
    """Codes [E, B, n] held as `Picks`-style values and latents [E, S, width] (a pick whose value is 0 is not
    active), slices summed into their rows: called, the dense codes (built only if read); `l0()` the active codes per
    row [E], averaged over the batch, without them."""

    def __init__(self, values: torch.Tensor, idx: torch.Tensor, n: int, rows: torch.Tensor | None = None,
                 B: int | None = None):
        self.values, self.idx, self.n, self.rows = values, idx, n, rows
        self.B = values.shape[1] if B is None else B

    def __call__(self) -> torch.Tensor:
        E = self.values.shape[0]
        if self.rows is None:  # scatter_add_: a padded pick (value 0) may share a latent with a real one
            return self.values.new_zeros(E, self.B, self.n).scatter_add_(-1, self.idx, self.values)
        flat = (self.rows.unsqueeze(-1) * self.n + self.idx).view(E, -1)
        out = self.values.new_zeros(E, self.B * self.n).scatter_add_(1, flat, self.values.view(E, -1))
        return out.view(E, self.B, self.n)

    def l0(self) -> torch.Tensor:
        return (self.values != 0).sum((-2, -1)).float() / self.B
