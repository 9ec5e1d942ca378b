import pytest
import torch

from sparse_coding.activations import ToyConfig, ToyData, firing_probabilities


def test_defaults_are_sharkey_setting():
    cfg = ToyConfig()
    assert (cfg.d, cfg.n_features, cfg.mean_active, cfg.decay, cfg.correlated, cfg.noise) == (256, 512, 5.0, 0.99, True, 0.0)


def test_shapes_and_codes_reconstruct_x():
    data = ToyData(ToyConfig(d=32, n_features=64, mean_active=3.0))
    x, codes = data.sample(100)
    assert x.shape == (100, 32) and codes.shape == (100, 64)
    assert x.dtype == torch.float32 and codes.dtype == torch.float32
    # x is exactly the magnitude-weighted sum of true directions; magnitudes lie in [0, 1)
    torch.testing.assert_close(x, codes @ data.features, atol=1e-5, rtol=1e-5)
    assert codes.min() >= 0 and codes.max() < 1


def test_features_are_unit_norm():
    data = ToyData(ToyConfig(d=20, n_features=50, mean_active=2.0))
    torch.testing.assert_close(data.features.norm(dim=1), torch.ones(50))


@pytest.mark.parametrize("correlated", [False, True])
def test_mean_active_count_is_k(correlated):
    data = ToyData(ToyConfig(d=32, n_features=128, mean_active=5.0, decay=0.98, correlated=correlated))
    _, codes = data.sample(20000, data.generator(1))
    active = (codes > 0).sum(1).float()
    # std of the mean over 20k rows is well below 0.05 here
    assert abs(active.mean().item() - 5.0) < 0.1
    # per-feature firing frequency matches p_i (the copula must keep the marginals)
    freq = (codes > 0).float().mean(0)
    assert (freq - data.probabilities).abs().max() < 0.015


def test_firing_frequencies_decay():
    data = ToyData(ToyConfig(d=32, n_features=200, mean_active=4.0, decay=0.98, correlated=False))
    _, codes = data.sample(20000, data.generator(2))
    freq = (codes > 0).float().mean(0)
    first, last = freq[:20].mean(), freq[-20:].mean()
    expected_ratio = 0.98 ** 180
    assert last / first == pytest.approx(expected_ratio, rel=0.25)
    # a monotone trend, not just the endpoints
    blocks = freq.view(10, 20).mean(1)
    assert (blocks[1:] < blocks[:-1]).all()


def test_probabilities_clip_and_keep_k():
    p = firing_probabilities(10, 9.5, 0.5)
    assert p.max() <= 1.0
    assert p.sum().item() == pytest.approx(9.5)
    assert (p[:-1] == 1).all() and p[-1] == pytest.approx(0.5)
    # decay=1 is uniform
    torch.testing.assert_close(firing_probabilities(8, 2.0, 1.0), torch.full((8,), 0.25, dtype=torch.float64))


def test_determinism_per_seed():
    cfg = ToyConfig(d=16, n_features=40, mean_active=3.0)
    a, b = ToyData(cfg), ToyData(cfg)
    torch.testing.assert_close(a.features, b.features)
    xa = list(a.batches(8, 3, seed=5))
    xb = list(b.batches(8, 3, seed=5))
    xc = list(a.batches(8, 3, seed=6))
    assert all(torch.equal(u, v) for u, v in zip(xa, xb))
    assert not torch.equal(xa[0], xc[0])
    # a different config seed gives different ground truth
    assert not torch.allclose(ToyData(ToyConfig(d=16, n_features=40, mean_active=3.0, seed=1)).features, a.features)
    # explicit generators reproduce
    torch.testing.assert_close(a.sample(5, a.generator(3))[0], b.sample(5, b.generator(3))[0])


def test_correlated_mode_correlates_firing():
    cfg = dict(d=16, n_features=60, mean_active=12.0, decay=1.0, corr_rank=4)
    corr_data = ToyData(ToyConfig(correlated=True, **cfg))
    _, codes = corr_data.sample(20000, corr_data.generator(0))
    fires = (codes > 0).float()
    emp = torch.corrcoef(fires.T)
    off = ~torch.eye(60, dtype=torch.bool)
    sigma = corr_data.correlation
    torch.testing.assert_close(sigma.diagonal(), torch.ones(60))
    # firing correlations follow the latent correlation matrix, sign and size
    r = torch.corrcoef(torch.stack([emp[off], sigma[off]]))[0, 1]
    assert r > 0.9
    assert emp[off].abs().mean() > 0.1

    indep = ToyData(ToyConfig(correlated=False, **cfg))
    assert indep.correlation is None
    _, codes = indep.sample(20000, indep.generator(0))
    emp = torch.corrcoef((codes > 0).float().T)
    assert emp[off].abs().max() < 0.05


def test_noise_is_added():
    data = ToyData(ToyConfig(d=64, n_features=32, mean_active=2.0, noise=0.1))
    x, codes = data.sample(4000)
    resid = x - codes @ data.features
    assert resid.std().item() == pytest.approx(0.1, rel=0.05)


@pytest.mark.parametrize("kwargs, name", [
    (dict(mean_active=600.0), "mean_active"), (dict(mean_active=0.0), "mean_active"), (dict(d=0), "d"), (dict(n_features=0), "n_features"),
    (dict(decay=0.0), "decay"), (dict(decay=1.5), "decay"), (dict(noise=-0.1), "noise"), (dict(corr_rank=0), "corr_rank"), (dict(correlated=True, corr_rank=-2), "corr_rank"),
])
def test_bad_config_names_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ToyConfig(**kwargs)


def test_bad_sample_arguments():
    data = ToyData(ToyConfig(d=8, n_features=16, mean_active=2.0))
    with pytest.raises(ValueError, match="batch_size"):
        data.sample(0)
    with pytest.raises(ValueError, match="steps"):
        list(data.batches(4, -1))
    with pytest.raises(ValueError, match="cfg"):
        ToyData({"d": 8})
