"""Reconstruction and sparsity of a dictionary on activation batches: FVU, MSE, L0, L1, dead and dense shares, each
feature's firing frequency (for the density histogram).

The SAE is anything with the ensemble interface of `dictionaries.EnsembleSAE`: `encode(x[B, d]) -> codes
[E, B, n]`, `decode(codes) -> [E, B, d]`, `n_members`, `d_in`, `d_sae`, and optionally `hparams` and `kind`."""

from __future__ import annotations

import functools
import inspect
import math
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..arguments import checked
from ..checks import check_int
from ..dictionaries.metrics import FVU

DENSE_THRESHOLD = 0.1
"""A feature is "dense" when it fires on more than this fraction of tokens (10 %), a common cut in the literature
for features that behave like a bias rather than a sparse feature."""

# Largest [E, rows, max(n, d)] block the reconstruction step materialises at once (elements; 2**24 floats = 64 MB),
# so that wide ensembles evaluate on a laptop's memory whatever batch size the caller reads.
_BLOCK_ELEMENTS = 2**24


def check_sae(sae: Any) -> None:
    missing = [a for a in ("encode", "decode", "n_members", "d_in", "d_sae") if not hasattr(sae, a)]
    if missing:
        raise ValueError(f"sae must have the ensemble interface of sparse_coding.dictionaries (encode, decode, "
                         f"n_members, d_in, d_sae); {type(sae).__name__} lacks {', '.join(missing)}. Build one "
                         f"with sparse_coding.dictionaries.make_sae(...) or load a trained sweep")


@contextmanager
def eval_mode(sae: Any) -> Iterator[Any]:
    """Run the block with `sae` in eval mode (a BatchTopK SAE encodes with its inference threshold, not its batch's
    top k·B) and give every module of it back the train/eval mode it came in with. Parameter-free stand-ins pass."""
    modes = [(m, m.training) for m in sae.modules()] if isinstance(sae, torch.nn.Module) else []
    if hasattr(sae, "eval"):
        sae.eval()
    try:
        yield sae
    finally:
        for m, training in modes:
            m.training = training


def in_eval_mode(fn: Callable) -> Callable:
    """Decorator: call `fn` with its argument `sae` in eval mode, the caller's mode restored after (`eval_mode`)."""
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            sae = sig.bind_partial(*args, **kwargs).arguments.get("sae")
        except TypeError:
            return fn(*args, **kwargs)  # Python's own binding error, as without the decorator
        with eval_mode(sae):
            return fn(*args, **kwargs)

    return wrapper


def sae_place(sae: Any) -> tuple[torch.device | None, torch.dtype | None]:
    """Device and dtype of the SAE's parameters (None for parameter-free stand-ins: inputs are then left as is)."""
    params = getattr(sae, "parameters", None)
    if callable(params):
        for p in params():
            return p.device, p.dtype
    return None, None


def rows_per_block(sae: Any, n_rows: int) -> int:
    width = max(int(sae.d_sae), int(sae.d_in))
    return max(1, min(n_rows, _BLOCK_ELEMENTS // max(1, int(sae.n_members) * width)))


@torch.no_grad()
def encode_decode(sae: Any, x: torch.Tensor, input_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, d] -> (codes [E, B, n], x_hat [E, B, d]) in x's units. `input_scale` multiplies x before the SAE sees it
    and divides the reconstruction after, for SAEs trained on normalised activations."""
    device, dtype = sae_place(sae)
    xs = x * input_scale if input_scale != 1.0 else x
    if device is not None:
        xs = xs.to(device=device, dtype=dtype)
    codes = sae.encode(xs)
    x_hat = sae.decode(codes)
    if input_scale != 1.0:
        x_hat = x_hat / input_scale
    E, B = int(sae.n_members), x.shape[0]
    if codes.ndim != 3 or codes.shape[:2] != (E, B) or x_hat.shape != (E, B, x.shape[1]):
        raise ValueError(f"the SAE returned codes {tuple(codes.shape)} and reconstructions {tuple(x_hat.shape)} for "
                         f"input {tuple(x.shape)}; expected [{E}, {B}, d_sae] and [{E}, {B}, {x.shape[1]}] "
                         f"(encode/decode must follow the ensemble interface of sparse_coding.dictionaries)")
    return codes, x_hat.to(device=x.device, dtype=x.dtype)


def check_finite(x: torch.Tensor, what: str) -> None:
    if not torch.isfinite(x).all():
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise ValueError(f"{what} contains {n_nan} NaN and {n_inf} inf values; the activations are corrupt or the "
                         f"model overflowed (fp16?). Re-harvest them in float32, or drop the bad chunk")


def member_indices(sae: Any, members: Sequence[int] | None) -> list[int]:
    E = int(sae.n_members)
    if members is None:
        return list(range(E))
    out = []
    for m in members:
        if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or not -E <= int(m) < E:
            raise ValueError(f"members must be indices into the ensemble (0..{E - 1}), got {m!r}")
        out.append(int(m) % E)
    return out




@checked
@in_eval_mode
@torch.no_grad()
def sparsity_stats(sae: Any, batches: Iterable[torch.Tensor], max_tokens: int | None = None, *,
                   dense_threshold: float = DENSE_THRESHOLD, input_scale: float = 1.0,
                   progress: bool = True) -> tuple[pd.DataFrame, torch.Tensor]:
    """Reconstruction and sparsity of every member on activation batches, in eval mode (as `mean_l0`; the SAE's
    train/eval mode is restored afterwards).

    batches: any iterable of float tensors [B, d] (e.g. `store.batches(4096, seed=0, epochs=1)`), d == sae.d_in.
    max_tokens: stop after this many rows (the last batch is cut), None = all.
    Returns (table, feature_freq):
      table, one row per member: member, n_tokens,
        fvu   = Σ‖x − x̂‖² / Σ‖x − x̄‖² (x̄ the mean over the tokens seen; 0 = perfect, 1 = no better than x̄),
        mse   = mean over tokens of ‖x − x̂‖² (summed over the d dims, as in the training loss),
        l0    = mean number of non-zero codes per token,  l1 = mean ‖c‖₁ per token,
        dead_frac  = share of features that never fired on these tokens,
        dense_frac = share of features firing on more than `dense_threshold` of tokens;
      feature_freq [E, d_sae] float64 on the CPU: the fraction of tokens on which each feature is non-zero.
    """
    check_sae(sae)
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                   or max_tokens < 1):
        raise ValueError(f"max_tokens must be a positive int or None (all batches), got {max_tokens!r}")
    if not 0 <= dense_threshold < 1:
        raise ValueError(f"dense_threshold is a fraction of tokens in [0, 1), got {dense_threshold!r}")
    if not (isinstance(input_scale, (int, float)) and math.isfinite(input_scale) and input_scale > 0):
        raise ValueError(f"input_scale must be a finite positive number, got {input_scale!r}")
    E, n, d = int(sae.n_members), int(sae.d_sae), int(sae.d_in)

    # float64 accumulators: sums over millions of tokens would lose digits in float32.
    fvu = FVU()
    l0_sum = torch.zeros(E, dtype=torch.float64)
    l1_sum = torch.zeros(E, dtype=torch.float64)
    fired = torch.zeros(E, n, dtype=torch.float64)
    n_tokens = 0

    bar = tqdm(total=max_tokens, desc="sparsity stats", unit="tok", disable=not progress, leave=False)
    for i, x in enumerate(batches):
        if not isinstance(x, torch.Tensor) or x.ndim != 2:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"batch {i} must be a float tensor [batch, d], got {shape}; flatten [B, T, d] "
                             f"activations with x.reshape(-1, d)")
        if x.shape[1] != d:
            raise ValueError(f"batch {i} has activation width {x.shape[1]} but the SAE expects d_in={d}: read the "
                             f"activations of the hook (layer and site) this SAE was trained on")
        if not x.is_floating_point():
            raise ValueError(f"batch {i} has dtype {x.dtype}; activations must be floating point")
        if max_tokens is not None:
            x = x[: max_tokens - n_tokens]
        check_finite(x, f"activation batch {i}")
        step = rows_per_block(sae, x.shape[0])
        for start in range(0, x.shape[0], step):
            xb = x[start: start + step]
            codes, x_hat = encode_decode(sae, xb, float(input_scale))
            fvu.update(xb, x_hat)
            active = codes != 0
            l0_sum += active.sum(dim=(1, 2)).double().cpu()
            l1_sum += codes.abs().double().sum(dim=(1, 2)).cpu()
            fired += active.sum(dim=1).double().cpu()
        n_tokens += x.shape[0]
        bar.update(x.shape[0])
        if max_tokens is not None and n_tokens >= max_tokens:
            break
    bar.close()
    if n_tokens == 0:
        raise ValueError("no activation rows were read: the batches iterable was empty (an exhausted generator? "
                         "call store.batches(...) again for each evaluation)")

    freq = fired / n_tokens
    table = pd.DataFrame({
        "member": np.arange(E),
        "n_tokens": n_tokens,
        "fvu": fvu.value().numpy(),
        "mse": (fvu.sse / n_tokens).numpy(),
        "l0": (l0_sum / n_tokens).numpy(),
        "l1": (l1_sum / n_tokens).numpy(),
        "dead_frac": (fired == 0).double().mean(1).numpy(),
        "dense_frac": (freq > dense_threshold).double().mean(1).numpy(),
    })
    return table, freq


@checked
def log10_density(feature_freq: torch.Tensor, floor: float | None = None) -> torch.Tensor:
    """log10 of each feature's firing frequency. Dead features (frequency 0) become -inf, or `floor` if given (e.g.
    floor=-10 puts them in a visible bar at the left of a histogram)."""
    f = torch.as_tensor(feature_freq, dtype=torch.float64)
    if (f < 0).any() or (f > 1).any():
        raise ValueError("feature_freq must hold fractions of tokens in [0, 1] (the second output of sparsity_stats)")
    out = torch.log10(f)
    if floor is not None:
        out = torch.where(f > 0, out, torch.full_like(out, float(floor)))
    return out


@checked
def density_histogram(feature_freq: torch.Tensor, bins: int = 50, lo: float | None = None, hi: float = 0.0
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Histogram of log10 feature density per member, on shared bin edges so members compare bar by bar.

    feature_freq [E, n] (or [n]). Returns (edges [bins+1], counts [E, bins], n_dead [E]); dead features are counted
    in n_dead, not in the bars (their log density is -inf). lo defaults to the smallest live log density, floored to
    an integer."""
    f = torch.as_tensor(feature_freq, dtype=torch.float64)
    if f.ndim == 1:
        f = f[None]
    if f.ndim != 2:
        raise ValueError(f"feature_freq must be [members, features] or [features], got shape {tuple(f.shape)}")
    logd = log10_density(f)
    live = torch.isfinite(logd)
    if lo is None:
        lo = math.floor(float(logd[live].min())) if live.any() else -1.0
        lo = min(lo, hi - 1.0)
    if not lo < hi:
        raise ValueError(f"lo={lo!r} must be below hi={hi!r} (log10 densities, e.g. lo=-6, hi=0); pass lo < hi or "
                         f"leave lo=None for the smallest live density")
    edges = np.linspace(lo, hi, bins + 1)
    counts = np.stack([np.histogram(row[m].numpy(), bins=edges)[0] for row, m in zip(logd, live)])
    return edges, counts, (~live).sum(1).numpy()


@checked
@in_eval_mode
@torch.no_grad()
def mean_l0(sae: Any, x: torch.Tensor, member: int = 0) -> float:
    """Mean number of active latents (codes > 0) per row of x [rows, d_in] for one member of an SAE (L0, latents
    per token), in eval mode (the SAE's train/eval mode is restored afterwards)."""
    check_sae(sae)
    check_int(member, "member", 0, int(sae.n_members) - 1, f" (an index into the ensemble of {sae.n_members})")
    return float((sae.encode(x)[member] > 0).sum(1).float().mean())
