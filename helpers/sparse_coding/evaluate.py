"""Evaluating a sweep of SAEs: one tidy table, one row per ensemble member.

Two kinds of numbers, measured separately and joined on `member`:

* `sparsity_stats` reads activation batches [B, d] and reports how well each member reconstructs them and how
  sparse its codes are: fraction of variance unexplained (FVU), MSE, L0, L1, dead and dense fractions, plus each
  feature's firing frequency (for the feature-density histogram).
* `spliced_loss` runs the language model on token contexts and swaps the activation at one hook for each member's
  reconstruction: next-token cross-entropy clean vs spliced vs zero- and mean-ablated, "loss recovered", KL to the
  clean logits, perplexity. (Cunningham et al. report Pythia-70M layer 2 perplexity going from about 25 to 40.)

`evaluate_sweep` does both and merges in each member's hyperparameters; `SweepEvaluation.save` writes the table as
CSV and the frequencies as safetensors.

The SAE is anything with the ensemble interface of `sparse_coding.sae`: `encode(x[B, d]) -> codes [E, B, n]`,
`decode(codes) -> [E, B, d]`, `n_members`, `d_in`, `d_sae`, and optionally `hparams` (one dict per member) and
`kind`. The model is a TransformerLens model (HookedTransformer or TransformerBridge).
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

DENSE_THRESHOLD = 0.1
"""A feature is "dense" when it fires on more than this fraction of tokens (10 %), a common cut in the literature
for features that behave like a bias rather than a sparse feature."""

# Largest [E, rows, max(n, d)] block the reconstruction step materialises at once (elements; 2**24 floats = 64 MB),
# so that wide ensembles evaluate on a laptop's memory whatever batch size the caller reads.
_BLOCK_ELEMENTS = 2**24


# ----------------------------------------------------------------------------------------------------------------
# SAE plumbing
# ----------------------------------------------------------------------------------------------------------------

def _check_sae(sae: Any) -> None:
    missing = [a for a in ("encode", "decode", "n_members", "d_in", "d_sae") if not hasattr(sae, a)]
    if missing:
        raise ValueError(f"sae must have the ensemble interface of sparse_coding.sae (encode, decode, n_members, "
                         f"d_in, d_sae); {type(sae).__name__} lacks {', '.join(missing)}. Build one with "
                         f"sparse_coding.sae.make_sae(...) or load a trained sweep")


def _sae_place(sae: Any) -> tuple[torch.device | None, torch.dtype | None]:
    """Device and dtype of the SAE's parameters (None for parameter-free stand-ins: inputs are then left as is)."""
    params = getattr(sae, "parameters", None)
    if callable(params):
        for p in params():
            return p.device, p.dtype
    return None, None


def _rows_per_block(sae: Any, n_rows: int) -> int:
    width = max(int(sae.d_sae), int(sae.d_in))
    return max(1, min(n_rows, _BLOCK_ELEMENTS // max(1, int(sae.n_members) * width)))


@torch.no_grad()
def _encode_decode(sae: Any, x: torch.Tensor, input_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, d] -> (codes [E, B, n], x_hat [E, B, d]) in x's units. `input_scale` multiplies x before the SAE sees it
    and divides the reconstruction after, for SAEs trained on normalised activations."""
    device, dtype = _sae_place(sae)
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
                         f"(encode/decode must follow the ensemble interface of sparse_coding.sae)")
    return codes, x_hat.to(device=x.device, dtype=x.dtype)


def _check_finite(x: torch.Tensor, what: str) -> None:
    if not torch.isfinite(x).all():
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise ValueError(f"{what} contains {n_nan} NaN and {n_inf} inf values; the activations are corrupt or the "
                         f"model overflowed (fp16?). Re-harvest them in float32, or drop the bad chunk")


def _member_indices(sae: Any, members: Sequence[int] | None) -> list[int]:
    E = int(sae.n_members)
    if members is None:
        return list(range(E))
    out = []
    for m in members:
        if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or not -E <= int(m) < E:
            raise ValueError(f"members must be indices into the ensemble (0..{E - 1}), got {m!r}")
        out.append(int(m) % E)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Reconstruction and sparsity on activation batches
# ----------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def sparsity_stats(sae: Any, batches: Iterable[torch.Tensor], max_tokens: int | None = None, *,
                   dense_threshold: float = DENSE_THRESHOLD, input_scale: float = 1.0,
                   progress: bool = True) -> tuple[pd.DataFrame, torch.Tensor]:
    """Reconstruction and sparsity of every member on activation batches.

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
    _check_sae(sae)
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                   or max_tokens < 1):
        raise ValueError(f"max_tokens must be a positive int or None (all batches), got {max_tokens!r}")
    if not 0 <= dense_threshold < 1:
        raise ValueError(f"dense_threshold is a fraction of tokens in [0, 1), got {dense_threshold!r}")
    if not (isinstance(input_scale, (int, float)) and math.isfinite(input_scale) and input_scale > 0):
        raise ValueError(f"input_scale must be a finite positive number, got {input_scale!r}")
    E, n, d = int(sae.n_members), int(sae.d_sae), int(sae.d_in)

    # float64 accumulators: sums over millions of tokens would lose digits in float32.
    sse = torch.zeros(E, dtype=torch.float64)
    l0_sum = torch.zeros(E, dtype=torch.float64)
    l1_sum = torch.zeros(E, dtype=torch.float64)
    fired = torch.zeros(E, n, dtype=torch.float64)
    sum_x = torch.zeros(d, dtype=torch.float64)
    sum_sq = 0.0
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
        _check_finite(x, f"activation batch {i}")
        step = _rows_per_block(sae, x.shape[0])
        for start in range(0, x.shape[0], step):
            xb = x[start: start + step]
            codes, x_hat = _encode_decode(sae, xb, float(input_scale))
            xf = xb.double()
            sse += (x_hat.double() - xf).pow(2).sum(dim=(1, 2)).cpu()
            active = codes != 0
            l0_sum += active.sum(dim=(1, 2)).double().cpu()
            l1_sum += codes.abs().double().sum(dim=(1, 2)).cpu()
            fired += active.sum(dim=1).double().cpu()
            sum_x += xf.sum(0).cpu()
            sum_sq += float(xf.pow(2).sum())
        n_tokens += x.shape[0]
        bar.update(x.shape[0])
        if max_tokens is not None and n_tokens >= max_tokens:
            break
    bar.close()
    if n_tokens == 0:
        raise ValueError("no activation rows were read: the batches iterable was empty (an exhausted generator? "
                         "call store.batches(...) again for each evaluation)")

    total_var = sum_sq - float(sum_x.pow(2).sum()) / n_tokens  # Σ‖x − x̄‖²
    freq = fired / n_tokens
    table = pd.DataFrame({
        "member": np.arange(E),
        "n_tokens": n_tokens,
        "fvu": (sse / total_var).numpy() if total_var > 0 else np.full(E, np.nan),
        "mse": (sse / n_tokens).numpy(),
        "l0": (l0_sum / n_tokens).numpy(),
        "l1": (l1_sum / n_tokens).numpy(),
        "dead_frac": (fired == 0).double().mean(1).numpy(),
        "dense_frac": (freq > dense_threshold).double().mean(1).numpy(),
    })
    return table, freq


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
    edges = np.linspace(lo, hi, bins + 1)
    counts = np.stack([np.histogram(row[m].numpy(), bins=edges)[0] for row, m in zip(logd, live)])
    return edges, counts, (~live).sum(1).numpy()


def plot_density_histogram(ax: Any, feature_freq: torch.Tensor, labels: Sequence[str] | None = None,
                           bins: int = 50) -> Any:
    """Draw the log10 feature-density histogram of each member on a matplotlib Axes (step outlines, one per member;
    the legend gives each member's dead count)."""
    edges, counts, n_dead = density_histogram(feature_freq, bins=bins)
    labels = list(labels) if labels is not None else [f"member {i}" for i in range(len(counts))]
    if len(labels) != len(counts):
        raise ValueError(f"got {len(labels)} labels for {len(counts)} members")
    for c, lab, dead in zip(counts, labels, n_dead):
        ax.stairs(c, edges, label=f"{lab} ({dead} dead)")
    ax.set_xlabel("log10 feature density (fraction of tokens a feature fires on)")
    ax.set_ylabel("features")
    ax.legend(fontsize="small")
    return ax


# ----------------------------------------------------------------------------------------------------------------
# The language model with the reconstruction spliced in
# ----------------------------------------------------------------------------------------------------------------

class _Stop(Exception):
    """Raised from a hook to end a forward pass once the activation we want has been seen (cheap mean pass)."""


def _model_device(model: Any) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _check_hook(model: Any, hook_name: str) -> None:
    names = list(getattr(model, "hook_dict", {}).keys())
    if not isinstance(hook_name, str) or hook_name not in names:
        # Offer the closest spellings, then other hooks of the same layer, so the fix is one copy-paste.
        near = difflib.get_close_matches(hook_name, names, n=4, cutoff=0.6) if isinstance(hook_name, str) else []
        layer = re.search(r"\d+", hook_name) if isinstance(hook_name, str) else None
        near += [h for h in names if layer and f".{layer.group()}." in h and h not in near][: 8 - len(near)]
        near = near or names[:8]
        raise ValueError(f"hook {hook_name!r} is not a hook of this model; valid names look like "
                         f"{', '.join(near)} (all of them: list(model.hook_dict))")


def _fast_start_layer(model: Any, hook_name: str) -> int | None:
    """For a HookedTransformer and a residual-stream hook, the layer the forward pass can restart from with the
    patched residual (`start_at_layer`), which skips re-running the layers below the hook for every member.
    None where that is not exactly equivalent (TransformerBridge has no start_at_layer; shortformer models need
    their positional embedding passed separately), so the full hooked forward is used instead."""
    try:
        from transformer_lens import HookedTransformer
    except ImportError:  # pragma: no cover - transformer_lens is a dependency
        return None
    if not isinstance(model, HookedTransformer):
        return None
    if getattr(model.cfg, "positional_embedding_type", None) == "shortformer":
        return None
    m = re.fullmatch(r"blocks\.(\d+)\.hook_resid_(pre|post)", hook_name)
    if not m:
        return None
    return int(m.group(1)) + (1 if m.group(2) == "post" else 0)


class _Splicer:
    """One model + hook: a clean forward that also returns the activation at the hook, and a forward with that
    activation replaced."""

    def __init__(self, model: Any, hook_name: str, fast: bool = True):
        _check_hook(model, hook_name)
        self.model, self.hook_name = model, hook_name
        self.start_layer = _fast_start_layer(model, hook_name) if fast else None

    def clean(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen: dict[str, torch.Tensor] = {}

        def grab(act, hook):
            seen["act"] = act.detach().clone()  # clone: later hooks or in-place ops must not change our copy

        logits = self.model.run_with_hooks(tokens, fwd_hooks=[(self.hook_name, grab)], return_type="logits")
        if "act" not in seen:
            raise ValueError(f"hook {self.hook_name!r} never fired during the forward pass; pick a hook on the path "
                             f"from tokens to logits")
        return logits, seen["act"]

    def activation(self, tokens: torch.Tensor) -> torch.Tensor:
        """The activation at the hook only: the pass is cut short right after it (any model, any hook)."""
        seen: dict[str, torch.Tensor] = {}

        def grab(act, hook):
            seen["act"] = act.detach().clone()
            raise _Stop

        try:
            self.model.run_with_hooks(tokens, fwd_hooks=[(self.hook_name, grab)], return_type="logits")
        except _Stop:
            pass
        if "act" not in seen:
            raise ValueError(f"hook {self.hook_name!r} never fired during the forward pass")
        return seen["act"]

    def patched(self, tokens: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        if self.start_layer is not None:
            return self.model(act, start_at_layer=self.start_layer, return_type="logits")

        def put(orig, hook):
            return act.to(dtype=orig.dtype, device=orig.device)

        return self.model.run_with_hooks(tokens, fwd_hooks=[(self.hook_name, put)], return_type="logits")


def _next_token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs [B, T-1, V], CE [B, T-1]) for predicting token t+1 at position t, in float32 whatever the model's
    dtype, so fp16/bf16 models do not round the losses we compare."""
    logp = logits[:, :-1].float().log_softmax(-1)
    ce = -logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    return logp, ce


def _check_tokens(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2:
        got = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"tokens must be an integer tensor [n_contexts, context_length], got {got}")
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise ValueError(f"tokens must be integer token ids, got dtype {tokens.dtype}")
    if tokens.shape[0] < 1 or tokens.shape[1] < 2:
        raise ValueError(f"tokens {tuple(tokens.shape)}: need at least one context of at least 2 tokens "
                         f"(the loss predicts each next token)")
    d_vocab = getattr(getattr(model, "cfg", None), "d_vocab", None)
    if d_vocab is not None and (int(tokens.min()) < 0 or int(tokens.max()) >= d_vocab):
        raise ValueError(f"token ids must lie in [0, {d_vocab}) for this model, got range "
                         f"[{int(tokens.min())}, {int(tokens.max())}]; were they made by another tokenizer?")
    n_ctx = getattr(getattr(model, "cfg", None), "n_ctx", None)
    if n_ctx is not None and tokens.shape[1] > n_ctx:
        raise ValueError(f"contexts of {tokens.shape[1]} tokens exceed the model's n_ctx={n_ctx}; cut them with "
                         f"tokens[:, :{n_ctx}]")
    return tokens.long()


def _width_error(splicer: _Splicer, sae: Any, width: int) -> ValueError:
    msg = (f"SAE expects activations of width d_in={sae.d_in} but hook {splicer.hook_name!r} has width {width}: "
           f"evaluate at the hook the SAE was trained on")
    meta = getattr(sae, "metadata", None) or getattr(sae, "config", None)
    if callable(meta):
        try:
            meta = meta()
        except Exception:  # noqa: BLE001 - a hint only
            meta = None
    if isinstance(meta, dict) and meta.get("hook_name"):
        msg += f" (its metadata says {meta['hook_name']!r})"
    return ValueError(msg)


@torch.no_grad()
def spliced_loss(model: Any, tokens: torch.Tensor, hook_name: str, sae: Any = None, *,
                 members: Sequence[int] | None = None, batch_size: int = 8,
                 ablations: Sequence[str] = ("zero", "mean"), mean_act: torch.Tensor | None = None,
                 keep_first_position: bool = False, input_scale: float = 1.0, fast: bool = True,
                 progress: bool = True) -> pd.DataFrame:
    """Next-token loss of the model with the activation at `hook_name` replaced, per ensemble member.

    tokens [N, T] integer ids; the loss is the cross-entropy of token t+1 at position t for t = 0..T-2 (the last
    position has no target), averaged over all N·(T-1) predictions, in float32.
    The first position: models with a BOS/attention-sink first token carry a residual there that is orders of
    magnitude larger than elsewhere, and SAEs reconstruct it badly. keep_first_position=True leaves position 0's
    activation clean in every spliced and ablated run (only positions 1.. are replaced); the loss is still over all
    predictions. Default False replaces every position, as in the original paper.
    ablations: any of "zero" (activation set to 0) and "mean" (set to `mean_act` [d], or, if None, to the mean of
    the activation over these tokens, measured in a first pass that stops at the hook).
    Returns one row per member (or a single row with member = -1 and no spliced columns when sae is None):
      ce_clean, ce_spliced, ce_zero, ce_mean, loss_recovered = (ce_zero − ce_spliced) / (ce_zero − ce_clean)
      (1 = as good as clean, 0 = no better than zeroing), loss_recovered_mean (same against mean ablation),
      kl_to_clean = mean over predictions of KL(clean ‖ spliced) in nats, ppl_clean = exp(ce_clean), ppl_spliced,
      n_predictions.
    Efficiency: the clean forward runs once per batch and is reused by every member; for residual-stream hooks on a
    HookedTransformer, spliced runs restart from the hook's layer instead of re-running the layers below it.
    """
    tokens = _check_tokens(model, tokens)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int (contexts per forward pass), got {batch_size!r}")
    ablations = tuple(ablations)
    bad = [a for a in ablations if a not in ("zero", "mean")]
    if bad:
        raise ValueError(f"unknown ablation(s) {bad}; choose from 'zero' and 'mean'")
    if not (isinstance(input_scale, (int, float)) and math.isfinite(input_scale) and input_scale > 0):
        raise ValueError(f"input_scale must be a finite positive number, got {input_scale!r}")
    if sae is not None:
        _check_sae(sae)
        member_ids = _member_indices(sae, members)
    else:
        member_ids = []
    splicer = _Splicer(model, hook_name, fast=fast)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    device = _model_device(model)
    N, T = tokens.shape
    first = 1 if keep_first_position else 0
    batches = [tokens[i: i + batch_size] for i in range(0, N, batch_size)]

    if "mean" in ablations:
        if mean_act is None:
            total, count = None, 0
            for tb in tqdm(batches, desc="mean activation", disable=not progress, leave=False):
                act = splicer.activation(tb.to(device))
                _check_finite(act, f"the activation at {hook_name!r}")
                act = act[:, first:].reshape(act.shape[0], act.shape[1] - first, -1)
                if sae is not None and act.shape[-1] != int(sae.d_in):  # fail before the long pass, not after
                    raise _width_error(splicer, sae, act.shape[-1])
                s = act.double().sum(dim=(0, 1))
                total = s if total is None else total + s
                count += act.shape[0] * act.shape[1]
            mean_act = total / count
        mean_act = torch.as_tensor(mean_act)
        if not torch.isfinite(mean_act).all():
            raise ValueError("mean_act contains NaN/inf; recompute it from clean activations")

    sums: dict[str, float] = {"clean": 0.0, "zero": 0.0, "mean": 0.0}
    ce_member = [0.0] * len(member_ids)
    kl_member = [0.0] * len(member_ids)
    n_pred = 0
    try:
        for tb in tqdm(batches, desc="spliced loss", disable=not progress, leave=False):
            tb = tb.to(device)
            logits, act = splicer.clean(tb)
            _check_finite(act, f"the activation at {hook_name!r}")
            logp_clean, ce = _next_token_logprobs(logits, tb)
            del logits
            sums["clean"] += float(ce.double().sum())
            n_pred += ce.numel()
            B = tb.shape[0]
            flat = act.reshape(B * T, -1)
            if sae is not None and flat.shape[1] != int(sae.d_in):
                raise _width_error(splicer, sae, flat.shape[1])
            if "mean" in ablations and mean_act.numel() not in (1, flat.shape[1]):
                raise ValueError(f"mean_act has {mean_act.numel()} values but the activation at {hook_name!r} has "
                                 f"width {flat.shape[1]}; pass the per-dimension mean of that hook's activations")

            def splice(new: torch.Tensor) -> torch.Tensor:
                """new [B*T, w] or broadcastable -> patched logits, keeping position 0 clean if asked."""
                new = new.to(dtype=act.dtype, device=act.device).expand(B * T, flat.shape[1]).reshape(act.shape)
                if first:
                    new = new.clone()
                    new[:, :first] = act[:, :first]
                return splicer.patched(tb, new)

            for name in ablations:
                fill = torch.zeros(1, flat.shape[1]) if name == "zero" else mean_act.reshape(1, -1)
                _, ce_abl = _next_token_logprobs(splice(fill), tb)
                sums[name] += float(ce_abl.double().sum())

            if member_ids:
                x_hat = torch.cat([_encode_decode(sae, flat[s: s + step], float(input_scale))[1]
                                   for step in [_rows_per_block(sae, flat.shape[0])]
                                   for s in range(0, flat.shape[0], step)], dim=1)
                for j, m in enumerate(member_ids):
                    logp, ce_s = _next_token_logprobs(splice(x_hat[m]), tb)
                    ce_member[j] += float(ce_s.double().sum())
                    kl = F.kl_div(logp, logp_clean, log_target=True, reduction="none").sum(-1)
                    kl_member[j] += float(kl.double().sum())
    finally:
        if was_training and hasattr(model, "train"):
            model.train()

    ce_clean = sums["clean"] / n_pred
    row_common: dict[str, Any] = {"ce_clean": ce_clean, "ppl_clean": math.exp(ce_clean)}
    for name in ("zero", "mean"):
        row_common[f"ce_{name}"] = sums[name] / n_pred if name in ablations else math.nan
    if sae is None:
        return pd.DataFrame([{"member": -1, **row_common, "n_predictions": n_pred}])

    def recovered(ce_s: float, ce_abl: float) -> float:
        gap = ce_abl - ce_clean
        return (ce_abl - ce_s) / gap if gap != 0 and math.isfinite(gap) else math.nan

    rows = []
    for j, m in enumerate(member_ids):
        ce_s = ce_member[j] / n_pred
        rows.append({"member": m, **row_common, "ce_spliced": ce_s,
                     "loss_recovered": recovered(ce_s, row_common["ce_zero"]),
                     "loss_recovered_mean": recovered(ce_s, row_common["ce_mean"]),
                     "kl_to_clean": kl_member[j] / n_pred, "ppl_spliced": math.exp(ce_s),
                     "n_predictions": n_pred})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------------------------
# The sweep table
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class SweepEvaluation:
    """table: one row per member (hyperparameters, sparsity stats, spliced-loss numbers); feature_freq [E, d_sae]."""

    table: pd.DataFrame
    feature_freq: torch.Tensor

    def save(self, folder: str | Path, name: str = "eval") -> tuple[Path, Path]:
        """`<name>.csv` and `<name>_feature_freq.safetensors` in folder, both written atomically."""
        from .io import atomic_write_text, save_tensors
        from .paths import resolve

        folder = resolve(folder)
        csv = atomic_write_text(folder / f"{name}.csv", self.table.to_csv(index=False))
        freq = save_tensors(folder / f"{name}_feature_freq.safetensors", {"feature_freq": self.feature_freq})
        return csv, freq

    @staticmethod
    def load(folder: str | Path, name: str = "eval") -> "SweepEvaluation":
        from .io import load_tensors
        from .paths import resolve

        folder = resolve(folder)
        return SweepEvaluation(pd.read_csv(folder / f"{name}.csv"),
                               load_tensors(folder / f"{name}_feature_freq.safetensors")["feature_freq"])


def _hparam_columns(sae: Any) -> pd.DataFrame:
    """Per-member hyperparameters as columns (scalars only, so the CSV stays flat), plus kind, d_in, d_sae."""
    E = int(sae.n_members)
    hp = list(getattr(sae, "hparams", None) or [{} for _ in range(E)])
    if len(hp) != E:
        raise ValueError(f"sae.hparams has {len(hp)} entries for {E} members")
    rows = []
    for i, h in enumerate(hp):
        row = {"member": i, "kind": getattr(sae, "kind", type(sae).__name__),
               "d_in": int(sae.d_in), "d_sae": int(sae.d_sae)}
        for k, v in dict(h).items():
            if isinstance(v, (bool, int, float, str, np.integer, np.floating)) and k not in row:
                row[k] = v
        rows.append(row)
    return pd.DataFrame(rows)


def evaluate_sweep(model: Any, sae: Any, batches: Iterable[torch.Tensor], tokens: torch.Tensor | None,
                   hook_name: str, *, max_tokens: int | None = None, batch_size: int = 8,
                   ablations: Sequence[str] = ("zero", "mean"), mean_act: torch.Tensor | None = None,
                   keep_first_position: bool = False, dense_threshold: float = DENSE_THRESHOLD,
                   input_scale: float = 1.0, progress: bool = True) -> SweepEvaluation:
    """The whole evaluation of one sweep: hyperparameters + `sparsity_stats` on `batches` + `spliced_loss` on
    `tokens`, joined into one tidy table (one row per member, CSV-ready). tokens=None (or model=None) skips the
    language-model part. See those functions for each column's meaning."""
    _check_sae(sae)
    stats, freq = sparsity_stats(sae, batches, max_tokens, dense_threshold=dense_threshold,
                                 input_scale=input_scale, progress=progress)
    table = _hparam_columns(sae).merge(stats, on="member")
    if tokens is not None and model is not None:
        loss = spliced_loss(model, tokens, hook_name, sae, batch_size=batch_size, ablations=ablations,
                            mean_act=mean_act, keep_first_position=keep_first_position, input_scale=input_scale,
                            progress=progress)
        table = table.merge(loss, on="member", how="left")
    table.insert(1, "hook_name", hook_name)
    table.attrs["dense_threshold"] = dense_threshold
    return SweepEvaluation(table, freq)
