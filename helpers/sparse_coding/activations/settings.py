"""One object for how activations are harvested: `HarvestSettings`, checked once when built, passed from a notebook
through `ensure_activations` to `harvest`, whose manifest records it (the fields that change what is on disk) and
compares it on resume. `harvest(model, tokens, hooks, n_tokens, ...)` keeps its keyword arguments as a way in."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ..arguments import checked
from ..checks import check_bool, check_dtype, check_int, check_seed
from .exclusion import Exclusion

_DTYPES = {"float32": torch.float32, "float16": torch.float16}


@checked
@dataclass(frozen=True)
class HarvestSettings:
    """How `harvest` runs. Units: tokens are rows (one per position of a context).

    n_tokens: rows to store per hook, rounded up to whole contexts.
    chunk_rows: rows per chunk file (rounded down to whole contexts); 131072 x d=128 x 4 B = 64 MB.
    batch_size: contexts per forward pass (with the lean CPU path, passes of at most `lm.CPUWorkers.ROWS_PER_CALL`
        rows run side by side).
    dtype: torch.float32 or torch.float16 on disk (the names "float32"/"float16" too); readers yield float32.
    ctx_len: tokens per context, needed only to cut a 1-D token stream.
    corpus, seed: provenance recorded in the manifest.
    fast: the lean GPT-NeoX forward where it applies (same values as the bridge's hooks, faster).
    exclude: rows left out of the dictionaries' inputs: "auto", True, False/None, an `Exclusion` or its dict
        (see `harvest` and `activations.exclusion`).

    Raises ValueError naming the field and what it must be, when built."""

    n_tokens: int
    chunk_rows: int = 131072
    batch_size: int = 32
    dtype: torch.dtype | str = torch.float32
    ctx_len: int | None = None
    corpus: str = ""
    seed: int = 0
    fast: bool = True
    exclude: str | bool | Exclusion | Mapping[str, Any] | None = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.dtype, str) and self.dtype.removeprefix("torch.") in _DTYPES:
            object.__setattr__(self, "dtype", _DTYPES[self.dtype.removeprefix("torch.")])
        check_dtype(self.dtype, "dtype", tuple(_DTYPES.values()))
        check_int(self.n_tokens, "n_tokens", 1, hint=" (rows to store per hook)")
        check_int(self.chunk_rows, "chunk_rows", 1)
        check_int(self.batch_size, "batch_size", 1, hint=" (contexts per forward pass)")
        if self.ctx_len is not None:
            check_int(self.ctx_len, "ctx_len", 1, hint=" (tokens per context) or None")
        if not isinstance(self.corpus, str):
            raise ValueError(f"corpus must be a string naming the text's source, got {type(self.corpus).__name__}")
        check_seed(self.seed)
        check_bool(self.fast, "fast")
        ex = self.exclude
        ok = ex is None or isinstance(ex, (bool, Exclusion, dict)) or ex == "auto"
        if not ok:
            raise ValueError(f"exclude must be 'auto', True, False/None, an Exclusion or its dict, got {ex!r}")
        if isinstance(ex, dict):
            Exclusion.from_json(ex)  # a malformed dict is refused here, naming the field

    @classmethod
    def build(cls, settings: "HarvestSettings | None" = None, **overrides: Any) -> "HarvestSettings":
        """`settings` with `overrides` applied, checked; without settings, `n_tokens` must be among the overrides.
        Raises ValueError naming an unknown field."""
        if settings is not None and not isinstance(settings, cls):
            raise ValueError(f"settings must be a HarvestSettings, got {type(settings).__name__}")
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown harvest setting(s) {unknown}; the fields are "
                             f"{sorted(f.name for f in dataclasses.fields(cls))}")
        if settings is None:
            if "n_tokens" not in overrides:
                raise ValueError("n_tokens is required: the rows to store per hook")
            return cls(**overrides)
        return dataclasses.replace(settings, **overrides)

    def to_json(self) -> dict[str, Any]:
        """Every field, JSON-ready (dtype by name, an Exclusion as its dict)."""
        out = dataclasses.asdict(self)
        out["dtype"] = str(self.dtype).removeprefix("torch.")
        if isinstance(self.exclude, Exclusion):
            out["exclude"] = self.exclude.to_json()
        return out
