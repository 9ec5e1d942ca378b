"""BatchTopK (Bussmann et al. 2024, arXiv 2412.06410): in training each member keeps the k·B largest activations of
the whole batch (k per row on average, not exactly k in every row); for inference a per-member threshold, the running
mean of the smallest kept activation, turns it into a JumpReLU. AuxK as TopK. Saved as SAELens "jumprelu" with that
threshold, so SAELens runs it exactly as we do in eval mode."""

from __future__ import annotations

from typing import Any

import torch

from ...checks import check_number
from ..base import register_sae
from ..picks import DenseSource, ScreenSource, batch_top
from ..screening import screens
from .jumprelu import checked_threshold
from .topk import TopKSAE


@register_sae("batchtopk")
class BatchTopKSAE(TopKSAE):
    """BatchTopK (Bussmann et al. 2024): per member, the k·B largest ReLU'd pre-activations of the batch survive.

    Training runs TopK's sparse step (`TopKSAE._sparse_forward`): the kept entries are gathered above a level
    estimated from a sample of the batch's pre-activations (`picks.batch_top`; exact, through the bfloat16 screen
    where it pays), and the gradients and the decoder touch only them, in row slices of k. Each training forward
    also updates the member's inference threshold: the smallest kept positive activation, averaged with rate
    threshold_lr (as SAELens; the first update takes the value as it is instead of averaging it with the starting 0,
    so short runs are not biased low). In eval mode codes are z·H(z − threshold), a JumpReLU with one threshold per
    member; before any training step the threshold is 0 (a plain ReLU). Members may have different k (each keeps
    its own k·B)."""

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
        row·n + latent [E, K], K = max(k)·B; a member with a smaller k has zeros past its own k·B. The dense
        reference of the training step's choice (`activation`)."""
        E, B, n = pre.shape
        K = min(self.k_max * B, B * n)
        ragged = len({h["k"] for h in self.hparams}) > 1
        values, idx = pre.reshape(E, B * n).topk(K, dim=-1, sorted=ragged)
        values = torch.relu(values)
        if ragged:
            ranks = torch.arange(K, device=pre.device)
            values = values * (ranks < self.member_param("k").view(-1, 1) * B).to(values.dtype)
        return values, idx

    def _main_picks(self, xs, W, bias, dense_pre):
        """The batch's k·B largest entries per member (`picks.batch_top`: gathered above a level estimated from a
        sample, through the screen where it pays), in row slices of k picks."""
        B, n = xs.shape[-2], self.d_sae
        pre = None
        if screens(xs, n, self.k_max):
            source = ScreenSource(xs, W, bias, self._workspace)
        else:
            pre = dense_pre()
            source = DenseSource(pre)
        return pre, batch_top(source, self.member_param("k"), self.k_max, B, n, width=self.k_max)

    def _main_values(self, picked: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        return torch.relu(picked) * keep

    def _picked(self, values: torch.Tensor) -> None:
        self._update_threshold(values.reshape(values.shape[0], -1))

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
        if not self.training:
            pre = self._pre(x)
            codes = self._jump(pre)
            return self._decode(codes), codes, self.fired(codes), {"aux": pre.new_zeros(self.n_members)}
        return self._sparse_forward(x)

    def member_state(self, i: int) -> dict[str, torch.Tensor]:
        state = super().member_state(i)
        # SAELens's "jumprelu" wants one threshold per latent: the member's threshold for every latent.
        state["threshold"] = torch.full((self.d_sae,), float(self.threshold[i]), dtype=self.dtype)
        return state

    @torch.no_grad()
    def scale_thresholds_(self, factor: torch.Tensor) -> None:
        """Each member's threshold times its factor (factor [E, d_sae], one value per member: `training.rescale`)."""
        f = factor.to(self.threshold.dtype)
        if not torch.allclose(f, f[:, :1].expand_as(f), rtol=1e-6, atol=0):
            raise ValueError("factor must be the same for every latent of a member: a batchtopk SAE has one threshold "
                             "per member")
        self.threshold.mul_(f[:, 0])

    @torch.no_grad()
    def load_member_state_(self, i: int, state: dict[str, torch.Tensor]) -> None:
        t = checked_threshold(state, self.d_sae)
        if not bool((t == t[0]).all()):
            raise ValueError("state['threshold'] differs between latents, but a batchtopk SAE has one threshold "
                             "per member; load this file as kind 'jumprelu'")
        super().load_member_state_(i, state)
        self.threshold[i] = t[0].to(self.threshold.dtype)
        self.threshold_updates[i] = 1
