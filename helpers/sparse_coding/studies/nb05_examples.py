"""Notebook 05's examples: the evaluation rows where a feature fires most, shown as short decoded snippets, for a
tracked feature's partner at every revision."""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch

from .. import lm
from ..activations import ActivationStore
from .nb05_tracking import Emergence, feature_codes

def _show_token(text: str) -> str:
    return text.replace("\n", "\\n").replace("\t", "\\t")


def context_snippet(tokens: torch.Tensor, pos: int, decode, before: int = 5, max_chars: int = 40) -> str:
    """The `before` tokens up to `pos` and the token at `pos` in brackets, newlines shown as \\n."""
    lo = max(0, pos - before)
    left = _show_token(decode(tokens[lo:pos].tolist())) if pos > lo else ""
    mid = _show_token(decode([int(tokens[pos])]))
    text = f"{left}[{mid}]"
    return text if len(text) <= max_chars else "…" + text[-(max_chars - 1):]


def top_examples(sae, store: ActivationStore, rows: torch.Tensor, feature: int, decode, member: int = 0,
                 n: int = 3, before: int = 5, x: torch.Tensor | None = None) -> list[tuple[str, float]]:
    """The n rows (of `rows`) where `feature` fires most: [(context snippet, activation)], strongest first; empty
    when it never fires there. x: the activations at `rows` if already loaded."""
    x = store.rows(rows) if x is None else x
    codes = feature_codes(sae, x, member, torch.tensor([feature]))[:, 0]
    k = min(n, int((codes > 0).sum()))
    if k == 0:
        return []
    vals, idx = codes.topk(k)
    out = []
    for v, i in zip(vals.tolist(), idx.tolist()):
        toks, pos = store.context_of(int(rows[i]))
        out.append((context_snippet(toks, pos, decode, before), float(v)))
    return out


def trajectory_examples(em: Emergence, runs: Sequence[Any], stores: Sequence[ActivationStore], rows: torch.Tensor,
                        features: Sequence[int], decode, x_evals: Sequence[torch.Tensor] | None = None,
                        member: int = 0, n: int = 2, before: int = 5) -> dict[int, list[list[tuple[str, float]]]]:
    """{final feature: per revision, the top examples of its matched partner there ([] when unmatched)}."""
    out = {}
    for f in features:
        per = []
        for k, (run, store) in enumerate(zip(runs, stores)):
            p = int(em.partner[k, f])
            x = x_evals[k] if x_evals is not None else None
            per.append([] if p < 0 else top_examples(run.sae, store, rows, p, decode, member, n, before, x))
        out[int(f)] = per
    return out


def token_decoder(model: str, data_dir: str | os.PathLike = "data"):
    """ids -> text with the model's tokenizer (the offline model's tokenizer.json, or a hub model's)."""
    from transformers import AutoTokenizer

    src = lm.model_source(model, data_dir)
    tok = AutoTokenizer.from_pretrained(src)
    return lambda ids: tok.decode(ids, clean_up_tokenization_spaces=False)
