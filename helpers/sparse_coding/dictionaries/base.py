"""Sparse autoencoders as batched ensembles: the base class every kind builds on, its typed output, and the registry.

An ensemble holds E members that share d_in and d_sae but differ in per-member hyperparameters (L1 coefficient, k,
seed, ...), stacked along a leading member axis and computed with batched matmuls (a sweep of 16 small SAEs costs
about one kernel launch per layer). Members never interact: the loss is a sum of per-member losses and Adam is
per-element, so member i trains as it would alone (bit for bit for ReLU; TopK's sparse kernels, which flatten the
members into one matrix, may round a few ulps apart). Weights are in SAELens's orientation (W_enc [E, d_in, d_sae],
W_dec [E, d_sae, d_in]), so `member_state(i)` is a plain slice:

    codes = act(x W_enc + b_enc − b_dec W_enc)      (the b_dec term only with pre_bias)
    x̂     = codes W_dec + b_dec

The pre-bias is applied as `− b_dec W_enc`, not `(x − b_dec) W_enc`: the same maths, but x needs no gradient, so
autograd skips a [B, d_in] x [d_in, d_sae] matmul per member that would only feed the tiny b_dec gradient.

An SAE can carry an input scale s (`input_scale`, set by `train_sae`, 1 by default): it sees s·x, so that its
hyperparameters mean the same at any activation scale (E‖s·x‖² = d_in, `training.estimate_input_scale`); `encode`,
`decode` and `forward` take and return raw activations, and `member_state` folds s into the weights (scale 1).

A kind subclasses `EnsembleSAE`, registers with `@register_sae(name)` and defines `activation` (pre-activations ->
codes), if it has any, `kind_losses`, and if its codes meet thresholds, `scale_thresholds_(factor [E, d_sae])`
(multiply them by factor as the codes are: `training.rescale`); a kind with a faster training step overrides
`_forward` (on scaled inputs, with `_pre` and `_decode`) and returns the same four things. The forward pass returns
an `SAEOutput`: the base computes the MSE once, the kind adds its own loss terms (as SAELens's TrainStepOutput).
This module knows no kind: `dictionaries.factory` imports them."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..arguments import checked
from ..checks import check_bool, check_device, check_dtype, check_int
from .kernels import SquaredError

SAE_KINDS: dict[str, type["EnsembleSAE"]] = {}

# Tokens without firing before a latent counts as dead (Gao et al. 2024, arXiv 2406.04093); short train_sae runs
# use fewer (TrainSettings.dead_window).
DEFAULT_DEAD_WINDOW = 10_000_000


@checked
def register_sae(name: str) -> Callable[[type["EnsembleSAE"]], type["EnsembleSAE"]]:
    """Class decorator: make an SAE kind available to `make_sae(name, ...)`."""
    def deco(cls: type["EnsembleSAE"]) -> type["EnsembleSAE"]:
        if name in SAE_KINDS and SAE_KINDS[name] is not cls:
            raise ValueError(f"SAE kind {name!r} is already registered to {SAE_KINDS[name].__name__}")
        cls.kind = name
        SAE_KINDS[name] = cls
        return cls
    return deco


def init_decoder(d_in: int, d_sae: int, seed: int) -> torch.Tensor:
    """A member's unit-norm decoder [d_sae, d_in], drawn on the CPU from its own generator so that the same seed
    gives the same weights whatever the ensemble around it and whatever device it ends up on."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    W = torch.randn(d_sae, d_in, generator=g, dtype=torch.float64)
    return (W / W.norm(dim=1, keepdim=True)).float()


def _mark_fitted(module: nn.Module, incompatible_keys: Any) -> None:  # a load_state_dict post hook
    module.fitted = True  # weights from a state dict: train_sae's input_scale "auto" keeps their scale


@checked
def fold_input_scale(state: dict[str, torch.Tensor], input_scale: float) -> dict[str, torch.Tensor]:
    """Weights trained on x·s as weights for raw x: W_enc·s, W_dec/s, b_dec/s (b_enc and thresholds act on codes,
    which do not change). Works on one member's state or a member-stacked one; returns a new dict."""
    out = dict(state)
    if input_scale != 1.0:
        if "W_enc" in out:
            out["W_enc"] = out["W_enc"] * input_scale
        out["W_dec"], out["b_dec"] = out["W_dec"] / input_scale, out["b_dec"] / input_scale
    return out


@dataclass(eq=False)
class SAEOutput:
    """One forward pass of an ensemble, filled the same way by every kind.

    x_hat [E, B, d_in]; mse [E] (mean over the batch of ‖x − x̂‖², summed over d_in); losses: the kind's extra
    loss terms, each [E] and already weighted (relu: l1; topk/batchtopk: aux; jumprelu: l0_loss); loss [E] = mse +
    their sum; fired [E, d_sae] bool: latents nonzero on at least one row; codes [E, B, d_sae], built on first read
    when the kind passed a function (TopK's training step never needs them densely)."""

    x_hat: torch.Tensor
    mse: torch.Tensor
    losses: dict[str, torch.Tensor]
    fired: torch.Tensor
    codes_or_fn: torch.Tensor | Callable[[], torch.Tensor] = field(repr=False)
    loss: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.loss = self.mse + sum(self.losses.values()) if self.losses else self.mse

    @cached_property
    def codes(self) -> torch.Tensor:
        c = self.codes_or_fn
        return c() if callable(c) else c

    @property
    def l0(self) -> torch.Tensor:
        """[E]: nonzero codes per row, averaged over the batch; from the picks when the codes are lazy and unbuilt."""
        count = getattr(self.codes_or_fn, "l0", None)
        if count is not None and "codes" not in vars(self):
            return count()
        return (self.codes != 0).sum(-1).float().mean(-1)


@checked
class EnsembleSAE(nn.Module):
    """Base class: E stacked SAEs. Subclasses define `activation` (pre-activations -> codes) and `kind_losses`."""

    kind: str = "base"
    architecture: str = "standard"  # SAELens's name for the architecture
    member_keys: tuple[str, ...] = ()  # per-member hyperparameters besides the seed
    # The hyperparameter that sets how sparse the codes are (what a sweep varies: l1_coef, k, l0_coef) and the loss
    # coefficient weighing a sparsity penalty (warmed up by coef_warmup_steps; None where sparsity is structural).
    sparsity_knob: str = ""
    sparsity_coef: str | None = None
    required_hparams: tuple[str, ...] = ()  # member keys without a default
    unit_norm_decoder: bool = True
    nonnegative_codes: bool = True  # False for a kind whose codes can be negative
    log_params: tuple[str, ...] = ()  # parameters stored as logs, where -inf is a value (log 0), not damage

    @classmethod
    def default_hparams(cls, d_in: int) -> dict[str, Any]:
        """Defaults of the member keys for this width; a missing key or None takes its default."""
        return {}

    def __init__(self, d_in: int, d_sae: int, hparams: Sequence[dict[str, Any]], tied: bool = False,
                 pre_bias: bool = True, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        check_int(d_in, "d_in", 1, hint=" (the activation width)")
        check_int(d_sae, "d_sae", 1, hint=" (the dictionary size)")
        check_dtype(dtype, "dtype")
        device = check_device(device)
        self.d_in, self.d_sae = d_in, d_sae
        self.tied, self.pre_bias = check_bool(tied, "tied"), check_bool(pre_bias, "pre_bias")
        self.dead_window: int | None = None  # tokens; see DEFAULT_DEAD_WINDOW
        self.input_scale = 1.0  # the SAE sees input_scale · x (module docstring)
        self.fitted = False  # weights from training or a file: train_sae's input_scale "auto" keeps their scale
        self.register_load_state_dict_post_hook(_mark_fitted)
        self.hparams = [dict(h) for h in hparams]
        for h in self.hparams:
            self.validate_member(h)
        E = len(self.hparams)
        W_dec = torch.stack([init_decoder(d_in, d_sae, h["seed"]) for h in self.hparams])
        self.W_dec = nn.Parameter(W_dec.to(device=device, dtype=dtype))
        # The encoder starts as the decoder's transpose (Gao et al.): every latent begins reading its own direction.
        self.W_enc = None if self.tied else nn.Parameter(self.W_dec.detach().transpose(1, 2).clone())
        self.b_enc = nn.Parameter(torch.zeros(E, d_sae, device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(E, d_in, device=device, dtype=dtype))
        # Tokens since each latent last fired; the trainer updates it, AuxK and the dead-feature metric read it.
        self.register_buffer("tokens_since_fired", torch.zeros(E, d_sae, dtype=torch.long, device=device))
        for key in self.member_keys:
            values = [float(h[key]) for h in self.hparams]
            self.register_buffer(f"_{key}", torch.tensor(values, device=device, dtype=dtype), persistent=False)

    # ----- description -----
    n_members = property(lambda self: self.W_dec.shape[0], doc="E, the number of members")
    device = property(lambda self: self.W_dec.device, doc="the parameters' device")
    dtype = property(lambda self: self.W_dec.dtype, doc="the parameters' dtype")

    @property
    def config(self) -> dict[str, Any]:
        """Settings shared by all members (per-member ones are in `hparams`)."""
        return {"kind": self.kind, "architecture": self.architecture, "d_in": self.d_in, "d_sae": self.d_sae,
                "tied": self.tied, "pre_bias": self.pre_bias, "dtype": str(self.dtype).removeprefix("torch."),
                "input_scale": float(self.input_scale)}

    def extra_repr(self) -> str:
        return f"kind={self.kind}, n_members={self.n_members}, d_in={self.d_in}, d_sae={self.d_sae}, tied={self.tied}"

    def validate_member(self, h: dict[str, Any]) -> None:
        h["seed"] = check_int(h.get("seed"), "seed", 0, 2**63 - 1, " (or a list of such ints, one per member)")

    def member_param(self, key: str) -> torch.Tensor:
        """A per-member hyperparameter as an [E] tensor on the SAE's device."""
        return getattr(self, f"_{key}")

    # ----- the maths -----
    def encoder_weight(self) -> torch.Tensor:
        """[E, d_in, d_sae]: W_enc, or W_decᵀ for a tied SAE."""
        return self.W_dec.transpose(1, 2) if self.tied else self.W_enc

    def encoder_bias(self) -> torch.Tensor:
        """[E, d_sae]: b_enc − b_dec W_enc with pre_bias, else b_enc."""
        if not self.pre_bias:
            return self.b_enc
        return self.b_enc - torch.bmm(self.b_dec.unsqueeze(1), self.encoder_weight()).squeeze(1)

    def check_input(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, d_in] (every member sees it) or [E, B, d_in], floating point, B >= 1, moved to the SAE's device and
        dtype. Raises ValueError naming x, what it must be and what it is."""
        want = f"[batch, {self.d_in}] or [{self.n_members}, batch, {self.d_in}]"
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"x must be a torch.Tensor of shape {want}, got {type(x).__name__}")
        if x.ndim not in (2, 3) or x.shape[-1] != self.d_in:
            raise ValueError(f"x has shape {tuple(x.shape)}: expected {want}" + (
                f" (d_in={self.d_in}, got width {x.shape[-1]})" if x.ndim in (2, 3) else
                " (for one row r, pass r[None])" if x.ndim == 1 else ""))
        if x.ndim == 3 and x.shape[0] != self.n_members:
            raise ValueError(f"x has {x.shape[0]} member slices but the ensemble has n_members={self.n_members}")
        if x.shape[-2] == 0:
            raise ValueError(f"x has 0 rows (shape {tuple(x.shape)}): give at least one row of activations")
        if not x.is_floating_point():
            raise ValueError(f"x must hold floating-point activations, got {x.dtype}; convert it with .float()")
        return x.to(device=self.device, dtype=self.dtype)

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, d_in] or [E, B, d_in] -> [E, B, d_in] (a view when shared)."""
        return x.expand(self.n_members, *x.shape) if x.ndim == 2 else x

    def scale_in(self, x: torch.Tensor) -> torch.Tensor:
        """x in the SAE's own units: input_scale · x."""
        return x * self.input_scale if self.input_scale != 1.0 else x

    def _pre(self, xs: torch.Tensor) -> torch.Tensor:
        """Scaled inputs [B, d_in] or [E, B, d_in] -> pre-activations [E, B, d_sae]."""
        return torch.baddbmm(self.encoder_bias().unsqueeze(1), self.expand(xs), self.encoder_weight())

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [E, B, d_sae] -> x̂ [E, B, d_in] in the SAE's own (scaled) units."""
        if codes.ndim != 3 or codes.shape[0] != self.n_members or codes.shape[2] != self.d_sae:
            raise ValueError(f"codes must be [{self.n_members}, batch, {self.d_sae}], got {tuple(codes.shape)}")
        return torch.baddbmm(self.b_dec.unsqueeze(1), codes, self.W_dec)

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """Raw x [B, d_in] or [E, B, d_in] -> [E, B, d_sae]."""
        return self._pre(self.scale_in(self.check_input(x)))

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Raw x [B, d_in] (every member sees it) or [E, B, d_in] -> codes [E, B, d_sae]."""
        return self.activation(self.pre_activations(x))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [E, B, d_sae] (floating point; moved to the SAE's device and dtype) -> x̂ [E, B, d_in], raw units."""
        if not isinstance(codes, torch.Tensor) or not codes.is_floating_point():
            raise ValueError(f"codes must be a floating-point torch.Tensor [{self.n_members}, batch, {self.d_sae}], "
                             f"got {getattr(codes, 'dtype', type(codes).__name__)}: convert with .float()")
        x_hat = self._decode(codes.to(device=self.device, dtype=self.dtype))
        return x_hat / self.input_scale if self.input_scale != 1.0 else x_hat

    def kind_losses(self, x: torch.Tensor, pre: torch.Tensor, codes: torch.Tensor, x_hat: torch.Tensor
                    ) -> dict[str, torch.Tensor]:
        """Extra loss terms, each [E] and already weighted; they are added to the MSE."""
        return {}

    def fired(self, codes: torch.Tensor) -> torch.Tensor:
        """[E, d_sae] bool: latents nonzero on at least one row of codes [E, B, d_sae]."""
        # amax beats (codes != 0).any() by skipping a bool temporary; valid where codes cannot be negative.
        return codes.detach().amax(dim=1) > 0 if self.nonnegative_codes else (codes.detach() != 0).any(dim=1)

    def _forward(self, xs: torch.Tensor):
        """The kind's part of a forward pass on scaled inputs xs: (x̂ [E, B, d_in] in scaled units, codes or a function
        making them, fired [E, d_sae], losses {name: [E]}). This generic version is autograd through `activation` and
        `kind_losses`."""
        pre = self._pre(xs)
        codes = self.activation(pre)
        x_hat = self._decode(codes)
        return x_hat, codes, self.fired(codes), self.kind_losses(xs, pre, codes, x_hat)

    def forward(self, x: torch.Tensor) -> SAEOutput:
        """Raw x [B, d_in] or [E, B, d_in] -> SAEOutput: x̂ in raw units, the mse and the kind's losses in the SAE's
        own (scaled) units, so the loss coefficients mean the same at any activation scale."""
        xs = self.scale_in(self.check_input(x))
        x_hat, codes, fired, losses = self._forward(xs)
        mse = SquaredError.apply(x_hat, xs)
        if self.input_scale != 1.0:
            x_hat = x_hat / self.input_scale
        return SAEOutput(x_hat, mse, losses, fired, codes)

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
            # Row dots by einsum (linalg.vecdot and (g * W).sum build an [E, d_sae, d_in] temporary), one fused update.
            g.addcmul_(torch.einsum("end,end->en", g, self.W_dec).unsqueeze(-1), self.W_dec, value=-1)

    # ----- dead latents -----
    @torch.no_grad()
    def update_firing_(self, fired: torch.Tensor, n_tokens: int) -> None:
        """Advance the tokens-since-fired counters by a batch of n_tokens rows in which `fired` [E, d_sae] fired."""
        self.tokens_since_fired.add_(n_tokens).masked_fill_(fired, 0)

    def dead_mask(self, window: int) -> torch.Tensor:
        """[E, d_sae] bool: latents that have not fired in the last `window` tokens."""
        return self.tokens_since_fired >= window

    # ----- interop -----
    def check_member(self, i: int) -> int:
        """A member index in [-n_members, n_members) as an int; ValueError naming i otherwise."""
        return check_int(i, "member index i", -self.n_members, self.n_members - 1, " (out of range for n_members="
                         f"{self.n_members})")

    def member_state(self, i: int) -> dict[str, torch.Tensor]:
        """Member i's weights in SAELens's layout (detached copies) for raw activations: the input scale folded in."""
        i = self.check_member(i)
        state = {"W_enc": self.encoder_weight().detach()[i].clone(), "b_enc": self.b_enc.detach()[i].clone(),
                 "W_dec": self.W_dec.detach()[i].clone(), "b_dec": self.b_dec.detach()[i].clone()}
        return fold_input_scale(state, self.input_scale)

    @torch.no_grad()
    def load_member_state_(self, i: int, state: dict[str, torch.Tensor]) -> None:
        """Inverse of `member_state`: copy one member's SAELens-layout weights (for raw activations) in; W_enc is
        ignored when tied; tensors or NumPy arrays, floating point and finite. Needs input_scale 1 (what member_state
        gives takes raw activations). Marks the SAE `fitted`. Raises ValueError naming i or the entry of state."""
        i = self.check_member(i)
        if self.input_scale != 1.0:
            raise ValueError(f"load_member_state_ needs an SAE with input_scale 1, this one has {self.input_scale}")
        d, n, tensors = self.d_in, self.d_sae, {}
        expected = {"W_enc": (d, n), "b_enc": (n,), "W_dec": (n, d), "b_dec": (d,)}
        for name, shape in expected.items():
            if name not in state:
                raise ValueError(f"state is missing {name!r} (needs {', '.join(expected)})")
            t = tensors[name] = torch.as_tensor(state[name]) if isinstance(state[name], np.ndarray) else state[name]
            if not isinstance(t, torch.Tensor) or not t.is_floating_point() or tuple(t.shape) != shape:
                got = f"{t.dtype} of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"state[{name!r}] must be a floating-point tensor of shape {shape}, got {got}")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"state[{name!r}] contains NaN or inf: the weights are damaged (or diverged)")
        for name in expected if not self.tied else ("b_enc", "W_dec", "b_dec"):
            getattr(self, name)[i].copy_(tensors[name])
        self.fitted = True
