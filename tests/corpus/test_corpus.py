"""corpus: sources, the split by document, the BPE tokenizer, and cutting token streams into contexts."""

import math

import sysconfig

import pytest
import torch

from transformers import AutoTokenizer

from sparse_coding import corpus as C

DOCS = [f"def f{i}(x):\n    # doc {i}: café ünïcode ✓\n    return x * {i} + {i % 3}\n" * (1 + i % 4) for i in range(40)]


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("texts")
    for i, d in enumerate(DOCS):
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        (sub / f"doc{i:02d}.txt").write_text(d, encoding="utf-8")
    (root / "ignored.bin").write_bytes(b"\x00\x01")
    return root


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    return C.train_tokenizer(DOCS, vocab_size=300, out_dir=out), out


def test_stdlib_split_keeps_tests_out_of_training():
    train, test = C.stdlib_files()
    assert train == sorted(train) and test == sorted(test) and len(train) > 100 and len(test) > 10
    assert not any("site-packages" in p.parts for p in train + test)
    root_parts = len(sysconfig.get_paths()["stdlib"].split("/"))
    assert all(not {"test", "tests", "idle_test"} & set(p.parts[root_parts:-1]) for p in train)
    c = C.load_corpus("stdlib", max_train_bytes=100_000)  # default: held-out library modules, tests left out
    assert c.name.startswith("stdlib-") and sum(map(len, c.train)) >= 100_000
    every = C.load_corpus("stdlib")
    assert not set(every.train_ids) & set(every.val_ids) and 0.02 < len(every.val) / len(every.train) < 0.1
    assert not any({"test", "tests", "idle_test"} & set(v.split("/")[:-1]) for v in every.train_ids + every.val_ids)
    assert C.load_corpus("stdlib").val_ids == every.val_ids  # deterministic
    t = C.load_corpus("stdlib", stdlib_val="tests", val_bytes=50_000, max_train_bytes=100_000)
    assert all({"test", "tests", "idle_test"} & set(v.split("/")[:-1]) for v in t.val_ids)
    assert t.val and sum(map(len, t.val)) < 2_000_000  # ~val_bytes, sampled evenly across the test packages
    with pytest.raises(ValueError, match="'split' or 'tests'"):
        C.load_corpus("stdlib", stdlib_val="nope")


def test_folder_source_splits_by_document(text_folder):
    c = C.load_corpus(text_folder, val_fraction=0.2)
    assert len(c.train) + len(c.val) == len(DOCS) and c.val and c.train
    assert not set(c.train_ids) & set(c.val_ids)
    assert all(i.endswith(".txt") for i in c.train_ids + c.val_ids)
    assert C.load_corpus(text_folder, val_fraction=0.2).val_ids == c.val_ids


def test_bad_sources_fail_clearly(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no text files"):
        C.load_corpus(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither 'stdlib'"):
        C.load_corpus("no_such_thing")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConnectionError, match="stdlib"):
        C.load_corpus("NeelNanda/pile-10k")


def test_tokenizer_round_trips_and_loads_with_transformers(tok):
    fast, folder = tok
    assert (folder / "tokenizer.json").exists()
    loaded = AutoTokenizer.from_pretrained(str(folder))
    assert loaded.is_fast and loaded.eos_token == C.EOS_TOKEN and loaded.eos_token_id == 0
    text = "def g(y):\n    return 'naïve ✓ 🙂'  # unseen bytes still encode\n"
    ids = loaded(text, add_special_tokens=False)["input_ids"]
    assert ids == fast(text, add_special_tokens=False)["input_ids"]
    assert loaded.decode(ids) == text  # byte-level: lossless even for characters never seen in training
    assert len(fast) <= 300
    with pytest.raises(ValueError, match="257"):
        C.train_tokenizer(DOCS, vocab_size=100)


def test_tokenize_joins_documents_with_eos_and_cuts_contexts(tok):
    fast, _ = tok
    stream = C.tokenize(DOCS[:5], fast)
    assert stream.dtype == torch.long and stream.ndim == 1
    assert int((stream == fast.eos_token_id).sum()) == 5 and stream[-1] == fast.eos_token_id
    first = fast(DOCS[0], add_special_tokens=False)["input_ids"]
    assert stream[: len(first)].tolist() == first and stream[len(first)] == fast.eos_token_id
    ctx = C.contexts(stream, 16)
    assert ctx.shape == (stream.numel() // 16, 16) and torch.equal(ctx.flatten(), stream[: ctx.numel()])
    assert C.contexts(stream, 16, max_contexts=2).shape == (2, 16)
    with pytest.raises(ValueError, match="lower ctx_len"):
        C.contexts(stream[:5], 16)
    with pytest.raises(ValueError, match="1-D"):
        C.contexts(ctx, 4)


def test_unigram_entropy_known_answers():
    assert C.unigram_entropy(torch.tensor([0, 1, 2, 3] * 10)) == pytest.approx(math.log(4))
    assert C.unigram_entropy(torch.tensor([7] * 10)) == pytest.approx(0.0)


def test_cached_tokens_reuses_and_keys_on_corpus(tok, text_folder, tmp_path):
    fast, _ = tok
    c = C.load_corpus(text_folder, val_fraction=0.2)
    tr, va = C.cached_tokens(c, fast, tmp_path, progress=False)
    assert len(list(tmp_path.glob("tokens-*.safetensors"))) == 1
    tr2, va2 = C.cached_tokens(c, fast, tmp_path, progress=False)
    assert torch.equal(tr, tr2) and torch.equal(va, va2)
    c.train = c.train[:-1]
    c.train_ids = c.train_ids[:-1]
    C.cached_tokens(c, fast, tmp_path, progress=False)
    assert len(list(tmp_path.glob("tokens-*.safetensors"))) == 2
