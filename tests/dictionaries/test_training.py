"""Training features beyond plain Adam: schedules, input normalisation, dead-latent resampling, checkpoints, resume
and divergence. Known answers where there are any (schedule values, the scale of scaled data, where resampled
latents point), bit-identity for resume, and the dead fraction with and without the remedies."""

import math

import pytest
import torch

from sparse_coding.dictionaries import make_sae
from sparse_coding.dictionaries.saelens_io import load_sweep, save_sweep
from sparse_coding.dictionaries.training import state as ckpt
from sparse_coding.dictionaries.training import (TrainingDiverged, adam, coef_factor, estimate_input_scale,
                                                 log_spaced_steps, lr_factor, member_generators, param_state,
                                                 resample_dead_, sparsity_key, train_sae)


pytestmark = pytest.mark.usefixtures("one_thread")


def planted_data(n=4000, d=16, n_features=32, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(n_features, d, generator=g)
    D = D / D.norm(dim=1, keepdim=True)
    fire = torch.rand(n, n_features, generator=g) < k / n_features
    return (fire * torch.rand(n, n_features, generator=g)) @ D


# ----------------------------------------------------------------------------------------------- schedules

def test_lr_schedule_known_values():
    assert [lr_factor(s, 100, warmup_steps=4) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    # linear-to-zero over the last 20 steps: 1 at the first decay step, 1/20 at the last, never 0
    lin = [lr_factor(s, 100, decay="linear") for s in range(100)]
    assert lin[79] == 1.0 and lin[80] == pytest.approx(1.0) and lin[99] == pytest.approx(1 / 20)
    assert all(a >= b for a, b in zip(lin, lin[1:]))
    cos = [lr_factor(s, 100, decay="cosine", decay_frac=0.5) for s in range(100)]
    assert cos[50] == pytest.approx(1.0) and 0 < cos[99] < 0.01 and cos[75] == pytest.approx(0.5, abs=0.05)
    assert lr_factor(0, 10, warmup_steps=2, decay="linear", decay_frac=1.0) == pytest.approx(0.5)
    assert [coef_factor(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert coef_factor(0, 0) == 1.0
    assert log_spaced_steps(20) == [0, 1, 2, 4, 8, 16, 20] and log_spaced_steps(16) == [0, 1, 2, 4, 8, 16]


def test_schedules_reach_the_optimizer_and_the_coefficient_buffers():
    x = planted_data(512)
    sae = make_sae("relu", d_in=16, d_sae=32, l1_coef=[0.1, 0.4], seed=[0, 1])
    assert sparsity_key(sae) == "l1_coef" and sparsity_key(make_sae("topk", 16, 32, k=2)) is None
    opt = adam(sae, 1e-2, (0.9, 0.999))
    seen = {}
    train_sae(sae, x, batch_size=32, steps=20, lr=1e-2, log_every=1, progress=False, optimizer=opt,
              warmup_steps=5, decay="linear", decay_frac=0.25, coef_warmup_steps=10,
              callback=lambda s, m: seen.setdefault(s, (opt.param_groups[0]["lr"], m.member_param("l1_coef").tolist())))
    for s, (lr, coefs) in seen.items():
        assert lr == pytest.approx(1e-2 * lr_factor(s, 20, 5, "linear", 0.25))
        assert coefs == pytest.approx([0.1 * coef_factor(s, 10), 0.4 * coef_factor(s, 10)])
    assert seen[0][1] == pytest.approx([0.01, 0.04]) and seen[19][0] == pytest.approx(1e-2 / 5)
    # after training the buffers hold the full coefficients again
    assert sae.member_param("l1_coef").tolist() == pytest.approx([0.1, 0.4])


def test_default_call_leaves_the_lr_alone():
    sae = make_sae("relu", d_in=16, d_sae=32)
    opt = adam(sae, 1e-3, (0.9, 0.999))
    opt.param_groups[0]["lr"] = 7e-4  # e.g. set by a callback schedule (notebook 01)
    train_sae(sae, planted_data(256), batch_size=32, steps=3, lr=1e-3, progress=False, optimizer=opt)
    assert opt.param_groups[0]["lr"] == 7e-4


# ----------------------------------------------------------------------------------------------- normalisation

def test_input_scale_known_answer_and_folding(tmp_path):
    x = 3.0 * torch.randn(20000, 16, generator=torch.Generator().manual_seed(0))
    s = estimate_input_scale(x, n_batches=4, batch_size=4096)
    assert s == pytest.approx(1 / 3, rel=0.02)  # E||x||^2 = 9 d
    assert estimate_input_scale([x[:100], x[100:300]], n_batches=10) == pytest.approx(
        math.sqrt(16 / x[:300].pow(2).sum(1).mean().item()), rel=1e-6)  # a short iterable: what it had
    with pytest.raises(ValueError, match="all zero"):
        estimate_input_scale(torch.zeros(10, 4), batch_size=5)
    # trained on s·x (the SAE keeps s and still takes raw x), saved with s folded: the loaded SAE reads raw x
    sae = make_sae("relu", d_in=16, d_sae=32, l1_coef=[1e-2, 1e-1], seed=[0, 1])
    train_sae(sae, x, batch_size=64, steps=30, lr=1e-2, progress=False, input_scale=s)
    assert sae.input_scale == s
    loaded = load_sweep(save_sweep(sae, tmp_path / "sweep"))
    assert loaded.input_scale == 1.0
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x[:256]), sae.encode(x[:256]), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(loaded.decode(loaded.encode(x[:256])), sae(x[:256]).x_hat, atol=1e-4, rtol=1e-4)
        # the codes are those of an unscaled SAE fed s·x
        plain = make_sae("relu", d_in=16, d_sae=32, l1_coef=[1e-2, 1e-1], seed=[0, 1])
        plain.load_state_dict(sae.state_dict())
        torch.testing.assert_close(plain.encode(x[:256] * s), sae.encode(x[:256]))


# ----------------------------------------------------------------------------------------------- resampling

def test_resample_points_dead_latents_at_the_worst_reconstructed_input():
    sae = make_sae("relu", d_in=8, d_sae=12, l1_coef=[0.0, 0.0], seed=[0, 1])
    opt = adam(sae, 1e-3, (0.9, 0.999))
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0)) * 0.01
    x[17] = torch.tensor([3.0, -4.0, 0, 0, 0, 0, 12.0, 0])  # the one row the SAE gets very wrong
    sae(x).loss.sum().backward()
    opt.step()  # Adam moments exist
    dead = torch.zeros(2, 12, dtype=torch.bool)
    dead[0, [2, 5]] = True  # member 1 has nothing dead
    before = {n: p.detach().clone() for n, p in sae.named_parameters()}
    alive_norm = sae.W_enc.detach()[0].norm(dim=0)[~dead[0]].mean()
    counts = resample_dead_(sae, opt, x, dead, member_generators(sae, seed=0))
    assert counts == [2, 0]
    target = x[17] - before["b_dec"][0]
    target = target / target.norm()
    # two dead latents and one dominant row: both get a distinct row, the dominant one among them
    dirs = sae.W_dec.detach()[0, [2, 5]]
    assert torch.allclose(dirs.norm(dim=1), torch.ones(2))
    assert max(float(dirs[i] @ target) for i in range(2)) == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(sae.W_enc.detach()[0][:, [2, 5]].T, dirs * 0.2 * alive_norm)
    assert (sae.b_enc.detach()[0, [2, 5]] == 0).all()
    for n in ("W_enc", "W_dec", "b_enc"):
        st = param_state(opt, getattr(sae, n))
        rows = st["exp_avg"][0][:, [2, 5]] if n == "W_enc" else st["exp_avg"][0][[2, 5]]
        assert (rows == 0).all() and (st["exp_avg_sq"][0][:, [2, 5]] if n == "W_enc"
                                      else st["exp_avg_sq"][0][[2, 5]]).eq(0).all()
    # untouched: member 1, and member 0's other latents
    torch.testing.assert_close(sae.W_dec.detach()[1], before["W_dec"][1], atol=0, rtol=0)
    keep = [i for i in range(12) if i not in (2, 5)]
    torch.testing.assert_close(sae.W_dec.detach()[0, keep], before["W_dec"][0, keep], atol=0, rtol=0)


@torch.no_grad()
def _dead_share(sae, x):
    return (sae.encode(x).amax(1) <= 0).float().mean(-1)


def test_resampling_revives_killed_latents_and_auxk_keeps_topk_alive():
    x = planted_data(8000)
    x_eval = planted_data(4000, seed=0)[-2000:]

    def killed_relu():
        sae = make_sae("relu", d_in=16, d_sae=64, l1_coef=[0.05, 0.1], seed=[0, 1])
        with torch.no_grad():
            sae.b_enc[:, :32] = -10.0  # half the latents can never fire: dead from the start
        return sae

    plain = killed_relu()
    train_sae(plain, x, batch_size=128, steps=300, lr=3e-3, progress=False)
    assert (_dead_share(plain, x_eval) >= 0.45).all()
    fixed = killed_relu()
    hist = train_sae(fixed, x, batch_size=128, steps=300, lr=3e-3, progress=False, log_every=100,
                     resample_every=50, resample_until=0.5)
    assert (_dead_share(fixed, x_eval) <= 0.05).all(), _dead_share(fixed, x_eval)
    assert (hist[hist.step == 299]["resampled"] >= 32).all()
    # TopK with AuxK (no resampling) on the same data stays alive too
    topk = make_sae("topk", d_in=16, d_sae=64, k=[3, 4], seed=[0, 1], dead_window=128 * 20)
    train_sae(topk, x, batch_size=128, steps=300, lr=3e-3, progress=False)
    assert (_dead_share(topk, x_eval) <= 0.05).all(), _dead_share(topk, x_eval)


# ----------------------------------------------------------------------------------------------- checkpoints, resume

class Interrupt(Exception):
    pass


def _interrupt_at(n):
    def cb(step, _sae):
        if step == n:
            raise Interrupt
    return cb


CASES = {
    # ReLU on a dataset tensor with every trajectory-changing feature on
    "relu": (lambda: make_sae("relu", d_in=16, d_sae=40, l1_coef=[0.02, 0.2], seed=[3, 4]),
             lambda x: x, dict(batch_size=32, warmup_steps=5, decay="cosine", coef_warmup_steps=8,
                               resample_every=10, resample_until=0.6, input_scale=1.7, seed=5)),
    # TopK + AuxK on a replayed iterable
    "topk": (lambda: make_sae("topk", d_in=16, d_sae=40, k=[2, 4], seed=[3, 4], dead_window=200),
             lambda x: [x[i:i + 32] for i in range(0, 60 * 32, 32)], dict(decay="linear")),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_interrupted_run_resumes_bit_identical(case, tmp_path):
    build, source, kw = CASES[case]
    x = planted_data(2000)
    kw = dict(steps=60, lr=1e-2, log_every=5, progress=False, snapshot_steps="log", state_every=10, **kw)
    ref = build()
    ref_hist = train_sae(ref, source(x), state_dir=tmp_path / "ref", **kw)

    sae = build()
    with pytest.raises(Interrupt):
        train_sae(sae, source(x), state_dir=tmp_path / "run", callback=_interrupt_at(45), **kw)
    assert ckpt.load_state(tmp_path / "run")[1]["step"] == 40  # state_every=10; 45 never saved
    sae = build()  # a fresh process would start from scratch weights too
    hist = train_sae(sae, source(x), state_dir=tmp_path / "run", **kw)
    for name, t in ref.state_dict().items():
        assert torch.equal(sae.state_dict()[name], t), name
    assert hist.equals(ref_hist)
    # resuming a finished run changes nothing
    again = build()
    train_sae(again, source(x), state_dir=tmp_path / "run", **kw)
    assert torch.equal(again.W_dec, ref.W_dec)


def test_log_spaced_snapshots_are_kept(tmp_path):
    x = planted_data(1000)
    sae = make_sae("relu", d_in=16, d_sae=24, l1_coef=[0.05, 0.1], seed=[1, 2])
    init = sae.W_dec.detach().clone()
    train_sae(sae, x, batch_size=32, steps=20, lr=1e-2, progress=False, state_dir=tmp_path, input_scale=2.0)
    assert ckpt.snapshot_steps(tmp_path) == [0, 1, 2, 4, 8, 16, 20]
    assert torch.equal(ckpt.load_snapshot(tmp_path, 0)["W_dec"], init)
    last = ckpt.load_snapshot(tmp_path, 20)
    assert torch.equal(last["W_dec"], sae.W_dec.detach()) and torch.equal(last["b_enc"], sae.b_enc.detach())
    torch.testing.assert_close(ckpt.load_snapshot(tmp_path, 20, fold=True)["W_dec"], sae.W_dec.detach() / 2.0)
    steps, traj = ckpt.load_decoder_trajectory(tmp_path, member=1)
    assert steps == [0, 1, 2, 4, 8, 16, 20] and traj.shape == (7, 24, 16)
    index = ckpt.load_state(tmp_path)[1]
    assert index["step"] == 20
    with pytest.raises(ValueError, match="available steps"):
        ckpt.load_snapshot(tmp_path, 3)


def test_resume_with_other_settings_is_refused(tmp_path):
    x = planted_data(500)
    sae = make_sae("relu", d_in=16, d_sae=24, l1_coef=0.1)
    train_sae(sae, x, batch_size=32, steps=8, lr=1e-2, progress=False, state_dir=tmp_path)
    with pytest.raises(ValueError, match=r"settings\.lr.*resume=False"):
        train_sae(make_sae("relu", d_in=16, d_sae=24, l1_coef=0.1), x, batch_size=32, steps=8, lr=3e-2,
                  progress=False, state_dir=tmp_path)
    with pytest.raises(ValueError, match="hparams"):
        train_sae(make_sae("relu", d_in=16, d_sae=24, l1_coef=0.2), x, batch_size=32, steps=8, lr=1e-2,
                  progress=False, state_dir=tmp_path)
    # resume=False starts over in the same folder
    train_sae(make_sae("relu", d_in=16, d_sae=24, l1_coef=0.1), x, batch_size=32, steps=8, lr=3e-2,
              progress=False, state_dir=tmp_path, resume=False)


def test_nan_loss_stops_with_the_last_good_checkpoint_intact(tmp_path):
    x = planted_data(800)

    def source(step):  # finite, but squares overflow float32 from step 23 on (25 batches, then again from the start)
        return x[32 * (step % 25):32 * (step % 25) + 32] * (1e25 if step >= 23 else 1.0)

    sae = make_sae("relu", d_in=16, d_sae=24, l1_coef=[0.05, 0.1], seed=[0, 1])
    with pytest.raises(TrainingDiverged, match=r"at step 23 for member\(s\) \[0, 1\].*state\.safetensors, step 20\) is intact"):
        train_sae(sae, source, steps=40, lr=1e-2, log_every=5, progress=False, state_dir=tmp_path,
                  state_every=10)
    tensors, meta = ckpt.load_state(tmp_path)
    assert meta["step"] == 20 and all(bool(torch.isfinite(t.float()).all()) for t in tensors.values())
    assert ckpt.snapshot_steps(tmp_path) == [0, 1, 2, 4, 8, 16]
    # without a checkpoint folder the error says so
    with pytest.raises(TrainingDiverged, match="no training state was written"):
        train_sae(make_sae("relu", d_in=16, d_sae=24), source, steps=40, lr=1e-2, log_every=100, progress=False)


# ----------------------------------------------------------------------------------------------- ActivationStore

@pytest.fixture
def small_store(make_store):
    """make_store of planted data: 600 rows of width d (default 8) in contexts of 10."""
    return lambda d=8, rows=600: make_store(planted_data(rows, d=d, n_features=16), torch.arange(rows), ctx_len=10)


def test_activation_store_source_follows_the_store_order_across_epochs(small_store):
    store = small_store()
    expected = list(store.batches(64, seed=2, epochs=3, drop_last=True))  # 9 batches per epoch
    seen = []
    sae = make_sae("relu", d_in=8, d_sae=16)
    orig = sae.forward
    sae.forward = lambda x: (seen.append(x.clone()), orig(x))[1]
    train_sae(sae, store, batch_size=64, seed=2, steps=20, lr=1e-3, progress=False)
    assert len(seen) == 20 and all(torch.equal(a, b) for a, b in zip(seen, expected))
    assert estimate_input_scale(store, n_batches=2, batch_size=300) == pytest.approx(
        math.sqrt(8 / store.all().pow(2).sum(1).mean().item()), rel=1e-5)  # two batches = the whole store


def test_bad_arguments_name_the_parameter(tmp_path, small_store):
    sae = make_sae("relu", d_in=4, d_sae=8)
    x = torch.randn(64, 4)
    for kwargs, name in [({"decay": "exp"}, "decay"), ({"warmup_steps": -1}, "warmup_steps"),
                         ({"decay_frac": 0}, "decay_frac"), ({"input_scale": 0.0}, "input_scale"),
                         ({"input_scale": float("nan")}, "input_scale"), ({"resample_every": 0}, "resample_every"),
                         ({"resample_until": 2}, "resample_until"), ({"coef_warmup_steps": 1.5}, "coef_warmup_steps"),
                         ({"state_dir": tmp_path, "snapshot_steps": [-1]}, "snapshot_steps"),
                         ({"state_dir": tmp_path, "snapshot_steps": "linear"}, "snapshot_steps"),
                         ({"state_every": 0}, "state_every")]:
        with pytest.raises(ValueError, match=name):
            train_sae(sae, x, batch_size=8, steps=2, progress=False, **kwargs)
    store = small_store(d=4)
    with pytest.raises(ValueError, match="batch_size"):
        train_sae(sae, store, steps=2, batch_size=store.n_tokens + 1, progress=False)
    # Without batch_size a store smaller than the default batch trains on whole-store batches.
    assert len(train_sae(sae, store, steps=2, progress=False, log_every=1)) >= 1
    with pytest.raises(ValueError, match="n_batches"):
        estimate_input_scale(x, n_batches=0)
