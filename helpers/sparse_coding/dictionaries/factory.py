"""Build an ensemble SAE of any registered kind: `make_sae("topk", d_in=128, ratio=4, k=[8, 16, 32])`."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..arguments import checked
from ..checks import check_int, check_positive
from . import kinds  # noqa: F401  (importing the kinds registers them)
from .base import SAE_KINDS, EnsembleSAE


def broadcast(hparams: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-member dicts from scalars and lists: lists fix the member count, scalars repeat."""
    lengths = {name: len(v) for name, v in hparams.items() if isinstance(v, (list, tuple))}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"per-member lists must have one length (the number of members), got "
                         f"{', '.join(f'{k}: {n}' for k, n in lengths.items())}")
    n = next(iter(lengths.values()), 1)
    if n == 0:
        raise ValueError(f"per-member lists are empty ({', '.join(lengths)}): give at least one value")
    return [{name: (v[i] if isinstance(v, (list, tuple)) else v) for name, v in hparams.items()} for i in range(n)]


def resolve_hparams(cls: type[EnsembleSAE], d_in: int, given: dict[str, Any]) -> dict[str, Any]:
    """The kind's per-member hyperparameters: the required ones checked, a missing key or a None (also inside a
    list) filled with the kind's default for this width, unknown keys refused."""
    missing = [k for k in cls.required_hparams if k not in given]
    if missing:
        raise ValueError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} required for a {cls.kind} SAE "
                         f"(e.g. k=32 active latents per row)")
    out = dict(given)
    for key, default in cls.default_hparams(d_in).items():
        value = out.get(key)
        if value is None:
            out[key] = default
        elif isinstance(value, (list, tuple)):
            out[key] = [default if v is None else v for v in value]
    unknown = set(out) - set(cls.member_keys)
    if unknown:
        raise ValueError(f"unknown hyperparameters for kind {cls.kind!r}: {', '.join(sorted(unknown))}; "
                         f"per-member ones are {', '.join(cls.member_keys + ('seed',))}")
    return out


@checked
def make_sae(kind: str, d_in: int, d_sae: int | None = None, *, ratio: float | None = None,
             seed: int | Sequence[int] = 0, tied: bool = False, pre_bias: bool = True,
             device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
             **member_hparams: Any) -> EnsembleSAE:
    """An ensemble SAE of the given kind, one member per entry of the hyperparameter lists.

    Per-member hyperparameters (seed and the kind's own: relu l1_coef; topk k, aux_k, aux_coef; jumprelu l0_coef,
    bandwidth, init_threshold, threshold_lr_mult; batchtopk k, aux_k, aux_coef, threshold_lr) may be scalars or
    lists; lists fix the number of members and must agree in length, scalars repeat; each seed is an integer (NumPy's
    too) in [0, 2**63). Give the dictionary size as d_sae or as ratio (d_sae = round(ratio · d_in)). dead_window
    (any kind): tokens without firing before a latent counts as dead (AuxK and the dead-feature metric; None lets
    `train_sae` choose).
    Raises ValueError naming the argument for an unknown kind, a bad size or hyperparameter."""
    if kind not in SAE_KINDS:
        raise ValueError(f"unknown SAE kind {kind!r}; known kinds: {', '.join(sorted(SAE_KINDS))}")
    check_int(d_in, "d_in", 1, hint=" (the activation width)")
    if (d_sae is None) == (ratio is None):
        raise ValueError("give exactly one of d_sae (dictionary size) or ratio (d_sae / d_in)")
    if ratio is not None:
        d_sae = max(1, round(check_positive(ratio, "ratio", " (dictionary size / d_in)") * d_in))
    check_int(d_sae, "d_sae", 1, hint=" (the dictionary size)")
    dead_window = member_hparams.pop("dead_window", None)
    if dead_window is not None:
        check_int(dead_window, "dead_window", 1, hint=" (tokens)")
    cls = SAE_KINDS[kind]
    hparams = broadcast({**resolve_hparams(cls, d_in, member_hparams), "seed": seed})
    sae = cls(d_in, d_sae, hparams, tied=tied, pre_bias=pre_bias, device=device, dtype=dtype)
    sae.dead_window = dead_window
    return sae
