"""The one definition of the fraction of variance unexplained (FVU), used by the training log, the toy study and the
evaluation of trained dictionaries alike.

    FVU = Σ‖x − x̂‖² / Σ‖x − x̄‖²      (sums over the rows seen, x̄ their mean; 0 = perfect, 1 = no better than x̄)
"""

from __future__ import annotations

import torch

from ..arguments import checked
from ..checks import check_tensor


@checked
class FVU:
    """FVU per ensemble member, accumulated in float64 over batches of x [B, d] and x̂ [E, B, d] (or [B, d]).

        fvu = FVU().update(x, x_hat).value()      # one batch
    """

    def __init__(self) -> None:
        self.sse: torch.Tensor | None = None  # [E] Σ‖x − x̂‖²
        # Sums of x − c, c the first batch's mean: Σ‖x − c‖² − ‖Σ(x − c)‖²/n is Σ‖x − x̄‖² for any c, and with c
        # near x̄ it does not cancel away (Σ‖x‖² − ‖Σx‖²/n lost ~1 % at mean/spread 1e7, even in float64).
        self.shift: torch.Tensor | None = None  # [d]
        self.sum_x: torch.Tensor | None = None  # [d] Σ(x − c)
        self.sum_sq = 0.0  # Σ‖x − c‖²
        self.n = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor, x_hat: torch.Tensor) -> "FVU":
        """Add one batch: x [B, d] and its reconstruction x_hat [E, B, d] (or [B, d]). Raises ValueError for other
        shapes (broadcasting would otherwise count a reconstruction of one row, or of another batch, against every
        row) and for a width or member count that differs from the batches before."""
        check_tensor(x, "x", 2, shape_hint="[B, d]")
        check_tensor(x_hat, "x_hat", (2, 3), shape_hint="[E, B, d] or [B, d]")
        if tuple(x_hat.shape[-2:]) != tuple(x.shape):
            raise ValueError(f"x_hat must be [E, B, d] or [B, d] with [B, d] = x's shape {tuple(x.shape)}, got "
                             f"{tuple(x_hat.shape)}; pass the reconstruction of this batch, row for row")
        members = x_hat.shape[0] if x_hat.ndim == 3 else 1
        if self.sse is not None and (self.sum_x.shape[0] != x.shape[1] or self.sse.shape[0] != members):
            raise ValueError(f"this batch has d={x.shape[1]} and {members} member(s), the batches before had "
                             f"d={self.sum_x.shape[0]} and {self.sse.shape[0]}; use one FVU per dictionary")
        xd = x.detach().double()
        err = (x_hat.detach().double() - xd).pow(2)
        sse = err.sum(dim=(-2, -1)).cpu().reshape(-1)
        self.sse = sse if self.sse is None else self.sse + sse
        if self.shift is None:
            self.shift = xd.mean(0)
        xc = xd - self.shift
        s = xc.sum(0).cpu()
        self.sum_x = s if self.sum_x is None else self.sum_x + s
        self.sum_sq += float(xc.pow(2).sum())
        self.n += x.shape[0]
        return self

    def total_variance(self) -> float:
        """Σ‖x − x̄‖² over the rows seen."""
        return self.sum_sq - float(self.sum_x.pow(2).sum()) / self.n if self.n else float("nan")

    def value(self) -> torch.Tensor:
        """[E] float64 (NaN when the rows seen have no variance)."""
        if self.sse is None:
            raise ValueError("FVU.value() before any update(x, x_hat)")
        var = self.total_variance()
        return self.sse / var if var > 0 else torch.full_like(self.sse, float("nan"))
