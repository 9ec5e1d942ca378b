"""sweep: train on a store, save in SAELens layout with the scale folded in, reuse on rerun, never overwrite."""

import numpy as np
import pytest
import torch

from sparse_coding import activations as A
from sparse_coding import sweep
from sparse_coding.io import save_json
from sparse_coding.toy import ToyConfig, ToyData


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A harvest folder of planted sparse data, scaled x50 like a raw residual stream."""
    folder = tmp_path_factory.mktemp("store") / "acts"
    folder.mkdir()
    data = ToyData(ToyConfig(d=16, n_features=24, k=2.0, correlated=False, seed=0))
    x, _ = data.sample(8192, generator=torch.Generator().manual_seed(0))
    x = 50 * x
    nbytes, sha = A.write_chunk(folder / "chunk-00000.safetensors",
                                {"acts": x, "tokens": torch.zeros(len(x), dtype=torch.int32)})
    save_json(folder / A.MANIFEST, {"model": "toy/model", "revision": "final", "hook": "blocks.0.hook_resid_post",
                                    "d": 16, "dtype": "float32", "n_tokens": len(x), "target_tokens": len(x),
                                    "ctx_len": 16, "corpus": "toy", "seed": 0, "complete": True,
                                    "chunks": [{"file": "chunk-00000.safetensors", "rows": len(x), "bytes": nbytes,
                                                "crc32": sha}]})
    return A.ActivationStore(folder), data


def test_input_scale_normalises_mean_squared_norm(store):
    s, _ = store
    scale = sweep.input_scale(s)
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
        x_hat = run.sae(x)["x_hat"]
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


def _table():
    import pandas as pd

    return pd.DataFrame({"kind": ["relu"] * 3 + ["topk"] * 2, "l0": [4.0, 16.0, 64.0, 8.0, 100.0],
                         "fvu": [0.4, 0.2, 0.1, 0.15, 0.01], "dead_frac": [0, 0.1, 0.0, 0.02, 0.0],
                         "ppl_clean": [10.0] * 5, "ppl_spliced": [20, 15, 12, 14, 11.0],
                         "loss_recovered": [0.5, 0.7, 0.9, 0.8, 0.99]})


def test_best_members_respects_the_l0_budget():
    best = sweep.best_members(_table(), l0_budget=20)
    assert best.loc["relu", "l0"] == 16.0 and best.loc["topk", "l0"] == 8.0
    # nothing within budget: the sparsest member
    assert sweep.best_members(_table(), l0_budget=2).loc["relu", "l0"] == 4.0


def test_fvu_vs_reference_interpolates_in_log_log():
    t = _table()
    # relu at L0=8 interpolates log-linearly between (4, 0.4) and (16, 0.2): sqrt(0.4 * 0.2); topk 0.15 is below.
    expected = float(np.log2(0.15 / np.sqrt(0.4 * 0.2)))
    assert abs(sweep.fvu_vs_reference(t, "topk") - expected) < 1e-9  # L0=100 is outside relu's range: ignored
    m = sweep.frontier_metrics(t, sweep.best_members(t, 20), l0_budget=20)
    # the headline splice is the sweep's best SAE within the budget: topk at L0 8 (FVU 0.15 < relu's 0.2)
    assert m["max_dead_fraction"] == 0.1 and m["clean_perplexity"] == 10.0 and m["spliced_perplexity"] == 14.0
    assert m["spliced_perplexity_kind"] == "topk" and m["best_relu_spliced_perplexity"] == 15.0
    # topk has nothing within L0 <= 5: its fallback (L0 8) may not win the headline however low its FVU
    m5 = sweep.frontier_metrics(t, sweep.best_members(t, 5), l0_budget=5)
    assert m5["spliced_perplexity_kind"] == "relu" and m5["spliced_perplexity"] == 20.0
    assert m["topk_log2_fvu_vs_relu_at_same_l0"] < 0


def test_checkpoints_are_kept_beside_the_sweep(store, tmp_path):
    s, _ = store
    run = sweep.train_lm_sweep(s, "topk", 1, {"k": 2}, data_dir=tmp_path, n_tokens=256 * 9, batch_size=256,
                               progress=False, checkpoints=True)
    from sparse_coding.checkpoint import snapshot_steps

    assert snapshot_steps(sweep.checkpoint_dir(run.folder)) == [0, 1, 2, 4, 8, 9]  # steps completed, the last one included
