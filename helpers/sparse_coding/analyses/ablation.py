"""What a feature does to the model: remove it at the hook, or move or clamp it, and measure the next-token
log-probabilities; which input tokens cause it (each one replaced by neutral tokens drawn from the corpus'
unigram distribution); and the loss when only part of the dictionary is kept.

All edits act on the activation x at the hook and leave the rest of it — the SAE's error term x − x̂ included —
untouched (Cunningham et al. 2023, arXiv 2309.08600, Section 5):
- "zero": x − cᵢ·dᵢ at every position where feature i fires (cᵢ its activation, dᵢ its decoder row);
- "rank_one" (the paper's less-than-rank-one ablation): x − t·dᵢ/‖dᵢ‖ with the smallest t ≥ 0 that turns the
  feature off (found by bisection), so the rest of the code moves as little as possible;
- "clamp": x + (v − cᵢ)·dᵢ, setting the feature's activation to v (e.g. a multiple of its max: steering).
The SAE encodes in eval mode and is given back in the train/eval mode it came in with."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from ..arguments import checked
from ..activations import Exclusion
from ..checks import check_choice, check_int, check_number
from .features import sae_encoder
from .reconstruction import in_eval_mode
from .splicing import Splicer, check_tokens, model_device, next_token_logprobs


@dataclass
class AblationEffect:
    """The effect of editing one feature over some contexts.

    logprob_change [d_vocab]: mean over the edited positions of log p_edited(token) − log p_clean(token) for every
    output token (nats); loss_clean / loss_edited: mean next-token cross-entropy over all predictions (nats)."""

    latent: int
    mode: str
    logprob_change: torch.Tensor
    loss_clean: float
    loss_edited: float
    n_positions: int

    def top_drops(self, k: int = 10) -> list[tuple[int, float]]:
        """The k output tokens whose log-probability falls most: [(token id, change)]."""
        v, i = self.logprob_change.topk(k, largest=False)
        return list(zip(i.tolist(), v.tolist()))

    def top_gains(self, k: int = 10) -> list[tuple[int, float]]:
        v, i = self.logprob_change.topk(k)
        return list(zip(i.tolist(), v.tolist()))


def _rank_one_shift(encode, x: torch.Tensor, u: torch.Tensor, latent: int, iters: int = 40) -> torch.Tensor:
    """[P]: the smallest t >= 0 with encode(x − t·u)[latent] == 0, per row of x [P, d] (bisection after doubling;
    rows already off get 0). ValueError when no t up to 2^60 turns it off (the encoder does not read along u)."""
    off = lambda t: encode(x - t[:, None] * u)[:, latent] <= 0  # noqa: E731
    lo = torch.zeros(x.shape[0], dtype=x.dtype)
    hi = torch.ones_like(lo)
    done = off(lo)
    for _ in range(60):
        h = off(hi) | done
        if bool(h.all()):
            break
        hi = torch.where(h, hi, 2 * hi)
    if not bool((off(hi) | done).all()):
        raise ValueError(f"latent {latent} does not turn off when x moves against its decoder direction (its "
                         f"encoder does not read along it), so mode='rank_one' has no shift; use mode='zero'")
    for _ in range(iters):
        mid = (lo + hi) / 2
        m = off(mid)
        hi, lo = torch.where(m, mid, hi), torch.where(m, lo, mid)
    return torch.where(done, torch.zeros_like(hi), hi)


@checked
@in_eval_mode
def edit_activation(sae: Any, x: torch.Tensor, latent: int, mode: str = "zero", value: float | None = None,
                    member: int = 0, where: str = "firing") -> tuple[torch.Tensor, torch.Tensor]:
    """(edited x [rows, d], bool [rows] of the rows edited) for one feature (see the module docstring); `where`:
    "firing" rows only, or "all" rows (clamp only: steering everywhere)."""
    check_choice(mode, "mode", ("zero", "rank_one", "clamp"))
    check_choice(where, "where", ("firing", "all"))
    check_int(latent, "latent", 0, int(sae.d_sae) - 1, f" (the dictionary has d_sae={sae.d_sae} features)")
    encode = sae_encoder(sae, member)
    c = encode(x)[:, latent].to(x.dtype)
    d = sae.member_state(member)["W_dec"][latent].to(device=x.device, dtype=x.dtype)  # raw units
    rows = c > 0 if where == "firing" else torch.ones_like(c, dtype=torch.bool)
    if mode == "zero":
        return x - c[:, None] * d, rows
    if mode == "clamp":
        if value is None:
            raise ValueError("mode='clamp' needs value= (the activation to set, e.g. 2 × the feature's max)")
        v = check_number(value, "value")
        return x + torch.where(rows, v - c, torch.zeros_like(c))[:, None] * d, rows
    u = d / d.norm().clamp_min(1e-12)
    t = torch.zeros_like(c)
    if bool(rows.any()):
        t[rows] = _rank_one_shift(lambda z: encode(z).to(x.dtype), x[rows], u, latent)
    return x - t[:, None] * u, rows


@checked
@in_eval_mode
@torch.no_grad()
def feature_ablation(model: torch.nn.Module, sae: Any, hook: str, tokens: torch.Tensor, latent: int, *,
                     mode: str = "zero", value: float | None = None, member: int = 0, where: str = "firing",
                     batch_size: int | None = None, exclude: Exclusion | None = None) -> AblationEffect:
    """Edit the feature of index `latent` at `hook` in every context of tokens [n_contexts, T] and measure the change
    in next-token log-probabilities at the edited positions and in the loss. A feature that never fires there
    changes nothing (exactly: the edit is not applied anywhere). exclude: positions left out of the SAE's inputs
    (its cfg.json's): never edited, and the predictions made there are left out of the loss."""
    exclude = exclude or Exclusion()
    check_int(latent, "latent", 0, int(sae.d_sae) - 1, f" (the dictionary has {sae.d_sae} features)")
    tokens = check_tokens(model, tokens)
    batch_size = batch_size or max(1, 1024 // tokens.shape[1])  # the bridge's eager attention is [B, H, T, T]
    splicer = Splicer(model, hook, fast=False)
    device = model_device(model)
    total = None
    n_pos, ce_clean, ce_edit, n_pred = 0, 0.0, 0.0, 0
    for i in range(0, len(tokens), batch_size):
        tb = tokens[i:i + batch_size].to(device)
        logits, act = splicer.clean(tb)
        B, T, d = act.shape
        new, rows = edit_activation(sae, act.reshape(B * T, d), latent, mode, value, member, where)
        keep = exclude.keep(tb, act, hook)
        new = torch.where(keep.reshape(B * T, 1), new, act.reshape(B * T, d))
        rows = rows.reshape(B, T) & keep
        logp, ce = next_token_logprobs(logits, tb)
        scored = keep[:, :-1]
        ce_clean += float(ce[scored].double().sum())
        n_pred += int(scored.sum())
        if not bool(rows.any()):
            ce_edit += float(ce[scored].double().sum())  # nothing edited: the same predictions
            continue
        logp_e, ce_e = next_token_logprobs(splicer.patched(tb, new.reshape(B, T, d)), tb)
        ce_edit += float(ce_e[scored].double().sum())
        at = rows[:, :-1]  # the prediction made at an edited position
        diff = (logp_e - logp)[at].double().sum(0)
        total = diff if total is None else total + diff
        n_pos += int(at.sum())
    if n_pred == 0:
        raise ValueError(f"exclude={exclude} leaves no prediction to score in contexts of {tokens.shape[1]} tokens")
    vocab = int(logits.shape[-1])
    change = (total / n_pos).float() if total is not None and n_pos else torch.zeros(vocab)
    return AblationEffect(latent, mode, change.cpu(), ce_clean / n_pred, ce_edit / n_pred, n_pos)


def special_token_ids(model: Any) -> set[int]:
    """The ids a neutral replacement must never be: the tokenizer's special tokens (EOS, BOS, padding, ...); id 0
    (the offline model's EOS/BOS) when the model has no tokenizer."""
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return {0}
    ids = {int(i) for i in (getattr(tok, "all_special_ids", None) or [])}
    for attr in ("eos_token_id", "bos_token_id", "pad_token_id"):
        if getattr(tok, attr, None) is not None:
            ids.add(int(getattr(tok, attr)))
    return ids


def neutral_tokens(model: Any, distribution: torch.Tensor | None, originals: torch.Tensor, n_draws: int,
                   generator: torch.Generator) -> torch.Tensor:
    """[len(originals), n_draws] token ids drawn from `distribution` (weights over the vocabulary, e.g. the corpus'
    token counts; None: uniform over the tokenizer's tokens), never a special token (`special_token_ids`) and never
    the original token of that row. ValueError when no such token has weight."""
    d_vocab = int(model.cfg.d_vocab)
    if distribution is None:
        tok = getattr(model, "tokenizer", None)
        n = min(d_vocab, len(tok)) if tok is not None and hasattr(tok, "__len__") else d_vocab
        p = torch.zeros(d_vocab, dtype=torch.float64)
        p[:n] = 1.0
    else:
        w = distribution.detach().double().cpu().flatten()
        if len(w) > d_vocab or not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
            raise ValueError(f"distribution must hold {d_vocab} or fewer finite weights >= 0 (one per token id), "
                             f"got {len(w)}")
        p = torch.cat([w, w.new_zeros(d_vocab - len(w))])
    special = [i for i in special_token_ids(model) if i < d_vocab]
    p[special] = 0.0
    if float(p.sum()) <= 0:
        raise ValueError("distribution has no weight outside the special tokens: pass token counts of a corpus")
    orig = originals.cpu().long()
    draws = torch.multinomial(p, len(orig) * n_draws, replacement=True, generator=generator).view(len(orig), n_draws)
    for _ in range(100):  # a token replaced by itself would hide its effect: redraw those
        same = draws == orig[:, None]
        if not bool(same.any()):
            return draws
        draws[same] = torch.multinomial(p, int(same.sum()), replacement=True, generator=generator)
    raise ValueError("distribution puts (nearly) all its weight on the tokens being replaced: no neutral token")


@checked
@in_eval_mode
@torch.no_grad()
def token_ablation(model: torch.nn.Module, sae: Any, hook: str, context: torch.Tensor, position: int, latent: int, *,
                   member: int = 0, mode: str = "replace", distribution: torch.Tensor | None = None,
                   n_draws: int = 8, seed: int = 0, batch_size: int | None = None,
                   window: int | None = None) -> torch.Tensor:
    """[position + 1] float: how much the feature's activation at `position` of `context` [T] falls when each token
    0..position is replaced (mode="replace") or dropped (mode="drop": the later tokens shift left). Positive = that
    token helps cause the feature; units: the feature's activation. window: only the last `window` tokens up to
    `position` are edited (NaN before them), which bounds the cost at (window × n_draws) forward passes.

    "replace" puts a neutral token in: `n_draws` tokens drawn (seeded by `seed`) from `distribution` (weights over
    the vocabulary, e.g. the corpus' unigram counts; None: uniform), never a special token nor the token replaced,
    and the drop is averaged over the draws (resample ablation). An end-of-text token instead would insert a
    document boundary, and the feature falls for every earlier token replaced (Cunningham et al. 2023, arXiv
    2309.08600, Section 5, ablate input tokens one at a time). Tokens after `position` cannot reach it (the model
    is causal), so the context is cut there. ValueError for positions or latents out of range, bad distributions."""
    check_choice(mode, "mode", ("replace", "drop"))
    if isinstance(context, torch.Tensor) and context.ndim == 2 and context.shape[0] == 1:
        context = context[0]  # one context as a batch of one (tokens[i:i + 1])
    if not isinstance(context, torch.Tensor) or context.ndim != 1:
        got = tuple(context.shape) if isinstance(context, torch.Tensor) else type(context).__name__
        raise ValueError(f"context must be one context, a 1-D tensor of token ids [T], got shape {got}; pass "
                         f"tokens[i] for context i (contexts are never joined)")
    context = check_tokens(model, context[None])[0]
    T = context.shape[0]
    check_int(position, "position", 0, T - 1, f" (a position in the context of {T} tokens)")
    check_int(latent, "latent", 0, int(sae.d_sae) - 1, f" (the dictionary has {sae.d_sae} features)")
    check_int(n_draws, "n_draws", 1)
    if window is not None:
        check_int(window, "window", 1)
    ctx = context[:position + 1].cpu()
    L = len(ctx)
    lo = 0 if window is None else max(0, L - window)
    E = L - lo  # edited positions lo .. L-1
    draws = neutral_tokens(model, distribution, ctx, n_draws if mode == "replace" else 1,
                           torch.Generator().manual_seed(seed))[lo:]
    if mode == "replace":
        variants = ctx.repeat(E * n_draws, 1)
        variants[torch.arange(E * n_draws), torch.arange(lo, L).repeat_interleave(n_draws)] = draws.flatten()
        targets = torch.full((E * n_draws,), L - 1)
    else:  # dropped: the rest shifts left and a neutral token fills the end, where the target cannot see it
        variants = torch.stack([torch.cat([ctx[:i], ctx[i + 1:], draws[i - lo]]) for i in range(lo, L)])
        targets = torch.tensor([L - 2] * (E - 1) + [L - 1])
    batch = torch.cat([ctx[None], variants])
    targets = torch.cat([torch.tensor([L - 1]), targets])
    # Eager attention holds [rows, heads, L, L]: about 4M entries per head per forward.
    batch_size = batch_size or max(1, min(2 ** 22 // L ** 2, 2 ** 16 // L))
    splicer, device, encode = Splicer(model, hook, fast=False), model_device(model), sae_encoder(sae, member)
    a = []
    for i in range(0, len(batch), batch_size):
        act = splicer.activation(batch[i:i + batch_size].to(device))
        rows = act[torch.arange(act.shape[0]), targets[i:i + batch_size].to(act.device)]
        a.append(encode(rows)[:, latent].float().cpu())
    a = torch.cat(a)
    drop = torch.full((L,), math.nan)
    drop[lo:] = a[0] - a[1:].view(E, -1).mean(1)
    if mode == "drop":
        drop[position] = a[0]  # dropping the token itself removes the feature's position entirely
    return drop


@checked
@in_eval_mode
@torch.no_grad()
def loss_with_features(model: torch.nn.Module, sae: Any, hook: str, tokens: torch.Tensor,
                       keep: Mapping[str, Sequence[int]], *,
                       member: int = 0, batch_size: int | None = None,
                       exclude: Exclusion | None = None) -> dict[str, float]:
    """Mean next-token cross-entropy (nats) of the clean model ("clean"), with the whole reconstruction x̂ spliced in
    ("all", without the error term), and for each named feature set S with x̂_S + (x − x̂) = x − Σ_{i∉S} cᵢ·dᵢ —
    the features in S plus the SAE's error term, i.e. every feature outside S ablated ("<name>"; every feature
    kept gives x itself, the clean loss; none kept gives the error term plus b_dec). exclude: positions left out of
    the SAE's inputs (its cfg.json's), kept clean and left out of the means, as in `splicing.spliced_loss`.
    ValueError for indices outside [0, d_sae) and for a set named "clean" or "all"."""
    exclude = exclude or Exclusion()
    tokens = check_tokens(model, tokens)
    batch_size = batch_size or max(1, 1024 // tokens.shape[1])
    splicer = Splicer(model, hook)
    device = model_device(model)
    encode = sae_encoder(sae, member)
    masks = {}
    for name, feats in keep.items():
        if name in ("clean", "all"):
            raise ValueError(f"feature set name {name!r} is taken by the clean / whole-reconstruction loss: rename it")
        m = torch.zeros(int(sae.d_sae), dtype=torch.bool)
        idx = torch.as_tensor(list(feats), dtype=torch.long)
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= sae.d_sae):
            raise ValueError(f"feature set {name!r} has indices outside [0, {sae.d_sae})")
        m[idx] = True
        masks[name] = m
    sums = {"clean": 0.0, "all": 0.0, **{n: 0.0 for n in masks}}
    n_pred = 0
    state = sae.member_state(member)  # raw units
    W, b = state["W_dec"], state["b_dec"]
    for i in range(0, len(tokens), batch_size):
        tb = tokens[i:i + batch_size].to(device)
        logits, act = splicer.clean(tb)
        B, T, d = act.shape
        x = act.reshape(B * T, d)
        codes = encode(x)
        x_hat = (codes @ W + b).to(x.dtype)
        kept = exclude.keep(tb, act, hook)
        keep = kept.reshape(B * T, 1)
        scored = kept[:, :-1]

        def loss(new: torch.Tensor) -> float:
            new = torch.where(keep, new, x).reshape(B, T, d)
            return float(next_token_logprobs(splicer.patched(tb, new), tb)[1][scored].double().sum())

        _, ce = next_token_logprobs(logits, tb)
        sums["clean"] += float(ce[scored].double().sum())
        n_pred += int(scored.sum())
        if not bool(scored.any()):
            continue  # nothing to score in this batch: the spliced passes would add 0
        sums["all"] += loss(x_hat)
        for name, m in masks.items():
            removed = (codes * (~m).to(codes.dtype).to(codes.device)) @ W
            sums[name] += loss(x - removed.to(x.dtype))
    if n_pred == 0:
        raise ValueError(f"exclude={exclude} leaves no prediction to score in these {tuple(tokens.shape)} contexts "
                         f"(every position is excluded, e.g. by its max_norm); exclude fewer positions or pass "
                         f"longer contexts")
    return {k: v / n_pred for k, v in sums.items()}
