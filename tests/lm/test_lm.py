"""lm: the offline model trains deterministically on Pythia's checkpoint schedule, every checkpoint loads on its own,
and the TransformerLens model gives the transformers model's logits."""

import pytest
import torch

from conftest import TINY, train_tiny
from sparse_coding import lm
from sparse_coding.files import load_json


@pytest.fixture(scope="module")
def trained(tiny_lm):
    return tiny_lm


def test_checkpoint_schedule_is_pythias():
    assert lm.revision_steps(3000) == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000, 2000, 3000]
    assert lm.revision_steps(600) == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 600]
    assert lm.revision_steps(20) == [0, 1, 2, 4, 8, 16, 20]


def test_lr_schedule_warms_up_then_decays():
    cfg = lm.LMConfig(steps=100, warmup_steps=10, lr=1e-3, min_lr_frac=0.1)
    lrs = [lm.lr_at(s, cfg) for s in range(100)]
    assert lrs[0] < lrs[5] < lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lm.lr_at(100, cfg) == pytest.approx(1e-4)


def test_training_writes_checkpoints_that_load_alone(trained):
    root, log, out = trained
    m = log["metrics"]
    assert m["n_layers"] == 2 and m["d_model"] == 32 and m["train_tokens"] == 60 * 8 * 16
    assert m["checkpoints"] == [f"step{s}" for s in lm.revision_steps(60)]
    for name in m["checkpoints"] + ["final"]:
        assert (out / name / "config.json").exists() and (out / name / "tokenizer.json").exists()
        assert (out / name / "model.safetensors").exists()
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pkl"))  # safetensors + JSON only
    # Learning happened: the final validation loss is well below the initial one and under the unigram entropy.
    h = log["history"]
    assert h["val_loss"][-1] < h["val_loss"][0] - 0.5
    assert m["val_loss"] < m["unigram_entropy"]
    assert load_json(out / "train_log.json")["metrics"]["val_loss"] == pytest.approx(m["val_loss"])
    # A second call with the same config reuses the run instead of retraining: not a file is written again.
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert train_tiny(root)["metrics"] == m
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamps


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    def weights(name, seed):
        train_tiny(tmp_path / name, seed=seed, steps=4)
        return lm.load_hf_model(lm.offline_dir(tmp_path / name / "data"))[0].state_dict()

    a, b, c = weights("a", 0), weights("b", 0), weights("c", 1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("revision", ["final", "step1", "step0"])
def test_transformerlens_logits_match_transformers(trained, revision):
    _, _, out = trained
    hf, tok = lm.load_hf_model(out, revision)
    tl = lm.load_model(out, revision)
    x = lm.validation_contexts(out, max_contexts=4)
    with torch.no_grad():
        diff = (hf(x).logits - tl(x)).abs().max().item()
    assert diff <= 1e-4
    assert lm.loaded(tl).revision == revision


def test_checkpoints_differ_and_missing_ones_are_listed(trained):
    _, _, out = trained
    a = lm.load_hf_model(out, "step0")[0].state_dict()
    b = lm.load_hf_model(out, "step32")[0].state_dict()
    assert not all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(FileNotFoundError, match="step32"):
        lm.load_model(out, "step3")
    with pytest.raises(FileNotFoundError, match="train_offline_model"):
        lm.load_model(out / "nowhere")


def test_hooks_have_transformerlens_names_and_bad_ones_are_explained(trained):
    _, _, out = trained
    model = lm.load_model(out)
    valid = lm.valid_hooks(model)
    for L in range(2):
        for kind in ["resid_pre", "resid_post", "mlp_post", "mlp_out", "attn_out"]:
            assert lm.hook_name(kind, L) in valid
    assert lm.check_hooks(model, ["blocks.1.hook_resid_post"]) == ["blocks.1.hook_resid_post"]
    with pytest.raises(ValueError, match=r"valid layers 0\.\.1"):
        lm.check_hooks(model, ["blocks.2.hook_resid_post"])
    with pytest.raises(ValueError, match="hook_resid_post"):
        lm.check_hooks(model, ["blocks.0.hook_nonsense"])
    with pytest.raises(ValueError, match="unknown hook kind"):
        lm.hook_name("resid", 0)


def test_validation_contexts_are_the_held_out_tokens(trained):
    _, log, out = trained
    v = lm.validation_contexts(out)
    assert v.shape[1] == 16 and v.dtype == torch.long and v.numel() == log["metrics"]["val_tokens"]
    assert lm.validation_contexts(out, ctx_len=8, max_contexts=3).shape == (3, 8)
