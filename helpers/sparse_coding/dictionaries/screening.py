"""Exact top-k of float32 pre-activations through a bfloat16 screen: the TopK encoder's one dense matmul at
bfloat16 speed (several times float32's on CPUs with AMX tiles), with the same picks as float32 (TopK: Gao et al.
2024, arXiv 2406.04093).

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

from .kernels import _csr_matrix

# Past 1/_DENSE_ABOVE of all latents as candidates, the float32 pass is cheaper than rescoring them one by one.
_DENSE_ABOVE = 16
_U = 2.0 ** -8  # bfloat16's unit roundoff (8 significant bits, round to nearest)
_UP = _U / (1 - _U)

# None: screen where bfloat16 matmuls are fast (a CPU with AMX tiles); True / False force it (tests, comparisons).
SCREEN: bool | None = None


@functools.lru_cache(maxsize=1)
def _bf16_matmul_is_fast() -> bool:
    """Whether bfloat16 matmuls run in AMX tiles here: the CPU has them (Linux: amx_bf16 in /proc/cpuinfo's flags)
    and, timed once, a bfloat16 matmul takes under half the float32 one's time. Without the tiles (AVX-512 BF16
    only, or the kernel refusing them) bfloat16 matmuls are slower than float32 ones, and screening would cost."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    if "amx_bf16" not in flags:
        return False
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1024, 512, generator=g), torch.randn(512, 4096, generator=g)  # small ones time noise

    def best(x: torch.Tensor, y: torch.Tensor) -> float:
        times = []
        for _ in range(6):  # the first few calls set the kernels up
            t0 = time.perf_counter()
            torch.mm(x, y)
            times.append(time.perf_counter() - t0)
        return min(times[3:])

    return best(a.bfloat16(), b.bfloat16()) * 2 < best(a, b)


def screens(x: torch.Tensor, n: int, k: int) -> bool:
    """Whether the top k of [·, n] float32 pre-activations of x are found through the screen: float32 on a CPU
    whose bfloat16 matmuls are fast (or `SCREEN` forcing it), n large next to k (at least 256·k latents: few
    candidates per pick) and d_in at least 256 (a smaller matmul saves less than the screen's own passes cost)."""
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
    radius = _radius(x, xa, W, b)
    s = 8 if n % 8 == 0 and n // 8 >= k else 1
    m = n // s
    group_max = torch.amax(screen.unflatten(-1, (s, m)), -2, out=workspace("screen_max", E, B, m, dtype=screen.dtype))
    kth = _kth_lower(group_max, k)
    if not bool((torch.isfinite(kth).all() & torch.isfinite(radius).all())):
        return _dense_topk(x, W, b, k, sorted)  # NaN or inf inputs: float32 gives torch.topk's own answer
    lower = kth - radius - _UP * kth.abs()  # the k-th largest float32 pre-activation is at least this
    # The smallest screen whose upper bound (screen + radius + u'|screen|) reaches `lower`, less the float32 rounding
    # of these lines, then rounded down to bfloat16 (lowered by u first: round to nearest moves it by at most that).
    y = lower - radius
    threshold = torch.where(y >= 0, y / (1 + _UP), y / (1 - _UP)) - 1e-6 * (kth.abs() + 2 * radius)
    threshold = (threshold - threshold.abs() * (1.01 * _U)).to(torch.bfloat16).view(E * B)
    rows, groups = (group_max.view(E * B, m) >= threshold.unsqueeze(-1)).nonzero(as_tuple=True)
    members = screen.view(E * B, s, m)[rows, :, groups]  # [N, s]: each passing group's latents g, g + m, ...
    i, r = (members >= threshold[rows].unsqueeze(-1)).nonzero(as_tuple=True)
    if i.numel() * _DENSE_ABOVE > E * B * n:
        # Values too close together for the screen to tell apart (e.g. weights near zero under a large bias):
        # rescoring that many one by one costs more than the dense float32 pass.
        return _dense_topk(x, W, b, k, sorted)
    return _rescore_top(x, W, b, rows[i], groups[i] + r * m, k, sorted)


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


def _radius(x: torch.Tensor, xa: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
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


def _rescore_top(x, W, b, rows, cols, k, sorted):
    """The top k per row of the float32 pre-activations at the candidates (rows, cols): rows ascending (row e·B+b
    of the flattened [E·B] rows), cols the latents."""
    E, B, d = x.shape
    n = W.shape[-1]
    counts = torch.bincount(rows, minlength=E * B)
    crow = torch.zeros(E * B + 1, dtype=torch.long, device=x.device)
    torch.cumsum(counts, 0, out=crow[1:])
    member = rows // B
    table = W.mT.reshape(E * n, d)  # rows of Wᵀ: latent j of member e at e·n + j
    gcols = cols + member * n
    pattern = _csr_matrix(crow, gcols, x.new_zeros(gcols.shape[0]), (E * B, E * n))
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the operations used here are tested
        warnings.simplefilter("ignore", UserWarning)
        dots = torch.sparse.sampled_addmm(pattern, x.reshape(E * B, d), table.t(), beta=0.0).values()
    pre = dots + b.reshape(-1)[gcols]
    width = int(counts.max())
    slot = torch.arange(rows.shape[0], device=x.device) - crow[rows]
    padded = pre.new_full((E * B, width), float("-inf")).index_put_((rows, slot), pre)
    values, j = padded.topk(k, dim=-1, sorted=sorted)
    latent = cols.new_zeros(E * B, width).index_put_((rows, slot), cols).gather(-1, j)
    return values.view(E, B, k), latent.view(E, B, k)


def _dense_topk(x, W, b, k, sorted):
    pre = torch.baddbmm(b.unsqueeze(1), x, W)
    return pre.topk(k, dim=-1, sorted=sorted)
