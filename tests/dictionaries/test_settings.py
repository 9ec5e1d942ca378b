"""One settings object per job (issue 24): `TrainSettings` and `HarvestSettings` are checked once, built from the
keyword arguments or given whole (same result), recorded whole, compared on resume; one input-scale estimate; each
kind declares its own sparsity knob."""

from __future__ import annotations

import json

import pytest
import torch

from sparse_coding import activations, dictionaries
from sparse_coding.dictionaries import SAE_KINDS, TrainSettings

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("kw, name", [({"steps": 0}, "steps"), ({"lr": float("nan")}, "lr"), ({"lr": -1}, "lr"),
                                      ({"betas": (0.9,)}, "betas"), ({"betas": (0.9, 1.0)}, r"betas\[1\]"),
                                      ({"seed": -1}, "seed"), ({"batch_size": 0}, "batch_size"),
                                      ({"decay": "exp"}, "decay"), ({"decay_frac": 0}, "decay_frac"),
                                      ({"input_scale": "1"}, "input_scale"), ({"resample_until": 2}, "resample_until"),
                                      ({"snapshot_steps": [5000]}, "snapshot_steps"), ({"log_every": 1.5}, "log_every"),
                                      ({"stepz": 5}, "unknown training setting")])
def test_train_settings_refuse_a_bad_field_naming_it(kw, name):
    with pytest.raises(ValueError, match=name):
        TrainSettings.build(**kw)
    sae = dictionaries.make_sae("relu", 8, 16)
    with pytest.raises(ValueError, match=name):  # the same check at the way in
        dictionaries.train_sae(sae, torch.randn(64, 8), progress=False, **kw)


def test_the_object_and_the_keywords_train_the_same():
    x = torch.randn(512, 8, generator=torch.Generator().manual_seed(0))
    cfg = TrainSettings(steps=20, lr=3e-3, batch_size=32, seed=4, warmup_steps=3, decay="cosine", log_every=5)
    a, b = dictionaries.make_sae("topk", 8, 16, k=2), dictionaries.make_sae("topk", 8, 16, k=2)
    ha = dictionaries.train_sae(a, x, cfg, progress=False)
    hb = dictionaries.train_sae(b, x, progress=False, steps=20, lr=3e-3, batch_size=32, seed=4, warmup_steps=3,
                                decay="cosine", log_every=5)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert ha.equals(hb)
    # Keywords override the object's fields.
    c = dictionaries.make_sae("topk", 8, 16, k=2)
    dictionaries.train_sae(c, x, cfg, progress=False, lr=1e-4)
    assert not torch.equal(c.W_dec, a.W_dec)
    assert TrainSettings.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg


def test_a_resume_compares_the_settings(tmp_path):
    x = torch.randn(256, 8, generator=torch.Generator().manual_seed(1))
    sae = dictionaries.make_sae("relu", 8, 16)
    dictionaries.train_sae(sae, x, TrainSettings(steps=6, batch_size=32), state_dir=tmp_path / "st", progress=False)
    with pytest.raises(ValueError, match="other settings"):
        dictionaries.train_sae(dictionaries.make_sae("relu", 8, 16), x, TrainSettings(steps=6, batch_size=32,
                               lr=5e-4), state_dir=tmp_path / "st", progress=False)
    # Where and how often the state is written are not part of what a resume compares.
    dictionaries.train_sae(dictionaries.make_sae("relu", 8, 16), x, TrainSettings(steps=6, batch_size=32,
                           state_every=2, snapshot_steps=None), state_dir=tmp_path / "st", progress=False)


def test_one_input_scale_estimate(tmp_path):
    g = torch.Generator().manual_seed(2)
    store = activations.write_store(tmp_path / "s", 7.0 * torch.randn(9000, 8, generator=g))
    sae = dictionaries.make_sae("relu", 8, 16)
    dictionaries.train_sae(sae, store, steps=1, seed=3, progress=False)
    assert sae.input_scale == dictionaries.default_input_scale(store, 3)
    assert sae.input_scale == pytest.approx(1 / 7.0, rel=0.05)


def test_a_sweep_records_its_settings_whole(tmp_path):
    store = activations.write_store(tmp_path / "s", torch.randn(4096, 8, generator=torch.Generator().manual_seed(5)))
    run = dictionaries.train_lm_sweep(store, "topk", 2, {"k": [2, 4]}, TrainSettings(warmup_steps=2),
                                      data_dir=tmp_path / "d", n_tokens=2048, batch_size=256, progress=False)
    train = json.loads((run.folder / "sweep.json").read_text())["settings"]["train"]
    # a local sweep's record leaves out only the fields it never reads (where its state goes; the e2e loss fields,
    # whose absence reads as loss="local" when the record is loaded back)
    assert set(train) == TrainSettings.fields() - {"state_every", "snapshot_steps", "loss", "kl_coef",
                                                   "downstream_coef"}
    assert TrainSettings.from_json(train).loss == "local"
    assert train["warmup_steps"] == 2 and train["batch_size"] == 256 and train["steps"] == 8
    assert TrainSettings.from_json(train).lr == 1e-3
    again = dictionaries.train_lm_sweep(store, "topk", 2, {"k": [2, 4]}, data_dir=tmp_path / "d", n_tokens=2048,
                                        batch_size=256, warmup_steps=2, progress=False)
    assert again.reused  # the same settings given as keywords


def test_each_kind_declares_its_sparsity_knob():
    assert {k: SAE_KINDS[k].sparsity_knob for k in ("relu", "topk", "batchtopk", "jumprelu")} == {
        "relu": "l1_coef", "topk": "k", "batchtopk": "k", "jumprelu": "l0_coef"}
    for kind, cls in SAE_KINDS.items():
        assert cls.sparsity_knob in cls.member_keys, kind
        assert cls.sparsity_coef is None or cls.sparsity_coef in cls.member_keys, kind


@pytest.mark.parametrize("kw, name", [({"n_tokens": 0}, "n_tokens"), ({"dtype": "int8"}, "dtype"),
                                      ({"exclude": "sometimes"}, "exclude"), ({"exclude": {"pos": [0]}}, "exclude"),
                                      ({"corpus": 3}, "corpus"), ({"fast": "yes"}, "fast"),
                                      ({"chunk_row": 5}, "unknown harvest setting")])
def test_harvest_settings_refuse_a_bad_field_naming_it(kw, name):
    with pytest.raises(ValueError, match=name):
        activations.HarvestSettings.build(**{"n_tokens": 16, **kw})


def test_harvest_takes_the_object_or_the_keywords(tiny_lm, tmp_path):
    from sparse_coding import lm

    tl = lm.load_model(tiny_lm[2])
    toks = torch.randint(0, tl.cfg.d_vocab, (8, 16), generator=torch.Generator().manual_seed(6))
    hook = "blocks.0.hook_resid_post"
    cfg = activations.HarvestSettings(n_tokens=64, chunk_rows=32, dtype="float16", exclude=None)
    a = activations.harvest(tl, toks, [hook], None, tmp_path / "a", "m", settings=cfg, progress=False)[hook]
    b = activations.harvest(tl, toks, [hook], 64, tmp_path / "b", "m", chunk_rows=32, dtype=torch.float16,
                            exclude=None, progress=False)[hook]
    sa, sb = activations.ActivationStore(a), activations.ActivationStore(b)
    assert torch.equal(sa.all(), sb.all()) and sa.manifest["dtype"] == "float16"
    assert sa.manifest["harvest_settings"]["chunk_rows"] == 32
