"""Run a model up to the hooks asked for and return their activations: the lean GPT-NeoX forward where it applies,
else the model's own hook points. Harvesting and feature mining read activations through here."""

from __future__ import annotations

from typing import Sequence

import torch

from ..arguments import checked
from .fast_forward import NeoXFastPath
from .hooks import check_hooks, check_token_ids, hook_layer, hook_point, n_layers


class _StopForward(Exception):
    """Raised by the last needed hook: nothing after it is computed."""


@checked
class HookReader:
    """tokens [B, T] -> {hook: activation [B, T, ...]} through the model's own hook points, any model, any hook:
    forward hooks copy each activation as it is produced and the last needed one stops the pass (``stop_at_layer``
    semantics without the cache machinery)."""

    def __init__(self, model: torch.nn.Module, hooks: Sequence[str]):
        self.model = model
        self.hooks = check_hooks(model, list(hooks))
        self.points = {h: hook_point(model, h) for h in self.hooks}
        layers = [hook_layer(h) for h in self.hooks]
        # Hooks outside the blocks (embed, ln_final, unembed) need the full pass; otherwise stop after the last block.
        self.stop_at = None if any(l is None for l in layers) else max(layers) + 1
        if self.stop_at is not None and self.stop_at >= n_layers(model):
            self.stop_at = None
        self.out: dict[str, torch.Tensor] = {}
        self._remaining: set[str] = set()

    def _make_hook(self, name: str):
        def fn(module, args, output):
            if name in self._remaining:
                self.out[name] = output.detach()
                self._remaining.discard(name)
                if not self._remaining:
                    raise _StopForward
        return fn

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens = check_token_ids(tokens, getattr(getattr(self.model, "cfg", None), "d_vocab", None))
        self.out, self._remaining = {}, set(self.hooks)
        handles = [self.points[h].register_forward_hook(self._make_hook(h)) for h in self.hooks]
        try:
            kw = {"stop_at_layer": self.stop_at} if self.stop_at is not None else {}
            self.model(tokens, **kw)
        except _StopForward:
            pass
        finally:
            for hd in handles:
                hd.remove()
        if self._remaining:
            raise RuntimeError(f"hooks {sorted(self._remaining)} never fired during the forward pass")
        return self.out


@checked
def hook_reader(model: torch.nn.Module, hooks: Sequence[str], fast: bool = True):
    """A callable tokens [B, T] -> {hook: activation [B, T, d]} with a `.hooks` list: `NeoXFastPath` for
    block-level hooks of a GPT-NeoX model loaded with `load_model` (fast=True), else `HookReader`. Both give the
    bridge's values. Raises ValueError naming the valid hooks for a hook the model does not have."""
    reader = HookReader(model, hooks)  # validates the names
    if fast and NeoXFastPath.applies(model, reader.hooks):
        return NeoXFastPath(model, reader.hooks)
    return reader
