"""sweep: train on a store, save in SAELens layout with the scale folded in, reuse on rerun, never overwrite."""

import pytest
import torch

from sparse_coding import dictionaries as sweep
from sparse_coding.activations import ToyConfig, ToyData, write_store
from sparse_coding.dictionaries.training import snapshot_steps


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def store(make_store):
    """A store of planted sparse data, scaled x50 like a raw residual stream."""
    data = ToyData(ToyConfig(d=16, n_features=24, mean_active=2.0, correlated=False, seed=0))
    x, _ = data.sample(8192, generator=torch.Generator().manual_seed(0))
    return make_store(50 * x), data


def test_input_scale_normalises_mean_squared_norm(store):
    s, _ = store
    scale = sweep.default_input_scale(s, 0)
    x = s.all()
    assert abs((scale * x).pow(2).sum(1).mean().item() - s.d) < 1e-3 * s.d


def test_train_save_reuse_and_refuse_overwrite(store, tmp_path):
    s, data = store
    run = sweep.train_lm_sweep(s, "relu", 2, {"l1_coef": [0.01, 0.1]}, data_dir=tmp_path, n_tokens=8192 * 4,
                               batch_size=256, lr=3e-3, progress=False)
    assert not run.reused and run.sae.n_members == 2 and run.sae.d_sae == 32
    assert (run.folder / "member-000" / "cfg.json").exists() and len(run.history) > 0
    # The loaded sweep takes raw activations: it reconstructs the x50 data well, not the normalised one.
    x = s.rows(torch.arange(512))
    with torch.no_grad():
        x_hat = run.sae(x).x_hat
    fvu = (x_hat - x).pow(2).sum(-1).mean(-1) / (x - x.mean(0)).pow(2).sum(-1).mean()
    assert float(fvu.max()) < 0.3
    again = sweep.train_lm_sweep(s, "relu", 2, {"l1_coef": [0.01, 0.1]}, data_dir=tmp_path, n_tokens=8192 * 4,
                                 batch_size=256, lr=3e-3, progress=False)
    assert again.reused and torch.equal(again.sae.W_dec, run.sae.W_dec)
    with pytest.raises(FileExistsError, match="retrain=True"):
        sweep.train_lm_sweep(s, "relu", 2, {"l1_coef": [0.02, 0.1]}, data_dir=tmp_path, n_tokens=8192 * 4,
                             batch_size=256, lr=3e-3, progress=False)


def test_sweep_is_deterministic(store, tmp_path):
    s, _ = store
    kw = dict(n_tokens=4096, batch_size=256, lr=3e-3, progress=False)
    a = sweep.train_lm_sweep(s, "topk", 2, {"k": [2, 4]}, data_dir=tmp_path / "a", **kw)
    b = sweep.train_lm_sweep(s, "topk", 2, {"k": [2, 4]}, data_dir=tmp_path / "b", **kw)
    assert torch.equal(a.sae.W_dec, b.sae.W_dec) and torch.equal(a.sae.W_enc, b.sae.W_enc)


def test_bad_ratio_and_too_few_tokens(store, tmp_path):
    s, _ = store
    with pytest.raises(ValueError, match="ratio"):
        sweep.train_lm_sweep(s, "relu", 0, {"l1_coef": 0.1}, data_dir=tmp_path)
    with pytest.raises(ValueError, match="batch_size"):
        sweep.train_lm_sweep(s, "relu", 1, {"l1_coef": 0.1}, data_dir=tmp_path, n_tokens=10, batch_size=256)


def test_snapshots_are_kept_beside_the_sweep(store, tmp_path):
    s, _ = store
    run = sweep.train_lm_sweep(s, "topk", 1, {"k": 2}, data_dir=tmp_path, n_tokens=256 * 9, batch_size=256,
                               progress=False, snapshots=True)
    assert snapshot_steps(sweep.state_dir(run.folder)) == [0, 1, 2, 4, 8, 9]  # steps completed, the last one included


def test_reference_dictionary_is_another_seed_of_the_same_size(store, tmp_path):
    s = write_store(tmp_path / "acts", store[0].all(), model="offline", revision="final", hook="blocks.0.hook_resid_post")
    kw = dict(n_tokens=4096, batch_size=256, progress=False)
    runs = {(ratio, seed): sweep.train_lm_sweep(s, "topk", ratio, {"k": 2}, data_dir=tmp_path / "04_mcs", seed=seed,
                                                **kw) for ratio in (2, 4) for seed in (0, 1)}
    model, revision, hook = (s.manifest[k] for k in ("model", "revision", "hook"))
    mine = runs[(4, 0)].folder / sweep.member_name(0)
    assert sweep.dictionary_seed(mine) == 0
    roots = [tmp_path / "04_mcs", tmp_path]
    found = sweep.reference_dictionary(roots, model, revision, hook, 64, sweep.dictionary_seed(mine))
    assert found == runs[(4, 1)].folder / sweep.member_name(0)  # same size (64), the other seed
    assert sweep.reference_dictionary(roots, model, revision, hook, 32, 1) == runs[(2, 0)].folder / "member-000"
    assert sweep.reference_dictionary(roots, model, revision, hook, 128, 0) is None  # no dictionary of that size
    assert sweep.reference_dictionary([tmp_path / "elsewhere"], model, revision, hook, 64, 0) is None
