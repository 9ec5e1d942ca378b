"""The language model with the activation at one hook replaced: by each member's reconstruction (the "spliced"
loss), by zeros, or by the mean. Next-token cross-entropy clean vs spliced vs ablated, "loss recovered", KL to the
clean logits, perplexity. Cunningham et al. 2023 (arXiv 2309.08600) report Pythia-70M layer 2 perplexity going from
about 25 to 40. The model is a TransformerLens model (HookedTransformer or TransformerBridge)."""

from __future__ import annotations

from dataclasses import replace

import math
from typing import Any, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..arguments import checked
from .. import lm
from ..activations import Exclusion
from ..lm.upper import UpperLayers
from .reconstruction import check_finite, check_sae, encode_decode, in_eval_mode, member_indices, rows_per_block


class _Stop(Exception):
    """Raised from a hook to end a forward pass once the activation we want has been seen (cheap mean pass)."""


def model_device(model: Any) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


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
    layer, site = lm.parse_hook(hook_name)
    if layer is None or site not in ("hook_resid_pre", "hook_resid_post"):
        return None
    return layer + (1 if site == "hook_resid_post" else 0)


class Splicer:
    """One model + hook: a clean forward that also returns the activation at the hook, and a forward with that
    activation replaced."""

    def __init__(self, model: Any, hook_name: str, fast: bool = True):
        lm.check_hooks(model, [hook_name])
        self.model, self.hook_name = model, hook_name
        self.start_layer = _fast_start_layer(model, hook_name) if fast else None
        # A bridge over a Llama-family or GPT-NeoX decoder: the layers above the hook alone (`lm.upper`).
        self.upper = UpperLayers.for_hook(model, hook_name) if fast and self.start_layer is None else None

    def clean(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen: dict[str, torch.Tensor] = {}

        def grab(act, hook):
            seen["act"] = act.detach().clone()  # clone: later hooks or in-place ops must not change our copy

        if self.upper is None:
            logits = self.model.run_with_hooks(tokens, fwd_hooks=[(self.hook_name, grab)], return_type="logits")
        else:
            with self.upper.recording(tokens):
                logits = self.model.run_with_hooks(tokens, fwd_hooks=[(self.hook_name, grab)], return_type="logits")
        if "act" not in seen:
            raise ValueError(f"hook {self.hook_name!r} never fired during the forward pass; pick a hook on the path "
                             f"from tokens to logits")
        if self.upper is not None:
            self.upper.check(seen["act"], logits)
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
        if self.upper is not None and self.upper.ready(tokens):
            return self.upper(act)

        def put(orig, hook):
            return act.to(dtype=orig.dtype, device=orig.device)

        return self.model.run_with_hooks(tokens, fwd_hooks=[(self.hook_name, put)], return_type="logits")


def next_token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs [B, T-1, V], CE [B, T-1]) for predicting token t+1 at position t, in float32 whatever the model's
    dtype, so fp16/bf16 models do not round the losses we compare."""
    logp = logits[:, :-1].float().log_softmax(-1)
    ce = -logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    return logp, ce


def check_tokens(model: Any, tokens: torch.Tensor) -> torch.Tensor:
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


def _width_error(splicer: Splicer, sae: Any, width: int) -> ValueError:
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


def _nothing_left(exclude: Exclusion, tokens: torch.Tensor, what: str) -> ValueError:
    return ValueError(f"exclude={exclude} leaves out (its max_norm limits included) every position of these "
                      f"{tuple(tokens.shape)} contexts that could be used: {what}; pass an exclusion with a larger "
                      f"max_norm or fewer positions (the harvest's manifest records the one the SAE was trained with)")


@checked
@in_eval_mode
@torch.no_grad()
def spliced_loss(model: torch.nn.Module, tokens: torch.Tensor, hook_name: str,
                 sae: Any = None, *,
                 members: Sequence[int] | None = None, batch_size: int = 8,
                 ablations: Sequence[str] = ("zero", "mean"), mean_act: torch.Tensor | None = None,
                 keep_first_position: bool = False, input_scale: float = 1.0, fast: bool = True,
                 exclude: Exclusion | None = None, progress: bool = True) -> pd.DataFrame:
    """Next-token loss of the model with the activation at `hook_name` replaced, per ensemble member.

    tokens [N, T] integer ids; the loss is the cross-entropy of token t+1 at position t for t = 0..T-2 (the last
    position has no target), averaged over all N·(T-1) predictions, in float32.
    The first position: models with a BOS/attention-sink first token carry a residual there that is orders of
    magnitude larger than elsewhere, and SAEs reconstruct it badly. keep_first_position=True leaves position 0's
    activation clean in every spliced and ablated run (only positions 1.. are replaced); the loss is still over all
    predictions. Default False replaces every position, as in the original paper.
    exclude: positions and token ids left out of the SAE's inputs (`activations.Exclusion`, as the harvest's
    manifest or the dictionary's cfg.json records it, e.g. position 0 of a model with massive first-position
    activations): they keep their clean activation in every spliced and ablated run, the mean ablation's mean
    leaves them out, and the predictions made at them are left out of every loss (as SAELens's evaluation does).
    ablations: any of "zero" (activation set to 0) and "mean" (set to `mean_act` [d], or, if None, to the mean of
    the activation over these tokens, measured in a first pass that stops at the hook).
    Returns one row per member (or a single row with member = -1 and no spliced columns when sae is None):
      ce_clean, ce_spliced, ce_zero, ce_mean, loss_recovered = (ce_zero − ce_spliced) / (ce_zero − ce_clean)
      (1 = as good as clean, 0 = no better than zeroing), loss_recovered_mean (same against mean ablation),
      kl_to_clean = mean over predictions of KL(clean ‖ spliced) in nats, ppl_clean = exp(ce_clean), ppl_spliced,
      n_predictions.
    Efficiency: the clean forward runs once per batch and is reused by every member; for residual-stream hooks on a
    HookedTransformer (`start_at_layer`) or a bridge over a Llama-family or GPT-NeoX decoder (`lm.upper`), spliced runs
    restart from the hook's layer instead of re-running the layers below it.
    The SAE encodes in eval mode (as `reconstruction.mean_l0`); its and the model's train/eval modes are restored.
    ValueError when `exclude` (its max_norm limits included) leaves nothing to score or to average.
    """
    tokens = check_tokens(model, tokens)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int (contexts per forward pass), got {batch_size!r}")
    ablations = tuple(ablations)
    bad = [a for a in ablations if a not in ("zero", "mean")]
    if bad:
        raise ValueError(f"unknown ablation(s) {bad}; choose from 'zero' and 'mean'")
    if not (isinstance(input_scale, (int, float)) and math.isfinite(input_scale) and input_scale > 0):
        raise ValueError(f"input_scale must be a finite positive number, got {input_scale!r}")
    if sae is not None:
        check_sae(sae)
        member_ids = member_indices(sae, members)
    else:
        member_ids = []
    splicer = Splicer(model, hook_name, fast=fast)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    device = model_device(model)
    N, T = tokens.shape
    unscored = exclude or Exclusion()  # left out of the SAE's inputs and of the losses
    # Kept clean in every spliced run: the excluded positions, plus position 0 under keep_first_position.
    clean = replace(unscored, positions=tuple(sorted({0, *unscored.positions}))) if keep_first_position else unscored
    if not bool(unscored.keep(tokens)[:, :-1].any()):
        raise ValueError(f"exclude={unscored} leaves no prediction to score in these {tuple(tokens.shape)} "
                         f"contexts; exclude fewer positions or pass longer contexts")
    batches = [tokens[i: i + batch_size] for i in range(0, N, batch_size)]

    if "mean" in ablations:
        if mean_act is None:
            total, count = None, 0
            for tb in tqdm(batches, desc="mean activation", disable=not progress, leave=False):
                act = splicer.activation(tb.to(device))
                check_finite(act, f"the activation at {hook_name!r}")
                act = act.reshape(act.shape[0], act.shape[1], -1)
                if sae is not None and act.shape[-1] != int(sae.d_in):  # fail before the long pass, not after
                    raise _width_error(splicer, sae, act.shape[-1])
                act = act[clean.keep(tb.to(act.device), act, hook_name)]
                s = act.double().sum(dim=0)
                total = s if total is None else total + s
                count += act.shape[0]
            if count == 0:
                raise _nothing_left(unscored, tokens, "the mean ablation has no activation to average")
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
            check_finite(act, f"the activation at {hook_name!r}")
            logp_clean, ce = next_token_logprobs(logits, tb)
            del logits
            keep = clean.keep(tb, act, hook_name)
            scored = unscored.keep(tb, act, hook_name)[:, :-1]
            sums["clean"] += float(ce[scored].double().sum())
            n_pred += int(scored.sum())
            B = tb.shape[0]
            flat = act.reshape(B * T, -1)
            if sae is not None and flat.shape[1] != int(sae.d_in):
                raise _width_error(splicer, sae, flat.shape[1])
            if "mean" in ablations and mean_act.numel() not in (1, flat.shape[1]):
                raise ValueError(f"mean_act has {mean_act.numel()} values but the activation at {hook_name!r} has "
                                 f"width {flat.shape[1]}; pass the per-dimension mean of that hook's activations")

            def splice(new: torch.Tensor) -> torch.Tensor:
                """new [B*T, w] or broadcastable -> patched logits, excluded positions kept clean."""
                new = new.to(dtype=act.dtype, device=act.device).expand(B * T, flat.shape[1]).reshape(act.shape)
                if clean:
                    new = torch.where(keep.reshape(B, T, *[1] * (act.ndim - 2)), new, act)
                return splicer.patched(tb, new)

            for name in ablations:
                fill = torch.zeros(1, flat.shape[1]) if name == "zero" else mean_act.reshape(1, -1)
                _, ce_abl = next_token_logprobs(splice(fill), tb)
                sums[name] += float(ce_abl[scored].double().sum())

            if member_ids:
                x_hat = torch.cat([encode_decode(sae, flat[s: s + step], float(input_scale))[1]
                                   for step in [rows_per_block(sae, flat.shape[0])]
                                   for s in range(0, flat.shape[0], step)], dim=1)
                for j, m in enumerate(member_ids):
                    logp, ce_s = next_token_logprobs(splice(x_hat[m]), tb)
                    ce_member[j] += float(ce_s[scored].double().sum())
                    kl = F.kl_div(logp, logp_clean, log_target=True, reduction="none").sum(-1)
                    kl_member[j] += float(kl[scored].double().sum())
    finally:
        if was_training and hasattr(model, "train"):
            model.train()

    if n_pred == 0:
        raise _nothing_left(unscored, tokens, "no prediction is left to score")
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
