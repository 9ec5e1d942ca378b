"""The tiny GGUF that `tiny_gguf.write_tiny_llama_gguf` writes is one transformers reads as it reads SmolLM2's: the
config has the sizes asked for, the weights are the ones written, the tokenizer rebuilt from the metadata
round-trips Python source, and the file is the same bytes for the same seed. Other GGUF tests stand on this."""

import inspect
import json
import textwrap

import numpy as np
import pytest
import torch
import transformers

from tiny_gguf import BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS, UNK_ID, write_tiny_llama_gguf

pytestmark = pytest.mark.usefixtures("one_thread")
SIZES = dict(n_layers=3, d_model=48, n_heads=6, n_kv_heads=2, d_mlp=96, vocab_size=700, ctx_len=128)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    path = write_tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", seed=1, **SIZES)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return path, model.eval(), tokenizer


def test_model_loads_with_the_sizes_and_weights_written(loaded):
    import gguf

    path, model, _ = loaded
    c = model.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
            c.intermediate_size, c.vocab_size, c.max_position_embeddings, c.head_dim) == (
        "llama", 3, 48, 6, 2, 96, 700, 128, 8)
    assert c.tie_word_embeddings and (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (BOS_ID, EOS_ID, PAD_ID)
    # every parameter came from the file rather than from a random init (Q and K only up to llama.cpp's row order)
    tensors = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(path).tensors}
    weights = model.state_dict()
    assert np.array_equal(weights["model.embed_tokens.weight"].numpy(), tensors["token_embd.weight"])
    assert np.array_equal(weights["model.layers.2.mlp.down_proj.weight"].numpy(), tensors["blk.2.ffn_down.weight"])
    assert np.array_equal(np.sort(weights["model.layers.1.self_attn.k_proj.weight"].numpy(), axis=None),
                          np.sort(tensors["blk.1.attn_k.weight"], axis=None))
    tokens = torch.arange(40).reshape(2, 20) * 17 % 700
    with torch.no_grad():
        logits = model(tokens).logits
    assert logits.shape == (2, 20, 700) and torch.isfinite(logits).all()
    assert logits.std(dim=-1).min() > 0 and (logits[:, 1:] - logits[:, :1]).abs().max() > 1e-3


def test_tokenizer_round_trips_python_source(loaded):
    _, _, tokenizer = loaded
    assert len(tokenizer) == 700
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == list(SPECIAL_TOKENS)
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (UNK_ID, BOS_ID, EOS_ID)
    unicode = "x = {'é': 1}\t# ünïcode ✓\r\n"
    for text in (inspect.getsource(json.dumps), inspect.getsource(textwrap.dedent), unicode):
        ids = tokenizer(text)["input_ids"]
        assert ids[0] != BOS_ID and tokenizer.decode(ids) == text
        assert len(ids) < len(text.encode()) or not text.isascii()  # merges learned: fewer ids than bytes
    ids = tokenizer("<|im_start|>user\nhi<|im_end|>")["input_ids"]
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID  # special tokens stay whole


def test_same_seed_same_bytes(tmp_path):
    a = write_tiny_llama_gguf(tmp_path / "a.gguf", seed=5, n_layers=1)
    b = write_tiny_llama_gguf(tmp_path / "b.gguf", seed=5, n_layers=1)
    c = write_tiny_llama_gguf(tmp_path / "c.gguf", seed=6, n_layers=1)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
