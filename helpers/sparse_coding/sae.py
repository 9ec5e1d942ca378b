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
    def update_firing_(self, codes: torch.Tensor | None, fired: torch.Tensor | None = None,
                       n_tokens: int | None = None) -> None:
        """Advance the tokens-since-fired counters by one batch of codes [E, B, d_sae]. `fired` [E, d_sae], when
        the forward pass already worked it out (its output's "fired"), saves a pass over the codes; with `fired`
        and `n_tokens` (the batch size) the codes are not needed at all (None)."""
        if fired is None:
            if codes is None:
                raise ValueError("update_firing_ needs the codes, or fired and n_tokens")
            # amax beats (codes != 0).any() by skipping a bool temporary; valid where codes cannot be negative.
            fired = codes.amax(dim=1) > 0 if self.nonnegative_codes else (codes != 0).any(dim=1)
        if n_tokens is None:
            if codes is None:
                raise ValueError("update_firing_ needs n_tokens (the batch size) when codes is None")
            n_tokens = codes.shape[1]
        self.tokens_since_fired.add_(n_tokens).masked_fill_(fired, 0)

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


class SAEOutput(dict):
    """The dict a forward pass returns, with some entries computed only when first read.

    TopK's training step never needs its dense [E, B, d_sae] codes (the trainer takes "fired" and the batch size),
    so building them (an allocation, a fill and a scatter over E·B·d_sae entries, as much memory traffic as the rest
    of the step's sparse part) is deferred until someone reads `out["codes"]`. Reading, `in`, `get`, iteration and
    copying all see the lazy entries; iterating or copying computes them."""

    def __init__(self, *args: Any, lazy: dict[str, Callable[[], Any]] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._lazy = {k: f for k, f in (lazy or {}).items() if not dict.__contains__(self, k)}

    def __missing__(self, key: str) -> Any:
        make = self._lazy.pop(key, None)
        if make is None:
            raise KeyError(key)
        value = make()
        dict.__setitem__(self, key, value)
        return value

    def __setitem__(self, key: str, value: Any) -> None:
        self._lazy.pop(key, None)
        dict.__setitem__(self, key, value)

    def __delitem__(self, key: str) -> None:
        if self._lazy.pop(key, None) is None:
            dict.__delitem__(self, key)
        elif dict.__contains__(self, key):
            dict.__delitem__(self, key)

    def __contains__(self, key: object) -> bool:
        return dict.__contains__(self, key) or key in self._lazy

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default

    def pop(self, key: str, *default: Any) -> Any:
        if key in self._lazy:
            self[key]
        return dict.pop(self, key, *default)

    def setdefault(self, key: str, default: Any = None) -> Any:
        if key in self:
            return self[key]
        self[key] = default
        return default

    def materialize(self) -> "SAEOutput":
        """Compute every lazy entry now."""
        for key in list(self._lazy):
            self[key]
        return self

    def __len__(self) -> int:
        return dict.__len__(self) + len(self._lazy)

    def __iter__(self):
        return dict.__iter__(self.materialize())

    def keys(self):
        return dict.keys(self.materialize())

    def values(self):
        return dict.values(self.materialize())

    def items(self):
        return dict.items(self.materialize())

    def popitem(self):
        return dict.popitem(self.materialize())

    def copy(self) -> dict[str, Any]:
        return dict(self.materialize())

    def __eq__(self, other: object) -> bool:
        return dict.__eq__(self.materialize(), other)

    def __ne__(self, other: object) -> bool:
        return dict.__ne__(self.materialize(), other)

    def __or__(self, other: Any) -> Any:
        return dict.__or__(self.materialize(), other)

    def __ror__(self, other: Any) -> Any:
        return dict.__ror__(self.materialize(), other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return dict.__repr__(self.materialize())

    def __reduce__(self):
        return dict, (dict(self.materialize()),)


# Rows of the batch per chunk in the sparse backward passes: E·rows·K·d_in ≈ this many elements (a cache-sized
# temporary; larger chunks spill out of the cache, smaller ones pay Python per chunk), but at least _MIN_ROWS rows
# so that AuxK's wide picks (K = k + d_in/2) do not turn into thousands of tiny calls.
_SPARSE_CHUNK_ELEMS = 1 << 18
_MIN_ROWS = 8


def _chunks(E: int, B: int, K: int, d: int):
    step = max(_MIN_ROWS, _SPARSE_CHUNK_ELEMS // max(1, E * K * d))
    return [(s, min(B, s + step)) for s in range(0, B, step)]


def _rows_add_(out: torch.Tensor, gidx: torch.Tensor, coef: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """out [E·n, d] += Σ_(e,b,j) coef[e,b,j] · rows[e,b] at row gidx[e,b,j] (already offset by e·n): the transpose
    of a sparse [B, n] matrix with K entries per row times a dense [B, d] one, in O(E·B·K·d) without sorting."""
    E, B, K = gidx.shape
    d = rows.shape[-1]
    for s, t in _chunks(E, B, K, d):
        src = (coef[:, s:t].unsqueeze(-1) * rows[:, s:t].unsqueeze(2)).reshape(-1, d)
        out.index_add_(0, gidx[:, s:t].reshape(-1), src)
    return out


def _gather_dot(table: torch.Tensor, gidx: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """[E, B, K]: table[gidx[e,b,j]] · rows[e,b] (table [E·n, d], gidx offset by e·n)."""
    E, B, K = gidx.shape
    d = rows.shape[-1]
    out = rows.new_empty(E, B, K)
    for s, t in _chunks(E, B, K, d):
        picked = table.index_select(0, gidx[:, s:t].reshape(-1)).view(E, t - s, K, d)
        torch.sum(picked.mul_(rows[:, s:t].unsqueeze(2)), dim=-1, out=out[:, s:t])
    return out


def _offset(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Latent indices [E, B, K] -> rows of the member-flattened [E·n, ·] table."""
    return idx + (torch.arange(idx.shape[0], device=idx.device) * n).view(-1, 1, 1)


class _SparseEncodeFunction(torch.autograd.Function):
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
        gidx = _offset(idx, n)
        g_x = g_W = g_b_enc = g_b_dec = None
        g_b = g.new_zeros(E * n).index_add_(0, gidx.reshape(-1), g.reshape(-1)).view(E, n)
        if need[1]:
            g_Wt = _rows_add_(g.new_zeros(E * n, d), gidx, g, x.expand(E, *x.shape[-2:])).view(E, n, d)
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


class _SparseDecodeFunction(torch.autograd.Function):
    """Σ_j values[e,b,j] · W_dec[e, idx[e,b,j]] -> [E, B, d_in] (no b_dec), touching only the chosen decoder rows:
    forward one embedding_bag; backward ∂W_dec by index_add (no sort, unlike embedding_bag's own backward) and
    ∂values by dot products with the gathered rows."""

    @staticmethod
    def forward(ctx, W_dec, values, idx):
        E, n, d = W_dec.shape
        K = idx.shape[-1]
        gidx = _offset(idx, n)
        out = nn.functional.embedding_bag(gidx.view(-1, K), W_dec.reshape(E * n, d), mode="sum",
                                          per_sample_weights=values.reshape(-1, K))
        ctx.save_for_backward(W_dec, values, gidx)
        return out.view(E, -1, d)

    @staticmethod
    def backward(ctx, g_out):
        W_dec, values, gidx = ctx.saved_tensors
        E, n, d = W_dec.shape
        g_out = g_out.contiguous()
        g_W = g_values = None
        if ctx.needs_input_grad[0]:
            g_W = _rows_add_(g_out.new_zeros(E * n, d), gidx, values, g_out).view(E, n, d)
        if ctx.needs_input_grad[1]:
            g_values = _gather_dot(W_dec.reshape(E * n, d), gidx, g_out)
        return g_W, g_values, None


def _topk_rows(pre: torch.Tensor, k: int, sorted: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`pre.topk(k, dim=-1, sorted=sorted)` for [E, B, n], through group maxima when n is large next to k.

    Split each row into s strided groups {g, g + m, g + 2m, ...} (m = n / s): every one of the row's k largest
    values lies in one of the k groups with the largest maxima (a group outside them has k groups whose maxima are
    at least its own), so the top k of those k·s candidates are the row's top k. One vectorised max over the row
    and two small top-k's replace a top-k over all n (CPU top-k costs several ns per element). The values are
    exactly torch.topk's; among exactly tied values the latent picked may differ."""
    n = pre.shape[-1]
    s = 1
    while s * 2 * 64 * k <= n and n % (s * 2) == 0:  # keep m >= 64k, where torch.topk takes its cheaper path
        s *= 2
    if s < 4:
        return pre.topk(k, dim=-1, sorted=sorted)
    m = n // s
    group_max = pre.unflatten(-1, (s, m)).amax(-2)
    _, groups = group_max.topk(k, dim=-1, sorted=False)
    cand = (groups.unsqueeze(-1) + torch.arange(0, n, m, device=pre.device)).flatten(-2)
    values, j = pre.gather(-1, cand).topk(k, dim=-1, sorted=sorted)
    return values, cand.gather(-1, j)


@register_sae("topk")
class TopKSAE(EnsembleSAE):
    """TopK (Gao et al. 2024): keep each row's k largest ReLU'd pre-activations; AuxK makes dead latents model the
    residual error so they get gradient again.

    Members may have different k: the top max(k) are taken once for all members and each member keeps its first k
    (topk returns them sorted).

    The forward pass is sparse everywhere but the encoder matmul: that runs without autograd, the k chosen entries
    per row (and AuxK's aux_k) are picked, and the gradients reach the weights through those entries only
    (`_SparseEncodeFunction`, `_SparseDecodeFunction`): per row O(K·d_in) work instead of O(d_sae·d_in) for the
    encoder gradient, the decoder forward and both decoder gradients. The dense codes in the output are built only
    if read (`SAEOutput`)."""

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

    def _ragged(self, k: int, key: str) -> bool:
        return k > 1 and len({h[key] for h in self.hparams}) > 1

    def _top(self, pre: torch.Tensor, k: int, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's k largest pre-activations (before the ReLU) and their latents; sorted only if the members'
        `key` differ (they are then cut at their own k)."""
        return _topk_rows(pre, k, sorted=self._ragged(k, key))

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

    def sparse_decode(self, values: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Σ_j values[e,b,j] · W_dec[e, idx[e,b,j]]  ([E, B, d_in], no b_dec). Only the k chosen decoder rows are
        touched, forward and backward: k·d_in multiply-adds per row instead of d_sae·d_in."""
        return _SparseDecodeFunction.apply(self.W_dec, values, idx)

    def _pre_buffer(self, E: int, B: int) -> torch.Tensor | None:
        """In training, one [E, B, d_sae] buffer for the pre-activations, kept from step to step: a fresh one costs
        page faults on every step (large CPU allocations are mapped and unmapped each time). Dropped by eval()."""
        if not self.training:
            return None
        buf = getattr(self, "_pre_cache", None)
        if buf is None or buf.shape != (E, B, self.d_sae) or buf.dtype != self.dtype or buf.device != self.device:
            self._pre_cache = buf = None  # free the old one first
            buf = self._pre_cache = torch.empty(E, B, self.d_sae, device=self.device, dtype=self.dtype)
        return buf

    def train(self, mode: bool = True) -> "TopKSAE":
        if not mode:
            self._pre_cache = None
        return super().train(mode)

    def _dead_for_aux(self) -> torch.Tensor | None:
        """[E, d_sae] dead latents when AuxK has work this step, else None."""
        if self.aux_k_max == 0 or not self.training:
            return None
        dead = self.dead_mask(self.dead_window if self.dead_window is not None else DEFAULT_DEAD_WINDOW)
        # One host sync per step, but it saves a second top-k and decode on every step where nothing is dead.
        return dead if bool(dead.any()) else None

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if type(self).activation is not TopKSAE.activation or type(self).kind_losses is not TopKSAE.kind_losses:
            return super().forward(x)  # a subclass with its own maths takes the generic path
        x = self._check_input(x)
        E, B, n, k = self.n_members, x.shape[-2], self.d_sae, self.k_max
        W = self.encoder_weight()
        xs = x.expand(E, *x.shape) if x.ndim == 2 else x
        dead = self._dead_for_aux()
        with torch.no_grad():
            bias = self.b_enc
            if self.pre_bias:
                bias = bias - torch.bmm(self.b_dec.unsqueeze(1), W).squeeze(1)
            pre = torch.baddbmm(bias.unsqueeze(1), xs, W, out=self._pre_buffer(E, B))
            picked, idx = self._top(pre, k, "k")
            if dead is not None:
                # pre is ours and no longer needed: mask it in place for AuxK's choice among the dead.
                aux_picked, aux_idx = self._top(pre.masked_fill_(~dead.unsqueeze(1), float("-inf")),
                                                self.aux_k_max, "aux_k")
                picked, idx = torch.cat([picked, aux_picked], -1), torch.cat([idx, aux_idx], -1)
            del pre
        # Gradients reach W, b_enc and b_dec through the chosen entries only (main and AuxK together).
        picked = _SparseEncodeFunction.apply(xs, W, self.b_enc, self.b_dec if self.pre_bias else None, idx, picked)
        values, main_idx = self._finish(picked[..., :k], k, "k"), idx[..., :k]
        x_hat = self.sparse_decode(values, main_idx) + self.b_dec.unsqueeze(1)
        mse = (x_hat - x).pow(2).sum(-1).mean(-1)
        if dead is None:
            aux = mse.new_zeros(E)
        else:
            aux_values = self._finish(picked[..., k:], self.aux_k_max, "aux_k")
            aux = self._aux_loss(x, x_hat, aux_values, idx[..., k:], dead)
        with torch.no_grad():
            v = values.detach()
            fired = torch.zeros(E, n, device=self.device, dtype=self.dtype).scatter_add_(
                1, main_idx.reshape(E, -1), v.reshape(E, -1)) > 0
        dense = lambda: torch.zeros(E, B, n, device=v.device, dtype=v.dtype).scatter_(-1, main_idx, v)  # noqa: E731
        return SAEOutput({"x_hat": x_hat, "loss": mse + aux, "mse": mse, "aux": aux, "fired": fired},
                         lazy={"codes": dense})

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
                  dead: torch.Tensor) -> torch.Tensor:
        residual = (x - x_hat).detach()
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
