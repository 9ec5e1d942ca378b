"""TopK (Gao et al. 2024, arXiv 2406.04093): keep each row's k largest ReLU'd pre-activations; AuxK makes dead
latents model the residual error so they get gradient again. Saved as SAELens "topk"."""

from __future__ import annotations

from typing import Any, Callable

import torch

from ...checks import check_coef, check_int
from ..base import DEFAULT_DEAD_WINDOW, EnsembleSAE, register_sae
from ..kernels import SparseDecode, SparseEncode, topk_rows
from ..picks import Picks, SparseCodes, slice_rows, sum_slices
from ..screening import screened_topk, screens
from ..workspace import Workspaces

# AuxK trains the sub-dictionary of the dead latents (their columns gathered, dense matmuls over them) while at most
# 1/AUX_GATHER_BELOW of d_sae is dead; past that, masked sparse passes over all latents cost about the same.
AUX_GATHER_BELOW = 2


def _columns(W: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """W [E, d_in, n] at columns cols [E, m] -> [E, d_in, m], gathered as rows of Wᵀ: W is column-major, so the
    gather reads whole rows and its gradient lands in W's own layout."""
    return W.mT.gather(1, cols.unsqueeze(-1).expand(*cols.shape, W.shape[1])).mT


@register_sae("topk")
class TopKSAE(Workspaces, EnsembleSAE):
    """TopK (Gao et al. 2024): keep each row's k largest ReLU'd pre-activations; AuxK makes dead latents model the
    residual error so they get gradient again.

    Members may have different k: the top max(k) are taken once for all members and each member keeps its first k
    (topk returns them sorted).

    The forward pass is sparse everywhere but the encoder matmul: that runs without autograd, the k chosen entries
    per row (and AuxK's aux_k) are picked, and the gradients reach the weights through those entries only
    (`SparseEncode`, `SparseDecode`): per row O(K·d_in) work instead of O(d_sae·d_in) for the
    encoder gradient, the decoder forward and both decoder gradients. On a CPU whose bfloat16 matmuls measure fast
    enough and with a wide enough dictionary the encoder matmul itself runs as a bfloat16 screen whose picks are
    float32's (`screening`). The dense codes in the output are built only if read (`SAEOutput.codes`). BatchTopK
    runs the same step on its own picks (`_main_picks`, `_main_values`)."""

    architecture = "topk"
    member_keys = ("k", "aux_k", "aux_coef")
    sparsity_knob, sparsity_coef = "k", None
    required_hparams = ("k",)

    @classmethod
    def default_hparams(cls, d_in: int) -> dict[str, Any]:
        return {"aux_k": d_in // 2, "aux_coef": 1 / 32}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.k_max = max(int(h["k"]) for h in self.hparams)
        self.aux_k_max = max(int(h["aux_k"]) for h in self.hparams)

    def validate_member(self, h: dict[str, Any]) -> None:
        super().validate_member(h)
        check_int(h.get("k"), "k", 1, self.d_sae, f" (active latents per row; d_sae={self.d_sae})")
        check_int(h.get("aux_k"), "aux_k", 0, self.d_sae, " (dead latents AuxK uses; None means d_in // 2)")
        check_coef(h.get("aux_coef"), "aux_coef")

    def _keep_first(self, values: torch.Tensor, key: str) -> torch.Tensor:
        """Zero each member's ranks >= its own k (values sorted descending along the last axis)."""
        ranks = torch.arange(values.shape[-1], device=values.device)
        return values * (ranks < self.member_param(key).view(-1, 1, 1)).to(values.dtype)

    def _ragged(self, k: int, key: str) -> bool:
        return k > 1 and len({h[key] for h in self.hparams}) > 1

    def _top(self, pre: torch.Tensor, k: int, key: str, bias: torch.Tensor | None = None, relu: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's k largest pre-activations (before the ReLU, of pre + bias [E, d_sae] when given; ReLU'd with
        relu) and their latents; sorted only if the members' `key` differ (they are then cut at their own k)."""
        return topk_rows(pre, k, sorted=self._ragged(k, key), bias=bias, relu=relu,
                         workspace=lambda *shape: self._workspace(f"group_max{shape}", *shape))

    def _screened_top(self, xs: torch.Tensor, W: torch.Tensor, bias: torch.Tensor, k: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """`_top` of the float32 pre-activations xs W + bias without computing them densely (see screening)."""
        return screened_topk(xs, W, bias, k, sorted=self._ragged(k, "k"), workspace=self._workspace)

    def _finish(self, values: torch.Tensor, k: int, key: str) -> torch.Tensor:
        """ReLU and the per-member cut of chosen pre-activations."""
        values = torch.relu(values)
        return self._keep_first(values, key) if self._ragged(k, key) else values

    def select(self, pre: torch.Tensor, k: int, key: str, mask: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's top-k ReLU'd pre-activations (k = max over members, each member then keeps its own
        `key`): values [E, B, k] and latent indices [E, B, k]. `mask` [E, d_sae] restricts the choice."""
        if mask is not None:
            pre = pre.masked_fill(~mask.unsqueeze(1), float("-inf"))
        # Top-k first, ReLU on the k survivors: the same codes as ReLU then top-k, without two full passes over
        # [E, B, d_sae] (ReLU forward and backward). Sorting is only needed to cut members at different k.
        values, idx = self._top(pre, k, key)
        return self._finish(values, k, key), idx

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        values, idx = self.select(pre, self.k_max, "k")
        return torch.zeros_like(pre).scatter(-1, idx, values)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Raw x [B, d_in] or [E, B, d_in] -> codes [E, B, d_sae]. Without autograd (under torch.no_grad, as when
        harvesting), through `encode_picks`: where the screen pays (`screening.screens`) the top k are found through
        it, without computing every pre-activation in float32, else x W_enc and the bias are added as the top-k
        reads them. The same codes as the autograd pass up to a few ulps in the values (the bias is added after
        x W_enc, not inside one fused matmul), and where two pre-activations lie within such an ulp at the cut, the
        latent chosen may differ."""
        if not torch.is_grad_enabled():
            picks = self.encode_picks(x)
            if picks is not None:
                values, idx = picks
                return values.new_zeros(*values.shape[:2], self.d_sae).scatter_(-1, idx, values)
        return super().encode(x)

    @torch.no_grad()
    def encode_picks(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Raw x [B, d_in] or [E, B, d_in] -> each row's chosen codes without the dense [E, B, d_sae]: values
        [E, B, k_max] (0 where inactive: below the ReLU, or past a member's own k) at latents [E, B, k_max]
        (distinct within a row); scattered, they are `encode`'s codes. None for a subclass whose choice is not each
        row's top k (BatchTopK). Without autograd; through the screen where it pays, as `encode`."""
        if type(self).activation is not TopKSAE.activation:
            return None
        xs = self.expand(self.scale_in(self.check_input(x)))
        if screens(xs, self.d_sae, self.k_max):
            values, idx = self._screened_top(xs, self.encoder_weight(), self.encoder_bias(), self.k_max)
            return self._finish(values, self.k_max, "k"), idx
        # the bias and the ReLU join the top-k's one read of each row (no two more passes over [E, B, d_sae]);
        # x W as `mm` where there is one member (as the ideal of benchmarks/bench_mining.py computes it)
        W = self.encoder_weight()
        xw = (xs[0] @ W[0]).unsqueeze(0) if self.n_members == 1 else torch.bmm(xs, W)
        values, idx = self._top(xw, self.k_max, "k", bias=self.encoder_bias(), relu=True)
        return (self._keep_first(values, "k") if self._ragged(self.k_max, "k") else values), idx

    def sparse_decode(self, values: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Σ_j values[e,b,j] · W_dec[e, idx[e,b,j]]  ([E, B, d_in], no b_dec). Only the k chosen decoder rows are
        touched, forward and backward: k·d_in multiply-adds per row instead of d_sae·d_in."""
        return SparseDecode.apply(self.W_dec, values, idx)

    def _dead_for_aux(self) -> torch.Tensor | None:
        """[E, d_sae] dead latents when AuxK has work this step, else None."""
        if self.aux_k_max == 0 or not self.training:
            return None
        dead = self.dead_mask(self.dead_window if self.dead_window is not None else DEFAULT_DEAD_WINDOW)
        # One host sync per step, but it saves a second top-k and decode on every step where nothing is dead.
        return dead if bool(dead.any()) else None

    def _aux_top(self, pre: torch.Tensor | None, dead: torch.Tensor, dense_pre: Callable[[], torch.Tensor],
                 sub_pre: Callable[[torch.Tensor], torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """AuxK's choice: each row's aux_k largest pre-activations [E, B, d_sae] among its member's dead latents
        (dead [E, d_sae]): values [E, B, K], their positions [E, B, K] and the columns they index, -inf where fewer
        are dead. When few latents are dead only their columns are gathered and searched: cols [E, m] (each
        member's dead latents in order, padded with masked live ones), positions index cols, K = min(aux_k, m).
        Otherwise pre (ours, no longer needed) is masked in place, positions are latents, K = aux_k, cols None.
        pre is None when the main top k were screened: dense_pre() then computes all of it and sub_pre(cols) only
        the dead columns [E, B, m]."""
        E, n = dead.shape
        counts = dead.sum(-1)
        m = int(counts.max())  # a host sync, beside the one that found anything dead
        if m * AUX_GATHER_BELOW > n:
            pre = dense_pre() if pre is None else pre
            values, idx = self._top(pre.masked_fill_(~dead.unsqueeze(1), float("-inf")), self.aux_k_max, "aux_k")
            return values, idx, None
        # Each member's dead latents first (stable: in latent order), then live ones, masked below.
        cols = torch.argsort((~dead).to(torch.uint8), dim=-1, stable=True)[:, :m]
        sub = sub_pre(cols) if pre is None else pre.gather(-1, cols.unsqueeze(1).expand(E, pre.shape[1], m))
        sub.masked_fill_((torch.arange(m, device=dead.device) >= counts.unsqueeze(-1)).unsqueeze(1), float("-inf"))
        values, j = self._top(sub, min(self.aux_k_max, m), "aux_k")
        return values, j, cols

    def _aux_dictionary(self, W: torch.Tensor, cols: torch.Tensor | None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(encoder weight [E, d_in, m], b_enc [E, m], W_dec [E, m, d_in]) of the latents cols [E, m] (all latents
        when None), differentiable. AuxK over few dead latents is this small SAE: its picks cover most of its m
        columns, so the kernels take their dense form (kernels.DENSE_BELOW), a few [B, m] matmuls, instead of
        sparse passes over aux_k picks per row of the whole dictionary."""
        if cols is None:
            return W, self.b_enc, self.W_dec
        rows = cols.unsqueeze(-1).expand(*cols.shape, self.d_in)
        return _columns(W, cols), self.b_enc.gather(1, cols), self.W_dec.gather(1, rows)

    def _main_picks(self, xs: torch.Tensor, W: torch.Tensor, bias: torch.Tensor,
                    dense_pre: Callable[[], torch.Tensor]) -> tuple[torch.Tensor | None, Picks]:
        """The step's choice, without autograd: (the dense pre-activations [E, B, d_sae] if computed, else None;
        the picks: pre-activations, latents and keep mask [E, S, K], rows [E, S] or None when S = B, one per row,
        and every pick kept). TopK: each row's k largest, through the screen where it pays."""
        pre = None
        if screens(xs, self.d_sae, self.k_max):
            picked, idx = self._screened_top(xs, W, bias, self.k_max)
        else:
            pre = dense_pre()
            picked, idx = self._top(pre, self.k_max, "k")
        return pre, Picks(picked, idx, None, None)

    def _main_values(self, picked: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """Codes [E, B, K] of the picks (differentiable in picked)."""
        return self._finish(picked, self.k_max, "k")

    def _picked(self, values: torch.Tensor) -> None:
        """Called with the step's codes at its picks [E, B, K] (no autograd); BatchTopK's threshold follows them."""

    def _forward(self, x: torch.Tensor):
        if type(self).activation is not TopKSAE.activation or type(self).kind_losses is not TopKSAE.kind_losses:
            return super()._forward(x)  # a subclass with its own maths takes the generic path
        return self._sparse_forward(x)

    def _sparse_forward(self, x: torch.Tensor):
        """The training step through the chosen entries only (`_main_picks`), AuxK included."""
        E, B, n = self.n_members, x.shape[-2], self.d_sae
        W = self.encoder_weight()
        xs = self.expand(x)
        dead = self._dead_for_aux()
        cols = None
        with torch.no_grad():
            bias = self.encoder_bias()

            def dense_pre() -> torch.Tensor:
                return torch.baddbmm(bias.unsqueeze(1), xs, W, out=self._workspace("pre", E, B, n))

            def sub_pre(cols: torch.Tensor) -> torch.Tensor:  # the columns cols [E, m] of dense_pre()
                return torch.baddbmm(bias.gather(1, cols).unsqueeze(1), xs, _columns(W, cols))

            pre, main = self._main_picks(xs, W, bias, dense_pre)
            picked, idx, keep, rows = main
            K = idx.shape[-1]
            # AuxK's picks join the main ones in one set of sparse passes when both index the same rows of all
            # latents; picks in row slices (`picks.Picks`) or among the dead columns only take passes of their own.
            joined = False
            if dead is not None:
                aux_picked, aux_idx, cols = self._aux_top(pre, dead, dense_pre, sub_pre)
                joined = cols is None and rows is None
                if joined:
                    picked, idx = torch.cat([picked, aux_picked], -1), torch.cat([idx, aux_idx], -1)
            del pre
        # Gradients reach W, b_enc and b_dec through the chosen entries only.
        b_dec = self.b_dec if self.pre_bias else None
        picked = SparseEncode.apply(xs if rows is None else slice_rows(xs, rows), W, self.b_enc, b_dec, idx, picked)
        values, main_idx = self._main_values(picked[..., :K], keep), idx[..., :K]
        x_hat = self.sparse_decode(values, main_idx)
        x_hat = (x_hat if rows is None else sum_slices(x_hat, rows, B)) + self.b_dec.unsqueeze(1)
        if dead is None:
            aux = x_hat.new_zeros(E)
        else:
            W_aux, b_aux, W_dec_aux = self._aux_dictionary(W, cols)
            if joined:
                aux_picked, aux_idx = picked[..., K:], idx[..., K:]
            else:
                aux_picked = SparseEncode.apply(xs, W_aux, b_aux, b_dec, aux_idx, aux_picked)
            aux_values = self._finish(aux_picked, aux_idx.shape[-1], "aux_k")
            aux = self._aux_loss(x, x_hat, aux_values, aux_idx, dead, W_dec_aux)
        with torch.no_grad():
            v = values.detach()
            self._picked(v)
            fired = torch.zeros(E, n, device=self.device, dtype=self.dtype).scatter_add_(
                1, main_idx.reshape(E, -1), v.reshape(E, -1)) > 0
        # The dense codes are built only if read: the training step never needs them.
        return x_hat, SparseCodes(v, main_idx, n, rows, B), fired, {"aux": aux}

    def kind_losses(self, x, pre, codes, x_hat):
        return {"aux": self._aux(x, pre, x_hat)}

    def _aux(self, x: torch.Tensor, pre: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        """AuxK: the aux_k largest dead latents reconstruct the main reconstruction's error."""
        dead = self._dead_for_aux()
        if dead is None:
            return torch.zeros(self.n_members, device=self.device, dtype=self.dtype)
        values, idx = self.select(pre, self.aux_k_max, "aux_k", mask=dead)
        return self._aux_loss(x, x_hat, values, idx, dead)

    def _aux_loss(self, x: torch.Tensor, x_hat: torch.Tensor, values: torch.Tensor, idx: torch.Tensor,
                  dead: torch.Tensor, W_dec: torch.Tensor | None = None) -> torch.Tensor:
        """AuxK's loss [E] from its codes (values at idx, rows of W_dec [E, ·, d_in]: the decoder by default)."""
        residual = (x - x_hat).detach()
        # b_dec is already in x_hat; the dead latents model only what is left over.
        aux_hat = self.sparse_decode(values, idx) if W_dec is None else SparseDecode.apply(W_dec, values, idx)
        # Normalised by the residual's own variance so aux_coef (1/32) means the same at any activation scale.
        baseline = (residual - residual.mean(-2, keepdim=True)).pow(2).sum(-1).mean(-1).clamp_min(1e-12)
        aux = (aux_hat - residual).pow(2).sum(-1).mean(-1) / baseline
        # A member with nothing dead has no aux loss (not the residual's full error, which it cannot reduce).
        return self.member_param("aux_coef") * aux * dead.any(-1).to(aux.dtype)
