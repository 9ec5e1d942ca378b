import math

import pytest
import torch

from sparse_coding.activations import ToyConfig, ToyData
from sparse_coding.studies.nb01_toy import run_baselines, run_toy_sweep, train_topk


@pytest.fixture(scope="module")
def easy():
    # few, equally likely, independent features in more dimensions than features: an SAE must find them all
    return ToyData(ToyConfig(d=16, n_features=8, k=1.5, decay=1.0, correlated=False, seed=0))


@pytest.fixture(scope="module")
def sweep(easy):
    return run_toy_sweep(easy, l1_coefs=[0.3, 0.01], per_true_grid=[2, 1], steps=300, batch_size=64, lr=1e-2, n_eval=512)


def test_sweep_table_covers_the_grid(sweep):
    t = sweep.table
    assert sweep.l1_coefs == [0.01, 0.3] and sweep.per_true_grid == [1.0, 2.0]  # sorted
    assert len(t) == 4 and set(t["d_sae"]) == {8, 16}
    for col in ["mmcs", "mmcs_reverse", "share_recovered", "dead_share", "l0", "fvu", "mmcs_vs_larger"]:
        assert col in t
    # only the smaller dictionary has a next-larger one
    assert t[t.per_true == 1.0]["mmcs_vs_larger"].notna().all() and t[t.per_true == 2.0]["mmcs_vs_larger"].isna().all()
    assert sweep.grid("mmcs").shape == (2, 2)
    assert sweep.dictionaries[2.0].shape == (2, 16, 16)
    assert set(sweep.history["per_true"]) == {1.0, 2.0}


def test_sweep_recovers_planted_features(sweep):
    best = sweep.best()
    assert best["mmcs"] > 0.95
    assert best["mmcs"] == pytest.approx(sweep.table["mmcs"].max())
    # the MMCS against the truth is what the dictionaries say it is
    row = sweep.table[(sweep.table.per_true == best["per_true"]) & (sweep.table.l1_coef == best["l1_coef"])]
    assert row["share_recovered"].item() > 0.8


def test_sweep_is_deterministic(easy):
    a, b = (run_toy_sweep(easy, l1_coefs=[0.1], per_true_grid=[1], steps=20, batch_size=32, n_eval=64) for _ in range(2))
    torch.testing.assert_close(a.dictionaries[1.0], b.dictionaries[1.0])


def test_topk_and_baselines_run_and_score(easy):
    out = train_topk(easy, k=2, per_true=1, steps=100, batch_size=64, lr=1e-2, n_eval=256)
    assert 0 < out["mmcs"] <= 1 and out["l0"] <= 2 + 1e-6
    base = run_baselines(easy, n_samples=600, omp_iter=3, ica_samples=400, k_true=2)
    assert list(base["method"][:2]) == ["PCA", "ICA"]
    assert base["d_sae"].tolist() == [16, 16, 8, 8]  # PCA/ICA: min(n_samples, d); OMP: one atom per feature
    assert all(0 < v <= 1 + 1e-6 and math.isfinite(v) for v in base["mmcs"])


@pytest.mark.parametrize("kwargs, name", [
    (dict(l1_coefs=[], per_true_grid=[1]), "l1_coefs"), (dict(l1_coefs=[-1.0], per_true_grid=[1]), "l1_coefs"),
    (dict(l1_coefs=[0.1], per_true_grid=[0]), "per_true"), (dict(l1_coefs=[0.1, 0.1], per_true_grid=[1]), "l1_coefs"),
    (dict(l1_coefs=[0.1], per_true_grid=[1], steps=0), "steps"),
])
def test_bad_sweep_parameters(easy, kwargs, name):
    kwargs.setdefault("steps", 1)
    with pytest.raises(ValueError, match=name):
        run_toy_sweep(easy, **kwargs)
