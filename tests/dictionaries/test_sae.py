"""SAE kinds: the maths against hand computation, invariants, seeding, the registry and parameter errors."""

import pytest
import torch

from sparse_coding.dictionaries import SAE_KINDS, EnsembleSAE, ReLUSAE, SAEOutput, make_sae, register_sae
from sparse_coding.dictionaries.training import train_sae


pytestmark = pytest.mark.usefixtures("one_thread")


def _randomise_biases(sae, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(sae.b_enc.shape, generator=g))
        sae.b_dec.copy_(0.5 * torch.randn(sae.b_dec.shape, generator=g))


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("pre_bias", [False, True])
def test_relu_forward_matches_hand_computation(tied, pre_bias):
    sae = make_sae("relu", d_in=12, d_sae=40, l1_coef=[1e-3, 5e-2], seed=[3, 4], tied=tied, pre_bias=pre_bias)
    _randomise_biases(sae)
    x = torch.randn(9, 12, generator=torch.Generator().manual_seed(1))
    out = sae(x)
    for i, alpha in enumerate([1e-3, 5e-2]):
        s = sae.member_state(i)
        xin = x - s["b_dec"] if pre_bias else x
        c = torch.relu(xin @ s["W_enc"] + s["b_enc"])
        x_hat = c @ s["W_dec"] + s["b_dec"]
        mse = ((x - x_hat) ** 2).sum(1).mean()
        torch.testing.assert_close(out.codes[i], c, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.x_hat[i], x_hat, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.mse[i], mse, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.losses["l1"][i], alpha * c.abs().sum(1).mean(), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(out.loss[i], mse + alpha * c.abs().sum(1).mean(), atol=1e-5, rtol=1e-5)
        if tied:
            torch.testing.assert_close(s["W_enc"], s["W_dec"].T)
    assert out.loss.shape == out.mse.shape == out.losses["l1"].shape == (2,)
    torch.testing.assert_close(sae.decode(sae.encode(x)), out.x_hat)


def test_tied_has_one_matrix_and_gets_both_gradients():
    sae = make_sae("relu", d_in=6, d_sae=10, tied=True)
    assert sae.W_enc is None
    assert {n for n, _ in sae.named_parameters()} == {"W_dec", "b_enc", "b_dec"}


def test_shared_and_per_member_inputs_agree():
    sae = make_sae("topk", d_in=8, d_sae=32, k=[2, 5, 7], seed=[0, 1, 2])
    x = torch.randn(5, 8)
    torch.testing.assert_close(sae.encode(x), sae.encode(x.expand(3, 5, 8)))
    # Different inputs per member really are routed to their member.
    xs = torch.randn(3, 5, 8)
    for i in range(3):
        torch.testing.assert_close(sae.encode(xs)[i], sae.encode(xs[i])[i])


def test_topk_keeps_exactly_k_largest_per_row():
    d_in, d_sae, ks = 16, 64, [1, 4, 9]
    sae = make_sae("topk", d_in=d_in, d_sae=d_sae, k=ks, seed=[0, 1, 2])
    _randomise_biases(sae)
    x = torch.randn(200, d_in, generator=torch.Generator().manual_seed(0))
    codes = sae.encode(x)
    pre = sae.pre_activations(x)
    for i, k in enumerate(ks):
        active = (codes[i] != 0).sum(1)
        positive = (pre[i] > 0).sum(1)
        # ReLU after top-k: a row with fewer than k positive pre-activations keeps only those.
        assert torch.equal(active, positive.clamp(max=k))
        assert (positive >= k).float().mean() > 0.9  # so the check above is mostly "exactly k"
        # The survivors are the row's k largest pre-activations, unchanged.
        top = torch.relu(pre[i]).topk(k, dim=1)
        torch.testing.assert_close(codes[i].gather(1, top.indices), top.values)
        torch.testing.assert_close(codes[i].sum(1), top.values.sum(1))


def test_topk_exactly_k_during_training():
    sae = make_sae("topk", d_in=16, d_sae=48, k=[3, 6], seed=[0, 1])
    g = torch.Generator().manual_seed(0)
    seen = []

    def check(step, sae):
        x = torch.randn(64, 16, generator=g)
        active = (sae.encode(x) != 0).sum(-1)
        seen.append(active)

    train_sae(sae, lambda s: torch.randn(64, 16, generator=g), steps=30, log_every=10, progress=False,
              callback=check)
    for active in seen:
        assert active.max() <= 6
        assert (active[0] == 3).float().mean() > 0.9 and (active[1] == 6).float().mean() > 0.9


def test_decoder_directions_unit_norm_and_detached():
    sae = make_sae("relu", d_in=8, d_sae=20, seed=[0, 1])
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    D = sae.decoder_directions()
    assert D.shape == (2, 20, 8) and not D.requires_grad
    torch.testing.assert_close(D.norm(dim=-1), torch.ones(2, 20))
    sae.normalize_decoder_()
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(2, 20))


def test_decoder_gradient_projection_drops_the_component_along_each_row():
    """project_decoder_grad_: g <- g - (g . w) w for every unit decoder row w, per member, in place."""
    sae = make_sae("relu", d_in=8, d_sae=20, seed=[0, 1], dtype=torch.float64)
    sae.normalize_decoder_()  # unit rows in float64 (the init is normalised in float32)
    g = torch.randn(2, 20, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sae.W_dec.grad = g.clone()
    sae.project_decoder_grad_()
    W = sae.W_dec.detach()
    torch.testing.assert_close(sae.W_dec.grad, g - (g * W).sum(-1, keepdim=True) * W)
    torch.testing.assert_close((sae.W_dec.grad * W).sum(-1), torch.zeros(2, 20, dtype=torch.float64))


@pytest.mark.parametrize("kind,kw", [("relu", {"l1_coef": [1e-3, 1e-1]}), ("relu", {"tied": True}),
                                     ("topk", {"k": [2, 4]})])
def test_decoder_rows_unit_norm_after_every_step(kind, kw):
    sae = make_sae(kind, d_in=10, d_sae=30, seed=[0, 1], **kw)
    norms = []
    g = torch.Generator().manual_seed(0)
    train_sae(sae, lambda s: 3 * torch.randn(32, 10, generator=g), steps=25, lr=3e-2, log_every=1, progress=False,
              callback=lambda step, s: norms.append(s.W_dec.detach().norm(dim=-1)))
    assert len(norms) == 25
    for n in norms:
        torch.testing.assert_close(n, torch.ones_like(n), atol=1e-5, rtol=0)


def test_member_init_matches_single_member_with_same_seed():
    ens = make_sae("relu", d_in=7, d_sae=19, l1_coef=[1e-3, 2e-3, 3e-3], seed=[11, 5, 11])
    for i, seed in enumerate([11, 5, 11]):
        alone = make_sae("relu", d_in=7, d_sae=19, seed=seed)
        for name, t in alone.member_state(0).items():
            assert torch.equal(ens.member_state(i)[name], t), name
    assert not torch.equal(ens.W_dec[0], ens.W_dec[1])
    assert torch.equal(ens.W_dec[0], ens.W_dec[2])
    # Encoder starts as the decoder's transpose.
    assert torch.equal(ens.member_state(1)["W_enc"], ens.member_state(1)["W_dec"].T)


def test_hparams_and_config():
    sae = make_sae("topk", d_in=8, ratio=4, k=[2, 3], seed=7)
    assert sae.kind == "topk" and sae.n_members == 2 and sae.d_in == 8 and sae.d_sae == 32
    assert sae.hparams == [{"k": 2, "aux_k": 4, "aux_coef": 1 / 32, "seed": 7},
                           {"k": 3, "aux_k": 4, "aux_coef": 1 / 32, "seed": 7}]
    assert sae.config["architecture"] == "topk"
    relu = make_sae("relu", d_in=4, d_sae=8, l1_coef=[0.1, 0.2], seed=[0, 1])
    assert [h["l1_coef"] for h in relu.hparams] == [0.1, 0.2] and [h["seed"] for h in relu.hparams] == [0, 1]


def test_member_state_round_trip():
    a = make_sae("relu", d_in=6, d_sae=12, seed=[0, 1])
    _randomise_biases(a)
    b = make_sae("relu", d_in=6, d_sae=12, seed=[2, 3])
    b.load_member_state_(1, a.member_state(0))
    x = torch.randn(4, 6)
    torch.testing.assert_close(b(x).x_hat[1], a(x).x_hat[0])
    s = a.member_state(0)
    assert s["W_enc"].shape == (6, 12) and s["W_dec"].shape == (12, 6)
    assert s["b_enc"].shape == (12,) and s["b_dec"].shape == (6,)


def test_auxk_engages_only_on_dead_latents():
    sae = make_sae("topk", d_in=8, d_sae=32, k=2, aux_k=4, dead_window=100)
    sae.train()
    x = torch.randn(50, 8)
    assert sae(x).losses["aux"].item() == 0.0  # nothing dead yet
    with torch.no_grad():
        sae.tokens_since_fired[0, :16] = 1000  # the first 16 latents are now dead
    out = sae(x)
    assert out.losses["aux"].item() > 0
    out.losses["aux"].sum().backward()
    grad = sae.W_enc.grad[0].abs().sum(0)
    assert grad[:16].sum() > 0 and grad[16:].sum() == 0  # only dead latents learn from the aux loss
    sae.eval()
    assert sae(x).losses["aux"].item() == 0.0  # aux is a training loss only


def test_registry_accepts_new_kinds():
    @register_sae("test_abs")
    class AbsSAE(ReLUSAE):
        def activation(self, pre):
            return pre.abs()

    try:
        assert SAE_KINDS["test_abs"] is AbsSAE
        sae = make_sae("test_abs", d_in=4, d_sae=8, l1_coef=0.0)
        assert sae.kind == "test_abs" and isinstance(sae, EnsembleSAE)
        assert (sae.encode(torch.randn(3, 4)) >= 0).all()
        with pytest.raises(ValueError, match="already registered"):
            register_sae("test_abs")(type("Other", (ReLUSAE,), {}))
    finally:
        SAE_KINDS.pop("test_abs", None)


@pytest.mark.parametrize("kwargs,match", [
    (dict(kind="nope", d_in=4, d_sae=8), "known kinds: .*relu.*topk"),
    (dict(kind="relu", d_in=0, d_sae=8), "d_in"),
    (dict(kind="relu", d_in=4, d_sae=0), "d_sae"),
    (dict(kind="relu", d_in=4, d_sae=-3), "d_sae"),
    (dict(kind="relu", d_in=4, ratio=0), "ratio"),
    (dict(kind="relu", d_in=4, ratio=-1.0), "ratio"),
    (dict(kind="relu", d_in=4), "d_sae"),
    (dict(kind="relu", d_in=4, d_sae=8, l1_coef=-1e-3), "l1_coef"),
    (dict(kind="relu", d_in=4, d_sae=8, l1_coef=[1e-3, float("nan")]), "l1_coef"),
    (dict(kind="relu", d_in=4, d_sae=8, l1_coef=[1e-3, 2e-3], seed=[0, 1, 2]), "l1_coef: 2, seed: 3"),
    (dict(kind="relu", d_in=4, d_sae=8, seed=1.5), "seed"),
    (dict(kind="relu", d_in=4, d_sae=8, k=3), "unknown hyperparameters .* k"),
    (dict(kind="topk", d_in=4, d_sae=8, k=9), r"\bk must be .*d_sae=8"),
    (dict(kind="topk", d_in=4, d_sae=8, k=[2, 0]), r"\bk must be"),
    (dict(kind="topk", d_in=4, d_sae=8), r"\bk is required"),
    (dict(kind="topk", d_in=4, d_sae=8, k=2, aux_k=9), "aux_k"),
    (dict(kind="topk", d_in=4, d_sae=8, k=2, aux_coef=-1), "aux_coef"),
    (dict(kind="topk", d_in=4, d_sae=8, k=2, dead_window=0), "dead_window"),
])
def test_bad_parameters_name_the_parameter(kwargs, match):
    kind = kwargs.pop("kind")
    with pytest.raises(ValueError, match=match):
        make_sae(kind, **kwargs)


def test_bad_inputs_say_expected_and_got():
    sae = make_sae("relu", d_in=4, d_sae=8, seed=[0, 1])
    with pytest.raises(ValueError, match=r"d_in=4, got width 5"):
        sae(torch.randn(3, 5))
    with pytest.raises(ValueError, match="n_members=2"):
        sae.encode(torch.randn(3, 2, 4))
    with pytest.raises(ValueError, match="codes must be"):
        sae.decode(torch.randn(2, 3, 7))
    with pytest.raises(ValueError, match="out of range"):
        sae.member_state(2)


def run_with(sae, x, kind_forward) -> SAEOutput:
    """sae's forward pass with `kind_forward` (a kind's fast `_forward`, or the generic EnsembleSAE._forward, the
    autograd reference) as the kind's part."""
    x = sae.check_input(x)
    x_hat, codes, fired, losses = kind_forward(sae, x)
    return SAEOutput(x_hat, (x_hat - x).pow(2).sum(-1).mean(-1), losses, fired, codes)


@pytest.mark.parametrize("tied,pre_bias,shared", [(False, True, True), (True, True, False), (False, False, False)])
def test_relu_hand_backward_matches_autograd(tied, pre_bias, shared):
    """The ReLU kind computes its backward by hand; the generic autograd path is the reference."""
    sae = make_sae("relu", d_in=6, d_sae=14, l1_coef=[0.0, 0.3], seed=[0, 1], tied=tied, pre_bias=pre_bias,
                   dtype=torch.float64)
    _randomise_biases(sae)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(11, 6, generator=g, dtype=torch.float64)
    if not shared:
        x = torch.randn(2, 11, 6, generator=g, dtype=torch.float64)
    grads = []
    for forward in (ReLUSAE._forward, EnsembleSAE._forward):
        sae.zero_grad()
        xg = x.clone().requires_grad_()  # the input gradient too (the hand backward computes it when asked)
        out = run_with(sae, xg, forward)
        (out.loss * torch.tensor([1.0, 2.0], dtype=torch.float64)).sum().backward()
        grads.append({n: p.grad.clone() for n, p in sae.named_parameters()})
        grads[-1]["loss"] = out.loss.detach()
        grads[-1]["x"] = xg.grad.clone()
    for name in grads[1]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("with_dead", [False, True])
@pytest.mark.parametrize("tied,pre_bias,shared,ks", [
    (False, True, True, ([2, 5], [3, 4])),  # ragged k and aux_k: sorted top-k, each member cut at its own
    (True, True, False, ([3, 3], [4, 4])),  # equal k: unsorted top-k; tied weights; one input per member
    (False, False, False, ([4, 2], [5, 2])),
    (True, False, True, ([1, 6], [20, 3])),  # aux_k = d_sae: more aux picks than dead latents (-inf picks)
])
@pytest.mark.parametrize("dense_below,csr", [(0, True), (0, False), (1000, True)])
@pytest.mark.parametrize("aux_gather_below", [1, 1000])  # AuxK: the dead sub-dictionary / masked, forced
def test_topk_sparse_path_matches_dense_autograd(with_dead, tied, pre_bias, shared, ks, dense_below, csr,
                                                 aux_gather_below, monkeypatch):
    """TopK's step is sparse (the encoder forward runs without autograd, gradients flow through the chosen entries
    only, the decoder touches only the chosen rows); the dense generic autograd path is the reference, in float64:
    outputs, every parameter gradient (members weighted differently) and the input gradient. The kernels switch to
    a dense form of the same maths when the picks are many (kernels.DENSE_BELOW), and run the sparse passes as CSR
    matmuls on the CPU, chunked elsewhere; AuxK trains the sub-dictionary of the dead latents' columns when few are
    dead (topk.AUX_GATHER_BELOW): every form is checked."""
    from sparse_coding.dictionaries import TopKSAE, kernels

    from sparse_coding.dictionaries.kinds import topk as topk_module

    monkeypatch.setattr(kernels, "DENSE_BELOW", dense_below)
    monkeypatch.setattr(topk_module, "AUX_GATHER_BELOW", aux_gather_below)
    if not csr:
        monkeypatch.setattr(kernels, "_csr_path", lambda t: False)
    k, aux_k = ks
    sae = make_sae("topk", d_in=6, d_sae=20, k=k, aux_k=aux_k, seed=[0, 1], dead_window=10, tied=tied,
                   pre_bias=pre_bias, dtype=torch.float64)
    _randomise_biases(sae)
    sae.train()
    if with_dead:
        with torch.no_grad():
            sae.tokens_since_fired[0, ::2] = 100
            sae.tokens_since_fired[1, :7] = 100
    g = torch.Generator().manual_seed(3)
    x = torch.randn(*(() if shared else (2,)), 13, 6, generator=g, dtype=torch.float64)
    results = []
    for forward in (TopKSAE._forward, EnsembleSAE._forward):
        sae.zero_grad()
        xg = x.clone().requires_grad_()
        out = run_with(sae, xg, forward)
        (out.loss * torch.tensor([1.0, 2.5], dtype=torch.float64)).sum().backward()
        grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
        grads["x"] = xg.grad.clone()
        results.append(({"x_hat": out.x_hat.detach(), "codes": out.codes.detach(), "loss": out.loss.detach(),
                         "mse": out.mse.detach(), "aux": out.losses["aux"].detach()}, grads))
    assert (results[0][0]["aux"] > 0).all() == with_dead
    for a, b in zip(results[0], results[1]):
        assert set(a) == set(b)
        for name in b:
            torch.testing.assert_close(a[name], b[name], rtol=1e-10, atol=1e-12, msg=name)
    # Without x needing a gradient (the trainer's case) the parameter gradients are the same.
    sae.zero_grad()
    out = run_with(sae, x, TopKSAE._forward)
    (out.loss * torch.tensor([1.0, 2.5], dtype=torch.float64)).sum().backward()
    for n, p in sae.named_parameters():
        torch.testing.assert_close(p.grad, results[1][1][n], rtol=1e-10, atol=1e-12, msg=n)


def test_topk_output_codes_are_lazy_but_complete():
    """TopK's dense codes are built only when read (the training step never reads them), then equal encode's."""
    sae = make_sae("topk", d_in=8, d_sae=24, k=[2, 3], seed=[0, 1])
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    out = sae(x)
    assert "codes" not in vars(out)  # not built by the forward pass
    assert torch.equal(out.codes, sae.encode(x).detach())
    assert "codes" in vars(out)  # built once, then kept
    torch.testing.assert_close(out.fired, (out.codes != 0).any(1))
    assert set(out.losses) == {"aux"} and out.loss.shape == (2,)


def test_topk_step_deterministic_and_ensemble_equals_solo():
    """Two identical runs give identical weights; each member of an ensemble trains as it would alone (the
    sparse backward adds in a fixed order, and members never share a row of its sparse matrices)."""
    # float64: in float32 the members' different summation orders (ragged k sorts the top-k) differ by rounding,
    # which Adam amplifies where a gradient is near zero.
    kw = dict(d_in=8, d_sae=40, aux_k=6, dead_window=32, dtype=torch.float64)  # dead: silent for one batch
    logs = []

    def run(sae):
        g = torch.Generator().manual_seed(5)
        logs.append(train_sae(sae, lambda s: torch.randn(32, 8, generator=g, dtype=torch.float64), steps=12, lr=1e-2, log_every=1,
                              progress=False))
        return sae

    a = run(make_sae("topk", k=[3, 5], seed=[1, 2], **kw))
    b = run(make_sae("topk", k=[3, 5], seed=[1, 2], **kw))
    for name, p in a.named_parameters():
        assert torch.equal(p, dict(b.named_parameters())[name]), name
    assert (logs[0]["aux"] > 0).any()  # some latents went dead, so AuxK ran
    for i, (k, seed) in enumerate([(3, 1), (5, 2)]):
        solo = run(make_sae("topk", k=k, seed=seed, **kw))
        for name, t in solo.member_state(0).items():
            torch.testing.assert_close(a.member_state(i)[name], t, rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize("k,sorted_", [(4, True), (4, False), (1, True), (8, False)])
def test_topk_rows_through_group_maxima_equals_torch_topk(k, sorted_):
    """TopK's row top-k goes through group maxima once d_sae >= 256·k; its values must be torch.topk's exactly,
    also with masked (-inf) latents and with fewer finite entries than k (AuxK with few dead latents)."""
    from sparse_coding.dictionaries.kernels import topk_rows as _topk_rows

    g = torch.Generator().manual_seed(0)
    pre = torch.randn(3, 50, 4096, generator=g)
    pre[0, :, 100:] = float("-inf")  # fewer candidates than groups
    pre[1, :5, 2:] = float("-inf")  # fewer finite entries than k
    pre[2, 7] = pre[2, 7].round(decimals=0)  # many ties
    values, idx = _topk_rows(pre, k, sorted=sorted_)
    ref = pre.topk(k, dim=-1, sorted=True).values
    assert torch.equal(pre.gather(-1, idx), values)
    assert torch.equal(values.sort(-1, descending=True).values if not sorted_ else values, ref)
    assert (idx.sort(-1).values.diff(dim=-1) > 0).all()  # no latent twice


@pytest.mark.parametrize("use_aten", [True, False])
def test_relu_grad_is_the_relu_backward_on_both_paths(use_aten):
    from sparse_coding.dictionaries.relu_step import relu_grad_

    g = torch.Generator().manual_seed(0)
    codes = torch.randn(3, 50, 40, generator=g).clamp_min_(0)
    codes[0, :5] = 0.0  # exact zeros: no gradient through an inactive latent
    grad = torch.randn(3, 50, 40, generator=g)
    pre = codes.clone().requires_grad_(True)
    torch.relu(pre).backward(grad)  # autograd's ReLU backward at pre = codes (codes >= 0)
    out = relu_grad_(grad.clone(), codes, use_aten=use_aten)
    assert torch.equal(out, pre.grad)
    assert torch.equal(out, grad.masked_fill(codes <= 0, 0))
