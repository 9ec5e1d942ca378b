"""Token positions left out of a dictionary's inputs: the first position and special tokens of models whose first
position carries massive activations (Sun et al. 2024, arXiv 2402.17762: a few dimensions 10-1000x the others).

They stay in the model's forward pass (they are context for every later token) but never reach an SAE's inputs,
input scale or metrics, as SAELens (`exclude_special_tokens`) and sparsify do. A harvest records its exclusion in
the manifest; the store, the spliced loss and feature mining read it from there or from a dictionary's cfg.json."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

# First-position median norm over the other positions' above which a model counts as having massive activations
# (Sun et al. report 100-1000x); notebook 02 records each layer's ratio as first_position_norm_ratio.
MASSIVE_RATIO = 5.0


@dataclass(frozen=True)
class Exclusion:
    """positions: context positions left out (e.g. (0,)); token_ids: token ids left out wherever they stand."""

    positions: tuple[int, ...] = ()
    token_ids: tuple[int, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.positions or self.token_ids)

    def to_json(self) -> dict | None:
        return {"positions": list(self.positions), "token_ids": list(self.token_ids)} if self else None

    @classmethod
    def from_json(cls, obj: Any) -> "Exclusion":
        """From a manifest's or cfg.json's ``exclude`` field (None or {"positions": [...], "token_ids": [...]}).
        Raises ValueError naming the field for anything else."""
        if obj is None:
            return cls()
        if not isinstance(obj, dict) or not set(obj) <= {"positions", "token_ids"}:
            raise ValueError(f"field 'exclude' must be null or {{'positions': [...], 'token_ids': [...]}}, got {obj!r}")
        vals = {k: tuple(int(v) for v in obj.get(k, ())) for k in ("positions", "token_ids")}
        if any(v < 0 for v in vals["positions"] + vals["token_ids"]):
            raise ValueError(f"field 'exclude' holds a negative position or token id: {obj!r}")
        return cls(tuple(sorted(set(vals["positions"]))), tuple(sorted(set(vals["token_ids"]))))

    def keep(self, tokens: torch.Tensor) -> torch.Tensor:
        """Bool mask [n_contexts, ctx_len] of the positions kept, for token contexts [n_contexts, ctx_len]."""
        keep = torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device)
        for p in self.positions:
            if p < tokens.shape[-1]:
                keep[..., p] = False
        if self.token_ids:
            keep &= ~torch.isin(tokens, torch.tensor(self.token_ids, device=tokens.device))
        return keep


def special_token_ids(tokenizer: Any) -> tuple[int, ...]:
    """The tokenizer's special token ids (BOS, EOS, padding, ...), sorted."""
    ids = getattr(tokenizer, "all_special_ids", None) or []
    return tuple(sorted({int(i) for i in ids if i is not None}))


@torch.inference_mode()
def first_position_ratio(read: Callable[[torch.Tensor], dict], tokens: torch.Tensor) -> dict[str, float]:
    """{hook: median norm at position 0 / median norm at the other positions} over token contexts [n, ctx_len]
    read through `read` (tokens -> {hook: activations [n, ctx_len, d]})."""
    out = {}
    for hook, acts in read(tokens).items():
        norms = acts.float().norm(dim=-1)
        out[hook] = float(norms[:, 0].median() / norms[:, 1:].median().clamp_min(1e-12))
    return out


def detect_exclusion(read: Callable[[torch.Tensor], dict], tokens: torch.Tensor, tokenizer: Any,
                     ratio: float = MASSIVE_RATIO) -> Exclusion:
    """Position 0 and the special tokens when any hook's first-position median norm is over `ratio` times the
    others' (massive activations), else nothing. tokens: a few contexts [n, ctx_len] (8 are enough)."""
    ratios = first_position_ratio(read, tokens)
    if max(ratios.values()) <= ratio:
        return Exclusion()
    return Exclusion((0,), special_token_ids(tokenizer))


def resolve_exclusion(exclude: Any, read: Callable[[torch.Tensor], dict], tokens: torch.Tensor,
                      tokenizer: Any) -> Exclusion:
    """A harvest's `exclude` argument as an Exclusion: "auto" (detect massive first-position activations on the
    first 8 contexts), None/False (nothing), True (position 0 and the special tokens), an Exclusion, or its JSON
    form. Raises ValueError naming `exclude` otherwise."""
    if exclude is None or exclude is False:
        return Exclusion()
    if isinstance(exclude, Exclusion):
        return exclude
    if exclude is True:
        return Exclusion((0,), special_token_ids(tokenizer))
    if isinstance(exclude, str):
        if exclude != "auto":
            raise ValueError(f"exclude must be 'auto', True, False/None, or {{'positions': [...], 'token_ids': "
                             f"[...]}}, got {exclude!r}")
        return detect_exclusion(read, tokens[:8], tokenizer)
    if isinstance(exclude, dict):
        return Exclusion.from_json(exclude)
    raise ValueError(f"exclude must be 'auto', True, False/None, an Exclusion or its dict, got "
                     f"{type(exclude).__name__}")


def exclusion_of(manifest_or_cfg: dict) -> Exclusion:
    """The exclusion a manifest (``exclude``) or a dictionary cfg.json (``metadata.exclude``) records."""
    if "exclude" in manifest_or_cfg:
        return Exclusion.from_json(manifest_or_cfg["exclude"])
    return Exclusion.from_json((manifest_or_cfg.get("metadata") or {}).get("exclude"))


def kept_rows(tokens: torch.Tensor, ctx_len: int, exclusion: Exclusion) -> torch.Tensor | None:
    """LongTensor of the row numbers kept in a store whose rows are whole contexts of `ctx_len` (row r is position
    r % ctx_len), or None when nothing is excluded."""
    if not exclusion:
        return None
    return exclusion.keep(tokens.reshape(-1, ctx_len)).reshape(-1).nonzero().squeeze(1)



def norm_outliers(store: Any, ratio: float = 10.0, rows_per_read: int = 65536) -> dict:
    """The kept rows of a store whose norm exceeds `ratio` x the median kept norm: massive activations that the
    exclusion did not catch (they can sit past position 0, e.g. after a run of repeated tokens at a context's
    start). {"median_norm", "max_norm", "n_rows", "share_of_sum_squares" (their share of Σ‖x‖², what an SAE's
    MSE and input scale are made of), "positions" ({position in context: count})}. Reads every kept row once."""
    norms = torch.cat([store.rows(range(i, min(i + rows_per_read, store.n_tokens))).norm(dim=1)
                       for i in range(0, store.n_tokens, rows_per_read)])
    median = float(norms.median())
    big = (norms > ratio * median).nonzero().squeeze(1)
    positions: dict[int, int] = {}
    for r in big.tolist():
        pos = store.context_of(r)[1]
        positions[pos] = positions.get(pos, 0) + 1
    sq = norms.double().pow(2)
    return {"median_norm": median, "max_norm": float(norms.max()), "n_rows": int(big.numel()),
            "share_of_sum_squares": float(sq[big].sum() / sq.sum()), "positions": dict(sorted(positions.items()))}
