"""The one definition of the fraction of variance unexplained (FVU), used by the training log, the toy study and the
evaluation of trained dictionaries alike.

    FVU = Σ‖x − x̂‖² / Σ‖x − x̄‖²      (sums over the rows seen, x̄ their mean; 0 = perfect, 1 = no better than x̄)
"""

from __future__ import annotations

import torch

from ..arguments import checked



@checked
class FVU:
    """FVU per ensemble member, accumulated in float64 over batches of x [B, d] and x̂ [E, B, d] (or [B, d]).

        fvu = FVU().update(x, x_hat).value()      # one batch
    """

    def __init__(self) -> None:
        self.sse: torch.Tensor | None = None  # [E] Σ‖x − x̂‖²
        self.sum_x: torch.Tensor | None = None  # [d]
        self.sum_sq = 0.0
        self.n = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor, x_hat: torch.Tensor) -> "FVU":
        xd = x.detach().double()
        err = (x_hat.detach().double() - xd).pow(2)
        sse = err.sum(dim=(-2, -1)).cpu().reshape(-1)
        self.sse = sse if self.sse is None else self.sse + sse
        s = xd.sum(0).cpu()
        self.sum_x = s if self.sum_x is None else self.sum_x + s
        self.sum_sq += float(xd.pow(2).sum())
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
