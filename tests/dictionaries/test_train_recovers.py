"""The training loop: planted dictionaries are recovered, ensembles equal solo runs, runs are reproducible, the log
says what it should and bad batches are refused."""

import pytest
import torch

from sparse_coding.dictionaries import make_sae
from sparse_coding.analyses import mmcs
from sparse_coding.dictionaries.training import train_sae


pytestmark = pytest.mark.usefixtures("one_thread")


def planted(d=24, n_features=48, k=3, seed=0):
    """A sparse-data generator from a random unit dictionary (independent of sparse_coding.toy on purpose, so a
    bug there cannot hide one here): each feature fires with probability k/n, magnitude uniform [0, 1)."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(n_features, d, generator=g)
    D = D / D.norm(dim=1, keepdim=True)

    def sample(batch_size, gen):
        fire = torch.rand(batch_size, n_features, generator=gen) < k / n_features
        return (fire * torch.rand(batch_size, n_features, generator=gen)) @ D

    return D, sample


# l1_coef on inputs normalised to E‖x‖² = d_in (train_sae's default): 1.5 there is 0.3 on these raw inputs.
@pytest.mark.parametrize("kind,kw,lr", [("relu", {"l1_coef": 1.5}, 3e-3), ("topk", {"k": 3}, 3e-3)])
def test_planted_dictionary_is_recovered(kind, kw, lr):
    D, sample = planted()
    sae = make_sae(kind, d_in=24, d_sae=96, seed=0, **kw)
    g = torch.Generator().manual_seed(1)
    hist = train_sae(sae, lambda s: sample(256, g), steps=1200, lr=lr, log_every=400, progress=False)
    score = mmcs(D, sae.decoder_directions()[0])
    assert score >= 0.95, (score, hist.tail(1).to_dict("records"))
    # An untrained dictionary of the same size is far from the truth: the score is earned.
    assert mmcs(D, make_sae(kind, d_in=24, d_sae=96, seed=5, **kw).decoder_directions()[0]) < 0.7
    assert hist["fvu"].iloc[-1] < 0.2


@pytest.mark.parametrize("kind,kw", [("relu", {"l1_coef": [0.01, 0.1, 0.3]}), ("topk", {"k": [2, 3, 5]}),
                                     ("relu", {"l1_coef": [0.05, 0.2, 0.1], "tied": True})])
def test_ensemble_members_match_solo_runs(kind, kw):
    D, sample = planted(d=16, n_features=32)
    seeds = [4, 9, 2]
    xs = [sample(64, torch.Generator().manual_seed(100 + s)) for s in range(60)]
    # A short dead window so that AuxK is exercised too.
    ens = make_sae(kind, d_in=16, d_sae=48, seed=seeds, dead_window=512, **kw)
    hist = train_sae(ens, xs, steps=60, lr=1e-2, log_every=20, progress=False)
    for i, seed in enumerate(seeds):
        solo_kw = {k: (v[i] if isinstance(v, list) else v) for k, v in kw.items()}
        solo = make_sae(kind, d_in=16, d_sae=48, seed=seed, dead_window=512, **solo_kw)
        solo_hist = train_sae(solo, xs, steps=60, lr=1e-2, log_every=20, progress=False)
        for name, t in solo.member_state(0).items():
            torch.testing.assert_close(ens.member_state(i)[name], t, atol=1e-5, rtol=0, msg=name)
        mine = hist[hist.member == i].reset_index(drop=True)
        torch.testing.assert_close(torch.tensor(mine.loss.values), torch.tensor(solo_hist.loss.values),
                                   atol=1e-5, rtol=1e-5)


def test_same_seed_same_weights_bitwise():
    D, sample = planted(d=16, n_features=32)
    data = torch.cat([sample(500, torch.Generator().manual_seed(0))])
    runs = []
    for _ in range(2):
        sae = make_sae("topk", d_in=16, d_sae=40, k=[2, 4], seed=[1, 2], dead_window=256)
        h = train_sae(sae, data, batch_size=32, steps=40, lr=1e-2, log_every=10, progress=False, seed=3)
        runs.append((sae.state_dict(), h))
    for name in runs[0][0]:
        assert torch.equal(runs[0][0][name], runs[1][0][name]), name
    assert runs[0][1].equals(runs[1][1])
    # A different training seed draws other batches from the dataset, so the weights move apart.
    sae = make_sae("topk", d_in=16, d_sae=40, k=[2, 4], seed=[1, 2], dead_window=256)
    train_sae(sae, data, batch_size=32, steps=40, lr=1e-2, log_every=10, progress=False, seed=4)
    assert not torch.equal(sae.W_dec, runs[0][0]["W_dec"])


def test_history_columns_rows_and_known_dead_fraction():
    sae = make_sae("relu", d_in=8, d_sae=20, l1_coef=[0.0, 1e-3], seed=[0, 1])
    with torch.no_grad():
        # Half the latents always fire, half never can (their gradient is zero through the ReLU).
        sae.b_enc[:, :10] = 100.0
        sae.b_enc[:, 10:] = -100.0
    g = torch.Generator().manual_seed(0)
    calls = []
    hist = train_sae(sae, lambda s: torch.randn(16, 8, generator=g), steps=23, lr=1e-6, log_every=10,
                     progress=False, dead_window=48, callback=lambda step, s: calls.append(step))
    assert calls == [0, 10, 20, 22]
    assert len(hist) == 4 * 2
    assert list(hist.columns[:7]) == ["step", "member", "loss", "mse", "fvu", "l0", "dead_frac"]
    assert {"l1", "l1_coef", "seed"} <= set(hist.columns)
    assert hist["step"].tolist() == [0, 0, 10, 10, 20, 20, 22, 22]
    assert hist["l1_coef"].tolist() == [0.0, 1e-3] * 4
    assert (hist["l0"] == 10).all()
    assert (hist["dead_frac"] == 0.5).all()
    last = hist.iloc[-1]
    assert last.loss == pytest.approx(last.mse + last["l1"], rel=1e-5)


def test_fvu_is_mse_over_variance():
    sae = make_sae("relu", d_in=8, d_sae=16, l1_coef=0.0)
    with torch.no_grad():
        sae.W_dec.zero_()  # x̂ = b_dec = 0, so mse = E‖x‖² and fvu = E‖x‖² / E‖x - x̄‖²
    x = torch.randn(1000, 8, generator=torch.Generator().manual_seed(0)) + 5.0
    var = (x - x.mean(0)).pow(2).sum(1).mean()
    hist = train_sae(sae, lambda s: x, steps=1, lr=1e-9, progress=False, input_scale=1.0)
    assert hist.mse.iloc[0] == pytest.approx(float(x.pow(2).sum(1).mean()), rel=1e-5)
    assert hist["fvu"].iloc[0] == pytest.approx(float(x.pow(2).sum(1).mean() / var), rel=1e-5)
    # By default the SAE sees inputs scaled to E‖s·x‖² = d_in: the mse (in those units) is d_in, the fvu unchanged.
    sae = make_sae("relu", d_in=8, d_sae=16, l1_coef=0.0)
    with torch.no_grad():
        sae.W_dec.zero_()
    hist = train_sae(sae, lambda s: x, steps=1, lr=1e-9, progress=False)
    assert sae.input_scale == pytest.approx(float(8 / x.pow(2).sum(1).mean()) ** 0.5, rel=1e-5)
    assert hist.mse.iloc[0] == pytest.approx(8.0, rel=1e-5)
    assert hist["fvu"].iloc[0] == pytest.approx(float(x.pow(2).sum(1).mean() / var), rel=1e-5)


def test_bad_batches_and_arguments_raise():
    sae = make_sae("relu", d_in=4, d_sae=8)
    bad = torch.randn(10, 4)
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        train_sae(sae, [torch.randn(10, 4), bad], steps=2, progress=False)
    with pytest.raises(ValueError, match=r"d_in=4\], got \(10, 5\)"):
        train_sae(sae, [torch.randn(10, 5)], steps=1, progress=False)
    with pytest.raises(ValueError, match="ran out after 1 steps"):
        train_sae(sae, [torch.randn(10, 4)], steps=2, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        train_sae(sae, torch.randn(100, 4), steps=2, progress=False, batch_size=0)
    for kwargs, name in [({"steps": 0}, "steps"), ({"lr": -1.0}, "lr"), ({"log_every": 0}, "log_every"),
                         ({"dead_window": 0}, "dead_window")]:
        with pytest.raises(ValueError, match=name):
            train_sae(sae, lambda s: torch.randn(4, 4), **kwargs, progress=False)
