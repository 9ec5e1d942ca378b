"""Token contexts for a model: what it was trained on, its validation split, and held-out text it never saw.

For the offline model the training and validation streams are the ones it was trained and validated on; for a hub
model the standard library is tokenized with the model's own tokenizer (cached under ``<data_dir>/tokens/``).
Held-out text is the library text no model here was trained on: the offline model's validation modules and the
standard library's test packages."""

from __future__ import annotations

import os
import re

import torch

from ..arguments import checked
from .. import corpus as _corpus
from ..checks import check_int
from ..files import load_json, load_tensors
from ..paths import resolve
from .load import DEFAULT_OFFLINE_DIR, offline_dir


# The original work harvested 256-token contexts; a long-context model (SmolLM2: 8192) at its own length would need
# eager attention scores of batch x heads x n_ctx^2 floats (77 GB at batch 32).
MAX_DEFAULT_CTX = 256


@checked
def default_ctx_len(tl: torch.nn.Module) -> int:
    """Tokens per context when none is given: the model's own context length, at most `MAX_DEFAULT_CTX` (256)."""
    n_ctx = int(getattr(tl.cfg, "n_ctx", 0) or 0)
    return min(n_ctx, MAX_DEFAULT_CTX) if n_ctx else MAX_DEFAULT_CTX


@checked
def validation_contexts(model_dir: str | os.PathLike = DEFAULT_OFFLINE_DIR, ctx_len: int | None = None,
                        split: str = "val", max_contexts: int | None = None) -> torch.Tensor:
    """LongTensor [n_contexts, ctx_len] of the held-out (``split="val"``) or training token contexts of a locally
    trained model, the same tokens its validation loss was measured on."""
    root = resolve(model_dir)
    path = root / f"tokens-{split}.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: train the model first (lm.train_offline_model / notebook 00); "
                                f"for a hub model tokenize a corpus with corpus.tokenize(...) instead")
    if ctx_len is None:
        ctx_len = int(load_json(root / "corpus.json")["ctx_len"])
    return _corpus.contexts(load_tensors(path)["tokens"], ctx_len, max_contexts)


@checked
def model_contexts(tl: torch.nn.Module, model: str, *, data_dir: str | os.PathLike = "data", ctx_len: int | None = None,
                   split: str = "train") -> torch.Tensor:
    """Token contexts [n_contexts, ctx_len] to harvest (split="train") or to measure a loss on (split="val"): the
    offline model's own tokenized splits, or the standard library tokenized with another model's tokenizer (cached
    under ``<data_dir>/tokens/``), ctx_len defaulting to `default_ctx_len` (the model's own, at most 256)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if model == "offline":
        return validation_contexts(offline_dir(data_dir), split=split)
    c = _corpus.load_corpus("stdlib")
    train, val = _corpus.cached_tokens(c, tl.tokenizer, _token_cache(model, data_dir), progress=True)
    return _corpus.contexts(train if split == "train" else val, ctx_len or default_ctx_len(tl))


def _token_cache(model: str, data_dir: str | os.PathLike) -> "os.PathLike":
    return resolve(data_dir) / "tokens" / re.sub(r"\W+", "_", model)


@checked
def held_out_tokens(tl: torch.nn.Module, model: str, *, data_dir: str | os.PathLike = "data", max_bytes: int | None = 8_000_000
                    ) -> torch.Tensor:
    """One token stream [n_tokens] of held-out text (`corpus.held_out_stdlib`: for the offline model its validation
    modules first, then the test packages, up to `max_bytes` characters), each document followed by EOS, tokenized
    with the model's tokenizer and cached."""
    val_modules = None
    if model == "offline":
        info = resolve(offline_dir(data_dir)) / "corpus.json"
        val_modules = load_json(info)["val_docs"] if info.exists() else None
    held = _corpus.held_out_stdlib(val_modules, max_bytes=max_bytes)
    return _corpus.cached_tokens(held, tl.tokenizer, _token_cache(model, data_dir), progress=False)[1]


@checked
def held_out_contexts(tl: torch.nn.Module, model: str, n_tokens: int, *, data_dir: str | os.PathLike = "data",
                      ctx_len: int | None = None) -> torch.Tensor:
    """Contexts [n_contexts, ctx_len] of held-out text covering at least n_tokens tokens (fewer if the text runs
    out), ctx_len defaulting to `default_ctx_len` (the model's own, at most 256). Raises ValueError for a ctx_len
    past the model's n_ctx."""
    check_int(n_tokens, "n_tokens", 1)
    n_ctx = int(getattr(tl.cfg, "n_ctx", 0) or 0)
    ctx_len = check_int(ctx_len if ctx_len is not None else default_ctx_len(tl), "ctx_len", 2, n_ctx or None,
                        " (tokens per context, at most the model's n_ctx)")
    # About 3 characters per token on code: 8 per token read leaves a wide margin without tokenizing everything.
    stream = held_out_tokens(tl, model, data_dir=data_dir, max_bytes=max(200_000, 8 * n_tokens))
    return _corpus.contexts(stream, ctx_len, max_contexts=-(-n_tokens // ctx_len))


@checked
def document_fragments(stream: torch.Tensor, eos_id: int, length: int, n: int, seed: int = 0
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """n fragments [n, length] of a token stream whose documents end with `eos_id`, one per document where there
    are enough documents (documents shorter than `length` are skipped), more per document otherwise (the longest
    documents give the extra ones, never overlapping); with the document index [n] of each. Seeded."""
    check_int(length, "length", 2)
    check_int(n, "n", 1)
    ends = (stream == eos_id).nonzero().squeeze(1).tolist()
    starts = [0] + [e + 1 for e in ends[:-1]]
    docs = [(s, e) for s, e in zip(starts, ends) if e - s >= length]
    if not docs:
        raise ValueError(f"no document of at least {length} tokens in the stream; lower length")
    g = torch.Generator().manual_seed(seed)
    capacity = torch.tensor([(e - s) // length for s, e in docs])
    per_doc = torch.zeros(len(docs), dtype=torch.long)
    while int(per_doc.sum()) < n and bool((per_doc < capacity).any()):
        room = (per_doc < capacity).nonzero().squeeze(1)
        take = room[torch.randperm(len(room), generator=g)][: n - int(per_doc.sum())]
        per_doc[take] += 1
    frags, owner = [], []
    for d, ((s, e), k) in enumerate(zip(docs, per_doc.tolist())):
        if k == 0:
            continue
        slots = torch.randperm((e - s) // length, generator=g)[:k].sort().values
        for slot in slots.tolist():
            frags.append(stream[s + slot * length: s + (slot + 1) * length])
            owner.append(d)
    return torch.stack(frags), torch.tensor(owner)
