"""Sparse autoencoders as batched ensembles.

An ensemble holds E members that share d_in and d_sae but differ in per-member hyperparameters (L1 coefficient,
k, seed, ...). Their weights are stacked along a leading member axis and computed with batched matmuls, so a
sweep of 16 small SAEs costs about one kernel launch per layer instead of 16. Members never interact: the loss
is a sum of per-member losses and Adam is per-element, so member i trains exactly as it would alone.

Weights are stored in SAELens's orientation (W_enc [d_in, d_sae], W_dec [d_sae, d_in]) with the member axis
in front, so `member_state(i)` is a plain slice.

    c  = act(x W_enc + b_enc - b_dec W_enc)      (the b_dec term only with pre_bias)
    x̂  = c W_dec + b_dec

The pre-bias is applied as `- b_dec W_enc` instead of `(x - b_dec) W_enc`: same maths, but x needs no gradient,
so autograd skips a full [B, d_in] x [d_in, d_sae] matmul per member that would only feed the tiny b_dec grad.

Kinds (`SAE_KINDS`, extend with `@register_sae(name)`): "relu" (ReLU + L1, forward/backward written out by hand
for speed) and "topk" (TopK + AuxK, decoding through only the k chosen rows). Each fast path is tested against
the generic autograd `EnsembleSAE.forward`, which a new kind gets by defining `activation` and `kind_losses`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

SAE_KINDS: dict[str, type["EnsembleSAE"]] = {}

# Tokens without firing before a latent counts as dead (Gao et al. use 10M); `train_sae` picks a shorter window
# for short runs unless told otherwise.
DEFAULT_DEAD_WINDOW = 10_000_000


def register_sae(name: str) -> Callable[[type["EnsembleSAE"]], type["EnsembleSAE"]]:
    """Class decorator: make an SAE kind available to `make_sae(name, ...)`."""

    def deco(cls: type["EnsembleSAE"]) -> type["EnsembleSAE"]:
        if name in SAE_KINDS and SAE_KINDS[name] is not cls:
            raise ValueError(f"SAE kind {name!r} is already registered to {SAE_KINDS[name].__name__}")
        cls.kind = name
        SAE_KINDS[name] = cls
        return cls

    return deco


def _broadcast(hparams: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-member dicts from scalars and lists: lists fix the member count, scalars repeat."""
    lengths = {name: len(v) for name, v in hparams.items() if isinstance(v, (list, tuple))}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"per-member lists must have one length (the number of members), got "
                         f"{', '.join(f'{k}: {n}' for k, n in lengths.items())}")
    n = next(iter(lengths.values()), 1)
    if n == 0:
        raise ValueError(f"per-member lists are empty ({', '.join(lengths)}): give at least one value")
    return [{name: (v[i] if isinstance(v, (list, tuple)) else v) for name, v in hparams.items()} for i in range(n)]


def _init_member(d_in: int, d_sae: int, seed: int) -> torch.Tensor:
    """A member's unit-norm decoder, drawn on the CPU from its own generator so that the same seed gives the same
    weights whatever the ensemble around it and whatever device it ends up on."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    W = torch.randn(d_sae, d_in, generator=g, dtype=torch.float64)
    return (W / W.norm(dim=1, keepdim=True)).float()


class EnsembleSAE(nn.Module):
    """Base class: E stacked SAEs. Subclasses define `activation` (pre-activations -> codes) and `kind_losses`."""

    kind: str = "base"
    architecture: str = "standard"  # SAELens's name for the architecture
    member_keys: tuple[str, ...] = ()  # per-member hyperparameters besides the seed
    unit_norm_decoder: bool = True
    nonnegative_codes: bool = True  # set False for a kind whose codes can be negative
    loss_terms: tuple[str, ...] = ()  # keys of `kind_losses`, logged by the trainer

    def __init__(self, d_in: int, d_sae: int, hparams: Sequence[dict[str, Any]], tied: bool = False,
                 pre_bias: bool = True, device: str | torch.device | None = None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if not isinstance(d_in, int) or d_in < 1:
            raise ValueError(f"d_in must be a positive int (the activation width), got {d_in!r}")
        if not isinstance(d_sae, int) or d_sae < 1:
            raise ValueError(f"d_sae must be a positive int (the dictionary size), got {d_sae!r}")
        self.d_in, self.d_sae = d_in, d_sae
        self.tied, self.pre_bias = bool(tied), bool(pre_bias)
        self.dead_window: int | None = None  # tokens; see DEFAULT_DEAD_WINDOW
        self.hparams = [dict(h) for h in hparams]
        for h in self.hparams:
            self.validate_member(h)
        E = len(self.hparams)
        W_dec = torch.stack([_init_member(d_in, d_sae, h["seed"]) for h in self.hparams])
        self.W_dec = nn.Parameter(W_dec.to(device=device, dtype=dtype))
        # Encoder starts as the decoder's transpose (Gao et al.): every latent begins reading its own direction.
        self.W_enc = None if self.tied else nn.Parameter(self.W_dec.detach().transpose(1, 2).clone())
        self.b_enc = nn.Parameter(torch.zeros(E, d_sae, device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(E, d_in, device=device, dtype=dtype))
        # Tokens since each latent last fired; the trainer updates it, AuxK and the dead-feature metric read it.
        self.register_buffer("tokens_since_fired", torch.zeros(E, d_sae, dtype=torch.long, device=device))
        for key in self.member_keys:
            values = [float(h[key]) for h in self.hparams]
            self.register_buffer(f"_{key}", torch.tensor(values, device=device, dtype=dtype), persistent=False)

    # ----- description -----
    @property
    def n_members(self) -> int:
        return self.W_dec.shape[0]

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_dec.dtype

    @property
    def config(self) -> dict[str, Any]:
        """Settings shared by all members (per-member ones are in `hparams`)."""
        return {"kind": self.kind, "architecture": self.architecture, "d_in": self.d_in, "d_sae": self.d_sae,
                "tied": self.tied, "pre_bias": self.pre_bias, "dtype": str(self.dtype).removeprefix("torch.")}

    def extra_repr(self) -> str:
        return f"kind={self.kind}, n_members={self.n_members}, d_in={self.d_in}, d_sae={self.d_sae}, tied={self.tied}"

    def validate_member(self, h: dict[str, Any]) -> None:
        seed = h.get("seed")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int (or a list of ints, one per member), got {seed!r}")

    def member_param(self, key: str) -> torch.Tensor:
        """A per-member hyperparameter as an [E] tensor on the SAE's device."""
        return getattr(self, f"_{key}")

    # ----- the maths -----
    def encoder_weight(self) -> torch.Tensor:
        return self.W_dec.transpose(1, 2) if self.tied else self.W_enc

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"x must be a torch.Tensor of shape [batch, d_in], got {type(x).__name__}")
        if x.ndim not in (2, 3) or x.shape[-1] != self.d_in:
            raise ValueError(f"x has shape {tuple(x.shape)}: expected [batch, {self.d_in}] or "
                             f"[{self.n_members}, batch, {self.d_in}] (d_in={self.d_in}, got width {x.shape[-1]})")
        if x.ndim == 3 and x.shape[0] != self.n_members:
            raise ValueError(f"x has {x.shape[0]} member slices but the ensemble has n_members={self.n_members}")
        return x.to(device=self.device, dtype=self.dtype)

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        x = self._check_input(x)
        W = self.encoder_weight()
        bias = self.b_enc
        if self.pre_bias:
            bias = bias - torch.bmm(self.b_dec.unsqueeze(1), W).squeeze(1)
        if x.ndim == 2:
            x = x.expand(self.n_members, *x.shape)
        return torch.baddbmm(bias.unsqueeze(1), x, W)

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, d_in] (every member sees it) or [E, B, d_in] -> codes [E, B, d_sae]."""
        return self.activation(self.pre_activations(x))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [E, B, d_sae] -> x̂ [E, B, d_in]."""
        if codes.ndim != 3 or codes.shape[0] != self.n_members or codes.shape[2] != self.d_sae:
            raise ValueError(f"codes must be [{self.n_members}, batch, {self.d_sae}], got {tuple(codes.shape)}")
        return torch.baddbmm(self.b_dec.unsqueeze(1), codes, self.W_dec)

    def kind_losses(self, x: torch.Tensor, pre: torch.Tensor, codes: torch.Tensor, x_hat: torch.Tensor
                    ) -> dict[str, torch.Tensor]:
        """Extra loss terms, each [E] and already weighted; they are added to the MSE."""
        return {}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self._check_input(x)
        pre = self.pre_activations(x)
        codes = self.activation(pre)
        x_hat = self.decode(codes)
        err = x_hat - x
        mse = err.pow(2).sum(-1).mean(-1)
        terms = self.kind_losses(x, pre, codes, x_hat)
        loss = mse + sum(terms.values()) if terms else mse
        return {"x_hat": x_hat, "codes": codes, "loss": loss, "mse": mse, **terms}

    # ----- decoder geometry -----
    def decoder_directions(self) -> torch.Tensor:
        """[E, d_sae, d_in] unit-norm feature directions (detached)."""
        W = self.W_dec.detach()
        return W / W.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale decoder rows to unit norm (kinds whose L1 or scale conventions need it)."""
        if self.unit_norm_decoder:
            self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def project_decoder_grad_(self) -> None:
        """Drop the gradient component along each decoder row: with unit-norm rows it only changes the norm, which
        the renormalisation after the step would undo anyway, and it would leak into Adam's moments."""
        g = self.W_dec.grad
        if self.unit_norm_decoder and g is not None:
            g.sub_((g * self.W_dec).sum(-1, keepdim=True) * self.W_dec)

    # ----- dead latents -----
    @torch.no_grad()
    def update_firing_(self, codes: torch.Tensor, fired: torch.Tensor | None = None) -> None:
        """Advance the tokens-since-fired counters by one batch of codes [E, B, d_sae]. `fired` [E, d_sae], when
        the forward pass already worked it out (its output's "fired"), saves a pass over the codes."""
        if fired is None:
            # amax beats (codes != 0).any() by skipping a bool temporary; valid where codes cannot be negative.
            fired = codes.amax(dim=1) > 0 if self.nonnegative_codes else (codes != 0).any(dim=1)
        self.tokens_since_fired.add_(codes.shape[1]).masked_fill_(fired, 0)

    def dead_mask(self, window: int) -> torch.Tensor:
        """[E, d_sae] bool: latents that have not fired in the last `window` tokens."""
        return self.tokens_since_fired >= window

    # ----- interop -----
    def member_state(self, i: int) -> dict[str, torch.Tensor]:
        """Member i's weights in SAELens's layout (detached copies)."""
        if not -self.n_members <= i < self.n_members:
            raise ValueError(f"member index i={i} out of range for n_members={self.n_members}")
        W_dec = self.W_dec.detach()[i]
        return {"W_enc": self.encoder_weight().detach()[i].clone(), "b_enc": self.b_enc.detach()[i].clone(),
                "W_dec": W_dec.clone(), "b_dec": self.b_dec.detach()[i].clone()}

    @torch.no_grad()
    def load_member_state_(self, i: int, state: dict[str, torch.Tensor]) -> None:
        """Inverse of `member_state`: copy one member's SAELens-layout weights in (W_enc is ignored when tied)."""
        expected = {"W_enc": (self.d_in, self.d_sae), "b_enc": (self.d_sae,), "W_dec": (self.d_sae, self.d_in),
                    "b_dec": (self.d_in,)}
        for name, shape in expected.items():
            if name not in state:
                raise ValueError(f"state is missing {name!r} (needs {', '.join(expected)})")
            if tuple(state[name].shape) != shape:
                raise ValueError(f"state[{name!r}] has shape {tuple(state[name].shape)}, expected {shape}")
        if not self.tied:
            self.W_enc[i].copy_(state["W_enc"])
        self.b_enc[i].copy_(state["b_enc"])
        self.W_dec[i].copy_(state["W_dec"])
        self.b_dec[i].copy_(state["b_dec"])


def _check_coef(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or v == float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")


class _ReLUSAEFunction(torch.autograd.Function):
    """ReLU SAE forward and backward by hand. Autograd computes the same numbers, but on CPU it hands the ReLU
    backward a transposed-layout gradient (3-10x slower elementwise passes over [E, B, d_sae]) and adds the L1
    gradient as a separate broadcast pass; here the L1 gradient is the bias of the one baddbmm that computes the
    code gradient, and every [E, B, d_sae] tensor stays contiguous. Net: one step costs little beyond its 5
    matmuls. Returns x̂, the per-member mean L1 of the codes, and the codes (not differentiable: use `encode`
    for gradients with respect to codes)."""

    @staticmethod
    def forward(ctx, x, W_enc, b_eff, W_dec, b_dec):
        codes = torch.baddbmm(b_eff.unsqueeze(1), x, W_enc).clamp_min_(0)
        x_hat = torch.baddbmm(b_dec.unsqueeze(1), codes, W_dec)
        # One pass over the codes gives both the L1 norm (codes >= 0) and which latents fired.
        per_latent = codes.sum(1)
        l1 = per_latent.sum(-1) / codes.shape[1]
        ctx.save_for_backward(x, W_enc, W_dec, codes)
        ctx.mark_non_differentiable(codes, per_latent)
        ctx.set_materialize_grads(False)
        return x_hat, l1, codes, per_latent

    @staticmethod
    def backward(ctx, g_xhat, g_l1, _g_codes, _g_per_latent):
        x, W_enc, W_dec, codes = ctx.saved_tensors
        E, B, n = codes.shape
        bias = (g_l1 / B).view(E, 1, 1).expand(E, B, n) if g_l1 is not None else codes.new_zeros(1, 1, 1).expand(E, B, n)
        if g_xhat is None:
            g_codes = bias.contiguous()
        else:
            g_codes = torch.baddbmm(bias, g_xhat, W_dec.transpose(1, 2))
        # In place: g_codes is ours, and a fresh [E, B, d_sae] buffer costs page faults on every step.
        g_pre = torch.ops.aten.threshold_backward.grad_input(g_codes, codes, 0, grad_input=g_codes)
        need = ctx.needs_input_grad
        g_x = torch.bmm(g_pre, W_enc.transpose(1, 2)) if need[0] else None
        g_W_enc = torch.bmm(x.transpose(1, 2), g_pre) if need[1] else None
        g_b_eff = g_pre.sum(1) if need[2] else None
        g_W_dec = g_b_dec = None
        if g_xhat is not None:
            g_W_dec = torch.bmm(codes.transpose(1, 2), g_xhat) if need[3] else None
            g_b_dec = g_xhat.sum(1) if need[4] else None
        return g_x, g_W_enc, g_b_eff, g_W_dec, g_b_dec


@register_sae("relu")
class ReLUSAE(EnsembleSAE):
    """ReLU + L1 (Cunningham et al. 2023, Sharkey et al. 2022): loss = mse + l1_coef * ||c||_1 with unit-norm
    decoder rows, so the L1 cannot be dodged by shrinking codes and growing the decoder."""

    architecture = "standard"
    member_keys = ("l1_coef",)
    loss_terms = ("l1",)

    def validate_member(self, h: dict[str, Any]) -> None:
        super().validate_member(h)
        _check_coef("l1_coef", h.get("l1_coef"))

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre)

    def kind_losses(self, x, pre, codes, x_hat):
        # codes are >= 0, so the L1 norm is a plain sum.
        return {"l1": self.member_param("l1_coef") * codes.sum(-1).mean(-1)}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if type(self).activation is not ReLUSAE.activation or type(self).kind_losses is not ReLUSAE.kind_losses:
            return super().forward(x)  # a subclass with its own maths takes the generic path
        x = self._check_input(x)
        W = self.encoder_weight()
        bias = self.b_enc
        if self.pre_bias:
            bias = bias - torch.bmm(self.b_dec.unsqueeze(1), W).squeeze(1)
        xs = x.expand(self.n_members, *x.shape) if x.ndim == 2 else x
        x_hat, l1, codes, per_latent = _ReLUSAEFunction.apply(xs, W, bias, self.W_dec, self.b_dec)
        mse = (x_hat - x).pow(2).sum(-1).mean(-1)
        l1 = self.member_param("l1_coef") * l1
        return {"x_hat": x_hat, "codes": codes, "loss": mse + l1, "mse": mse, "l1": l1, "fired": per_latent > 0}


@register_sae("topk")
class TopKSAE(EnsembleSAE):
    """TopK (Gao et al. 2024): keep each row's k largest ReLU'd pre-activations; AuxK makes dead latents model the
    residual error so they get gradient again.

    Members may have different k: the top max(k) are taken once for all members and each member keeps its first k
    (topk returns them sorted)."""

    architecture = "topk"
    member_keys = ("k", "aux_k", "aux_coef")
    loss_terms = ("aux",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.k_max = max(int(h["k"]) for h in self.hparams)
        self.aux_k_max = max(int(h["aux_k"]) for h in self.hparams)

    def validate_member(self, h: dict[str, Any]) -> None:
        super().validate_member(h)
        k = h.get("k")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.d_sae:
            raise ValueError(f"k must be an int in [1, d_sae={self.d_sae}] (active latents per row), got {k!r}")
        aux_k = h.get("aux_k")
        if isinstance(aux_k, bool) or not isinstance(aux_k, int) or not 0 <= aux_k <= self.d_sae:
            raise ValueError(f"aux_k must be an int in [0, d_sae={self.d_sae}] (None means d_in // 2), got {aux_k!r}")
        _check_coef("aux_coef", h.get("aux_coef"))

    def _keep_first(self, values: torch.Tensor, key: str) -> torch.Tensor:
        """Zero each member's ranks >= its own k (values sorted descending along the last axis)."""
        ranks = torch.arange(values.shape[-1], device=values.device)
        return values * (ranks < self.member_param(key).view(-1, 1, 1)).to(values.dtype)

    def select(self, pre: torch.Tensor, k: int, key: str, mask: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's top-k ReLU'd pre-activations (k = max over members, each member then keeps its own
        `key`): values [E, B, k] and latent indices [E, B, k]. `mask` [E, d_sae] restricts the choice."""
        if mask is not None:
            pre = pre.masked_fill(~mask.unsqueeze(1), float("-inf"))
        # Top-k first, ReLU on the k survivors: the same codes as ReLU then top-k, without two full passes over
        # [E, B, d_sae] (ReLU forward and backward). Sorting is only needed to cut members at different k.
        ragged = k > 1 and len({h[key] for h in self.hparams}) > 1
        values, idx = pre.topk(k, dim=-1, sorted=ragged)
        values = torch.relu(values)
        if ragged:
            values = self._keep_first(values, key)
        return values, idx

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        values, idx = self.select(pre, self.k_max, "k")
        return torch.zeros_like(pre).scatter(-1, idx, values)

    def sparse_decode(self, values: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Σ_j values[e,b,j] · W_dec[e, idx[e,b,j]]  ([E, B, d_in], no b_dec). Only the k chosen decoder rows are
        touched, forward and backward: k·d_in multiply-adds per row instead of d_sae·d_in."""
        E, B, k = values.shape
        offsets = (torch.arange(E, device=idx.device) * self.d_sae).view(E, 1, 1)
        out = nn.functional.embedding_bag((idx + offsets).view(E * B, k), self.W_dec.reshape(E * self.d_sae, -1),
                                          per_sample_weights=values.reshape(E * B, k), mode="sum")
        return out.view(E, B, self.d_in)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if type(self).activation is not TopKSAE.activation or type(self).kind_losses is not TopKSAE.kind_losses:
            return super().forward(x)  # a subclass with its own maths takes the generic path
        x = self._check_input(x)
        pre = self.pre_activations(x)
        values, idx = self.select(pre, self.k_max, "k")
        x_hat = self.sparse_decode(values, idx) + self.b_dec.unsqueeze(1)
        mse = (x_hat - x).pow(2).sum(-1).mean(-1)
        aux = self._aux(x, pre, x_hat)
        with torch.no_grad():
            fired = torch.zeros(self.n_members, self.d_sae, device=self.device, dtype=self.dtype).scatter_add_(
                1, idx.view(self.n_members, -1), values.detach().view(self.n_members, -1)) > 0
        codes = torch.zeros_like(pre).scatter(-1, idx, values)
        return {"x_hat": x_hat, "codes": codes, "loss": mse + aux, "mse": mse, "aux": aux, "fired": fired}

    def kind_losses(self, x, pre, codes, x_hat):
        return {"aux": self._aux(x, pre, x_hat)}

    def _aux(self, x: torch.Tensor, pre: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        """AuxK: the aux_k largest dead latents reconstruct the main reconstruction's error."""
        zero = torch.zeros(self.n_members, device=self.device, dtype=self.dtype)
        if self.aux_k_max == 0 or not self.training:
            return zero
        dead = self.dead_mask(self.dead_window if self.dead_window is not None else DEFAULT_DEAD_WINDOW)
        # One host sync per step, but it saves a second top-k and decode on every step where nothing is dead.
        if not bool(dead.any()):
            return zero
        residual = (x - x_hat).detach()
        values, idx = self.select(pre, self.aux_k_max, "aux_k", mask=dead)
        # b_dec is already in x_hat; the dead latents model only what is left over.
        aux_hat = self.sparse_decode(values, idx)
        # Normalised by the residual's own variance so aux_coef (1/32) means the same at any activation scale.
        baseline = (residual - residual.mean(-2, keepdim=True)).pow(2).sum(-1).mean(-1).clamp_min(1e-12)
        aux = (aux_hat - residual).pow(2).sum(-1).mean(-1) / baseline
        # A member with nothing dead has no aux loss (not the residual's full error, which it cannot reduce).
        return self.member_param("aux_coef") * aux * dead.any(-1).to(aux.dtype)


def make_sae(kind: str, d_in: int, d_sae: int | None = None, *, ratio: float | None = None,
             seed: int | Sequence[int] = 0, tied: bool = False, pre_bias: bool = True,
             device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
             **member_hparams: Any) -> EnsembleSAE:
    """Build an ensemble SAE of the given kind.

    Per-member hyperparameters (seed, l1_coef, k, aux_k, aux_coef) may be scalars or lists; lists fix the number
    of members and must agree in length, scalars are repeated. Give the dictionary size as d_sae or as
    ratio (d_sae = round(ratio * d_in)).

    relu: l1_coef (default 1e-3).  topk: k (required), aux_k (None -> d_in // 2), aux_coef (1/32).
    Any kind: dead_window (tokens without firing before a latent counts as dead, for AuxK and the dead-feature
    metric; None lets `train_sae` choose).
    """
    if kind not in SAE_KINDS:
        raise ValueError(f"unknown SAE kind {kind!r}; known kinds: {', '.join(sorted(SAE_KINDS))}")
    if isinstance(d_in, bool) or not isinstance(d_in, int) or d_in < 1:
        raise ValueError(f"d_in must be a positive int (the activation width), got {d_in!r}")
    if (d_sae is None) == (ratio is None):
        raise ValueError("give exactly one of d_sae (dictionary size) or ratio (d_sae / d_in)")
    if ratio is not None:
        if not isinstance(ratio, (int, float)) or not ratio > 0:
            raise ValueError(f"ratio must be > 0 (dictionary size / d_in), got {ratio!r}")
        d_sae = max(1, round(ratio * d_in))
    if isinstance(d_sae, bool) or not isinstance(d_sae, int) or d_sae < 1:
        raise ValueError(f"d_sae must be a positive int (the dictionary size), got {d_sae!r}")
    cls = SAE_KINDS[kind]
    dead_window = member_hparams.pop("dead_window", None)
    if dead_window is not None and (isinstance(dead_window, bool) or not isinstance(dead_window, int)
                                    or dead_window < 1):
        raise ValueError(f"dead_window must be a positive int (tokens), got {dead_window!r}")
    if cls is TopKSAE or issubclass(cls, TopKSAE):
        if "k" not in member_hparams:
            raise ValueError("k is required for a topk SAE (active latents per row), e.g. k=32")
        aux_k = member_hparams.pop("aux_k", None)
        member_hparams["aux_k"] = d_in // 2 if aux_k is None else (
            [d_in // 2 if a is None else a for a in aux_k] if isinstance(aux_k, (list, tuple)) else aux_k)
        member_hparams.setdefault("aux_coef", 1 / 32)
    elif kind == "relu":
        member_hparams.setdefault("l1_coef", 1e-3)
    defaults = getattr(cls, "default_hparams", None)  # a kind's own defaults (see sae_kinds)
    for key, value in (defaults(d_in) if defaults else {}).items():
        member_hparams.setdefault(key, value)
    unknown = set(member_hparams) - set(cls.member_keys)
    if unknown:
        raise ValueError(f"unknown hyperparameters for kind {kind!r}: {', '.join(sorted(unknown))}; "
                         f"per-member ones are {', '.join(cls.member_keys + ('seed',))}")
    hparams = _broadcast({**member_hparams, "seed": seed})
    sae = cls(d_in, d_sae, hparams, tied=tied, pre_bias=pre_bias, device=device, dtype=dtype)
    sae.dead_window = dead_window
    return sae


from . import sae_kinds  # noqa: E402,F401  (registers jumprelu, batchtopk, relu_bias_decay)
