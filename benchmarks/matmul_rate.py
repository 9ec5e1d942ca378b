"""The matmul ideal the training benchmarks compare against: torch.mm's FLOP rate on one SAE step's shapes."""

from __future__ import annotations

import time

import torch


def mm_rate(d: int, n: int, batch: int, repeats: int = 2, inner: int = 1) -> float:
    """FLOP/s of plain torch.mm over the five matmuls of one member's step (x W_enc, c W_dec, c^T g, g W_dec^T,
    x^T c): the best of `repeats` timings of `inner` passes over the five, after one warm-up pass."""
    x, W_enc = torch.randn(batch, d), torch.randn(d, n)
    c, W_dec, g = torch.randn(batch, n), torch.randn(n, d), torch.randn(batch, d)
    ops = [lambda: x @ W_enc, lambda: c @ W_dec, lambda: c.T @ g, lambda: g @ W_dec.T, lambda: x.T @ c]
    for op in ops:
        op()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            for op in ops:
                op()
        best = min(best, time.perf_counter() - t0)
    return inner * len(ops) * 2 * batch * d * n / best
