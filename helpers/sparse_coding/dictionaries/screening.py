"""Exact top-k of float32 pre-activations through a bfloat16 screen: the TopK encoder's one dense matmul at
bfloat16 speed (several times float32's on CPUs with AMX tiles, about twice with AVX-512 BF16), with the same picks
as float32 (TopK: Gao et al. 2024, arXiv 2406.04093). Chosen (`screens`) where a bfloat16 matmul, timed once per
process (`bf16_matmul_speedup`), runs at least 1.3 times float32's rate.

The screen x̃·W̃_j + b̃_j (x, W and b rounded to bfloat16, the bias as one more input of the matmul, products summed
in float32, the result rounded to bfloat16) is within a bound of the float32 pre-activations that follows from the
rounding alone:
    |screen - pre| <= ‖δx‖·max_j‖W_j‖ + u·‖x‖·max_j‖W_j‖ + u·max_j|b_j| + 2γ·(‖x‖·max_j‖W_j‖ + max_j|b_j|) + u'·|screen|
(δx what rounding took from x, u = 2⁻⁸ bfloat16's unit roundoff, u' = u/(1-u), γ = (width + 2)·2⁻²⁴ for the float32
sums of the screen and of the rescoring; Cauchy–Schwarz turns the sums into norms). A latent whose screen, raised
by the bound, stays below a lower bound on the row's k-th largest pre-activation (the k-th largest screened group
maximum, lowered by the bound) cannot be in the row's float32 top k; the few that can, a few times k per row, are
rescored in float32 (one sampled matmul) and the top k of those are the answer. No row can fail: the rule keeps at
least k candidates; rows with NaN or inf take the float32 path.
"""

from __future__ import annotations

import functools
import time
import warnings
from typing import Callable

import torch

from . import jit
from .kernels import _csr_matrix

# Past 1/_DENSE_ABOVE of all latents as candidates, the float32 pass is cheaper than rescoring them one by one.
_DENSE_ABOVE = 16
_U = 2.0 ** -8  # bfloat16's unit roundoff (8 significant bits, round to nearest)
_UP = _U / (1 - _U)

# None: screen where a bfloat16 matmul runs at least _MIN_SPEEDUP times float32's rate here (`bf16_matmul_speedup`,
# timed once per process); True / False force it (tests, comparisons).
SCREEN: bool | None = None

# The screen replaces the float32 matmul [B, d_in] x [d_in, n] (time M) and the float32 top-k pass over its [B, n]
# output (P) by the bfloat16 matmul (width d_in + 1 padded to 32: about M / speedup) and its own passes (Q: casting
# W and x, the bound, the group max and compare over the [B, n] bfloat16 screen, rescoring a few k per row), so it
# pays where speedup > M / (M + P - Q). Q - P does not grow with d_in while M does: the wider the matmul, the nearer
# 1 the speedup it needs. Timed on an Intel Xeon with AMX (2 threads, B 4096, k 32), Q - P was 0.23 M at d_in 512,
# n 16384 (break-even at speedup 1.30; the screen ran 2.1x float32 there at the speedup of 6-8 its tiles give) and
# 0.5 M at the smallest shapes `screens` admits (d_in 256, n 256·k: break-even near 2). On an AMD EPYC with
# AVX-512 BF16 and no AMX (bfloat16 dot products at most double the float32 FMA rate: speedup 2 or less)
# bench_screen measured the screen 1.46x-1.85x float32, so its passes cost less there next to the matmul than on
# the Xeon. Without bfloat16 hardware torch emulates bfloat16 matmuls at a fraction of float32's rate (speedup
# well under 1). 1.3 keeps every CPU with bfloat16 instructions (about 2 and up) and none without (under 1), with
# room for the noise of a one-off timing, and is where the screen breaks even at the common d_in 512, n 16384 on a
# machine whose passes are as costly as the Xeon's. (On such a machine with a speedup between 1.3 and 2, the
# smallest shapes admitted would gain little or lose a little; the AMD's cheaper passes did not.)
_MIN_SPEEDUP = 1.3
_TIMED = (1024, 544, 4096)  # B, width (d_in 512 + the bias, padded to 32), n: the screen's matmul at a small batch


def _time_bf16_speedup() -> float:
    """float32 time / bfloat16 time of one [1024, 544] x [544, 4096] matmul on this CPU at torch's thread count,
    each in the layout the screen gives it (float32 W [d_in, n]; bfloat16 W as rows of latents, transposed), into a
    kept output: one warm-up call each (kernel set-up, paid by the first real matmul anyway), then the least of 3
    alternating timings (the whole 0.1-0.3 s on 2 busy cores with AMX). Stops early where bfloat16 takes over twice
    float32's time (emulated: far below any threshold). 0.0 where this build cannot multiply bfloat16 matrices."""
    B, width, n = _TIMED
    g = torch.Generator().manual_seed(0)
    a, w = torch.rand(B, width, generator=g) - 0.5, torch.rand(n, width, generator=g) - 0.5  # cheaper than randn
    try:
        a16, w16 = a.bfloat16(), w.bfloat16()
        out16 = torch.mm(a16, w16.t())
    except (RuntimeError, NotImplementedError):
        return 0.0
    wt = w.t().contiguous()
    out = torch.mm(a, wt)
    f32 = bf16 = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        torch.mm(a, wt, out=out)
        t1 = time.perf_counter()
        torch.mm(a16, w16.t(), out=out16)
        t2 = time.perf_counter()
        f32, bf16 = min(f32, t1 - t0), min(bf16, t2 - t1)
        if bf16 > 2 * f32:
            break
    return f32 / bf16 if bf16 > 0 else 0.0


@functools.lru_cache(maxsize=1)
def bf16_matmul_speedup() -> float:
    """How many times float32's rate a bfloat16 matmul runs at on this CPU (float32 time / bfloat16 time at the
    screen's shape, see `_time_bf16_speedup`): timed on the first call, then kept for the process. 0.0 where
    bfloat16 matmuls raise. `screens` screens where it is at least _MIN_SPEEDUP (1.3)."""
    return float(_time_bf16_speedup())


def _bf16_matmul_is_fast() -> bool:
    """Whether a bfloat16 matmul is fast enough here for the screen to pay: `bf16_matmul_speedup()` at least
    _MIN_SPEEDUP, whatever the CPU's instructions (AMX tiles, AVX-512 BF16 or others); measured, not read from
    flags."""
    return bf16_matmul_speedup() >= _MIN_SPEEDUP


def screens(x: torch.Tensor, n: int, k: int) -> bool:
    """Whether the top k of [·, n] float32 pre-activations of x are found through the screen: float32 on the CPU,
    where a bfloat16 matmul runs at least _MIN_SPEEDUP times float32's rate (`bf16_matmul_speedup`; or `SCREEN`
    forcing it either way), n large next to k (at least 256·k latents: few candidates per pick) and d_in at least
    256 (a smaller matmul saves less than the screen's own passes cost)."""
    if x.dtype != torch.float32 or x.device.type != "cpu":
        return False
    if SCREEN is not None:
        return SCREEN
    return n >= 256 * k and x.shape[-1] >= 256 and _bf16_matmul_is_fast()


def _augment(t: torch.Tensor, column: torch.Tensor, width: int, out: torch.Tensor | None) -> torch.Tensor:
    """[E, R, d] float32 and a column [E, R] -> [E, R, width] bfloat16: t, the column, zeros (the bias enters the
    matmul as one more input, and the width stays a multiple of 32 for the tiles). Into `out` if given."""
    if out is None:
        out = t.new_empty(*t.shape[:-1], width, dtype=torch.bfloat16)
    d = t.shape[-1]
    out[..., :d] = t
    out[..., d] = column
    out[..., d + 1:] = 0
    return out


Workspace = Callable[..., "torch.Tensor | None"]


def _no_workspace(name: str, *shape: int, dtype: torch.dtype = torch.float32) -> None:
    return None


def screened_topk(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, k: int, sorted: bool = False,
                  workspace: Workspace = _no_workspace) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's k largest float32 pre-activations x W + b: values [E, B, k] (float32, rescored) and latents
    [E, B, k]. x [E, B, d_in] (an expanded view is fine), W [E, d_in, n], b [E, n]; float32. The picks are the top k
    of the float32 pre-activations, computed as dot products: a dense float32 matmul sums in another order, so its
    values differ by a few ulps, and where two latents lie that close at the k-th place it may order them the other
    way (as two BLAS builds may); otherwise the picks are torch.topk's on the dense float32 pre-activations.
    workspace(name, *shape, dtype=) returns a buffer kept from call to call, or None (large fresh buffers cost page
    faults on the CPU).

    Raises ValueError if x, W or b is not float32 or the shapes do not fit."""
    if not (x.dtype == W.dtype == b.dtype == torch.float32):
        raise ValueError(f"screened_topk needs float32 x, W, b; got {x.dtype}, {W.dtype}, {b.dtype}")
    E, B, d = x.shape
    n = W.shape[-1]
    if W.shape != (E, d, n) or b.shape != (E, n):
        raise ValueError(f"screened_topk: W {tuple(W.shape)} and b {tuple(b.shape)} do not fit x {tuple(x.shape)}")
    screen, xa = bf16_screen(x, W, b, workspace)
    radius = screen_radius(x, xa, W, b)
    s = 8 if n % 8 == 0 and n // 8 >= k else 1
    m = n // s
    if jit.available(screen):
        return _jit_screened(x, W, b, k, sorted, workspace, screen, radius, s)
    group_max = torch.amax(screen.unflatten(-1, (s, m)), -2, out=workspace("screen_max", E, B, m, dtype=screen.dtype))
    kth = _kth_lower(group_max, k)
    if not bool((torch.isfinite(kth).all() & torch.isfinite(radius).all())):
        return _dense_topk(x, W, b, k, sorted)  # NaN or inf inputs: float32 gives torch.topk's own answer
    lower = kth - radius - _UP * kth.abs()  # the k-th largest float32 pre-activation is at least this
    threshold = screen_floor(lower, radius, kth).view(E * B)
    rows, groups = (group_max.view(E * B, m) >= threshold.unsqueeze(-1)).nonzero(as_tuple=True)
    members = screen.view(E * B, s, m)[rows, :, groups]  # [N, s]: each passing group's latents g, g + m, ...
    i, r = (members >= threshold[rows].unsqueeze(-1)).nonzero(as_tuple=True)
    if i.numel() * _DENSE_ABOVE > E * B * n:
        # Values too close together for the screen to tell apart (e.g. weights near zero under a large bias):
        # rescoring that many one by one costs more than the dense float32 pass.
        return _dense_topk(x, W, b, k, sorted)
    return _rescore_top(x, W, b, rows[i], groups[i] + r * m, k, sorted)


def _jit_screened(x, W, b, k, sorted, workspace, screen, radius, s):
    """`screened_topk`'s passes over the screen as two compiled row kernels (`jit`): the same candidates."""
    E, B, _ = x.shape
    n = screen.shape[-1]
    m = n // s
    # A finite radius bounds ‖x̃‖·‖W̃_j‖ and |b̃_j| within float32's range, so the screen holds no NaN (the kernels
    # do not look for one); the torch passes fall back on the same inputs (a NaN screen needs a non-finite radius).
    if not bool(torch.isfinite(radius).all()):
        return _dense_topk(x, W, b, k, sorted)
    group_max, kth = jit.screen_maxima(screen.view(E * B, n), s, k, m % 8 == 0 and m // 8 >= 4 * k, workspace)
    kth = kth.float().view(E, B)
    if not bool(torch.isfinite(kth).all()):  # a screen rounded up to ±inf near float32's largest values
        return _dense_topk(x, W, b, k, sorted)
    lower = kth - radius - _UP * kth.abs()
    threshold = screen_floor(lower, radius, kth).view(E * B)
    rows, cols = jit.screen_candidates(screen.view(E * B, n), s, group_max, threshold)
    if rows.numel() * _DENSE_ABOVE > E * B * n:
        return _dense_topk(x, W, b, k, sorted)
    return _rescore_top(x, W, b, rows, cols, k, sorted)


def screen_floor(lower: torch.Tensor, radius: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """[E, B] bfloat16: the smallest screen whose upper bound (screen + radius + u'|screen|) reaches `lower` [E, B],
    less the float32 rounding of these lines (ref [E, B]: a value of the size involved, e.g. lower itself), then
    rounded down to bfloat16 (lowered by u first: round to nearest moves it by at most that). Every latent whose
    float32 pre-activation is at least `lower` has a screen at least this."""
    y = lower - radius
    threshold = torch.where(y >= 0, y / (1 + _UP), y / (1 - _UP)) - 1e-6 * (ref.abs() + 2 * radius)
    return (threshold - threshold.abs() * (1.01 * _U)).to(torch.bfloat16)


def bf16_screen(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, workspace: Workspace = _no_workspace
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The screen x̃·W̃ + b̃ [E, B, n] (bfloat16) of x [E, B, d_in], W [E, d_in, n], b [E, n], and the rounded
    inputs [x̃, 1, 0...] [E, B, width] it was computed from: one bfloat16 batched matmul with the bias as one more
    input (width: d_in + 1 rounded up to a multiple of 32, the tiles' depth)."""
    E, B, d = x.shape
    n = W.shape[-1]
    width = (d + 1 + 31) // 32 * 32
    xa = _augment(x, x.new_ones(E, B), width, workspace("screen_x", E, B, width, dtype=torch.bfloat16))
    Wa = _augment(W.mT, b, width, workspace("screen_W", E, n, width, dtype=torch.bfloat16))  # rows are latents
    return torch.bmm(xa, Wa.mT, out=workspace("screen", E, B, n, dtype=torch.bfloat16)), xa


def _kth_lower(group_max: torch.Tensor, k: int) -> torch.Tensor:
    """[E, B] float32, at most the k-th largest screen of each row: the k-th largest maximum of k groups or more
    (at least k latents reach it). Taken over groups of 8 group maxima where there are enough: a top-k over 1/8 as
    many values, for a slightly lower bound (two of the row's top k share a group more often)."""
    m = group_max.shape[-1]
    if m % 8 == 0 and m // 8 >= 4 * k:
        group_max = group_max.unflatten(-1, (8, m // 8)).amax(-2)
    return group_max.topk(k, dim=-1, sorted=False).values.amin(-1).float()


def screen_radius(x: torch.Tensor, xa: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[E, B]: a bound on |screen - pre| apart from the screen's own rounding to bfloat16 (u'|screen|). With δ what
    rounding to bfloat16 took, x·W_j + b_j - (x̃·W̃_j + b̃_j) = δx·W_j + x̃·δW_j + δb_j, so
    ‖δx‖·max‖W_j‖ + ‖x̃‖·u·max‖W_j‖ + u·max|b_j|, plus 2γ(‖x‖·max‖W_j‖ + max|b_j|) for the float32 sums of the
    screen and of the rescoring. The bias is kept apart: folded into the norms it would widen the bound by ‖x‖·|b|."""
    d = x.shape[-1]
    x_norm = torch.linalg.vector_norm(x, dim=-1)
    dx_norm = torch.linalg.vector_norm(x - xa[..., :d].float(), dim=-1)
    w_max = torch.linalg.vector_norm(W, dim=1).amax(-1, keepdim=True)  # [E, 1]
    b_max = b.abs().amax(-1, keepdim=True)
    gamma = (xa.shape[-1] + 2) * 2.0 ** -24
    sums = 2 * gamma * (1 + _U) ** 2 * (x_norm * w_max + b_max)
    # The tiles flush subnormal inputs, products and sums to zero: at most 2⁻¹²⁶ per input times the other side's
    # norm (Cauchy–Schwarz over width terms), and 2⁻¹²⁶ per product.
    width = xa.shape[-1]
    flush = 2.0 ** -126 * (width ** 0.5 * (x_norm + w_max + b_max + 1) * (1 + _U) + 2 * width)
    # 1 % slack covers the float32 arithmetic of the bound itself.
    return 1.01 * ((dx_norm + _U * (1 + _U) * x_norm) * w_max + _U * b_max + sums + flush)


def rescore(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 pre-activations [N] x W + b at (rows, cols): rows [N] ascending (row e·B+b of the flattened
    [E·B] rows of x [E, B, d_in]), cols [N] latents; one sampled matmul. Also returns the CSR row pointer [E·B+1]."""
    E, B, d = x.shape
    n = W.shape[-1]
    counts = torch.bincount(rows, minlength=E * B)
    crow = torch.zeros(E * B + 1, dtype=torch.long, device=x.device)
    torch.cumsum(counts, 0, out=crow[1:])
    table = W.mT.reshape(E * n, d)  # rows of Wᵀ: latent j of member e at e·n + j
    gcols = cols + (rows // B) * n
    pattern = _csr_matrix(crow, gcols, x.new_zeros(gcols.shape[0]), (E * B, E * n))
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the operations used here are tested
        warnings.simplefilter("ignore", UserWarning)
        dots = torch.sparse.sampled_addmm(pattern, x.reshape(E * B, d), table.t(), beta=0.0).values()
    return dots + b.reshape(-1)[gcols], crow


def _rescore_top(x, W, b, rows, cols, k, sorted):
    """The top k per row of the float32 pre-activations at the candidates (rows, cols): rows ascending (row e·B+b
    of the flattened [E·B] rows), cols the latents."""
    E, B, d = x.shape
    pre, crow = rescore(x, W, b, rows, cols)
    width = int((crow[1:] - crow[:-1]).max())
    slot = torch.arange(rows.shape[0], device=x.device) - crow[rows]
    padded = pre.new_full((E * B, width), float("-inf")).index_put_((rows, slot), pre)
    values, j = padded.topk(k, dim=-1, sorted=sorted)
    latent = cols.new_zeros(E * B, width).index_put_((rows, slot), cols).gather(-1, j)
    return values.view(E, B, k), latent.view(E, B, k)


def _dense_topk(x, W, b, k, sorted):
    pre = torch.baddbmm(b.unsqueeze(1), x, W)
    return pre.topk(k, dim=-1, sorted=sorted)
