"""BatchTopK (Bussmann et al. 2024, arXiv 2412.06410): in training each member keeps the k·B largest activations of
the whole batch (k per row on average, not exactly k in every row); for inference a per-member threshold, the running
mean of the smallest kept activation, turns it into a JumpReLU. AuxK as TopK. Saved as SAELens "jumprelu" with that
threshold, so SAELens runs it exactly as we do in eval mode."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...checks import check_number
from ..base import register_sae
from .jumprelu import checked_threshold
from .topk import TopKSAE


@register_sae("batchtopk")
class BatchTopKSAE(TopKSAE):
    """BatchTopK (Bussmann et al. 2024): per member, the k·B largest ReLU'd pre-activations of the batch survive.

    Training decodes through only the kept latents (one embedding_bag over all members' kept entries, grouped by
    row). Each training forward also updates the member's inference threshold: the smallest kept positive
    activation, averaged with rate threshold_lr (as SAELens; the first update takes the value as it is instead of
    averaging it with the starting 0, so short runs are not biased low). In eval mode codes are
    z·H(z − threshold), a JumpReLU with one threshold per member; before any training step the threshold is 0
    (a plain ReLU). Members may have different k (the top max(k)·B are taken once, sorted, and each keeps its own)."""

    architecture = "jumprelu"
    member_keys = ("k", "aux_k", "aux_coef", "threshold_lr")

    @classmethod
    def default_hparams(cls, d_in: int) -> dict[str, Any]:
        return {**super().default_hparams(d_in), "threshold_lr": 0.01}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        E = self.n_members
        # float64 like SAELens: an average of many small updates loses digits in float32.
        self.register_buffer("threshold", torch.zeros(E, dtype=torch.float64, device=self.device))
        self.register_buffer("threshold_updates", torch.zeros(E, dtype=torch.long, device=self.device))

    def validate_member(self, h: dict[str, Any]) -> None:
        super().validate_member(h)
        check_number(h.get("threshold_lr"), "threshold_lr", low=0, high=1, low_open=True,
                     hint=" (the rate of the running mean of the smallest kept activation)")

    # -- training: top k·B over the batch --
    def batch_select(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per member, the k·B largest ReLU'd entries of pre [E, B, n]: values [E, K] and flat indices
        row·n + latent [E, K], K = max(k)·B; a member with a smaller k has zeros past its own k·B."""
        E, B, n = pre.shape
        K = min(self.k_max * B, B * n)
        ragged = len({h["k"] for h in self.hparams}) > 1
        values, idx = pre.reshape(E, B * n).topk(K, dim=-1, sorted=ragged)
        values = torch.relu(values)
        if ragged:
            ranks = torch.arange(K, device=pre.device)
            values = values * (ranks < self.member_param("k").view(-1, 1) * B).to(values.dtype)
        return values, idx

    def batch_decode(self, values: torch.Tensor, idx: torch.Tensor, B: int) -> torch.Tensor:
        """Σ over each row's kept entries of value · W_dec[latent] -> [E, B, d_in] (no b_dec). One embedding_bag
        over all members: entries are sorted by (member, row) so each row's entries form one bag."""
        E, K = idx.shape
        n = self.d_sae
        member = torch.arange(E, device=idx.device).view(E, 1)
        key, order = (idx + member * (B * n)).view(-1).sort()  # global (member, row, latent), grouped by bag
        bag = key // n  # = member·B + row
        latent = (key // (B * n)) * n + key % n  # = member·n + latent: a row of W_dec flattened to [E·n, d]
        counts = torch.bincount(bag, minlength=E * B)
        offsets = counts.cumsum(0) - counts
        out = nn.functional.embedding_bag(latent, self.W_dec.reshape(E * n, self.d_in), offsets,
                                          mode="sum", per_sample_weights=values.reshape(-1)[order])
        return out.view(E, B, self.d_in)

    @torch.no_grad()
    def _update_threshold(self, values: torch.Tensor) -> None:
        smallest = values.masked_fill(values <= 0, float("inf")).amin(-1).to(self.threshold.dtype)
        seen = torch.isfinite(smallest)
        lr = self.member_param("threshold_lr").to(self.threshold.dtype)
        averaged = torch.where(self.threshold_updates > 0, (1 - lr) * self.threshold + lr * smallest, smallest)
        self.threshold.copy_(torch.where(seen, averaged, self.threshold))
        self.threshold_updates.add_(seen.long())

    # -- inference: a JumpReLU with one threshold per member --
    def _jump(self, pre: torch.Tensor) -> torch.Tensor:
        return pre * (pre > self.threshold.to(pre.dtype).view(-1, 1, 1))

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self._jump(pre)
        E, B, n = pre.shape
        values, idx = self.batch_select(pre)
        return torch.zeros(E, B * n, device=pre.device, dtype=pre.dtype).scatter(-1, idx, values).view(E, B, n)

    def _forward(self, x: torch.Tensor):
        pre = self._pre(x)
        E, B, n = pre.shape
        if not self.training:
            codes = self._jump(pre)
            return self._decode(codes), codes, self.fired(codes), {"aux": pre.new_zeros(E)}
        values, idx = self.batch_select(pre)
        x_hat = self.batch_decode(values, idx, B) + self.b_dec.unsqueeze(1)
        aux = self._aux(x, pre, x_hat)
        with torch.no_grad():
            v = values.detach()
            self._update_threshold(v)
            fired = torch.zeros(E, n, device=pre.device, dtype=pre.dtype).scatter_add_(1, idx % n, v) > 0
            codes = torch.zeros(E, B * n, device=pre.device, dtype=pre.dtype).scatter_(1, idx, v).view(E, B, n)
        return x_hat, codes, fired, {"aux": aux}

    def member_state(self, i: int) -> dict[str, torch.Tensor]:
        state = super().member_state(i)
        # SAELens's "jumprelu" wants one threshold per latent: the member's threshold for every latent.
        state["threshold"] = torch.full((self.d_sae,), float(self.threshold[i]), dtype=self.dtype)
        return state

    @torch.no_grad()
    def load_member_state_(self, i: int, state: dict[str, torch.Tensor]) -> None:
        t = checked_threshold(state, self.d_sae)
        if not bool((t == t[0]).all()):
            raise ValueError("state['threshold'] differs between latents, but a batchtopk SAE has one threshold "
                             "per member; load this file as kind 'jumprelu'")
        super().load_member_state_(i, state)
        self.threshold[i] = t[0].to(self.threshold.dtype)
        self.threshold_updates[i] = 1
