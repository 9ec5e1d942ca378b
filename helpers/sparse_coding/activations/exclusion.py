"""Rows left out of a dictionary's inputs: the first position and special tokens of models whose first position
carries massive activations (Sun et al. 2024, arXiv 2402.17762: a few dimensions 10-1000x the others), and, in those
models, any other row whose norm at the hook is over `NORM_RATIO` x the median (massive activations also sit at the
first delimiter tokens past position 0, where a position rule cannot see them; notebook 02 records how many rows
each layer leaves out, `massive_rows_excluded`).

They stay in the model's forward pass (they are context for every later token) but never reach an SAE's inputs,
input scale or metrics, as SAELens (`exclude_special_tokens`) and sparsify do. A harvest records its exclusion in
the manifest, with the norm limit it measured at each hook; the store, the spliced loss, feature ablation and
mining read it from there or from a dictionary's cfg.json and apply the limit to the activation at the hook."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

from ..arguments import checked


# First-position median norm over the other positions' above which a model counts as having massive activations
# (Sun et al. report 100-1000x); notebook 02 records each layer's ratio as first_position_norm_ratio.
MASSIVE_RATIO = 5.0
# In such a model, a row whose norm at the hook is over NORM_RATIO x the median of the kept rows' is left out too.
NORM_RATIO = 10.0
_KEYS = {"positions", "token_ids", "norm_ratio", "max_norm"}


@checked
@dataclass(frozen=True)
class Exclusion:
    """positions: context positions left out (e.g. (0,)); token_ids: token ids left out wherever they stand;
    norm_ratio: rows over this many times the median norm at their hook are left out too (a harvest measures the
    limit at each hook it writes); max_norm: ((hook, limit), ...) those measured limits, in the activation's units."""

    positions: tuple[int, ...] = ()
    token_ids: tuple[int, ...] = ()
    norm_ratio: float | None = None
    max_norm: tuple[tuple[str, float], ...] = ()

    def __post_init__(self):
        # The same rules as from_json, and the same normal form (sorted tuples without repeats): an exclusion built
        # here and one read back from a manifest compare equal, and a store written with it can be opened.
        def ids(name: str) -> tuple[int, ...]:
            v = getattr(self, name)
            if isinstance(v, (str, bytes)) or not all(isinstance(x, numbers.Integral) and not isinstance(x, bool)
                                                      and x >= 0 for x in v):
                raise ValueError(f"Exclusion {name} must be ints >= 0, got {v!r}")
            return tuple(sorted({int(x) for x in v}))

        ratio = self.norm_ratio
        if ratio is not None and not (isinstance(ratio, numbers.Real) and not isinstance(ratio, bool)
                                      and math.isfinite(ratio) and ratio > 1):
            raise ValueError(f"Exclusion norm_ratio must be a number over 1 or None, got {ratio!r}")
        limits = dict(self.max_norm)
        if not all(isinstance(h, str) and isinstance(v, numbers.Real) and not isinstance(v, bool)
                   and math.isfinite(v) and v > 0 for h, v in limits.items()):
            raise ValueError(f"Exclusion max_norm must be (hook name, positive norm) pairs, got {self.max_norm!r}")
        for name, value in (("positions", ids("positions")), ("token_ids", ids("token_ids")),
                            ("norm_ratio", None if ratio is None else float(ratio)),
                            ("max_norm", tuple(sorted((h, float(v)) for h, v in limits.items())))):
            object.__setattr__(self, name, value)

    def __bool__(self) -> bool:
        return bool(self.positions or self.token_ids or self.norm_ratio or self.max_norm)

    def to_json(self) -> dict | None:
        if not self:
            return None
        out: dict[str, Any] = {"positions": list(self.positions), "token_ids": list(self.token_ids)}
        if self.norm_ratio is not None:
            out["norm_ratio"] = self.norm_ratio
        if self.max_norm:
            out["max_norm"] = dict(self.max_norm)
        return out

    @classmethod
    def from_json(cls, obj: Any) -> "Exclusion":
        """From a manifest's or cfg.json's ``exclude`` field (None or {"positions": [...], "token_ids": [...],
        optionally "norm_ratio": r, "max_norm": {hook: limit}}). Raises ValueError naming the field otherwise."""
        if obj is None:
            return cls()
        if not isinstance(obj, dict) or not set(obj) <= _KEYS:
            raise ValueError(f"field 'exclude' must be null or {{'positions': [...], 'token_ids': [...], "
                             f"'norm_ratio': r, 'max_norm': {{hook: limit}}}}, got {obj!r}")
        vals = {k: tuple(int(v) for v in obj.get(k, ())) for k in ("positions", "token_ids")}
        if any(v < 0 for v in vals["positions"] + vals["token_ids"]):
            raise ValueError(f"field 'exclude' holds a negative position or token id: {obj!r}")
        ratio = obj.get("norm_ratio")
        if ratio is not None and not (isinstance(ratio, (int, float)) and not isinstance(ratio, bool)
                                      and math.isfinite(ratio) and ratio > 1):
            raise ValueError(f"field 'exclude.norm_ratio' must be a number over 1 or null, got {ratio!r}")
        limits = obj.get("max_norm") or {}
        if not isinstance(limits, dict) or not all(
                isinstance(h, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                and v > 0 for h, v in limits.items()):
            raise ValueError(f"field 'exclude.max_norm' must map hook names to positive norms, got {limits!r}")
        return cls(tuple(sorted(set(vals["positions"]))), tuple(sorted(set(vals["token_ids"]))),
                   None if ratio is None else float(ratio),
                   tuple(sorted((h, float(v)) for h, v in limits.items())))

    def limit(self, hook: str | None) -> float | None:
        """The norm limit measured at `hook`, or None (no norm rule there)."""
        return dict(self.max_norm).get(hook) if hook is not None else None

    def with_limits(self, limits: dict[str, float]) -> "Exclusion":
        """A copy whose max_norm also holds `limits` ({hook: limit}; these win over earlier ones)."""
        return replace(self, max_norm=tuple(sorted({**dict(self.max_norm), **limits}.items())))

    def for_hook(self, hook: str) -> "Exclusion":
        """A copy with only `hook`'s limit: what one hook's manifest and its dictionaries record."""
        lim = self.limit(hook)
        return replace(self, max_norm=() if lim is None else ((hook, lim),))

    @classmethod
    def merged(cls, exclusions: "list[Exclusion]") -> "Exclusion":
        """One exclusion for readers of several hooks (e.g. mining at every layer): the stores' limits together.
        Raises ValueError when they leave out different positions or tokens."""
        exclusions = list(exclusions)
        if not exclusions:
            return cls()
        first = exclusions[0]
        for e in exclusions[1:]:
            if (e.positions, e.token_ids, e.norm_ratio) != (first.positions, first.token_ids, first.norm_ratio):
                raise ValueError(f"the stores leave out different rows ({first.to_json()} vs {e.to_json()}); "
                                 f"harvest them with the same exclude")
        limits: dict[str, float] = {}
        for e in exclusions:
            limits.update(dict(e.max_norm))
        return first.with_limits(limits)

    def same_as(self, other: "Exclusion", rel: float = 1e-3) -> bool:
        """Equal positions, token ids and ratio, and limits at the same hooks within `rel` (a limit is measured
        from a forward pass, whose last bits may differ between runs)."""
        a, b = dict(self.max_norm), dict(other.max_norm)
        return ((self.positions, self.token_ids, self.norm_ratio) == (other.positions, other.token_ids,
                                                                       other.norm_ratio)
                and set(a) == set(b) and all(abs(a[h] - b[h]) <= rel * max(a[h], b[h]) for h in a))

    def keep(self, tokens: torch.Tensor, acts: torch.Tensor | None = None, hook: str | None = None) -> torch.Tensor:
        """Bool mask [n_contexts, ctx_len] of the positions kept, for token contexts [n_contexts, ctx_len] and, where
        this exclusion has a norm limit at `hook`, the activations there ([n_contexts, ctx_len, ...]). Raises
        ValueError when `hook` has a limit but `acts` is not given."""
        keep = torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device)
        for p in self.positions:
            if p < tokens.shape[-1]:
                keep[..., p] = False
        if self.token_ids:
            keep &= ~torch.isin(tokens, torch.tensor(self.token_ids, device=tokens.device))
        lim = self.limit(hook)
        if lim is not None:
            if acts is None:
                raise ValueError(f"the exclusion leaves out rows over norm {lim:.4g} at {hook!r}: pass the "
                                 f"activations there as acts")
            norms = acts.detach().reshape(*tokens.shape, -1).float().norm(dim=-1).to(keep.device)
            keep &= norms <= lim
        return keep


@checked
def special_token_ids(tokenizer: Any) -> tuple[int, ...]:
    """The tokenizer's special token ids (BOS, EOS, padding, ...), sorted."""
    ids = getattr(tokenizer, "all_special_ids", None) or []
    return tuple(sorted({int(i) for i in ids if i is not None}))


@checked
@torch.inference_mode()
def first_position_ratio(read: Callable[[torch.Tensor], dict], tokens: torch.Tensor) -> dict[str, float]:
    """{hook: median norm at position 0 / median norm at the other positions} over token contexts [n, ctx_len]
    read through `read` (tokens -> {hook: activations [n, ctx_len, d]})."""
    out = {}
    for hook, acts in read(tokens).items():
        norms = acts.float().norm(dim=-1)
        out[hook] = float(norms[:, 0].median() / norms[:, 1:].median().clamp_min(1e-12))
    return out


@checked
def detect_exclusion(read: Callable[[torch.Tensor], dict], tokens: torch.Tensor, tokenizer: Any,
                     norm_ratio: float = MASSIVE_RATIO) -> Exclusion:
    """Position 0, the special tokens and rows over `NORM_RATIO` x the median norm when any hook's first-position
    median norm is over `norm_ratio` times the others' (massive activations), else nothing. tokens: a few contexts
    [n, ctx_len] (8 are enough)."""
    ratios = first_position_ratio(read, tokens)
    if max(ratios.values()) <= norm_ratio:
        return Exclusion()
    return Exclusion((0,), special_token_ids(tokenizer), NORM_RATIO)


@checked
@torch.inference_mode()
def norm_limits(read: Callable[[torch.Tensor], dict], tokens: torch.Tensor, exclusion: Exclusion) -> dict[str, float]:
    """{hook: exclusion.norm_ratio x the median norm of the positions the exclusion keeps by position and token}
    over token contexts [n, ctx_len] read through `read`; {} when the exclusion has no norm_ratio. The median of
    8 contexts' 2,000 rows is the store's within a few percent; massive rows are 30-1000x it."""
    if not exclusion.norm_ratio:
        return {}
    keep = exclusion.keep(tokens)
    out = {}
    for hook, acts in read(tokens).items():
        norms = acts.float().reshape(*tokens.shape, -1).norm(dim=-1)[keep.to(acts.device)]
        out[hook] = float(f"{exclusion.norm_ratio * float(norms.median()):.6g}")
    return out


def resolve_exclusion(exclude: Any, read: Callable[[torch.Tensor], dict], tokens: torch.Tensor,
                      tokenizer: Any) -> Exclusion:
    """A harvest's `exclude` argument as an Exclusion: "auto" (detect massive first-position activations on the
    first 8 contexts), None/False (nothing), True (position 0, the special tokens, rows over NORM_RATIO x the median
    norm), an Exclusion, or its JSON form. Limits at hooks are measured by the harvest (`norm_limits`). Raises ValueError naming `exclude` otherwise."""
    if exclude is None or exclude is False:
        return Exclusion()
    if isinstance(exclude, Exclusion):
        return exclude
    if exclude is True:
        return Exclusion((0,), special_token_ids(tokenizer), NORM_RATIO)
    if isinstance(exclude, str):
        if exclude != "auto":
            raise ValueError(f"exclude must be 'auto', True, False/None, or {{'positions': [...], 'token_ids': "
                             f"[...], 'norm_ratio': r}}, got {exclude!r}")
        return detect_exclusion(read, tokens[:8], tokenizer)
    if isinstance(exclude, dict):
        return Exclusion.from_json(exclude)
    raise ValueError(f"exclude must be 'auto', True, False/None, an Exclusion or its dict, got "
                     f"{type(exclude).__name__}")


@checked
def exclusion_of(manifest_or_cfg: dict) -> Exclusion:
    """The exclusion a manifest (``exclude``) or a dictionary cfg.json (``metadata.exclude``) records."""
    if "exclude" in manifest_or_cfg:
        return Exclusion.from_json(manifest_or_cfg["exclude"])
    return Exclusion.from_json((manifest_or_cfg.get("metadata") or {}).get("exclude"))


def kept_rows(tokens: torch.Tensor, ctx_len: int, exclusion: Exclusion, hook: str | None = None,
              norms: torch.Tensor | None = None) -> tuple[torch.Tensor | None, int]:
    """(LongTensor of the row numbers kept in a store whose rows are whole contexts of `ctx_len` (row r is position
    r % ctx_len), or None when nothing is excluded; the rows left out for their norm alone). norms [rows]: each
    row's norm, needed where the exclusion has a limit at `hook` (the store's)."""
    if not exclusion:
        return None, 0
    keep = exclusion.keep(tokens.reshape(-1, ctx_len)).reshape(-1)
    lim = exclusion.limit(hook)
    n_over = 0
    if lim is not None:
        if norms is None:
            raise ValueError(f"the exclusion has a norm limit at {hook!r}: pass the rows' norms")
        over = keep & (norms.reshape(-1) > lim)
        n_over = int(over.sum())
        keep &= ~over
    return keep.nonzero().squeeze(1), n_over
