"""Buffers an SAE keeps from training step to training step: on the CPU a large fresh tensor is mapped and unmapped
on every step and page-faults on its first write, which costs a visible share of a step at Pythia-70M width (the
[E, B, d_sae] pre-activations are 256 MiB at batch 4096 and 16384 latents)."""

from __future__ import annotations

import torch


class Workspaces:
    """Mixin for an `EnsembleSAE` kind: `_workspace(name, *shape)` in training mode, dropped by eval()."""

    def _workspace(self, name: str, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """In training, a buffer of this shape kept under `name` from step to step (its contents are whatever the
        last user left); None in eval mode, where nothing is kept."""
        if not self.training:
            return None
        dtype = dtype or self.dtype
        cache = self.__dict__.setdefault("_workspaces", {})
        buf = cache.get(name)
        if buf is None or buf.shape != shape or buf.dtype != dtype or buf.device != self.device:
            cache.pop(name, None)  # free the old one first
            buf = cache[name] = torch.empty(*shape, device=self.device, dtype=dtype)
        return buf

    def train(self, mode: bool = True):
        if not mode:
            self.__dict__.pop("_workspaces", None)
        return super().train(mode)
