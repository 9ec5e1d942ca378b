"""Bad inputs to the sweeps, the classical baselines, FVU, the batch sources and TrainSettings (audit). Faults fixed:

- ica_dictionary on data that spans fewer directions than min(n_samples, d) (a dead or constant column, features in a
  subspace, n_samples <= d): returned rows far from unit norm (noise directions), or an error about NaN/inf from
  inside scikit-learn's whitening; now n_components defaults to the centred rank and one above it is a ValueError.
- online_dictionary(n_epochs=0) returned scikit-learn's random initial dictionary as if trained (-1: an error about
  max_iter); pca/ica/online_dictionary with seed >= 2**32 failed inside scikit-learn about random_state, and
  ksvd_dictionary with a seed near 2**32 failed after its first round (seed + round overflowed it).
- FVU.update broadcast a reconstruction of the wrong shape (x_hat [1, d] counted against every row of x [B, d]) and
  failed with torch errors for 1-D input or a width / member count changing between batches.
- train_lm_sweep / train_e2e_sweep silently ignored `steps=` and the snapshot_steps / state_every of a settings
  object; train_lm_sweep failed with a TypeError for per-member seeds in hparams (train_e2e_sweep takes them).
- TrainSettings kept numpy scalars (a seed from np.arange, an lr from np.logspace), so to_json() was not JSON.
- A callable source over a precomputed stream shorter than 16 steps failed with an IndexError from the input-scale
  estimate (even for a run of that many steps); estimate_input_scale mixed batches of different widths."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from sparse_coding import dictionaries
from sparse_coding.dictionaries import (FVU, TrainSettings, estimate_input_scale, ica_dictionary, ksvd_dictionary,
                                        online_dictionary, pca_dictionary)
from sparse_coding.dictionaries.training import snapshot_steps

pytestmark = pytest.mark.usefixtures("one_thread")


def planted(rank: int = 4, d: int = 8, n: int = 2000):
    """Laplace sources along `rank` random directions A [rank, d]: X [n, d] spans exactly those."""
    rng = np.random.default_rng(0)
    A = rng.standard_normal((rank, d))
    return rng.laplace(size=(n, rank)) @ A, A


def test_ica_on_rank_deficient_data_unmixes_the_directions_it_spans():
    X, A = planted()
    D = ica_dictionary(X)
    assert D.shape == (4, 8)
    torch.testing.assert_close(D.norm(dim=1), torch.ones(4))
    cos = (D.double() @ torch.from_numpy(A / np.linalg.norm(A, axis=1, keepdims=True)).T).abs()
    assert float(cos.max(1).values.min()) > 0.98  # every atom is one planted direction
    with pytest.raises(ValueError, match=r"n_components=6 exceeds the rank 4"):
        ica_dictionary(X, 6)


def test_ica_with_a_dead_column_or_no_variance():
    X, _ = planted(rank=7, d=7)
    D = ica_dictionary(np.c_[X, np.full(len(X), 3.0)])  # a constant (dead) dimension adds no direction
    assert D.shape == (7, 8) and torch.allclose(D.norm(dim=1), torch.ones(7))
    assert float(D[:, 7].abs().max()) < 1e-6
    with pytest.raises(ValueError, match="no variance"):
        ica_dictionary(np.ones((50, 8)))


def test_online_dictionary_refuses_zero_epochs():
    X, _ = planted(n=100)
    with pytest.raises(ValueError, match="n_epochs must be an int >= 1"):
        online_dictionary(X, 4, alpha=0.1, n_epochs=0)


@pytest.mark.parametrize("call", [lambda X: pca_dictionary(X, 3, seed=2**32),
                                  lambda X: ica_dictionary(X, 3, seed=2**32),
                                  lambda X: online_dictionary(X, 3, alpha=0.1, n_epochs=1, seed=2**32)])
def test_baseline_seeds_outside_sklearns_range_name_seed(call):
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 4294967295\]"):
        call(planted(n=100)[0])


def test_ksvd_takes_a_seed_at_the_top_of_the_range():
    X, _ = planted(n=100)
    D = ksvd_dictionary(X, 4, 2, n_iter=2, seed=2**32 - 1)
    assert D.shape == (4, 8) and torch.allclose(D.norm(dim=1), torch.ones(4))


def test_fvu_refuses_shapes_that_would_broadcast_or_mix():
    x = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    x_hat = torch.zeros(2, 10, 4)
    assert torch.allclose(FVU().update(x, x_hat).value(), torch.ones(2, dtype=torch.float64) *
                          x.double().pow(2).sum() / (x.double() - x.double().mean(0)).pow(2).sum())
    with pytest.raises(ValueError, match=r"x_hat must be \[E, B, d\] or \[B, d\]"):
        FVU().update(x, x[:1])
    with pytest.raises(ValueError, match=r"x_hat must be"):
        FVU().update(x, torch.zeros(2, 9, 4))
    with pytest.raises(ValueError, match="x must have 2 dimensions"):
        FVU().update(x[0], x[0])
    with pytest.raises(ValueError, match="one FVU per dictionary"):
        FVU().update(x, x_hat).update(x[:, :3], torch.zeros(2, 10, 3))
    with pytest.raises(ValueError, match="one FVU per dictionary"):
        FVU().update(x, x_hat).update(x, torch.zeros(3, 10, 4))


@pytest.fixture(scope="module")
def store(make_store):
    return make_store(torch.randn(2048, 8, generator=torch.Generator().manual_seed(0)))


KW = dict(n_tokens=1024, batch_size=256, progress=False)  # 4 steps


def test_a_sweep_refuses_steps(store, tmp_path):
    with pytest.raises(ValueError, match=r"steps=100 cannot be given to a sweep.*n_tokens=steps \* batch_size"):
        dictionaries.train_lm_sweep(store, "topk", 1, {"k": 2}, data_dir=tmp_path, steps=100, **KW)


def test_a_sweep_keeps_the_settings_snapshot_steps_and_takes_member_seeds(store, tmp_path):
    run = dictionaries.train_lm_sweep(store, "topk", 1, {"k": [2, 2], "seed": [3, 4]},
                                      TrainSettings(snapshot_steps=[0, 4]), data_dir=tmp_path, snapshots=True, **KW)
    assert snapshot_steps(dictionaries.state_dir(run.folder)) == [0, 4]
    assert run.sae.n_members == 2 and [h["seed"] for h in run.sae.hparams] == [3, 4]
    assert run.folder.name == "topk-r1-s0"  # the folder and the batches follow the run's seed
    alone = dictionaries.make_sae("topk", 8, ratio=1, k=2, seed=4)
    fresh = dictionaries.make_sae("topk", 8, ratio=1, k=[2, 2], seed=[3, 4])
    assert torch.equal(fresh.W_dec[1], alone.W_dec[0])  # what the sweep started its members from


def test_an_e2e_sweep_refuses_steps_and_keeps_the_settings_snapshot_steps(tiny_model, tmp_path):
    model, contexts, _ = tiny_model
    kw = dict(model_name="tiny", data_dir=tmp_path, n_tokens=64, batch_size=32, input_scale=1.0, progress=False)
    with pytest.raises(ValueError, match="steps=3 cannot be given to a sweep"):
        dictionaries.train_e2e_sweep(model, contexts[:8], "blocks.0.hook_resid_post", "relu", 1, {"l1_coef": 0.1},
                                     steps=3, **kw)
    run = dictionaries.train_e2e_sweep(model, contexts[:8], "blocks.0.hook_resid_post", "relu", 1, {"l1_coef": 0.1},
                                       TrainSettings(snapshot_steps=(2,), state_every=1), snapshots=True, **kw)
    assert snapshot_steps(dictionaries.state_dir(run.folder)) == [2]


def test_train_settings_store_plain_numbers():
    cfg = TrainSettings(steps=np.int64(10), seed=np.arange(3)[2], lr=np.float32(0.5), batch_size=np.int64(4),
                        betas=(np.float64(0.9), 0.99))
    out = json.loads(json.dumps(cfg.to_json()))
    assert out["steps"] == 10 and out["seed"] == 2 and out["lr"] == 0.5 and out["batch_size"] == 4
    assert type(cfg.seed) is int and type(cfg.lr) is float and type(cfg.betas[0]) is float


def test_a_short_callable_stream_is_estimated_on_the_batches_it_has():
    stream = torch.randn(5, 32, 8, generator=torch.Generator().manual_seed(0))
    expected = math.sqrt(8 / float(stream.double().pow(2).sum(-1).mean()))
    assert estimate_input_scale(lambda step: stream[step]) == pytest.approx(expected, rel=1e-12)
    sae = dictionaries.make_sae("relu", 8, 16)
    log = dictionaries.train_sae(sae, lambda step: stream[step], steps=5, log_every=1, progress=False)
    assert sorted(set(log["step"])) == [0, 1, 2, 3, 4] and sae.input_scale == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match=r"batches\(5\) raised IndexError"):
        dictionaries.train_sae(dictionaries.make_sae("relu", 8, 16), lambda step: stream[step], steps=6,
                               progress=False)


def test_estimate_input_scale_refuses_mixed_widths():
    with pytest.raises(ValueError, match="batch 1 has width 2 but the batches before have d_in=8"):
        estimate_input_scale([torch.ones(4, 8), torch.ones(4, 2)])


def test_fvu_keeps_its_precision_far_from_the_origin():
    # Σ‖x‖² − ‖Σx‖²/n cancelled away: about 1 % off at mean/spread 1e7, even in float64 (before)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=g, dtype=torch.float64)
    x_hat = x + 0.5 * torch.randn(512, 8, generator=g, dtype=torch.float64)
    near = FVU().update(x, x_hat).value()
    far = FVU()
    # several batches: the shift is the first batch's mean, not the overall one
    for xs, hs in zip((x + 1e7).split(100), (x_hat + 1e7).split(100)):
        far.update(xs, hs)
    torch.testing.assert_close(far.value(), near, rtol=1e-6, atol=0)
    assert far.total_variance() == pytest.approx(float(((x - x.mean(0)) ** 2).sum()), rel=1e-9)
