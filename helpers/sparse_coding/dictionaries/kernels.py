"""The hand-written autograd functions behind the fast training steps (each tested against plain autograd).

- `ReLUStep` (in `relu_step`): a ReLU SAE's forward and backward in a few batched matmuls (kinds.relu).
- `SparseEncode`, `SparseDecode`: gradients that touch only the chosen latents of a TopK-style code, so only the
  encoder forward stays dense (kinds.topk, kinds.batchtopk; Gao et al. 2024, arXiv 2406.04093). On the CPU their
  sparse passes are single calls on torch CSR matrices (`torch.addmm`, `torch.sparse.sampled_addmm`): one
  multi-threaded operation each instead of a loop of small ones.
- `topk_rows`: each row's k largest values through strided group maxima (exact values, cheaper than a full top-k
  when d_sae is large next to k).
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import nn

from . import jit, jit_topk


# Off the CPU, or in half precision (which torch's CPU sparse matmuls lack), the sparse passes run as chunked
# index_add_ / index_select: E·rows·K·d_in ≈ this many elements per chunk (a bounded temporary), at least _MIN_ROWS
# rows so that AuxK's wide picks (K = k + d_in/2) do not turn into thousands of tiny calls.
_SPARSE_CHUNK_ELEMS = 1 << 18
_MIN_ROWS = 8


def _chunks(E: int, B: int, K: int, d: int):
    step = max(_MIN_ROWS, _SPARSE_CHUNK_ELEMS // max(1, E * K * d))
    return [(s, min(B, s + step)) for s in range(0, B, step)]


def _csr_path(t: torch.Tensor) -> bool:
    """On the CPU in float32/64 the sparse passes are single CSR matmuls: one multi-threaded call each, where the
    chunked loop is hundreds of small parallel operations that pay a thread wake-up each (slow with
    OMP_WAIT_POLICY=PASSIVE, which `threads` sets)."""
    return t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64)


def _csr(gidx: torch.Tensor, values: torch.Tensor, n_cols: int) -> torch.Tensor:
    """The sparse [E·B, n_cols] matrix whose row (e, b) holds values[e,b,j] at columns gidx[e,b,j] (K per row,
    unsorted; a repeated column adds)."""
    rows, K = gidx.shape[0] * gidx.shape[1], gidx.shape[-1]
    crow = torch.arange(0, rows * K + 1, K, device=gidx.device)
    return _csr_matrix(crow, gidx.reshape(-1), values.reshape(-1), (rows, n_cols))


def _csr_matrix(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the operations used here are tested
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, size=size)


def _rows_add(n_out: int, gidx: torch.Tensor, coef: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """[n_out, d] with Σ_(e,b,j) coef[e,b,j] · rows[e,b] at row gidx[e,b,j] (already offset by e·n): the transpose
    of a sparse [E·B, n_out] matrix with K entries per row times the dense [E·B, d] rows, in O(E·B·K·d)."""
    E, B, K = gidx.shape
    d = rows.shape[-1]
    if _csr_path(rows):
        # The transpose built here (one stable sort by output row) and multiplied with beta=0 into an uninitialised
        # result: `A.t() @ rows` converts the layout itself and zero-fills and copies its result, which is slower.
        flat = gidx.reshape(-1)
        order = flat.argsort(stable=True)
        crow = torch.zeros(n_out + 1, dtype=torch.long, device=rows.device)
        torch.cumsum(torch.bincount(flat, minlength=n_out), 0, out=crow[1:])
        At = _csr_matrix(crow, order // K, coef.reshape(-1)[order], (n_out, E * B))
        out = rows.new_empty(n_out, d)
        return torch.addmm(out, At, rows.reshape(E * B, d), beta=0, out=out)  # out= too: else addmm copies out
    out = rows.new_zeros(n_out, d)
    for s, t in _chunks(E, B, K, d):
        src = (coef[:, s:t].unsqueeze(-1) * rows[:, s:t].unsqueeze(2)).reshape(-1, d)
        out.index_add_(0, gidx[:, s:t].reshape(-1), src)
    return out


def _gather_dot(table: torch.Tensor, gidx: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """[E, B, K]: table[gidx[e,b,j]] · rows[e,b] (table [E·n, d], gidx offset by e·n): the product rows @ tableᵀ
    sampled at the chosen entries only."""
    E, B, K = gidx.shape
    d = rows.shape[-1]
    if _csr_path(rows):
        pattern = _csr(gidx, rows.new_zeros(E * B * K), table.shape[0])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse.sampled_addmm(pattern, rows.reshape(E * B, d), table.t(), beta=0.0
                                              ).values().view(E, B, K)
    out = rows.new_empty(E, B, K)
    for s, t in _chunks(E, B, K, d):
        picked = table.index_select(0, gidx[:, s:t].reshape(-1)).view(E, t - s, K, d)
        torch.sum(picked.mul_(rows[:, s:t].unsqueeze(2)), dim=-1, out=out[:, s:t])
    return out


# The sparse passes move E·B·K·d_in scattered floats (memory-bound), a dense matmul does E·B·n·d_in multiply-adds at
# BLAS speed, about ten times faster per element: with K ≥ n / DENSE_BELOW (AuxK's wide picks on a small
# dictionary, e.g. k + d_in/2 = 140 of 1024) the dense form of the same maths is the faster one.
DENSE_BELOW = 8


def _dense_is_faster(K: int, n: int) -> bool:
    return K * DENSE_BELOW >= n


def _scatter(values: torch.Tensor, idx: torch.Tensor, n: int) -> torch.Tensor:
    """[E, B, K] entries at latents idx -> dense [E, B, n] (repeated latents add)."""
    return values.new_zeros(*values.shape[:-1], n).scatter_add_(-1, idx, values)


def _offset(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Latent indices [E, B, K] -> rows of the member-flattened [E·n, ·] table."""
    return idx + (torch.arange(idx.shape[0], device=idx.device) * n).view(-1, 1, 1)


class SparseEncode(torch.autograd.Function):
    """The pre-activations at chosen entries, pre[e, b, idx[e,b,j]] with pre = x W + b_enc (- b_dec W with
    pre_bias), as a differentiable function of x, W, b_enc and b_dec. The forward receives those values already
    computed (the dense encoder forward that picked them ran without autograd) and only passes them on; the backward
    touches the E·B·K chosen entries only, instead of the dense [B, d_in] x [B, d_sae] matmul that a dense
    pre-activation gradient (zero almost everywhere) would cost:
        ∂W[:, j] = Σ_(b: j chosen) g · x_b (built as rows of Wᵀ),   ∂b_enc[j] = Σ g,
        pre_bias: ∂W[:, j] -= b_dec ∂b_enc[j],  ∂b_dec = -W ∂b_enc,   ∂x_b = Σ_j g · W[:, idx]."""

    @staticmethod
    def forward(ctx, x, W, b_enc, b_dec, idx, picked):
        ctx.save_for_backward(x, W, b_dec, idx)
        ctx.pre_bias = b_dec is not None
        return picked.clone()

    @staticmethod
    def backward(ctx, g):
        x, W, b_dec, idx = ctx.saved_tensors
        E, d, n = W.shape
        need = ctx.needs_input_grad
        if _dense_is_faster(idx.shape[-1], n):
            return SparseEncode._dense_backward(ctx, x, W, b_dec, idx, g)
        gidx = _offset(idx, n)
        g_x = g_W = g_b_enc = g_b_dec = None
        g_b = g.new_zeros(E * n).index_add_(0, gidx.reshape(-1), g.reshape(-1)).view(E, n)
        if need[1]:
            g_Wt = _rows_add(E * n, gidx, g, x.expand(E, *x.shape[-2:])).view(E, n, d)
            if ctx.pre_bias:
                g_Wt.baddbmm_(g_b.unsqueeze(2), b_dec.unsqueeze(1), alpha=-1)
            g_W = g_Wt.transpose(1, 2)
        if need[2]:
            g_b_enc = g_b
        if ctx.pre_bias and need[3]:
            g_b_dec = -torch.bmm(W, g_b.unsqueeze(2)).squeeze(2)
        if need[0]:
            table = W.transpose(1, 2).reshape(E * n, d)
            g_x = nn.functional.embedding_bag(gidx.reshape(-1, idx.shape[-1]), table, mode="sum",
                                              per_sample_weights=g.reshape(-1, idx.shape[-1]))
            g_x = g_x.view(E, -1, d)  # x is [E, B, d_in] (expanded when shared): autograd sums the expand
        return g_x, g_W, g_b_enc, g_b_dec, None, None

    @staticmethod
    def _dense_backward(ctx, x, W, b_dec, idx, g):
        """The same gradients through the dense [E, B, n] gradient of the pre-activations (see DENSE_BELOW)."""
        E, d, n = W.shape
        need = ctx.needs_input_grad
        G = _scatter(g, idx, n)
        g_b = G.sum(1)
        g_x = g_W = g_b_dec = None
        if need[1]:
            g_W = torch.bmm(x.expand(E, *x.shape[-2:]).transpose(1, 2), G)
            if ctx.pre_bias:
                g_W.baddbmm_(b_dec.unsqueeze(2), g_b.unsqueeze(1), alpha=-1)
        if ctx.pre_bias and need[3]:
            g_b_dec = -torch.bmm(W, g_b.unsqueeze(2)).squeeze(2)
        if need[0]:
            g_x = torch.bmm(G, W.transpose(1, 2))
        return g_x, g_W, g_b if need[2] else None, g_b_dec, None, None


class SparseDecode(torch.autograd.Function):
    """Σ_j values[e,b,j] · W_dec[e, idx[e,b,j]] -> [E, B, d_in] (no b_dec), touching only the chosen decoder rows:
    forward one embedding_bag; backward ∂W_dec by index_add (no sort, unlike embedding_bag's own backward) and
    ∂values by dot products with the gathered rows."""

    @staticmethod
    def forward(ctx, W_dec, values, idx):
        E, n, d = W_dec.shape
        K = idx.shape[-1]
        if _dense_is_faster(K, n):
            codes = _scatter(values, idx, n)
            ctx.save_for_backward(W_dec, codes, idx)
            ctx.dense = True
            return torch.bmm(codes, W_dec)
        ctx.dense = False
        gidx = _offset(idx, n)
        out = nn.functional.embedding_bag(gidx.view(-1, K), W_dec.reshape(E * n, d), mode="sum",
                                          per_sample_weights=values.reshape(-1, K))
        ctx.save_for_backward(W_dec, values, gidx)
        return out.view(E, -1, d)

    @staticmethod
    def backward(ctx, g_out):
        if ctx.dense:
            W_dec, codes, idx = ctx.saved_tensors
            g_out = g_out.contiguous()
            g_W = torch.bmm(codes.transpose(1, 2), g_out) if ctx.needs_input_grad[0] else None
            g_values = (torch.bmm(g_out, W_dec.transpose(1, 2)).gather(-1, idx)
                        if ctx.needs_input_grad[1] else None)
            return g_W, g_values, None
        W_dec, values, gidx = ctx.saved_tensors
        E, n, d = W_dec.shape
        g_out = g_out.contiguous()
        g_W = g_values = None
        if ctx.needs_input_grad[0]:
            g_W = _rows_add(E * n, gidx, values, g_out).view(E, n, d)
        if ctx.needs_input_grad[1]:
            g_values = _gather_dot(W_dec.reshape(E * n, d), gidx, g_out)
        return g_W, g_values, None


def _jit_groups(pre: torch.Tensor, n: int, k: int) -> int:
    """The number of strided groups `jit_topk.topk` takes for rows of n (a power of two from 2k with at least 4
    values per group), or 0 where it does not apply (not a contiguous float32 CPU tensor, or too few values)."""
    if not (jit.available(pre) and pre.dtype == torch.float32 and pre.is_contiguous() and 1 <= k and 8 * k <= n
            and not pre.requires_grad):
        return 0
    g = 1
    while g < 2 * k:
        g *= 2
    return g if g <= n // 4 and n % g == 0 else 0


def topk_rows(pre: torch.Tensor, k: int, sorted: bool, workspace: Callable[..., torch.Tensor | None] | None = None,
              bias: torch.Tensor | None = None, relu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`pre.topk(k, dim=-1, sorted=sorted)` for [E, B, n], through group maxima when n is large next to k. With bias
    [E, n], of pre + bias (the compiled kernel adds it as it reads each row: no pass over [E, B, n] for it); with
    relu, the values ReLU'd.

    Split each row into s strided groups {g, g + m, g + 2m, ...} (m = n / s): every one of the row's k largest
    values lies in one of the k groups with the largest maxima (a group outside them has k groups whose maxima are
    at least its own), so the top k of those k·s candidates are the row's top k. One vectorised max over the row
    and two small top-k's replace a top-k over all n (CPU top-k costs several ns per element). The values are
    exactly torch.topk's; among exactly tied values the latent picked may differ. workspace(*shape), if given,
    returns a buffer of that shape for the group maxima (or None), kept by the caller from call to call."""
    n = pre.shape[-1]
    g = _jit_groups(pre, n, k)
    if g and (bias is None or (bias.dtype == torch.float32 and bias.shape == (pre.shape[0], n)
                               and not (bias.requires_grad and torch.is_grad_enabled()))):  # (the kernel detaches)
        got = jit_topk.topk(pre.reshape(-1, n), k, g, sorted, bias, relu)
        if got is not None:  # None: a NaN somewhere, whose place torch.topk decides
            return got[0].view(*pre.shape[:-1], k), got[1].view(*pre.shape[:-1], k)
    if bias is not None:
        pre = pre + bias.unsqueeze(-2)
    values, idx = _torch_topk(pre, k, sorted, workspace)
    return (torch.relu(values) if relu else values), idx


def _torch_topk(pre: torch.Tensor, k: int, sorted: bool, workspace) -> tuple[torch.Tensor, torch.Tensor]:
    """`topk_rows` through torch's passes."""
    n = pre.shape[-1]
    s = 1
    while s * 2 * 64 * k <= n and n % (s * 2) == 0:  # keep m >= 64k, where torch.topk takes its cheaper path
        s *= 2
    if s < 4:
        return pre.topk(k, dim=-1, sorted=sorted)
    m = n // s
    buf = workspace(*pre.shape[:-1], m) if workspace is not None else None
    groups_view = pre.unflatten(-1, (s, m))
    group_max = groups_view.amax(-2) if buf is None else torch.amax(groups_view, -2, out=buf)
    _, groups = group_max.topk(k, dim=-1, sorted=False)
    cand = (groups.unsqueeze(-1) + torch.arange(0, n, m, device=pre.device)).flatten(-2)
    values, j = pre.gather(-1, cand).topk(k, dim=-1, sorted=sorted)
    return values, cand.gather(-1, j)




class SquaredError(torch.autograd.Function):
    """The reconstruction loss ‖x̂ − x‖² summed over d_in, averaged over the batch: x_hat [E, B, d_in], x [B, d_in]
    (every member's) or [E, B, d_in] -> [E]. One difference pass and one norm reduction forward, one scaling pass
    backward: written as (x̂ − x).pow(2).sum(-1).mean(-1), autograd makes two more passes over [E, B, d_in] each way
    (a visible share of a small ensemble's step, benchmarks/bench_ensemble.py)."""

    @staticmethod
    def forward(ctx, x_hat, x):
        diff = x_hat - x
        ctx.save_for_backward(diff)
        ctx.shared = x.dim() == 2
        return torch.linalg.vector_norm(diff, dim=-1).square().mean(-1)

    @staticmethod
    def backward(ctx, g):
        (diff,) = ctx.saved_tensors
        g_hat = diff * (2 * g / diff.shape[1]).view(-1, 1, 1)
        g_x = None
        if ctx.needs_input_grad[1]:
            g_x = -(g_hat.sum(0) if ctx.shared else g_hat)
        return (g_hat if ctx.needs_input_grad[0] else None), g_x
