"""Bad input refused by kind (issue 24): each example the issue shows, and other members of its kind at other entry
points, gets an error that names the argument (or the file and field) and the fix, before anything is written."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from sparse_coding import activations, corpus, dictionaries

pytestmark = pytest.mark.usefixtures("one_thread")


# ----- a wrong dtype or type reaches torch -----
@pytest.mark.parametrize("kw, name", [({"dtype": torch.int64}, "dtype"), ({"dtype": "float32"}, "dtype"),
                                      ({"tied": "no"}, "tied"), ({"pre_bias": 1}, "pre_bias"),
                                      ({"device": "gpu"}, "device"), ({"device": 3}, "device")])
def test_make_sae_refuses_a_wrong_type_naming_it(kw, name):
    with pytest.raises(ValueError, match=name):
        dictionaries.make_sae("relu", 16, 32, **kw)


# ----- an empty input fails deep inside; an object of the wrong kind is iterated -----
@pytest.mark.parametrize("batches, words", [
    (torch.empty(0, 16), "empty"),
    ("activations.safetensors", r"ActivationStore\(path\)"),
    (torch.zeros(8, 16, dtype=torch.long), "floating-point"),
])
def test_train_sae_refuses_what_is_not_a_batch_source(batches, words):
    sae = dictionaries.make_sae("relu", 16, 32)
    with pytest.raises(ValueError, match=words):
        dictionaries.train_sae(sae, batches, steps=5, batch_size=8, progress=False)


def test_train_sae_refuses_a_path_object_too(tmp_path):
    sae = dictionaries.make_sae("relu", 16, 32)
    with pytest.raises(ValueError, match="ActivationStore"):
        dictionaries.train_sae(sae, tmp_path, steps=5, progress=False)
    with pytest.raises(ValueError, match="sae must be"):
        dictionaries.train_sae("relu", torch.randn(8, 16), steps=5, progress=False)
    with pytest.raises(ValueError, match="betas"):
        dictionaries.train_sae(sae, torch.randn(8, 16), steps=5, progress=False, betas=(0.9,))
    with pytest.raises(ValueError, match="seed"):
        dictionaries.train_sae(sae, torch.randn(8, 16), steps=5, progress=False, seed=-1)


# ----- a size of zero "succeeds" -----
class _NoModel(torch.nn.Module):
    """harvest checks its arguments before touching the model: a model that is never called."""


@pytest.mark.parametrize("kw, name", [({"n_tokens": 0}, "n_tokens"), ({"n_tokens": -5}, "n_tokens"),
                                      ({"batch_size": 0}, "batch_size"), ({"chunk_rows": 0}, "chunk_rows"),
                                      ({"hooks": "blocks.0.hook_resid_post"}, "hooks"), ({"hooks": []}, "hooks"),
                                      ({"tokens": torch.zeros(2, 8)}, "tokens"), ({"dtype": torch.int8}, "dtype"),
                                      ({"seed": 1.5}, "seed")])
def test_harvest_refuses_before_writing_anything(tmp_path, kw, name):
    args = {"tokens": torch.zeros(2, 8, dtype=torch.long), "hooks": ["blocks.0.hook_resid_post"], "n_tokens": 16}
    args.update({k: v for k, v in kw.items() if k in args})
    rest = {k: v for k, v in kw.items() if k not in args}
    with pytest.raises(ValueError, match=name):
        activations.harvest(_NoModel(), args["tokens"], args["hooks"], args["n_tokens"], tmp_path / "acts", "m",
                            progress=False, **rest)
    assert not (tmp_path / "acts").exists()


# ----- text is silently damaged -----
def _latin1_folder(tmp_path):
    root = tmp_path / "latin1"
    root.mkdir()
    for i in range(6):
        (root / f"m{i}.py").write_bytes(("x = 'caf\xe9'\n" * 10).encode("latin-1"))
    (root / "ok.py").write_text("y = 1\n", encoding="utf-8")
    return root


def test_load_corpus_reports_every_replaced_character(tmp_path):
    root = _latin1_folder(tmp_path)
    with pytest.warns(UserWarning, match="60 characters were replaced"):
        c = corpus.load_corpus(root)
    assert sum(c.replaced.values()) == 60 and len(c.replaced) == 6
    assert sum(d.count("\ufffd") for d in c.train + c.val) == 60
    with pytest.raises(ValueError, match=r"m0\.py is not valid UTF-8.*byte 8"):
        corpus.load_corpus(root, errors="strict")
    with pytest.raises(ValueError, match="errors"):
        corpus.load_corpus(root, errors="ignore")
    clean = tmp_path / "clean"
    clean.mkdir()
    for i in range(3):
        (clean / f"m{i}.py").write_text(f"x = 'café {i}'\n", encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert corpus.load_corpus(clean).replaced == {}


# ----- a loader trusts a field -----
@pytest.mark.parametrize("kind, drop, field", [("topk", "k", "k"), ("batchtopk", "k", "hparams.k")])
def test_loaders_check_the_fields_each_architecture_needs(tmp_path, kind, drop, field):
    sae = dictionaries.make_sae(kind, 8, 16, k=4)
    folder = tmp_path / kind
    dictionaries.save_sae(sae, folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    if kind == "topk":  # as SAELens saved it: no sparse_coding block, k at the top level
        cfg.pop("sparse_coding", None)
        cfg.pop("k")
    else:
        cfg["sparse_coding"]["hparams"].pop(drop)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=rf"cfg\.json: field '[a-z_.]*{field}'"):
        dictionaries.load_sae(folder)
    cfg["k"] = 0
    if kind == "batchtopk":
        cfg["sparse_coding"]["hparams"]["k"] = 99  # over d_sae
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="must be an int in"):
        dictionaries.load_sae(folder)


def test_a_jumprelu_folder_without_its_threshold_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "j"
    dictionaries.save_sae(dictionaries.make_sae("jumprelu", 8, 16), folder)
    state = load_file(folder / "sae_weights.safetensors")
    state.pop("threshold")
    save_file(state, folder / "sae_weights.safetensors")
    with pytest.raises(ValueError, match="threshold"):
        dictionaries.load_sae(folder)


# ----- a cache keyed on metadata, not content -----
class _CharTokenizer:
    """Token ids = code points: any change of text changes the ids."""

    eos_token_id = 0

    def __call__(self, texts, **kw):
        return {"input_ids": [[ord(ch) for ch in t] for t in texts]}

    def __repr__(self):
        return "CharTokenizer"


def test_cached_tokens_follow_the_text_not_its_length(tmp_path):
    from sparse_coding.corpus import Corpus, cached_tokens, tokenize

    tok = _CharTokenizer()
    a = Corpus("c", ["x = a + b\n", "y = 2\n"], ["z = 3\n"], ["f1", "f2"], ["f3"])
    edited = Corpus("c", ["x = a - b\n", "y = 2\n"], ["z = 3\n"], ["f1", "f2"], ["f3"])  # same length
    swapped = Corpus("c", ["y = 2\n", "x = a + b\n"], ["z = 3\n"], ["f1", "f2"], ["f3"])  # contents swapped
    t0, _ = cached_tokens(a, tok, tmp_path, progress=False)
    for other in (edited, swapped):
        t1, _ = cached_tokens(other, tok, tmp_path, progress=False)
        fresh = tokenize(other.train, tok, progress=False)
        assert torch.equal(t1, fresh) and not torch.equal(t1, t0)
