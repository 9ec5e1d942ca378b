"""Hook names: TransformerLens's names for the places activations are read or patched.

One parser (`parse_hook`) and one validator (`check_hooks`) for the whole package. Names look like
``blocks.{L}.hook_resid_post``, ``blocks.{L}.mlp.hook_post``, ``hook_embed``, ``ln_final.hook_normalized``."""

from __future__ import annotations

import difflib
import re
import weakref
from typing import NamedTuple, Sequence

import torch

from ..arguments import checked


SITES = {
    "resid_pre": "hook_resid_pre", "resid_mid": "hook_resid_mid", "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out", "mlp_out": "hook_mlp_out", "mlp_pre": "mlp.hook_pre", "mlp_post": "mlp.hook_post",
}
_BLOCK_HOOK = re.compile(r"blocks\.(\d+)\.(.+)")

# Hooks a model fires, found once per model object (weak keys: a dropped model takes its entry with it).
_VALID: "weakref.WeakKeyDictionary[torch.nn.Module, list[str]]" = weakref.WeakKeyDictionary()


class HookName(NamedTuple):
    """A parsed hook name: the block index (None outside the blocks) and the site within it."""

    layer: int | None
    site: str


@checked
def parse_hook(name: str) -> HookName:
    """``"blocks.3.mlp.hook_post"`` -> HookName(3, "mlp.hook_post"); ``"hook_embed"`` -> HookName(None, "hook_embed")."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a hook name must be a non-empty string like 'blocks.0.hook_resid_post', got {name!r}")
    m = _BLOCK_HOOK.fullmatch(name)
    return HookName(int(m.group(1)), m.group(2)) if m else HookName(None, name)


@checked
def hook_name(kind: str, layer: int) -> str:
    """``hook_name("resid_post", 2) == "blocks.2.hook_resid_post"``; kinds: resid_pre/mid/post, attn_out, mlp_out,
    mlp_pre, mlp_post (the MLP's hidden activations after the nonlinearity)."""
    if kind not in SITES:
        raise ValueError(f"unknown hook kind {kind!r}; valid: {sorted(SITES)}")
    return f"blocks.{int(layer)}.{SITES[kind]}"  # layer: an int >= 0 (numpy's too), checked by @checked


@checked
def hook_layer(hook: str) -> int | None:
    """The block index a hook belongs to (``blocks.3.…`` -> 3), or None for embed / final-LN hooks."""
    return parse_hook(hook).layer


@checked
def n_layers(model: torch.nn.Module) -> int:
    return int(model.cfg.n_layers)


@checked
def valid_hooks(model: torch.nn.Module) -> list[str]:
    """Every hook name the model fires on a forward pass (canonical names and TransformerLens aliases), in order.

    Found by running one token through the model with everything cached: what is listed is exactly what a forward
    pass can deliver, whatever the architecture. Computed once per model object."""
    if model not in _VALID:
        dev = next(model.parameters()).device
        with torch.inference_mode():
            _, cache = model.run_with_cache(torch.zeros(1, 1, dtype=torch.long, device=dev))
        _VALID[model] = list(cache.keys())
    return list(_VALID[model])


@checked
def check_hooks(model: torch.nn.Module, hooks: str | Sequence[str]) -> list[str]:
    """``hooks`` as a list if the model fires them all; otherwise a ValueError naming the layer range, the closest
    spellings and the valid sites."""
    if isinstance(hooks, str):
        hooks = [hooks]
    hooks = list(hooks)
    if not hooks:
        raise ValueError("no hooks requested; e.g. hooks=['blocks.0.hook_resid_post']")
    L = n_layers(model)
    valid = valid_hooks(model)
    for h in hooks:
        layer = parse_hook(h).layer
        if layer is not None and layer >= L:
            raise ValueError(f"hook {h!r}: layer {layer} is out of range; this model has {L} layers "
                             f"(valid layers 0..{L - 1})")
        if h not in valid:
            near = difflib.get_close_matches(h, valid, n=4, cutoff=0.6)
            sites = sorted({parse_hook(v).site for v in valid if parse_hook(v).layer == 0})
            other = [v for v in valid if parse_hook(v).layer is None]
            raise ValueError(f"unknown hook {h!r}: not a hook of this model"
                             f"{' (closest: ' + ', '.join(near) + ')' if near else ''}. Valid: "
                             f"blocks.{{0..{L - 1}}}.<site> with <site> in {sites}; plus {other}")
    return hooks


@checked
def hook_point(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """The HookPoint module behind a hook name (aliases included: ``model.hook_dict`` lists them)."""
    check_hooks(model, [name])
    points = model.hook_dict
    if name not in points:
        raise ValueError(f"hook {name!r} fires but has no hook point in model.hook_dict; use run_with_hooks")
    return points[name]


# Relative depths of the default layers of a deep model: after 1/6, 2/6, 3/6 and 4/6 of its blocks, i.e. where
# Pythia-70M's (6 blocks) layers 0-3 stand; the original work found the most interpretable features early.
DEFAULT_DEPTHS = (1 / 6, 2 / 6, 3 / 6, 4 / 6)
MAX_ALL_LAYERS = 8


@checked
def depth_layer(model_or_n: "torch.nn.Module | int", depth: float) -> int:
    """The block whose output stands at relative `depth` in (0, 1] of a model's blocks (or of n blocks):
    ``round(depth * n) - 1``, at least 0. Pythia-70M's layer 2 (of 6) is depth 0.5: layer 14 of a 30-block model."""
    n = model_or_n if isinstance(model_or_n, int) else n_layers(model_or_n)
    if not 0 < depth <= 1:
        raise ValueError(f"depth must be in (0, 1], got {depth}")
    return max(0, round(depth * n) - 1)


@checked
def default_layers(model_or_n: "torch.nn.Module | int") -> list[int]:
    """Every layer of a model of at most 8 blocks; else the blocks at relative depths `DEFAULT_DEPTHS` (four
    layers: a deep model's every layer would not fit a CPU's time or disk)."""
    n = model_or_n if isinstance(model_or_n, int) else n_layers(model_or_n)
    if n <= MAX_ALL_LAYERS:
        return list(range(n))
    return sorted({depth_layer(n, f) for f in DEFAULT_DEPTHS})


@checked
def check_token_ids(tokens: torch.Tensor, d_vocab: int | None) -> torch.Tensor:
    """tokens [B, T] as int64, after checking they are integer token ids in [0, d_vocab) (d_vocab None: not
    checked); ValueError naming tokens and the fix. Every hook reader runs it on each batch: an id past the
    vocabulary would otherwise fail inside the embedding lookup ("index out of range in self")."""
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2 or tokens.dtype.is_floating_point \
            or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        got = f"{tokens.dtype} {tuple(tokens.shape)}" if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"tokens must be integer token ids [n_contexts, ctx_len], got {got}")
    if tokens.numel() and d_vocab is not None:
        lo, hi = (int(v) for v in torch.aminmax(tokens))
        if lo < 0 or hi >= d_vocab:
            raise ValueError(f"token ids must lie in [0, {d_vocab}) for this model, got range [{lo}, {hi}]; were "
                             f"they made by another tokenizer?")
    return tokens.long()

