"""What splicing a reconstruction costs downstream, the measurements of end-to-end SAEs (Braun et al. 2024,
arXiv 2405.12241): next-token CE loss increase (spliced − clean, nats per prediction) against L0 and the number of
alive latents, the KL to the clean output, and the MSE at the SAE's own hook and at every later layer, on held-out
contexts; the L0 and alive count each kind needs at one CE loss increase (interpolated on its frontier); and how
alike dictionaries are, by max cosine and by an exact 1:1 matching side by side."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..activations import Exclusion
from ..arguments import checked
from ..dictionaries.training.e2e import downstream_hooks, frozen, kl_clean_spliced
from .matching import hungarian_match
from .reconstruction import check_sae, encode_decode, member_indices
from .splicing import check_tokens, next_token_logprobs


def _hooked(model: torch.nn.Module, tokens: torch.Tensor, hook_name: str, later: Sequence[str],
            replacement: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(logits, {hook: activation}) of one pass, with the activation at `hook_name` replaced when given."""
    seen: dict[str, torch.Tensor] = {}

    def grab(name: str):
        def fn(act, hook):
            seen[name] = act.detach().clone()
        return fn

    def put(orig, hook):
        return replacement.to(dtype=orig.dtype, device=orig.device)

    first = [(hook_name, grab(hook_name) if replacement is None else put)]
    logits = model.run_with_hooks(tokens, return_type="logits", fwd_hooks=first + [(h, grab(h)) for h in later])
    return logits, seen


@checked
@torch.no_grad()
def downstream_loss(model: torch.nn.Module, tokens: torch.Tensor, hook_name: str, sae: Any, *,
                    members: Sequence[int] | None = None, input_scale: float = 1.0, batch_size: int = 8,
                    exclude: Exclusion | None = None, progress: bool = True) -> pd.DataFrame:
    """One row per member of `sae` on held-out contexts `tokens` [n_contexts, ctx_len] (integer ids), with every
    member's reconstruction spliced in at `hook_name` (positions `exclude` leaves out keep their clean activation
    and are left out of every number):

    ce_clean, ce_spliced, ce_increase = ce_spliced − ce_clean (nats per next-token prediction, float32 sums in
    float64), kl (KL(clean ‖ spliced), nats, mean over kept positions), l0 (mean active latents per kept
    position), alive (latents firing at least once on these contexts) and alive_frac, mse_at_hook (mean over kept
    positions of ‖x − x̂‖², the activation's units) and nmse_at_hook (that over the mean ‖x − mean x‖²), and per
    later layer L (`training.e2e.downstream_hooks`) `mse:<hook>` and `nmse:<hook>`, the same between the spliced
    and the clean activations there; n_predictions, n_positions.
    Raises ValueError for float tokens, an SAE of another width than the hook's, members out of range or an
    exclusion that leaves no prediction to score."""
    tokens = check_tokens(model, tokens)
    check_sae(sae)
    ids = member_indices(sae, members)
    later = downstream_hooks(model, hook_name)
    exclude = exclude or Exclusion()
    device = next(iter(model.parameters())).device
    hooks = [hook_name, *later]
    sums: dict[str, np.ndarray] = {k: np.zeros(len(ids)) for k in ("ce", "kl", "l0", *[f"mse:{h}" for h in hooks])}
    clean_sum = 0.0
    moments = {h: [0.0, None] for h in hooks}  # Σ‖a‖², Σa: the variance of the clean activations
    fired = torch.zeros(len(ids), int(sae.d_sae), dtype=torch.bool)
    n_pred = n_pos = 0
    with frozen(model):
        for start in tqdm(range(0, len(tokens), batch_size), desc="downstream loss", disable=not progress,
                          leave=False):
            tb = tokens[start:start + batch_size].to(device)
            logits, clean = _hooked(model, tb, hook_name, later)
            act = clean[hook_name]
            if act.shape[-1] != int(sae.d_in):
                raise ValueError(f"SAE expects width d_in={sae.d_in} but hook {hook_name!r} has width "
                                 f"{act.shape[-1]}: evaluate at the hook the SAE was trained on")
            keep = exclude.keep(tb, act, hook_name)
            scored = keep[:, :-1]
            logp_all = logits.float().log_softmax(-1)  # once: the clean CE and every member's KL read it
            ce = -logp_all[:, :-1].gather(-1, tb[:, 1:, None]).squeeze(-1)
            clean_sum += float(ce[scored].double().sum())
            n_pred, n_pos = n_pred + int(scored.sum()), n_pos + int(keep.sum())
            for h in hooks:
                a = clean[h][keep].double()
                moments[h][0] += float(a.pow(2).sum())
                moments[h][1] = a.sum(0) if moments[h][1] is None else moments[h][1] + a.sum(0)
            codes, x_hat = encode_decode(sae, act[keep], float(input_scale))
            for j, m in enumerate(ids):
                fired[j] |= (codes[m] != 0).any(0).cpu()
                sums["l0"][j] += float((codes[m] != 0).sum())
                sums[f"mse:{hook_name}"][j] += float((x_hat[m] - act[keep]).double().pow(2).sum())
                new = act.clone()
                new[keep] = x_hat[m].to(act.dtype)
                logits_s, spliced = _hooked(model, tb, hook_name, later, replacement=new)
                _, ce_s = next_token_logprobs(logits_s, tb)
                sums["ce"][j] += float(ce_s[scored].double().sum())
                kl = kl_clean_spliced(logp_all, logits_s.float().log_softmax(-1))
                sums["kl"][j] += float(kl[keep].double().sum())
                for h in later:
                    sums[f"mse:{h}"][j] += float((spliced[h] - clean[h])[keep].double().pow(2).sum())
    if n_pred == 0:  # every number below is a mean over the scored predictions (a ZeroDivisionError otherwise)
        raise ValueError(f"exclude leaves no next-token prediction to score in tokens {tuple(tokens.shape)} (kept "
                         f"positions: {n_pos}); pass longer contexts or exclude fewer positions / token ids")
    ce_clean = clean_sum / n_pred
    rows = []
    for j, m in enumerate(ids):
        row: dict[str, Any] = {"member": m, **{k: v for k, v in sae.hparams[m].items()}, "ce_clean": ce_clean,
                               "ce_spliced": sums["ce"][j] / n_pred, "kl": sums["kl"][j] / n_pos,
                               "l0": sums["l0"][j] / n_pos, "alive": int(fired[j].sum()),
                               "alive_frac": float(fired[j].double().mean())}
        row["ce_increase"] = row["ce_spliced"] - ce_clean
        for h in hooks:
            sq, total = moments[h]
            var = sq / n_pos - float(total.pow(2).sum()) / n_pos ** 2
            mse = sums[f"mse:{h}"][j] / n_pos
            name = "at_hook" if h == hook_name else f":{h}"
            row[f"mse{'_' if h == hook_name else ''}{name}"] = mse
            row[f"nmse{'_' if h == hook_name else ''}{name}"] = mse / var if var > 0 else math.nan
        rows.append({**row, "n_predictions": n_pred, "n_positions": n_pos})
    return pd.DataFrame(rows)


@checked
def matched_ce_increase(frontiers: Mapping[str, pd.DataFrame]) -> float:
    """One CE loss increase every frontier reaches: the geometric middle of the range of CE increases the
    frontiers share (each {kind: table with ce_increase}); NaN when they share none. Raises ValueError for no
    frontiers or a table without a ce_increase column."""
    if not frontiers:
        raise ValueError("frontiers is empty: pass {kind: table with a ce_increase column}, one table per kind")
    for kind, t in frontiers.items():
        _need_columns(t, ("ce_increase",), f"frontiers[{kind!r}]")
    lo = max(float(t["ce_increase"].min()) for t in frontiers.values())
    hi = min(float(t["ce_increase"].max()) for t in frontiers.values())
    if not (lo <= hi) or lo <= 0:
        return (lo + hi) / 2 if lo <= hi else math.nan
    return math.sqrt(lo * hi)


@checked
def at_ce_increase(table: pd.DataFrame, ce_increase: float, column: str = "l0") -> float:
    """`column` (l0, alive, ...) interpolated at a CE loss increase on one kind's frontier (rows with ce_increase
    and `column`): linear in log CE increase between the two nearest points; NaN outside the range measured (or
    when no row has both numbers). Rows where either is NaN (not measured) are left out. Raises ValueError when
    the table lacks one of the two columns."""
    _need_columns(table, ("ce_increase", column), "table")
    t = table[["ce_increase", column]].astype(float)
    # a NaN row would sort last and become the top of the range: every target would fall outside it
    t = t[np.isfinite(t["ce_increase"]) & np.isfinite(t[column])].sort_values("ce_increase")
    if not len(t):
        return math.nan
    x = np.log(np.clip(t["ce_increase"].to_numpy(float), 1e-12, None))
    y = t[column].to_numpy(float)
    target = math.log(max(ce_increase, 1e-12))
    if not (x[0] <= target <= x[-1]) or not math.isfinite(target):
        return math.nan
    return float(np.interp(target, x, y))


def _need_columns(table: pd.DataFrame, columns: Sequence[str], name: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(f"{name} has no column {', '.join(map(repr, missing))} (its columns: {list(table.columns)}); "
                         f"pass the table downstream_loss returns, one row per member")


@checked
def dictionary_similarity(A: torch.Tensor, B: torch.Tensor) -> dict[str, float]:
    """How alike two dictionaries' directions A [n_A, d] and B [n_B, d] are, two summaries side by side:
    "mmcs" (mean over A's directions of the max cosine to any of B's: several may share one best match) and
    "matched" (mean cosine of an exact 1:1 max-total-cosine matching, `hungarian_match`, which counts each of B's
    directions once); both in [-1, 1]."""
    from .similarity import mmcs

    return {"mmcs": float(mmcs(A, B)), "matched": float(hungarian_match(A, B).cos.mean())}
