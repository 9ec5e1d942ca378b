"""Bad inputs to the activation store, chunk layout, toy data and corpus entry points, each refused where it enters
(or computed right) instead of giving a silent wrong result or an error from deep inside numpy/torch/datasets.

Faults fixed:
- ActivationStore.rows: a bool mask was read as rows 0/1 and float indices were truncated to other rows (silently
  wrong activations); a 2-D or scalar idx failed inside numpy.
- ActivationStore.context_of: True was read as row 1; a float row failed inside slicing.
- ActivationStore.batches: a bool batch_size gave batches of one row, epochs <= 0 gave no batches at all, floats
  failed inside range(); and every check waited for the first batch.
- write_store: NaN/inf activations were stored; token ids < 0 were stored and ids past int32 wrapped to other ids.
- norm_outliers: an all-zero store gave share_of_sum_squares = NaN (0/0).
- write_chunk: a float64/bool tensor failed with a bare KeyError (torch.float64).
- open_chunk: a valid bfloat16 chunk was called "corrupted" with advice to delete it.
- chunk_checksum: any kind other than "crc32" (e.g. "md5", "CRC32") silently returned a sha256.
- firing_probabilities: a steep decay with many active features gave NaN probabilities (0/0 after underflow).
- ToyData.sample / batches / generator: True was taken as 1 (one step), a float seed was truncated.
- unigram_entropy: a -100 label failed inside torch.bincount; ids >= vocab_size were silently counted.
- load_corpus: a missing folder path or a file path was asked of the hub as a dataset name (ConnectionError about
  the datasets cache); a folder relative to the repo root was not found from another working directory.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sparse_coding import activations as A
from sparse_coding import corpus as C
from sparse_coding.activations.layout import ChunkError, hook_folder, safe_name
from sparse_coding.paths import repo_root

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    x = torch.arange(40, dtype=torch.float32).reshape(10, 4)  # row r holds 4r .. 4r+3
    return A.write_store(tmp_path_factory.mktemp("audit") / "acts", x, torch.arange(10), ctx_len=5)


@pytest.mark.parametrize("idx, words", [
    (torch.tensor([True, False] * 5), "integer row numbers.*nonzero"),
    (np.array([1.7, 2.2]), "integer row numbers.*float64"),
    (torch.tensor([1.9]), "integer row numbers.*float32"),
    (np.array([[1, 2], [3, 4]]), r"1-D.*shape \(2, 2\).*reshape"),
    (3, r"1-D.*scalar.*\[row\]"),
])
def test_rows_refuses_masks_floats_and_wrong_shapes(store, idx, words):
    with pytest.raises(ValueError, match=f"ActivationStore.rows: idx.*{words}"):
        store.rows(idx)


def test_rows_still_takes_integer_rows_of_every_kind(store):
    for idx in ([9, 0, 5], range(9, -1, -5), np.array([9, 0, 5], dtype=np.int32)[[0, 1, 2]], torch.tensor([9, 0, 5])):
        assert store.rows(idx)[:, 0].tolist() == [4.0 * int(i) for i in idx]
    assert store.rows([]).shape == (0, 4)
    with pytest.raises(IndexError, match="row indices"):
        store.rows([10])


def test_context_of_refuses_bool_and_float_rows(store):
    for row in (True, 1.5):
        with pytest.raises(ValueError, match="context_of: row must be an int"):
            store.context_of(row)
    toks, pos = store.context_of(np.int64(7))
    assert toks.tolist() == [5, 6, 7, 8, 9] and pos == 2


@pytest.mark.parametrize("kw, name", [
    (dict(batch_size=True), "batch_size"), (dict(batch_size=2.5), "batch_size"),
    (dict(batch_size=4, epochs=0), "epochs"), (dict(batch_size=4, epochs=-1), "epochs"),
    (dict(batch_size=4, epochs=1.0), "epochs"), (dict(batch_size=4, seed=-1), "seed"),
    (dict(batch_size=4, drop_last=1), "drop_last"), (dict(batch_size=4, device="gpu0"), "device"),
])
def test_batches_refuses_bad_arguments_when_called(store, kw, name):
    with pytest.raises(ValueError, match=name):
        store.batches(**kw)  # refused on the call itself, not at the first next()
    assert sorted(torch.cat(list(store.batches(3, seed=1)))[:, 0].tolist()) == [4.0 * r for r in range(10)]


def test_write_store_refuses_non_finite_acts_before_writing(tmp_path):
    x = torch.ones(6, 3)
    x[4, 1] = float("nan")
    x[5, 0] = float("inf")
    with pytest.raises(ValueError, match=r"acts holds 1 NaN and 1 inf values in 2 rows \(first: row 4\)"):
        A.write_store(tmp_path / "s", x)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("bad", [-1, -100, 2**32 + 5])
def test_write_store_refuses_token_ids_it_cannot_store(tmp_path, bad):
    tokens = torch.arange(6)
    tokens[3] = bad
    with pytest.raises(ValueError, match=r"tokens must be token ids in \[0, 2\*\*31\)"):
        A.write_store(tmp_path / "s", torch.ones(6, 3), tokens)
    assert not (tmp_path / "s").exists()


def test_norm_outliers_of_an_all_zero_store_is_no_share(tmp_path):
    out = A.norm_outliers(A.write_store(tmp_path / "z", torch.zeros(8, 3)))
    assert out["share_of_sum_squares"] == 0.0 and out["n_rows"] == 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.bool, torch.uint8])
def test_write_chunk_names_a_dtype_it_cannot_hold(tmp_path, dtype):
    path = tmp_path / "c.safetensors"
    with pytest.raises(ValueError, match=f"write_chunk: tensor 'acts' is {dtype}.*convert"):
        A.write_chunk(path, {"acts": torch.ones(4, 2, dtype=dtype), "tokens": torch.zeros(4, dtype=torch.int32)})
    assert not path.exists()


def test_open_chunk_calls_bfloat16_unmappable_not_corrupted(tmp_path):
    path = tmp_path / "c.safetensors"
    A.write_chunk(path, {"acts": torch.ones(4, 2, dtype=torch.bfloat16), "tokens": torch.zeros(4, dtype=torch.int32)})
    with pytest.raises(ChunkError, match="'acts' as BF16, which cannot be memory-mapped") as e:
        A.open_chunk(path)
    assert "corrupted" not in str(e.value) and "delete" not in str(e.value)


def test_chunk_checksum_refuses_an_unknown_kind(store):
    chunk = store.folder / store.manifest["chunks"][0]["file"]
    assert A.chunk_checksum(chunk) == store.manifest["chunks"][0]["crc32"]
    for kind in ("md5", "CRC32"):
        with pytest.raises(ValueError, match=f"kind must be one of 'crc32', 'sha256', got '{kind}'"):
            A.chunk_checksum(chunk, kind)


@pytest.mark.parametrize("n, mean_active, decay", [(512, 400.0, 0.1), (2000, 1500.0, 0.5), (4096, 2048.0, 0.5)])
def test_firing_probabilities_survive_a_steep_decay(n, mean_active, decay):
    p = A.firing_probabilities(n, mean_active, decay)
    assert bool(torch.isfinite(p).all()) and float(p.min()) >= 0 and float(p.max()) <= 1
    assert float(p.sum()) == pytest.approx(mean_active, rel=1e-9)
    assert bool((p[1:] <= p[:-1]).all())  # still decaying with the feature index


def test_toy_sampler_refuses_bools_and_floats_for_counts_and_seeds():
    data = A.ToyData(A.ToyConfig(d=4, n_features=8, mean_active=1.0))
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        data.sample(True)
    with pytest.raises(ValueError, match="steps must be an int >= 0"):
        data.batches(2, True)  # refused on the call: before, one batch came back
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        data.batches(0, 3)
    with pytest.raises(ValueError, match="seed must be an int"):
        data.generator(1.5)


def test_unigram_entropy_refuses_ids_outside_the_vocabulary():
    with pytest.raises(ValueError, match=r"token ids >= 0, got a minimum of -100.*tokens\[tokens >= 0\]"):
        C.unigram_entropy(torch.tensor([1, 2, -100]))
    with pytest.raises(ValueError, match="id 500 >= vocab_size=100"):
        C.unigram_entropy(torch.tensor([1, 2, 500]), 100)
    assert C.unigram_entropy(torch.tensor([0, 1, 2, 3] * 5), 4) == pytest.approx(math.log(4))


def test_load_corpus_names_a_missing_folder_or_a_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="corpus source folder .*nope' does not exist"):
        C.load_corpus(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        C.load_corpus(tmp_path / "nope")
    (tmp_path / "a.txt").write_text("text")
    with pytest.raises(ValueError, match="is a file; pass the folder"):
        C.load_corpus(str(tmp_path / "a.txt"))


def test_load_corpus_finds_a_folder_relative_to_the_repo_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # as from notebooks/: relative paths are the repo root's, as everywhere else
    assert (repo_root() / "tests" / "corpus").is_dir()
    corpus = C.load_corpus("tests/corpus", val_fraction=0.5)
    assert corpus.name == "folder:corpus" and len(corpus.train) + len(corpus.val) >= 2


@pytest.mark.parametrize("name", ["..", ".", "../..", "/", ""])
def test_safe_name_never_gives_a_path_step(name):
    # before: safe_name("..") was "..", so a harvest folder could land above out_root
    assert safe_name(name) not in ("", ".", "..") and "/" not in safe_name(name)


def test_hook_folder_stays_under_out_root(tmp_path):
    from sparse_coding.paths import resolve

    root = resolve(tmp_path)
    for hook in ("blocks.2.hook_resid_post", "../../etc", "/etc", ".."):
        folder = hook_folder(tmp_path, "m", None, hook)
        assert folder.parent.parent.parent == root and folder.name not in ("", ".", "..")
    assert hook_folder(tmp_path, "m", None, "blocks.2.hook_resid_post").name == "blocks.2.hook_resid_post"
