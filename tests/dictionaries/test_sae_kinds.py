"""JumpReLU, BatchTopK and ReLU with encoder-bias decay: the maths by hand, the straight-through estimator's support,
exact-k·B selection, training on planted data, seeding, ensembles vs solo runs, SAELens interop, bad parameters."""

import pytest
import torch

from sparse_coding.dictionaries import saelens_io as sae_io
from sparse_coding.dictionaries import make_sae
from sparse_coding.dictionaries.kinds.jumprelu import _JumpReLUFunction
from sparse_coding.dictionaries.training import train_sae


pytestmark = pytest.mark.usefixtures("one_thread")


def planted(d=16, n_features=32, k=3, seed=0):
    """Sparse data from a random unit dictionary: each feature fires with probability k/n, magnitude U[0.5, 1.5)
    (away from zero, so that a threshold can separate firing from not)."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(n_features, d, generator=g)
    D = D / D.norm(dim=1, keepdim=True)

    def sample(batch_size, gen):
        fire = torch.rand(batch_size, n_features, generator=gen) < k / n_features
        return (fire * (0.5 + torch.rand(batch_size, n_features, generator=gen))) @ D

    return D, sample


def _perturb(sae, seed=0, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return sae


# ------------------------------------------------------------------------------------------------------ JumpReLU

@pytest.mark.parametrize("pre_bias", [False, True])
def test_jumprelu_zero_below_threshold_and_identity_above(pre_bias):
    sae = _perturb(make_sae("jumprelu", d_in=12, d_sae=40, seed=[3, 4], l0_coef=[0.1, 0.5], pre_bias=pre_bias))
    with torch.no_grad():  # thresholds spread over the range of the pre-activations
        sae.log_threshold.copy_(torch.empty(2, 40).uniform_(-4, 0.5, generator=torch.Generator().manual_seed(2)))
    x = torch.randn(64, 12, generator=torch.Generator().manual_seed(1))
    out = sae(x)
    pre = sae.pre_activations(x)
    theta = sae.log_threshold.exp().unsqueeze(1)
    above = pre > theta
    assert 0.1 < above.float().mean() < 0.5  # both sides are really exercised
    assert torch.equal(out.codes[~above], torch.zeros_like(out.codes[~above]))
    assert torch.equal(out.codes[above], pre[above])
    for i, lam in enumerate([0.1, 0.5]):
        s = sae.member_state(i)
        z = (x - s["b_dec"] if pre_bias else x) @ s["W_enc"] + s["b_enc"]
        c = z * (z > s["threshold"])
        x_hat = c @ s["W_dec"] + s["b_dec"]
        mse = (x - x_hat).pow(2).sum(1).mean()
        l0 = (c != 0).float().sum(1).mean()
        torch.testing.assert_close(out.codes[i], c, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.mse[i], mse, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.loss[i], mse + lam * l0, atol=1e-5, rtol=1e-5)
    # encode (the generic path) gives the same codes as the one-pass forward.
    torch.testing.assert_close(sae.encode(x), out.codes)


def test_jumprelu_threshold_gradient_only_within_bandwidth():
    eps = torch.tensor([0.2])
    theta = torch.tensor([[1.0, 1.0, 2.0]], requires_grad=True)
    # Latent 0: one pre-activation inside (θ-ε/2, θ+ε/2) below θ, one inside above θ, one far above.
    # Latent 1: none inside the window (0.85 and 1.15 are just outside).  Latent 2: one exactly at θ (inside, off).
    pre = torch.tensor([[[0.95, 0.85, 2.0], [1.05, 1.15, 0.0], [3.0, 0.0, 0.0]]], requires_grad=True)
    codes, l0, counts = _JumpReLUFunction.apply(pre, theta, eps)
    assert torch.equal(codes.detach(), torch.tensor([[[0.0, 0.0, 0.0], [1.05, 1.15, 0.0], [3.0, 0.0, 0.0]]]))
    assert l0.item() == pytest.approx(3 / 3) and counts.tolist() == [[2, 1, 0]]  # 3 active in 3 rows
    g_codes = torch.tensor([[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]]])
    lam = 0.3
    ((codes * g_codes).sum() + lam * l0.sum()).backward()
    B = 3
    # Rectangle kernel: -(1/ε)·Σ_window (θ·g_codes + λ/B), only over the two in-window entries of latent 0 and the
    # entry of latent 2 at its threshold.
    expected = torch.tensor([[-(1.0 * 1.0 + lam / B + 1.0 * 4.0 + lam / B) / 0.2, 0.0, -(2.0 * 3.0 + lam / B) / 0.2]])
    torch.testing.assert_close(theta.grad, expected)
    # Pre-activations get the JumpReLU's exact gradient H(z - θ)·g and nothing from the L0.
    torch.testing.assert_close(pre.grad, g_codes * (pre.detach() > theta.detach().unsqueeze(1)))


def test_jumprelu_threshold_is_learned_as_log_and_saved_as_theta():
    sae = make_sae("jumprelu", d_in=8, d_sae=20, seed=[0, 1], init_threshold=[0.05, 0.2])
    torch.testing.assert_close(sae.member_state(1)["threshold"], torch.full((20,), 0.2))
    torch.testing.assert_close(sae.log_threshold[0], torch.full((20,), 0.05).log())
    assert "log_threshold" in dict(sae.named_parameters())
    x = torch.randn(32, 8)
    sae(x).loss.sum().backward()
    # Chain rule through exp: d/d(log θ) = θ · d/dθ, so a nonzero threshold gradient reaches the parameter.
    assert sae.log_threshold.grad is not None and sae.log_threshold.grad.abs().sum() > 0


def test_jumprelu_threshold_lr_mult_speeds_log_theta_and_keeps_theta():
    """threshold_lr_mult m stores log θ / m: same θ at the start and after a save/load, and one Adam step (which
    moves every parameter by about lr) moves log θ by about m·lr."""
    fast = make_sae("jumprelu", d_in=8, d_sae=20, seed=0, init_threshold=0.1, threshold_lr_mult=[1.0, 10.0])
    torch.testing.assert_close(fast.threshold(), torch.full((2, 20), 0.1))
    state = fast.member_state(1)
    state["threshold"] = torch.linspace(0.05, 0.5, 20)
    fast.load_member_state_(1, state)
    torch.testing.assert_close(fast.member_state(1)["threshold"], torch.linspace(0.05, 0.5, 20))
    torch.testing.assert_close(fast.log_threshold[1], torch.linspace(0.05, 0.5, 20).log() / 10)
    before = fast.threshold().detach().log()
    opt = torch.optim.Adam(fast.parameters(), lr=1e-3)
    fast(torch.randn(256, 8, generator=torch.Generator().manual_seed(0)) * 0.3).loss.sum().backward()
    opt.step()
    moved = (fast.threshold().detach().log() - before).abs()
    touched = moved[0] > 9e-4  # a full Adam step in member 0 (same seed and data in both members)
    assert touched.any()
    torch.testing.assert_close(moved[1][touched], moved[0][touched] * 10, rtol=1e-3, atol=1e-6)
    with pytest.raises(ValueError, match="threshold_lr_mult"):
        make_sae("jumprelu", d_in=8, d_sae=20, threshold_lr_mult=0)


# ----------------------------------------------------------------------------------------------------- BatchTopK

def test_batchtopk_keeps_exactly_k_times_batch_per_member():
    ks, B = [2, 5, 1], 40
    sae = _perturb(make_sae("batchtopk", d_in=12, d_sae=64, k=ks, seed=[0, 1, 2]))
    x = torch.randn(B, 12, generator=torch.Generator().manual_seed(0))
    sae.train()
    out = sae(x)
    pre = sae.pre_activations(x)
    for i, k in enumerate(ks):
        codes = out.codes[i]
        assert int((codes != 0).sum()) == k * B
        # The survivors are the batch's k·B largest entries, unchanged; per row the count varies.
        top = pre[i].flatten().topk(k * B).values
        torch.testing.assert_close(codes[codes != 0].sort().values, top.sort().values)
        assert (codes != 0).sum(1).unique().numel() > 1
    torch.testing.assert_close(sae.activation(pre), out.codes)  # the generic path agrees


def test_batchtopk_sparse_decode_and_gradients_match_dense_autograd():
    sae = _perturb(make_sae("batchtopk", d_in=10, d_sae=30, k=[3, 4], seed=[5, 6], dead_window=1))
    sae.train()
    sae.tokens_since_fired[:, :10] = 10  # some latents dead, so AuxK contributes
    x = torch.randn(17, 10, generator=torch.Generator().manual_seed(3))
    out = sae(x)
    out.loss.sum().backward()
    grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    # Dense reference: codes from the generic activation, decoded by a plain matmul, AuxK from TopK's own code.
    pre = sae.pre_activations(x)
    codes = sae.activation(pre)
    x_hat = sae.decode(codes)
    ref = (x_hat - x).pow(2).sum(-1).mean(-1) + sae._aux(x, pre, x_hat)
    assert float(out.losses["aux"].detach().min()) > 0
    torch.testing.assert_close(out.x_hat, x_hat, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, ref, atol=1e-5, rtol=1e-5)
    ref.sum().backward()
    for n, p in sae.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)


def test_batchtopk_threshold_is_running_min_and_used_in_eval():
    sae = _perturb(make_sae("batchtopk", d_in=8, d_sae=24, k=[2, 3], seed=[0, 1], threshold_lr=[0.5, 0.1]))
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(16, 8, generator=g) for _ in range(2)]
    sae.train()
    assert torch.equal(sae.threshold, torch.zeros(2, dtype=torch.float64))
    mins = []
    for x in xs:
        codes = sae(x).codes
        mins.append(torch.stack([c[c > 0].min() for c in codes]).double())
    # First update takes the smallest kept activation as it is, then a running mean with each member's rate.
    lr = torch.tensor([0.5, 0.1], dtype=torch.float64)
    torch.testing.assert_close(sae.threshold, (1 - lr) * mins[0] + lr * mins[1])
    sae.eval()
    x = torch.randn(50, 8, generator=g)
    pre = sae.pre_activations(x)
    theta = sae.threshold.float().view(2, 1, 1)
    codes = sae.encode(x)
    torch.testing.assert_close(codes, pre * (pre > theta))
    torch.testing.assert_close(sae(x).codes, codes)
    torch.testing.assert_close(sae.threshold, (1 - lr) * mins[0] + lr * mins[1])  # eval does not move it


# ------------------------------------------------------------------------------------------- ReLU + b_enc decay

def test_relu_bias_decay_adds_l2_and_its_gradient():
    x = torch.randn(20, 8, generator=torch.Generator().manual_seed(0))
    plain = _perturb(make_sae("relu", d_in=8, d_sae=24, seed=[1, 2], l1_coef=0.01))
    decayed = make_sae("relu_bias_decay", d_in=8, d_sae=24, seed=[1, 2], l1_coef=0.01, b_enc_decay=[0.0, 0.3])
    decayed.load_state_dict(plain.state_dict())
    a, b = plain(x), decayed(x)
    l2 = decayed.b_enc.detach().pow(2).sum(-1)
    torch.testing.assert_close(b.loss, a.loss + torch.tensor([0.0, 0.3]) * l2)
    torch.testing.assert_close(b.losses["b_enc_l2"][1], 0.3 * l2[1])
    a.loss.sum().backward()
    b.loss.sum().backward()
    torch.testing.assert_close(decayed.b_enc.grad[0], plain.b_enc.grad[0])
    torch.testing.assert_close(decayed.b_enc.grad[1], plain.b_enc.grad[1] + 2 * 0.3 * decayed.b_enc.detach()[1])
    torch.testing.assert_close(decayed.W_dec.grad, plain.W_dec.grad)


# -------------------------------------------------------------------------------------------- training behaviour

def test_jumprelu_training_lowers_loss_and_l0_towards_planted():
    D, sample = planted(d=16, n_features=32, k=3)
    # l0_coef on inputs normalised to E‖x‖² = d_in (train_sae's default)
    sae = make_sae("jumprelu", d_in=16, d_sae=48, seed=0, l0_coef=0.8, bandwidth=0.05, init_threshold=0.05)
    g = torch.Generator().manual_seed(1)
    hist = train_sae(sae, lambda s: sample(128, g), steps=400, lr=1e-2, log_every=50, progress=False)
    first, last = hist.iloc[0], hist.iloc[-1]
    assert last.loss < 0.5 * first.loss
    assert first["l0"] > 15 and last["l0"] < 0.5 * first["l0"]  # from about half the latents towards 3
    assert last["fvu"] < 0.3
    assert float(sae.threshold().detach().mean()) > 0.05  # the thresholds rose


def test_batchtopk_training_lowers_loss_and_eval_l0_near_k():
    D, sample = planted(d=16, n_features=32, k=3)
    sae = make_sae("batchtopk", d_in=16, d_sae=48, seed=0, k=3)
    g = torch.Generator().manual_seed(1)
    hist = train_sae(sae, lambda s: sample(128, g), steps=300, lr=1e-2, log_every=50, progress=False)
    assert hist.iloc[-1].loss < 0.5 * hist.iloc[0].loss
    assert (hist["l0"] == 3).all()  # training L0 is k·B / B by construction
    x = sample(2000, torch.Generator().manual_seed(9))
    l0_eval = float((sae.encode(x) != 0).sum(-1).float().mean())
    assert 2 <= l0_eval <= 4.5, l0_eval  # the threshold carries the batch's sparsity over to inference


@pytest.mark.parametrize("kind,kw", [
    ("jumprelu", {"l0_coef": [0.01, 0.05, 0.1], "bandwidth": [0.05, 0.1, 0.05]}),
    ("batchtopk", {"k": [2, 3, 5]}),
    ("relu_bias_decay", {"l1_coef": [0.01, 0.1, 0.05], "b_enc_decay": [0.0, 0.1, 1.0]}),
])
def test_ensemble_members_match_solo_runs(kind, kw):
    D, sample = planted()
    seeds = [4, 9, 2]
    xs = [sample(64, torch.Generator().manual_seed(100 + s)) for s in range(40)]
    ens = make_sae(kind, d_in=16, d_sae=48, seed=seeds, dead_window=256, **kw)
    train_sae(ens, xs, steps=40, lr=1e-2, log_every=20, progress=False)
    for i, seed in enumerate(seeds):
        solo = make_sae(kind, d_in=16, d_sae=48, seed=seed, dead_window=256, **{k: v[i] for k, v in kw.items()})
        train_sae(solo, xs, steps=40, lr=1e-2, log_every=20, progress=False)
        for name, t in solo.member_state(0).items():
            torch.testing.assert_close(ens.member_state(i)[name], t, atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("kind,kw", [("jumprelu", {"l0_coef": 0.05}), ("batchtopk", {"k": [2, 4]})])
def test_same_seed_same_weights_bitwise(kind, kw):
    D, sample = planted()
    data = sample(400, torch.Generator().manual_seed(0))
    states = []
    for _ in range(2):
        sae = make_sae(kind, d_in=16, d_sae=40, seed=[1, 2], dead_window=128, **kw)
        train_sae(sae, data, batch_size=32, steps=30, lr=1e-2, log_every=10, progress=False, seed=3)
        states.append(sae.state_dict())
    for name in states[0]:
        assert torch.equal(states[0][name], states[1][name]), name


# ----------------------------------------------------------------------------------------------- SAELens interop

sae_lens = pytest.importorskip("sae_lens")


def _trained_like(kind, **kw):
    sae = _perturb(make_sae(kind, d_in=16, d_sae=40, seed=[3, 4], **kw))
    if kind == "jumprelu":
        with torch.no_grad():
            sae.log_threshold.copy_(torch.empty(2, 40).uniform_(-3, 0, generator=torch.Generator().manual_seed(5)))
    else:
        sae.train()
        sae(torch.randn(64, 16, generator=torch.Generator().manual_seed(6)))  # sets the inference threshold
        sae.eval()
        assert float(sae.threshold.min()) > 0
    return sae


@pytest.mark.parametrize("kind,kw", [("jumprelu", {"l0_coef": 0.1}), ("batchtopk", {"k": 4})])
def test_saelens_reads_ours_as_jumprelu(tmp_path, kind, kw):
    from sae_lens import SAE

    sae = _trained_like(kind, **kw)
    sae_io.save_sweep(sae, tmp_path / "sweep", input_scale=0.5, metadata={"hook_name": "blocks.0.hook_resid_post"})
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(7)) * 2
    ours = sae.encode(x * 0.5)  # trained on x·s: saved folded, so the file takes raw x
    for i in range(2):
        theirs = SAE.load_from_disk(str(tmp_path / "sweep" / sae_io.member_name(i)))
        assert theirs.cfg.architecture() == "jumprelu"
        codes = theirs.encode(x)
        assert 0 < float((codes != 0).float().mean()) < 0.9
        torch.testing.assert_close(codes, ours[i], atol=1e-5, rtol=1e-5)
    back = sae_io.load_sweep(tmp_path / "sweep")
    assert back.kind == kind and back.hparams == sae.hparams
    back.eval()
    torch.testing.assert_close(back.encode(x), ours, atol=1e-5, rtol=1e-5)


def test_we_read_saelens_jumprelu(tmp_path):
    from sae_lens import SAE, JumpReLUSAEConfig

    theirs = SAE.get_sae_class_for_architecture("jumprelu")(JumpReLUSAEConfig(d_in=12, d_sae=30))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        theirs.threshold.abs_()
        theirs.threshold[:3] = 0.0  # θ = 0 (a plain ReLU) must survive log θ = -inf
    theirs.save_model(str(tmp_path / "theirs"))
    ours = sae_io.load_sae(tmp_path / "theirs")
    x = torch.randn(50, 12)
    assert ours.kind == "jumprelu"
    torch.testing.assert_close(ours.encode(x)[0], theirs.encode(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours(x).x_hat[0], theirs.decode(theirs.encode(x)), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ bad parameters

@pytest.mark.parametrize("kind,kwargs,match", [
    ("jumprelu", {"l0_coef": -1.0}, "l0_coef"),
    ("jumprelu", {"bandwidth": 0.0}, "bandwidth"),
    ("jumprelu", {"bandwidth": float("nan")}, "bandwidth"),
    ("jumprelu", {"init_threshold": -0.1}, "init_threshold"),
    ("jumprelu", {"init_threshold": "0.1"}, "init_threshold"),
    ("jumprelu", {"k": 3}, "unknown hyperparameters.*k"),
    ("batchtopk", {}, "k is required"),
    ("batchtopk", {"k": 0}, "k must be"),
    ("batchtopk", {"k": 3, "threshold_lr": 0.0}, "threshold_lr"),
    ("batchtopk", {"k": 3, "threshold_lr": 2}, "threshold_lr"),
    ("relu_bias_decay", {"b_enc_decay": -0.5}, "b_enc_decay"),
    ("relu_bias_decay", {"b_enc_decay": float("inf")}, "b_enc_decay"),
])
def test_bad_parameters_name_the_parameter(kind, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_sae(kind, d_in=8, d_sae=16, **kwargs)


def test_bad_threshold_state_is_refused():
    sae = make_sae("jumprelu", d_in=4, d_sae=6)
    state = sae.member_state(0)
    with pytest.raises(ValueError, match="missing 'threshold'"):
        sae.load_member_state_(0, {k: v for k, v in state.items() if k != "threshold"})
    with pytest.raises(ValueError, match="threshold.*>= 0"):
        sae.load_member_state_(0, {**state, "threshold": -torch.ones(6)})
    btk = make_sae("batchtopk", d_in=4, d_sae=6, k=2)
    with pytest.raises(ValueError, match="load this file as kind 'jumprelu'"):
        btk.load_member_state_(0, {**btk.member_state(0), "threshold": torch.arange(6.0)})
