"""The layers above a residual-stream hook, run alone: a spliced forward pass that starts from the patched residual
instead of re-running the layers below the hook for every dictionary member and ablation.

TransformerLens's HookedTransformer has `start_at_layer` for this; a TransformerBridge has none, so for a
transformers decoder of the Llama family (``model.layers``, ``model.norm``, ``lm_head``; SmolLM2, Llama, Mistral,
Qwen2) the clean pass records what block L+1 is called with (attention mask, rotary position embeddings, position
ids) and later passes call blocks L+1.. with the same arguments, then the final norm and the unembedding. The first
use on each batch size checks the result against the clean logits; any difference turns it off for that splicer
(the full hooked pass is then used), so it can only be faster, never different."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch

from .. import lm

# Decoders whose logits are lm_head(norm(last hidden state)), with nothing (soft-capping, scaling) in between.
PLAIN_DECODERS = ("llama", "mistral", "qwen2")


class UpperLayers:
    """Blocks L+1.. of a bridge's transformers model, for a ``blocks.L.hook_resid_post`` hook. Build with `for_hook`."""

    def __init__(self, hf: torch.nn.Module, layer: int):
        self.hf, self.start = hf, layer + 1
        self.layers = hf.model.layers
        self.kwargs: dict[str, Any] | None = None
        self.key: tuple | None = None
        self.checked: set[int] = set()
        self.ok = True

    @classmethod
    def for_hook(cls, model: Any, hook_name: str) -> "UpperLayers | None":
        """An UpperLayers for a TransformerBridge over a plain decoder and a resid_post hook, else None."""
        hf = getattr(model, "__dict__", {}).get("original_model")
        layer, site = lm.parse_hook(hook_name)
        if hf is None or layer is None or site != "hook_resid_post":
            return None
        inner = getattr(hf, "model", None)
        if getattr(hf.config, "model_type", None) not in PLAIN_DECODERS or inner is None or \
                not all(hasattr(x, a) for x, a in ((inner, "layers"), (inner, "norm"), (hf, "lm_head"))):
            return None
        return cls(hf, layer)

    @contextmanager
    def recording(self, tokens: torch.Tensor):
        """Around the clean pass: keep the keyword arguments block L+1 is called with (the last block's output
        needs none)."""
        self.kwargs, self.key = None, None
        if self.start >= len(self.layers):
            self.kwargs, self.key = {}, (tokens.data_ptr(), tuple(tokens.shape))
            yield
            return

        def keep(module, args, kwargs):
            # A cache would make a second pass through the same blocks attend to the first pass's keys as well.
            self.kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value",
                                                                        "use_cache", "cache_position")}
            self.key = (tokens.data_ptr(), tuple(tokens.shape))

        handle = self.layers[self.start].register_forward_pre_hook(keep, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    def ready(self, tokens: torch.Tensor) -> bool:
        return self.ok and self.kwargs is not None and self.key == (tokens.data_ptr(), tuple(tokens.shape))

    @torch.no_grad()
    def __call__(self, resid: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, d_vocab] from the residual [B, T, d_model] after block L."""
        h = resid
        for block in self.layers[self.start:]:
            out = block(h, **self.kwargs)
            h = out[0] if isinstance(out, tuple) else out
        return self.hf.lm_head(self.hf.model.norm(h))

    def check(self, act: torch.Tensor, clean_logits: torch.Tensor) -> None:
        """Once per batch size: the upper pass from the clean activation must give the clean logits."""
        if act.shape[0] in self.checked or not self.ok:
            return
        self.ok = bool(torch.allclose(self(act), clean_logits, rtol=1e-4, atol=1e-4))
        self.checked.add(act.shape[0])
