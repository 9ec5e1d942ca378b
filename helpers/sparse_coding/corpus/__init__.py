"""Stage 1, corpus: text -> documents -> token contexts (the stdlib source, a text folder, or a hub dataset)."""

from .documents import Corpus, held_out_stdlib, hub_offline, load_corpus, stdlib_files
from .tokens import (EOS_TOKEN, cached_tokens, contexts, load_trained_tokenizer, token_texts, tokenize,
                     train_tokenizer, unigram_entropy)

__all__ = ["Corpus", "held_out_stdlib", "hub_offline", "load_corpus", "stdlib_files", "EOS_TOKEN", "cached_tokens", "contexts",
           "tokenize", "train_tokenizer", "load_trained_tokenizer", "unigram_entropy", "token_texts"]
