"""Tokens: documents -> one token stream -> fixed-length contexts.

Documents are encoded, each followed by the EOS token, concatenated, and cut into fixed-length contexts (the
remainder is dropped), as Pythia's training data was. The offline model's tokenizer is a byte-level BPE trained here
(:func:`train_tokenizer`); a hub model brings its own.

    corpus = load_corpus("stdlib")
    tok = train_tokenizer(corpus.train, vocab_size=4096)
    train = contexts(tokenize(corpus.train, tok), ctx_len=128)      # LongTensor [n_contexts, 128]
"""

from __future__ import annotations

import hashlib
import os
from typing import Iterable, Sequence

import torch

from ..arguments import checked
from ..files import load_tensors, save_tensors
from ..paths import resolve
from .documents import Corpus

EOS_TOKEN = "<|endoftext|>"

# ----------------------------------------------------------------------------------------------------- tokenizer

def _wrap(tok):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                   unk_token=EOS_TOKEN, pad_token=EOS_TOKEN)


@checked
def load_trained_tokenizer(folder: str | os.PathLike):
    """The tokenizer `train_tokenizer` saved into `folder`, built exactly as it was (so saving it again writes the
    same files)."""
    from tokenizers import Tokenizer

    return _wrap(Tokenizer.from_file(str(resolve(folder) / "tokenizer.json")))


@checked
def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, out_dir: str | os.PathLike | None = None):
    """Train a byte-level BPE (GPT-2 / Pythia style: every byte representable, no unknown tokens) on ``texts``.

    Returns a ``transformers`` fast tokenizer whose EOS (also BOS/UNK/PAD, as in Pythia) is ``<|endoftext|>`` with
    id 0. With ``out_dir``, writes ``tokenizer.json`` + ``tokenizer_config.json`` there, so
    ``AutoTokenizer.from_pretrained(out_dir)`` loads the same tokenizer. Deterministic for the same texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise ValueError(f"vocab_size={vocab_size} is too small for byte-level BPE: it needs 256 bytes + EOS (>= 257)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = _wrap(tok)
    if out_dir is not None:
        resolve(out_dir).mkdir(parents=True, exist_ok=True)
        fast.save_pretrained(str(out_dir))
    return fast


@checked
def tokenize(docs: Sequence[str], tokenizer, progress: bool = False, batch: int = 256) -> torch.Tensor:
    """All documents as one 1-D LongTensor of token ids, each document followed by the EOS token."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; documents cannot be joined")
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    from tqdm.auto import tqdm

    pieces: list[torch.Tensor] = []
    eos_t = torch.tensor([eos], dtype=torch.long)
    for start in tqdm(range(0, len(docs), batch), desc="tokenize", disable=not progress, unit="batch"):
        chunk = list(docs[start:start + batch])
        if backend is not None:  # the Rust tokenizer encodes a batch in parallel, far faster than one doc per call
            ids = [e.ids for e in backend.encode_batch(chunk, add_special_tokens=False)]
        else:
            ids = tokenizer(chunk, add_special_tokens=False)["input_ids"]
        for seq in ids:
            pieces.append(torch.tensor(seq, dtype=torch.long))
            pieces.append(eos_t)
    if not pieces:
        raise ValueError("no documents to tokenize")
    return torch.cat(pieces)


@checked
def contexts(tokens: torch.Tensor, ctx_len: int, max_contexts: int | None = None) -> torch.Tensor:
    """Cut a 1-D token stream into ``[n, ctx_len]`` non-overlapping contexts (a view; the tail is dropped)."""
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D (one joined stream), got shape {tuple(tokens.shape)}")
    if ctx_len < 2:
        raise ValueError(f"ctx_len must be >= 2, got {ctx_len}")
    n = tokens.numel() // ctx_len
    if n == 0:
        raise ValueError(f"only {tokens.numel()} tokens: not enough for one context of {ctx_len}; lower ctx_len")
    if max_contexts is not None:
        n = min(n, max_contexts)
    return tokens[: n * ctx_len].view(n, ctx_len)


@checked
def unigram_entropy(tokens: torch.Tensor, vocab_size: int | None = None) -> float:
    """Entropy (nats/token) of the empirical unigram distribution of ``tokens``: the loss of the best model that
    ignores context, the reference line a language model must get well under. Raises ValueError for a negative
    id (e.g. a -100 label padding) or, with vocab_size, an id >= vocab_size (tokens from another tokenizer)."""
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0:
        raise ValueError(f"unigram_entropy: tokens must be token ids >= 0, got a minimum of {lo} (a padding or "
                         f"ignore label such as -100?); drop those entries first, e.g. tokens[tokens >= 0]")
    if vocab_size is not None and hi >= vocab_size:
        # bincount would just grow to fit: an entropy over ids the model cannot emit, reported as if it could.
        raise ValueError(f"unigram_entropy: tokens hold id {hi} >= vocab_size={vocab_size}; they come from another "
                         f"tokenizer, or vocab_size is the wrong model's")
    counts = torch.bincount(tokens.flatten(), minlength=vocab_size or 0).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


@checked
def cached_tokens(corpus: Corpus, tokenizer, cache_dir: str | os.PathLike, progress: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) token streams, tokenized once and cached as ``tokens-<key>.safetensors`` in ``cache_dir``;
    the key is a digest of the tokenizer and of every document's text (in order, split by split), so any edit of the
    corpus (even one that keeps every length, or two files swapping contents) or of the tokenizer tokenizes anew."""
    h = hashlib.sha256()
    h.update(tokenizer.backend_tokenizer.to_str().encode() if hasattr(tokenizer, "backend_tokenizer") else
             repr(tokenizer).encode())
    for split in (corpus.train, corpus.val):
        h.update(b"\1split")
        for doc in split:
            data = doc.encode("utf-8", errors="surrogatepass")
            h.update(len(data).to_bytes(8, "little"))  # lengths first: no two document lists share a digest
            h.update(data)
    path = resolve(cache_dir) / f"tokens-{h.hexdigest()[:16]}.safetensors"
    if path.exists():
        t = load_tensors(path)
        return t["train"], t["val"]
    empty = torch.zeros(0, dtype=torch.long)
    train = tokenize(corpus.train, tokenizer, progress=progress) if corpus.train else empty
    val = tokenize(corpus.val, tokenizer, progress=progress) if corpus.val else empty
    save_tensors(path, {"train": train, "val": val}, metadata={"corpus": corpus.name})
    return train, val


@checked
def token_texts(tokenizer, n_vocab: int | None = None) -> list[str]:
    """Every token id's text, whitespace made visible (for figures and metrics). n_vocab: the model's d_vocab when
    its unembedding has more rows than the tokenizer has tokens (Pythia pads 50277 to 50304): those ids, which a
    logit lens or an ablation can still rank, are named `⟨id N⟩`."""
    out = []
    for i in range(len(tokenizer)):
        t = tokenizer.decode([i], clean_up_tokenization_spaces=False)
        t = t.replace("\n", "⏎").replace("\t", "⇥").replace(" ", "·")
        out.append("".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in t) or "∅")
    out += [f"⟨id {i}⟩" for i in range(len(out), n_vocab or 0)]
    return out
