"""A tiny Llama GGUF file written on the spot, so that the GGUF code path (transformers' reader, its tensor renaming
and Q/K un-permuting, its tokenizer rebuilt from metadata) can be tested offline in a second, without the 100 MB
SmolLM2 file. It copies the layout of SmolLM2-135M-Instruct's GGUF: llama.cpp's tensor and key names, tied
embeddings, a byte-level BPE ("gpt2") tokenizer whose first ids are <|endoftext|>, <|im_start|>, <|im_end|>.

    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf", seed=0)
    AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
"""

from __future__ import annotations

import functools
import json
import os
import sysconfig
from pathlib import Path

import gguf
import numpy as np

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# As in SmolLM2-135M-Instruct's GGUF: unknown = <|endoftext|>, bos = <|im_start|>, eos = pad = <|im_end|>.
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 2
DEFAULT_VOCAB = 1024
CORPUS_CHARS = 300_000
ROPE_THETA = 100_000.0
RMS_EPS = 1e-5


def _corpus() -> list[str]:
    """Python source, the kind of text the project's models read. The standard library is on every machine with
    this interpreter, so no file has to be shipped; its contents change only with the Python version."""
    texts, left = [], CORPUS_CHARS
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        texts.append(path.read_text(encoding="utf-8", errors="replace")[:left])
        left -= len(texts[-1])
        if left <= 0:
            break
    return texts


@functools.lru_cache(maxsize=8)
def _bpe(vocab_size: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(tokens in id order, merges as "a b") of a byte-level BPE trained with GPT-2's pre-tokenizer, because that
    is the pre-tokenizer transformers' GPT2Tokenizer puts back for a "gpt2" GGUF whose `pre` it does not know
    (SmolLM2's "smollm" included): merges learned under another split would not round-trip the same way.
    Cached because training (~0.2 s) is most of the writing time."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_corpus(), trainer)
    vocab = tokenizer.get_vocab()
    tokens = tuple(sorted(vocab, key=vocab.__getitem__))
    assert [vocab[t] for t in tokens] == list(range(len(tokens))) and tokens[:3] == SPECIAL_TOKENS
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    merges = tuple(m if isinstance(m, str) else " ".join(m) for m in merges)  # tokenizers >= 0.20 writes pairs
    return tokens, merges


def _tokenizer(vocab_size: int) -> tuple[list[str], list[int], tuple[str, ...]]:
    """Tokens, llama.cpp token types and merges, padded with unused tokens when the corpus cannot fill the
    requested vocabulary, so that the embedding always has exactly `vocab_size` rows."""
    tokens, merges = _bpe(vocab_size)
    tokens = list(tokens) + [f"<|unused_{i}|>" for i in range(vocab_size - len(tokens))]
    types = [gguf.TokenType.CONTROL if t in SPECIAL_TOKENS else
             gguf.TokenType.UNUSED if t.startswith("<|unused_") else gguf.TokenType.NORMAL for t in tokens]
    return tokens, [int(t) for t in types], merges


def write_tiny_llama_gguf(path: str | os.PathLike, *, seed: int = 0, n_layers: int = 2, d_model: int = 64,
                          n_heads: int = 4, n_kv_heads: int = 2, d_mlp: int = 128, vocab_size: int | None = None,
                          ctx_len: int = 256) -> Path:
    """Write the file and return its path. The same arguments give the same bytes (the weights come from
    `np.random.default_rng(seed)`, the tokenizer from a fixed corpus), so a test may compare digests.

    Weights are float32 with a 0.02 scale and unit norms, like a freshly initialised HF Llama: random, but the
    logits stay finite and differ across positions. They are written in HF's (out, in) layout and *not* permuted
    the way llama.cpp's converter permutes Q and K for its rotary layout: transformers un-permutes them on load,
    which for random weights only shuffles rows, and the shapes are what matter."""
    vocab_size = DEFAULT_VOCAB if vocab_size is None else vocab_size
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must hold the 256 bytes and {len(SPECIAL_TOKENS)} special tokens")
    if d_model % n_heads or n_heads % n_kv_heads or (d_model // n_heads) % 2:
        raise ValueError("need d_model divisible by n_heads, n_heads by n_kv_heads, and an even head_dim")
    head_dim = d_model // n_heads
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens, token_types, merges = _tokenizer(vocab_size)

    arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA]
    writer = gguf.GGUFWriter(path, arch)  # writes general.architecture itself
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(f"Tiny Llama {n_layers}L {d_model}d seed {seed}")  # "mistral" in the name would make it one
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(ctx_len)
    writer.add_embedding_length(d_model)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(d_mlp)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv_heads)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_rope_dimension_count(head_dim)  # transformers reads this key as head_dim
    writer.add_vocab_size(vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(list(merges))
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_unk_token_id(UNK_ID)
    writer.add_pad_token_id(PAD_ID)
    writer.add_add_bos_token(False)
    writer.add_add_space_prefix(False)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    rng = np.random.default_rng(seed)

    def add(name: str, *shape: int) -> None:
        weights = np.ones(shape) if len(shape) == 1 else rng.normal(0.0, 0.02, size=shape)
        writer.add_tensor(name, weights.astype(np.float32))

    names = gguf.TENSOR_NAMES
    add(names[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight", vocab_size, d_model)
    for layer in range(n_layers):
        block = lambda tensor: names[tensor].format(bid=layer) + ".weight"  # noqa: E731
        add(block(gguf.MODEL_TENSOR.ATTN_NORM), d_model)
        add(block(gguf.MODEL_TENSOR.ATTN_Q), n_heads * head_dim, d_model)
        add(block(gguf.MODEL_TENSOR.ATTN_K), n_kv_heads * head_dim, d_model)
        add(block(gguf.MODEL_TENSOR.ATTN_V), n_kv_heads * head_dim, d_model)
        add(block(gguf.MODEL_TENSOR.ATTN_OUT), d_model, n_heads * head_dim)
        add(block(gguf.MODEL_TENSOR.FFN_NORM), d_model)
        add(block(gguf.MODEL_TENSOR.FFN_GATE), d_mlp, d_model)
        add(block(gguf.MODEL_TENSOR.FFN_UP), d_mlp, d_model)
        add(block(gguf.MODEL_TENSOR.FFN_DOWN), d_model, d_mlp)
    add(names[gguf.MODEL_TENSOR.OUTPUT_NORM] + ".weight", d_model)  # no output.weight: tied, as in SmolLM2

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


if __name__ == "__main__":  # `python tests/tiny_gguf.py OUT.gguf`: the file `make test`'s GGUF smoke runs load
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python tests/tiny_gguf.py OUT.gguf")
    print(write_tiny_llama_gguf(sys.argv[1], seed=0, n_layers=10, vocab_size=1024))
