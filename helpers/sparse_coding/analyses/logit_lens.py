"""The logit lens of a direction: what it writes to the logits when read straight through the final norm and the
unembedding: (d ⊙ γ) W_U under RMSNorm (scale only), ((d − mean(d)) ⊙ γ) W_U under LayerNorm (its centring
removes any component along the all-ones vector, as the model's own final LayerNorm does). Raw logit lens is dominated by tokens the model rarely saw (their
unembedding rows barely trained), so `top_tokens` can leave out tokens rarer than a count in the corpus."""

from __future__ import annotations

import torch

from ..arguments import checked
from ..checks import check_int, check_tensor


@checked
def unembedding(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(γ [d_model], W_U [d_model, d_vocab]) of a TransformerLens model (TransformerBridge or HookedTransformer): the
    final layer norm's scale (ones when the model has none, e.g. folded into W_U) and the unembedding."""
    ln = getattr(model, "ln_final", None)
    gamma = getattr(ln, "w", None) if ln is not None else None
    if gamma is None and ln is not None:
        gamma = getattr(ln, "weight", None)
    W_U = model.W_U.detach()
    if gamma is None:
        gamma = torch.ones(W_U.shape[0], dtype=W_U.dtype, device=W_U.device)
    return gamma.detach(), W_U


@checked
@torch.no_grad()
def logit_lens(model: torch.nn.Module, direction: torch.Tensor) -> torch.Tensor:
    """[d_vocab] logits the direction [d_model] writes: (direction ⊙ γ) @ W_U. Raises ValueError when the direction is
    not d_model wide (a dictionary trained on another site needs that site's path to the logits)."""
    gamma, W_U = unembedding(model)
    check_tensor(direction, "direction", 1, finite=True, shape_hint="[d_model]")
    if direction.shape[0] != W_U.shape[0]:
        raise ValueError(f"direction has width {direction.shape[0]} but the model's residual stream is "
                         f"{W_U.shape[0]} wide: the logit lens reads residual-stream directions only")
    d = direction.to(W_U)
    if centred_norm(model):
        d = d - d.mean()
    return (d * gamma.to(W_U)) @ W_U


def centred_norm(model) -> bool:
    """True when the model's final norm is a LayerNorm (centres its input), False for RMSNorm or none, from
    TransformerLens's ``cfg.normalization_type`` ("LN"/"LNPre" vs "RMS"/"RMSPre"/None)."""
    return str(getattr(getattr(model, "cfg", None), "normalization_type", None) or "").startswith("LN")


@checked
def top_tokens(logits: torch.Tensor, k: int = 10, token_counts: torch.Tensor | None = None, min_count: int = 0
               ) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(the k tokens the logits promote most, the k they suppress most) as [(token id, logit)], leaving out tokens
    seen fewer than `min_count` times in `token_counts` [d_vocab] (e.g. torch.bincount of the corpus)."""
    check_int(k, "k", 1)
    logits = logits.detach().float().cpu()
    keep = torch.ones_like(logits, dtype=torch.bool)
    if token_counts is not None and min_count > 0:
        counts = torch.as_tensor(token_counts)
        keep[: len(counts)] &= counts[: len(logits)] >= min_count
        keep[len(counts):] = False
    idx = keep.nonzero().squeeze(1)
    vals = logits[idx]
    k = min(k, len(idx))
    up, down = vals.topk(k), vals.topk(k, largest=False)
    return ([(int(idx[i]), float(v)) for v, i in zip(up.values, up.indices)],
            [(int(idx[i]), float(v)) for v, i in zip(down.values, down.indices)])
