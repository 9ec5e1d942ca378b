"""Nothing trained is lost: the offline model's folder is never deleted behind the caller's back, an interrupted
training resumes to the uninterrupted result bit for bit, two trainings cannot write one folder at once, and
activations made from a model that has since been retrained are refused as stale."""

import pytest
import torch

from conftest import train_tiny
from sparse_coding import lm
from sparse_coding.files import folder_lock, load_json

pytestmark = pytest.mark.usefixtures("one_thread")


def _weights(root):
    return lm.load_hf_model(lm.offline_dir(root / "data"))[0].state_dict()


def test_other_settings_are_refused_naming_them_and_nothing_is_deleted(tmp_path):
    train_tiny(tmp_path, steps=4)
    out = lm.offline_dir(tmp_path / "data")
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(FileExistsError, match=r"seed 0 -> 1") as e:
        train_tiny(tmp_path, seed=1, steps=4)
    assert str(out) in str(e.value) and "overwrite=True" in str(e.value)
    assert sorted(p.name for p in out.iterdir()) == before  # step folders, final and log all still there
    # An explicit overwrite retrains with the new settings, and the model id changes with them.
    old_id = lm.model_id("offline", tmp_path / "data")
    lm.train_offline_model(tmp_path / "data", lm.LMConfig(seed=1, **{**_tiny(), "steps": 4}),
                           source=str(tmp_path / "texts"), progress=False, overwrite=True)
    assert load_json(out / "train_log.json")["run_key"]["config"]["seed"] == 1
    assert lm.model_id("offline", tmp_path / "data") not in (None, old_id)


def _tiny():
    from conftest import TINY
    return dict(TINY)


def test_folder_of_unknown_origin_is_refused(tmp_path):
    # checkpoints but no train_log.json / run.json: the old code deleted them and retrained
    out = lm.offline_dir(tmp_path / "data")
    (out / "step4").mkdir(parents=True)
    (out / "step4" / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="no run.json"):
        train_tiny(tmp_path, steps=4)
    assert (out / "step4" / "config.json").exists()


def test_interrupted_training_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch):
    train_tiny(tmp_path / "whole", steps=12)
    calls = {"n": 0}
    real = lm.train.lr_at

    def dies_at_step_9(step, cfg):
        if step == 9:
            raise KeyboardInterrupt("killed")
        return real(step, cfg)

    monkeypatch.setattr(lm.train, "lr_at", dies_at_step_9)
    with pytest.raises(KeyboardInterrupt):
        lm.train_offline_model(tmp_path / "cut" / "data", lm.LMConfig(**{**_tiny(), "steps": 12}),
                               source=str(_texts(tmp_path)), progress=False, state_every=4)
    out = lm.offline_dir(tmp_path / "cut" / "data")
    assert (out / "resume" / "state.json").exists() and not (out / "train_log.json").exists()
    assert load_json(out / "resume" / "state.json")["loop"]["step"] == 8
    monkeypatch.setattr(lm.train, "lr_at", real)
    log = lm.train_offline_model(tmp_path / "cut" / "data", lm.LMConfig(**{**_tiny(), "steps": 12}),
                                 source=str(_texts(tmp_path)), progress=False, state_every=4)
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
    whole = load_json(lm.offline_dir(tmp_path / "whole" / "data") / "train_log.json")
    assert log["history"] == whole["history"]
    assert not (out / "resume").exists()  # the resumable state goes once the run is complete


def _texts(tmp_path):
    return tmp_path / "whole" / "texts"


def test_two_trainings_cannot_write_one_folder(tmp_path):
    data = tmp_path / "data"
    with folder_lock(lm.offline_dir(data).parent, "another job"):
        with pytest.raises(BlockingIOError, match="another job"):
            train_tiny(tmp_path, steps=4)


def test_activations_of_a_retrained_model_are_stale(tmp_path):
    from sparse_coding import activations

    train_tiny(tmp_path, steps=4)
    data = tmp_path / "data"
    tl = lm.load_model(lm.model_source("offline", data))
    hook = "blocks.0.hook_resid_post"
    store = activations.ensure_activations(tl, "offline", "final", hook, 256, data_dir=data, progress=False)
    assert store.manifest["model_id"] == lm.model_id("offline", data)
    assert store.manifest["ctx_len"] == tl.cfg.n_ctx  # contexts of the model's own length by default
    lm.train_offline_model(data, lm.LMConfig(seed=3, **{**_tiny(), "steps": 4}), source=str(tmp_path / "texts"),
                           progress=False, overwrite=True)
    with pytest.raises(ValueError, match="stale"):
        activations.ensure_activations(tl, "offline", "final", hook, 256, data_dir=data, progress=False)


def test_contexts_longer_than_the_model_are_refused(tiny_lm):
    from sparse_coding import activations

    root, _, out = tiny_lm
    tl = lm.load_model(out)
    too_long = torch.zeros(4, tl.cfg.n_ctx + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="n_ctx"):
        activations.harvest(tl, too_long, ["blocks.0.hook_resid_post"], 16, root / "acts", "offline", "final",
                            progress=False)
