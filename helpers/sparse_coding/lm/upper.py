"""The layers above a residual-stream hook, run alone: a spliced forward pass that starts from the patched residual
instead of re-running the layers below the hook for every dictionary member, ablation and end-to-end training step.

TransformerLens's HookedTransformer has `start_at_layer` for this; a TransformerBridge has none, so for a
transformers decoder whose logits are lm_head(final norm(last hidden state)) — the Llama family (``model.layers``,
``model.norm``; SmolLM2, Llama, Mistral, Qwen2) and GPT-NeoX (``gpt_neox.layers``, ``gpt_neox.final_layer_norm``;
Pythia and the offline model) — the clean pass records what block L+1 is called with (attention mask, rotary
position embeddings, position ids) and later passes call blocks L+1.. with the same arguments, then the final norm
and the unembedding. The first use on each batch size checks the result against the clean logits (and the later
blocks' outputs against the clean ones where they were read); any difference turns it off (the full hooked pass is
then used), so it can only be faster, never different."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Sequence

import torch

from .hooks import parse_hook

# model_type -> (attribute of the body, its blocks, its final norm): decoders whose logits are
# lm_head(norm(last hidden state)), with nothing (soft-capping, scaling) in between.
DECODERS = {"llama": ("model", "layers", "norm"), "mistral": ("model", "layers", "norm"),
            "qwen2": ("model", "layers", "norm"), "gpt_neox": ("gpt_neox", "layers", "final_layer_norm")}
PLAIN_DECODERS = tuple(DECODERS)


class UpperLayers:
    """Blocks L+1.. of a bridge's transformers model, for a ``blocks.L.hook_resid_post`` hook. Build with `for_hook`."""

    def __init__(self, hf: torch.nn.Module, layer: int):
        body, blocks, norm = DECODERS[hf.config.model_type]
        self.hf, self.start = hf, layer + 1
        self.layers = getattr(getattr(hf, body), blocks)
        self.norm = getattr(getattr(hf, body), norm)
        self.head = getattr(hf, "lm_head", None) or getattr(hf, "embed_out")
        self.kwargs: dict[str, Any] | None = None
        self.key: tuple | None = None
        self.checked: set[int] = set()
        self.ok = True

    @classmethod
    def for_hook(cls, model: Any, hook_name: str) -> "UpperLayers | None":
        """An UpperLayers for a TransformerBridge over a plain decoder and a resid_post hook, else None."""
        hf = getattr(model, "__dict__", {}).get("original_model")
        layer, site = parse_hook(hook_name)
        if hf is None or layer is None or site != "hook_resid_post":
            return None
        parts = DECODERS.get(getattr(getattr(hf, "config", None), "model_type", None))
        body = getattr(hf, parts[0], None) if parts else None
        if body is None or not all(hasattr(body, a) for a in parts[1:]) or \
                not (hasattr(hf, "lm_head") or hasattr(hf, "embed_out")):
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
                                                                        "layer_past", "use_cache", "cache_position")}
            self.key = (tokens.data_ptr(), tuple(tokens.shape))

        handle = self.layers[self.start].register_forward_pre_hook(keep, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    def ready(self, tokens: torch.Tensor) -> bool:
        return self.ok and self.kwargs is not None and self.key == (tokens.data_ptr(), tuple(tokens.shape))

    def run(self, resid: torch.Tensor, keep_outputs: Sequence[int] = ()) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(logits [B, T, d_vocab], the outputs [B, T, d_model] of the blocks in `keep_outputs`) from the residual
        [B, T, d_model] after block L, differentiable in `resid` when grad is enabled."""
        h, kept = resid, []
        for i, block in enumerate(self.layers[self.start:], start=self.start):
            out = block(h, **self.kwargs)
            h = out[0] if isinstance(out, tuple) else out
            if i in keep_outputs:
                kept.append(h)
        return self.head(self.norm(h)), kept

    @torch.no_grad()
    def __call__(self, resid: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, d_vocab] from the residual [B, T, d_model] after block L."""
        return self.run(resid)[0]

    def check(self, act: torch.Tensor, clean_logits: torch.Tensor, keep_outputs: Sequence[int] = (),
              clean_outputs: Sequence[torch.Tensor] = ()) -> None:
        """Once per batch size: the upper pass from the clean activation must give the clean logits (and the clean
        outputs of the blocks in `keep_outputs`, where given)."""
        if act.shape[0] in self.checked or not self.ok:
            return
        with torch.no_grad():
            logits, outs = self.run(act, keep_outputs)
        self.ok = bool(torch.allclose(logits, clean_logits, rtol=1e-4, atol=1e-4)) and all(
            torch.allclose(o, c, rtol=1e-4, atol=1e-4) for o, c in zip(outs, clean_outputs))
        self.checked.add(act.shape[0])
