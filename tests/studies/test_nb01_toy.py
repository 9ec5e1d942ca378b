import math

import pytest
import torch

from sparse_coding.activations import ToyConfig, ToyData
from sparse_coding.studies.nb01_toy import run_baselines, run_toy_sweep


@pytest.fixture(scope="module")
def easy():
    # few, equally likely, independent features in more dimensions than features: an SAE must find them all
    return ToyData(ToyConfig(d=16, n_features=8, mean_active=1.5, decay=1.0, correlated=False, seed=0))


@pytest.fixture(scope="module")
def sweep(easy):
    return run_toy_sweep(easy, "relu", [1.5, 0.05], per_true_grid=[2, 1], steps=300, batch_size=64, lrs=[1e-2],
                         n_eval=512)


def test_sweep_table_covers_the_grid(sweep):
    t = sweep.table
    assert sweep.values == [0.05, 1.5] and sweep.per_true_grid == [1.0, 2.0]  # sorted
    assert sweep.param == "l1_coef" and sweep.lrs == [1e-2]
    assert len(t) == 4 and set(t["d_sae"]) == {8, 16}
    for col in ["mmcs", "mmcs_reverse", "share_recovered", "dead_share", "l0", "fvu", "mmcs_vs_larger", "lr"]:
        assert col in t
    # only the smaller dictionary has a next-larger one
    assert t[t.per_true == 1.0]["mmcs_vs_larger"].notna().all() and t[t.per_true == 2.0]["mmcs_vs_larger"].isna().all()
    assert sweep.grid("mmcs").shape == (2, 2)
    assert sweep.dictionaries[(2.0, 1e-2)].shape == (2, 16, 16)
    assert set(sweep.history["per_true"]) == {1.0, 2.0}


@pytest.mark.parametrize("kind, values", [("topk", [2, 1]), ("batchtopk", [2]), ("jumprelu", [0.5])])
def test_every_kind_sweeps_its_own_setting_and_lr(easy, kind, values):
    out = run_toy_sweep(easy, kind, values, per_true_grid=[1], steps=150, batch_size=64, lrs=[3e-3, 1e-2], n_eval=256)
    assert len(out.table) == len(values) * 2 and set(out.table["lr"]) == {3e-3, 1e-2}
    best = out.best()
    assert best["kind"] == kind and best["mmcs"] == pytest.approx(out.table["mmcs"].max())
    assert best[out.param] in values and best["lr"] in (3e-3, 1e-2)
    if kind == "topk":  # exactly k active per held-out row
        for k in values:
            assert out.table[out.table.k == k]["l0"].max() <= k + 1e-6


def test_sweep_recovers_planted_features(sweep):
    best = sweep.best()
    assert best["mmcs"] > 0.95
    assert best["mmcs"] == pytest.approx(sweep.table["mmcs"].max())
    # the MMCS against the truth is what the dictionaries say it is
    row = sweep.table[(sweep.table.per_true == best["per_true"]) & (sweep.table.l1_coef == best["l1_coef"])]
    assert row["share_recovered"].item() > 0.8


def test_sweep_is_deterministic(easy):
    a, b = (run_toy_sweep(easy, "relu", [0.1], per_true_grid=[1], steps=20, batch_size=32, n_eval=64)
            for _ in range(2))
    torch.testing.assert_close(a.dictionaries[(1.0, 1e-3)], b.dictionaries[(1.0, 1e-3)])


def test_baselines_run_and_score(easy):
    base = run_baselines(easy, n_samples=600, ksvd_iter=3, ica_samples=400, k_true=2, online_epochs=1)
    assert list(base["method"][:2]) == ["PCA", "ICA"]
    # PCA: min(n_samples, d); ICA: the rank of the data (8 true features span 8 of the 16 dims: the other 8
    # whitened directions are noise it cannot unmix); K-SVD and online dictionary learning: one atom per true feature
    assert base["d_sae"].tolist() == [16, 8, 8, 8, 8]
    assert all(0 < v <= 1 + 1e-6 and math.isfinite(v) for v in base["mmcs"])


@pytest.mark.parametrize("kind, values, kwargs, name", [
    ("relu", [], dict(per_true_grid=[1]), "l1_coefs"), ("relu", [-1.0], dict(per_true_grid=[1]), "l1_coefs"),
    ("relu", [0.1], dict(per_true_grid=[0]), "per_true"), ("relu", [0.1, 0.1], dict(per_true_grid=[1]), "l1_coefs"),
    ("relu", [0.1], dict(per_true_grid=[1], steps=0), "steps"), ("relu", [0.1], dict(per_true_grid=[1], lrs=[0]), "lrs"),
    ("topk", [1.5], dict(per_true_grid=[1]), "k"), ("topk", [20], dict(per_true_grid=[1]), "k=20"),
    ("gated", [1], dict(per_true_grid=[1]), "kind"),
])
def test_bad_sweep_parameters(easy, kind, values, kwargs, name):
    kwargs.setdefault("steps", 1)
    with pytest.raises(ValueError, match=name):
        run_toy_sweep(easy, kind, values, **kwargs)
