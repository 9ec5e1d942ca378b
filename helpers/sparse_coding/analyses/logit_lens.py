"""The logit lens of a direction: what it writes to the logits when read straight through the linear part of the
final norm and the unembedding: ((d − mean(d)) ⊙ γ) W_U under LayerNorm (its centring removes any component along
the all-ones vector, which the model's own final LayerNorm ignores too), (d ⊙ γ) W_U under RMSNorm (scale only, no
centring). The norm's division by the residual's scale is left out: it is one positive factor per position, the same
for every token's logit. Works for a TransformerBridge (the transformers model's own norm and head, nothing folded)
and a HookedTransformer, also with the norm's scale folded into W_U ("LNPre"/"RMSPre": γ = 1 then) and a centred
unembedding (which shifts every logit by one constant). Raw logit lens is dominated by tokens the model rarely saw
(their unembedding rows barely trained), so `top_tokens` can leave out tokens rarer than a count in the corpus."""

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
    """[d_vocab] logits the direction [d_model] writes through the final norm's linear part and the unembedding:
    ((direction − its mean) ⊙ γ) @ W_U under LayerNorm, (direction ⊙ γ) @ W_U under RMSNorm (`centred_norm`). Raises
    ValueError when the direction is not d_model wide (a dictionary trained on another site needs that site's path to
    the logits) or not finite."""
    check_tensor(direction, "direction", 1, finite=True, shape_hint="[d_model]")
    return _lens(model, direction[None], "direction")[0]


def _lens(model: torch.nn.Module, directions: torch.Tensor, name: str) -> torch.Tensor:
    """[n, d_vocab] in W_U's dtype and device: the lens of directions [n, d_model] (checked by the caller)."""
    gamma, W_U = unembedding(model)
    if directions.shape[1] != W_U.shape[0]:
        raise ValueError(f"{name} has width {directions.shape[1]} but the model's residual stream is "
                         f"{W_U.shape[0]} wide: the logit lens reads residual-stream directions only")
    d = directions.to(W_U)
    if centred_norm(model):
        d = d - d.mean(1, keepdim=True)
    return (d * gamma.to(W_U)) @ W_U


@checked
@torch.no_grad()
def logit_lens_matrix(model: torch.nn.Module, directions: torch.Tensor, token_counts: torch.Tensor | None = None,
                      min_count: int = 0) -> torch.Tensor:
    """[n, d_vocab] float32 on the CPU: `logit_lens` of every row of directions [n, d_model] (a dictionary's W_dec),
    with the columns of tokens seen fewer than `min_count` times in `token_counts` [d_vocab] set to 0, so that rare
    tokens (barely trained unembedding rows) head no list (as `top_tokens`). Raises ValueError for another width."""
    check_tensor(directions, "directions", 2, finite=True, shape_hint="[n, d_model]")
    out = _lens(model, directions, "directions").float().cpu()
    if token_counts is not None and min_count > 0:
        counts = torch.zeros(out.shape[1], dtype=torch.long)
        c = torch.as_tensor(token_counts).long().cpu()[: out.shape[1]]
        counts[: len(c)] = c
        out[:, counts < min_count] = 0.0
    return out


def centred_norm(model) -> bool:
    """True when the model's final norm is a LayerNorm (centres its input), False for RMSNorm or none: from the final
    norm's own class (a bridge's transformers module, e.g. GPT-NeoX's LayerNorm or LlamaRMSNorm; a HookedTransformer's
    LayerNorm/LayerNormPre/RMSNorm/RMSNormPre), else TransformerLens's ``cfg.normalization_type`` ("LN"/"LNPre" vs
    "RMS"/"RMSPre"/None)."""
    ln = getattr(model, "ln_final", None)
    inner = getattr(ln, "original_component", None)
    name = type(ln if inner is None else inner).__name__ if ln is not None else ""
    if "RMS" in name or "LayerNorm" in name:  # the module that runs decides, whatever a config says
        return "RMS" not in name
    return str(getattr(getattr(model, "cfg", None), "normalization_type", None) or "").startswith("LN")


@checked
def top_tokens(logits: torch.Tensor, k: int = 10, token_counts: torch.Tensor | None = None, min_count: int = 0
               ) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(the k tokens the logits promote most, the k they suppress most) as [(token id, logit)], leaving out tokens
    seen fewer than `min_count` times in `token_counts` [d_vocab] (e.g. torch.bincount of the corpus). Raises
    ValueError unless logits is one direction's [d_vocab] (a `logit_lens_matrix` is ranked row by row) without NaN."""
    check_int(k, "k", 1)
    # 2-D logits would be indexed as rows by the token ids below (an IndexError from torch, or wrong ids)
    check_tensor(logits, "logits", 1, floating=False,
                 shape_hint="[d_vocab] (one direction's logit_lens; for a logit_lens_matrix pass one row, m[i])")
    logits = logits.detach().float().cpu()
    if bool(torch.isnan(logits).any()):  # topk ranks NaN above every number: it would head the promoted list
        raise ValueError(f"logits contains {int(torch.isnan(logits).sum())} NaN values; the direction or the "
                         f"unembedding is not finite: check what produced them")
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
