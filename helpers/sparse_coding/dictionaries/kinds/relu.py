"""ReLU + L1 (Cunningham et al. 2023, arXiv 2309.08600; Sharkey et al. 2022): codes = ReLU(x W_enc + b_enc),
loss = ‖x − x̂‖² + l1_coef·‖codes‖₁ with unit-norm decoder rows, so the L1 cannot be dodged by shrinking codes and
growing the decoder. Saved as SAELens "standard".

"relu_bias_decay" adds b_enc_decay·‖b_enc‖² to the loss (an L2 decay on the encoder bias), reusing the same step."""

from __future__ import annotations

from typing import Any, Callable

import torch

from ...checks import check_coef
from ..base import EnsembleSAE, register_sae
from ..relu_step import ReLUStep
from ..workspace import Workspaces


def _copy_on_read(codes: torch.Tensor, counter: dict) -> Callable[[], torch.Tensor]:
    """codes living in a step buffer -> what SAEOutput builds its codes from on first read: a copy, so that codes a
    caller keeps do not change under it when the next step rewrites the buffer. The trainer reads them (for its log)
    within the step; a read after a later forward pass (which may have rewritten the buffer) raises instead of
    returning another batch's codes."""
    count = counter["_forwards"] = counter.get("_forwards", 0) + 1  # counter: the SAE's __dict__

    def read() -> torch.Tensor:
        if counter.get("_forwards") != count:
            raise RuntimeError("these codes were overwritten by a later forward pass: a ReLU SAE in training mode "
                               "reuses their buffer from step to step. Read out.codes before the next forward pass, "
                               "or run in eval mode (sae.eval()) or under torch.no_grad")
        return codes.clone()

    return read


@register_sae("relu")
class ReLUSAE(Workspaces, EnsembleSAE):
    """ReLU + L1. Per member: l1_coef (default 1.0, for inputs normalised to E‖x‖² = d_in as train_sae does by
    default: it recovers planted dictionaries at d_in from 32 to 256, tests/dictionaries/test_defaults.py)."""

    architecture = "standard"
    member_keys = ("l1_coef",)
    sparsity_knob = sparsity_coef = "l1_coef"

    @classmethod
    def default_hparams(cls, d_in: int) -> dict[str, Any]:
        return {"l1_coef": 1.0}

    def validate_member(self, h: dict[str, Any]) -> None:
        super().validate_member(h)
        check_coef(h.get("l1_coef"), "l1_coef")

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre)

    def kind_losses(self, x, pre, codes, x_hat):
        # codes are >= 0, so the L1 norm is a plain sum.
        return {"l1": self.member_param("l1_coef") * codes.sum(-1).mean(-1)}

    def _forward(self, x: torch.Tensor):
        if type(self).activation is not ReLUSAE.activation or type(self).kind_losses is not ReLUSAE.kind_losses:
            return super()._forward(x)  # a subclass with its own maths takes the generic path
        buffers = self._step_buffers()
        x_hat, l1, codes, per_latent = ReLUStep.apply(self.expand(x), self.encoder_weight(), self.b_enc, self.W_dec,
                                                      self.b_dec, self.pre_bias, buffers)
        return (x_hat, codes if buffers is None else _copy_on_read(codes, self.__dict__), per_latent > 0,
                {"l1": self.member_param("l1_coef") * l1})

    def _step_buffers(self) -> dict[str, torch.Tensor] | None:
        """In training with autograd on, the dict where `ReLUStep` keeps its [E, B, d_sae] tensors from step to step:
        fresh ones cost page faults on every step (large CPU allocations are mapped and unmapped each time). None in
        eval mode or under torch.no_grad, where nothing is kept; eval() drops them."""
        if not (self.training and torch.is_grad_enabled()):
            return None
        return self.__dict__.setdefault("_workspaces", {})  # the `Workspaces` dict: eval() drops it


@register_sae("relu_bias_decay")
class ReLUBiasDecaySAE(ReLUSAE):
    """ReLU + L1 with an L2 penalty on the encoder bias: loss = mse + l1_coef·‖c‖₁ + b_enc_decay·‖b_enc‖².

    Keeps ReLUSAE's hand-written step (activation and kind_losses are not overridden, so its fast path applies) and
    adds the decay to the losses afterwards; autograd gives b_enc the extra 2·b_enc_decay·b_enc."""

    member_keys = ("l1_coef", "b_enc_decay")

    @classmethod
    def default_hparams(cls, d_in: int) -> dict[str, Any]:
        return {"l1_coef": 1.0, "b_enc_decay": 1e-3}

    def validate_member(self, h: dict[str, Any]) -> None:
        super().validate_member(h)
        check_coef(h.get("b_enc_decay"), "b_enc_decay")

    def _forward(self, x: torch.Tensor):
        x_hat, codes, fired, losses = super()._forward(x)
        losses["b_enc_l2"] = self.member_param("b_enc_decay") * self.b_enc.pow(2).sum(-1)
        return x_hat, codes, fired, losses
