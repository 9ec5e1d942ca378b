"""BatchTopK and JumpReLU train through TopK's sparse paths (picks padded per row, gradients through the picks only):
the same numbers as the dense maths (the kind's `activation` / jump function through plain autograd), in float64 —
outputs, every parameter gradient, the input gradient, BatchTopK's threshold, AuxK, ensembles with different
settings per member, several training steps with resampling. And `picks.batch_top` against a top-k over the whole
flattened batch, including rows that force its candidate count to grow."""

import pytest
import torch

from sparse_coding.dictionaries import kernels, make_sae, picks
from sparse_coding.dictionaries.kinds import topk as topk_module
from sparse_coding.dictionaries.kinds.batchtopk import BatchTopKSAE
from sparse_coding.dictionaries.kinds.jumprelu import JumpReLUSAE
from sparse_coding.dictionaries.picks import (DenseSource, ScreenSource, SparseCodes, above, batch_top, chunk_rows,
                                             screened_above)
from sparse_coding.dictionaries.training import train_sae

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64


def _batchtopk_dense(sae, x):
    """Today's dense maths: the batch's k·B largest through `activation`, a dense decode, TopK's AuxK, and the
    threshold's running mean of the smallest kept activation."""
    pre = sae._pre(x)
    codes = sae.activation(pre)
    x_hat = sae._decode(codes)
    aux = sae._aux(x, pre, x_hat)
    sae._update_threshold(sae.batch_select(pre.detach())[0])
    return x_hat, codes, sae.fired(codes), {"aux": aux}


def _jumprelu_dense(sae, x):
    pre = sae._pre(x)
    codes, l0, counts = sae._jump(pre)
    return sae._decode(codes), codes, counts > 0, {"l0_loss": sae.member_param("l0_coef") * l0}


def _step(sae, x, forward, weights):
    """One forward with `forward` as the kind's part; loss weighted per member, backward; everything returned."""
    sae.zero_grad()
    xg = x.clone().requires_grad_()
    xs = sae.check_input(xg)
    x_hat, codes, fired, losses = forward(sae, xs)
    codes = codes() if callable(codes) else codes
    loss = (x_hat - sae.expand(xs)).pow(2).sum(-1).mean(-1) + sum(losses.values())
    (loss * weights).sum().backward()
    out = {n: p.grad.clone() for n, p in sae.named_parameters()}
    out.update(x=xg.grad.clone(), x_hat=x_hat.detach(), codes=codes.detach(), fired=fired.to(F64),
               **{k: v.detach() for k, v in losses.items()})
    for name, buf in sae.named_buffers():
        out["buffer " + name] = buf.clone().to(F64)
    return out


def _assert_same(a, b):
    assert set(a) == set(b)
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=1e-10, atol=1e-12, msg=name)


def _randomise(sae, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.b_enc.copy_(0.3 * torch.randn(sae.b_enc.shape, generator=g, dtype=F64))
        sae.b_dec.copy_(0.5 * torch.randn(sae.b_dec.shape, generator=g, dtype=F64))
        if hasattr(sae, "log_threshold"):
            sae.log_threshold.add_(0.3 * torch.randn(sae.log_threshold.shape, generator=g, dtype=F64))


@pytest.mark.parametrize("with_dead", [False, True])
@pytest.mark.parametrize("tied,pre_bias,shared,ks", [
    (False, True, True, [2, 5]),  # different k per member: each keeps its own k·B
    (True, True, False, [3, 3]),
    (False, False, False, [1, 20]),  # k = d_sae: every positive entry of the batch
])
@pytest.mark.parametrize("dense_below,csr", [(0, True), (0, False), (1000, True)])
@pytest.mark.parametrize("aux_gather_below", [1, 1000])
def test_batchtopk_sparse_step_equals_dense(with_dead, tied, pre_bias, shared, ks, dense_below, csr,
                                            aux_gather_below, monkeypatch):
    monkeypatch.setattr(kernels, "DENSE_BELOW", dense_below)
    monkeypatch.setattr(topk_module, "AUX_GATHER_BELOW", aux_gather_below)
    if not csr:
        monkeypatch.setattr(kernels, "_csr_path", lambda t: False)
    results = []
    for forward in (BatchTopKSAE._forward, _batchtopk_dense):
        sae = make_sae("batchtopk", d_in=6, d_sae=20, k=ks, aux_k=[4, 7], seed=[0, 1], dead_window=10, tied=tied,
                       pre_bias=pre_bias, threshold_lr=[0.5, 0.1], dtype=F64)
        _randomise(sae)
        sae.train()
        if with_dead:
            with torch.no_grad():
                sae.tokens_since_fired[0, ::2] = 100
                sae.tokens_since_fired[1, :7] = 100
        g = torch.Generator().manual_seed(3)
        x = torch.randn(*(() if shared else (2,)), 13, 6, generator=g, dtype=F64)
        x[..., 4, :] *= 30  # one row far larger: it holds many of the batch's top entries
        results.append([_step(sae, x, forward, torch.tensor([1.0, 2.5], dtype=F64)) for _ in range(2)])
    for a, b in zip(*results):
        assert (a["aux"] > 0).all() == with_dead
        _assert_same(a, b)


@pytest.mark.parametrize("tied,pre_bias,shared", [(False, True, True), (True, True, False), (False, False, False)])
@pytest.mark.parametrize("dense_below", [0, 1000])
@pytest.mark.parametrize("csr", [True, False])
def test_jumprelu_sparse_step_equals_dense(tied, pre_bias, shared, dense_below, csr, monkeypatch):
    monkeypatch.setattr(kernels, "DENSE_BELOW", dense_below)
    monkeypatch.setattr(picks, "DENSE_SHARE", 1)  # the sparse step even with many picks (a small dictionary)
    if not csr:
        monkeypatch.setattr(kernels, "_csr_path", lambda t: False)
    sae = make_sae("jumprelu", d_in=10, d_sae=30, l0_coef=[0.5, 2.0], bandwidth=[0.3, 0.8],
                   init_threshold=[0.5, 1.0], threshold_lr_mult=[1.0, 3.0], seed=[5, 6], tied=tied, pre_bias=pre_bias,
                   dtype=F64)
    _randomise(sae)
    sae.train()
    x = torch.randn(*(() if shared else (2,)), 17, 10, generator=torch.Generator().manual_seed(1), dtype=F64)
    weights = torch.tensor([1.0, 2.5], dtype=F64)
    assert isinstance(JumpReLUSAE._forward(sae, sae.check_input(x))[1], SparseCodes)  # the sparse step ran
    sparse, dense = _step(sae, x, JumpReLUSAE._forward, weights), _step(sae, x, _jumprelu_dense, weights)
    # The estimator's support was exercised: some entries inside the window, some thresholds with a gradient.
    assert int((sparse["log_threshold"] != 0).sum()) > 10
    _assert_same(sparse, dense)


def test_jumprelu_takes_the_dense_maths_when_most_entries_are_picks():
    """Thresholds far below the pre-activations (early training): the dense maths runs, with the same numbers."""
    sae = make_sae("jumprelu", d_in=10, d_sae=30, init_threshold=1e-3, seed=0, dtype=F64)
    sae.train()
    x = torch.randn(17, 10, generator=torch.Generator().manual_seed(1), dtype=F64)
    assert torch.is_tensor(JumpReLUSAE._forward(sae, sae.check_input(x))[1])  # dense codes: the dense path
    weights = torch.ones(1, dtype=F64)
    _assert_same(_step(sae, x, JumpReLUSAE._forward, weights), _step(sae, x, _jumprelu_dense, weights))


def test_jumprelu_entries_at_the_window_edge_are_not_missed(monkeypatch):
    """An entry just inside θ − ε/2 feeds θ's gradient; one just outside does not: the picks must agree with the
    dense window test even where rounding decides it."""
    sae = make_sae("jumprelu", d_in=4, d_sae=6, bandwidth=0.5, init_threshold=1.0, seed=0, dtype=F64)
    sae.train()
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.W_enc[0, 0, :] = 1.0
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    monkeypatch.setattr(picks, "DENSE_SHARE", 1)
    theta = float(sae.threshold().detach()[0, 0])
    edge = theta - 0.25
    x = torch.zeros(4, 4, dtype=F64)
    x[:, 0] = torch.tensor([edge + 1e-12, edge - 1e-12, edge, theta + 0.1], dtype=F64)
    weights = torch.ones(1, dtype=F64)
    _assert_same(_step(sae, x, JumpReLUSAE._forward, weights), _step(sae, x, _jumprelu_dense, weights))


@pytest.mark.parametrize("kind,kw", [
    ("batchtopk", {"k": [2, 4, 3]}),
    ("jumprelu", {"l0_coef": [0.3, 1.0, 3.0], "bandwidth": 0.4, "init_threshold": 4.0, "threshold_lr_mult": 10.0}),
])
def test_training_with_resampling_equals_dense(kind, kw, monkeypatch):
    """Twelve steps of an ensemble with dead-latent resampling every 4 steps: the same weights, thresholds, Adam
    moments and log whichever path computes each step."""
    g = torch.Generator().manual_seed(0)
    data = torch.randn(96, 8, generator=g, dtype=F64) * torch.rand(96, 1, generator=g, dtype=F64) * 3
    dense = {"batchtopk": _batchtopk_dense, "jumprelu": _jumprelu_dense}[kind]
    monkeypatch.setattr(picks, "DENSE_SHARE", 1)
    runs = []
    for forward in (None, dense):
        sae = make_sae(kind, d_in=8, d_sae=64, seed=[0, 1, 2], dtype=F64, **kw)
        with monkeypatch.context() as m:
            if forward is not None:
                m.setattr(type(sae), "_forward", lambda self, x, f=forward: f(self, x))
            log = train_sae(sae, data, steps=12, batch_size=16, lr=3e-3, resample_every=4, resample_until=1.0,
                            dead_window=16, progress=False, log_every=1, input_scale=1.0)
        runs.append((sae, log))
    (a, log_a), (b, log_b) = runs
    assert log_a["resampled"].max() > 0  # resampling happened
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p.to(F64), q.to(F64), rtol=1e-9, atol=1e-11, msg=name)
    cols = [c for c in log_a.columns if log_a[c].dtype.kind == "f"]
    torch.testing.assert_close(torch.tensor(log_a[cols].to_numpy()), torch.tensor(log_b[cols].to_numpy()),
                               rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("B,n,ks", [(7, 40, [3]), (16, 64, [2, 5]), (5, 9, [9, 4]), (12, 100, [1, 1])])
@pytest.mark.parametrize("skew", [False, True])
@pytest.mark.parametrize("margin", [1.15, 0.2])  # 0.2: the first level is too high, so it must be lowered
def test_batch_top_is_the_flattened_top(B, n, ks, skew, margin, monkeypatch):
    """The kept entries are exactly the batch's k·B largest positive ones, per member, also when one row holds most
    of them and when a row has no positive entry at all; each row's picks are cut into slices of `width`."""
    monkeypatch.setattr(picks, "MARGIN", margin)
    monkeypatch.setattr(picks, "SAMPLE_STRIDE", 3)
    E = len(ks)
    g = torch.Generator().manual_seed(B * n)
    pre = torch.randn(E, B, n, generator=g, dtype=F64)
    if skew:
        pre[:, 0] *= 50
        pre[:, -1] = -pre[:, -1].abs()
    chosen = batch_top(DenseSource(pre), torch.tensor(ks), max(ks), B, n, width=2)
    _check_batch_top(chosen, pre, ks, width=2)


def _check_batch_top(chosen, pre, ks, width):
    E, B, n = pre.shape
    for e, k in enumerate(ks):
        top = pre[e].flatten().topk(min(k * B, B * n)).values
        want = top[top > 0].sort().values
        keep = chosen.keep[e]
        torch.testing.assert_close(chosen.values[e][keep].sort().values, want)
        # Each pick is its row's pre-activation at its latent; no row has more slices than it needs.
        rows = chosen.rows[e].unsqueeze(-1).expand_as(chosen.idx[e])
        torch.testing.assert_close(pre[e][rows[keep], chosen.idx[e][keep]], chosen.values[e][keep])
        per_row = torch.bincount(rows[keep], minlength=B)
        slices = torch.bincount(chosen.rows[e][keep.any(-1)], minlength=B)
        assert torch.equal(slices, (per_row + width - 1) // width)


def test_batch_top_through_the_screen_equals_float32():
    """Through the bfloat16 screen the kept set is the float32 one (values to a few ulps: dot products summed in
    another order than the dense matmul's)."""
    E, B, d, n, ks = 2, 64, 96, 512, [4, 7]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(E, B, d, generator=g) * torch.rand(E, B, 1, generator=g) * 3
    W = torch.randn(E, d, n, generator=g) / d ** 0.5
    b = torch.randn(E, n, generator=g) * 0.1
    pre = torch.baddbmm(b.unsqueeze(1), x, W)
    chosen = batch_top(ScreenSource(x, W, b, lambda name, *shape, dtype=None: None), torch.tensor(ks), max(ks), B, n, width=3)
    _check_batch_top(chosen, pre, ks, width=3)


def test_chunk_rows_and_sparse_codes():
    rows = torch.tensor([0, 0, 0, 2, 3, 3, 5])  # E=2, B=3: member 0 rows 0, 2; member 1 rows 0 (=3), 2 (=5)
    cols = torch.tensor([4, 1, 2, 0, 2, 5, 4])
    vals = torch.tensor([1.0, 2.0, 6.0, 0.0, 3.0, 4.0, 5.0])
    chosen = chunk_rows(rows, cols, vals, E=2, B=3, width=2)
    assert chosen.values.shape == (2, 3, 2) and chosen.keep.sum() == 7
    assert chosen.rows[0].tolist() == [0, 0, 2] and chosen.rows[1].tolist()[:2] == [0, 2]
    assert not chosen.keep[1, 2].any()  # member 1 needs two slices: the third is padding
    codes = SparseCodes(chosen.values, chosen.idx, 6, chosen.rows, 3)
    dense = codes()
    want = torch.zeros(2, 3, 6)
    want[0, 0, 4], want[0, 0, 1], want[0, 0, 2], want[1, 0, 2], want[1, 0, 5], want[1, 2, 4] = 1, 2, 6, 3, 4, 5
    assert torch.equal(dense, want)  # padding adds 0 even where it shares latent 0 and row 0 with real picks
    torch.testing.assert_close(codes.l0(), (dense != 0).sum(-1).float().mean(-1))
    pre = torch.tensor([[[0.1, 0.5, -1.0], [0.7, 0.2, 0.9]]])
    assert above(pre, torch.tensor([[0.0, 0.4, 0.8]]), width=8) is None  # 4 of 6 entries: the dense maths is cheaper
    assert above(pre.masked_fill(pre > 0.8, float("nan")), torch.zeros(1, 3), width=8) is None  # not finite
    picks.DENSE_SHARE, share = 1, picks.DENSE_SHARE
    try:
        chosen = above(pre, torch.tensor([[0.0, 0.4, 0.8]]), width=8)
    finally:
        picks.DENSE_SHARE = share
    assert sorted(chosen.idx[0, 0][chosen.keep[0, 0]].tolist()) == [0, 1]
    assert sorted(chosen.idx[0, 1][chosen.keep[0, 1]].tolist()) == [0, 2]


def test_training_log_l0_from_picks_equals_dense_codes(monkeypatch):
    """The trainer's l0 column comes from the picks (no dense codes built) and equals the dense count."""
    monkeypatch.setattr(picks, "DENSE_SHARE", 1)
    for kind, kw in (("topk", {"k": 3}), ("batchtopk", {"k": 3}), ("jumprelu", {"init_threshold": 0.2})):
        sae = make_sae(kind, d_in=8, d_sae=32, seed=0, **kw)
        sae.train()
        out = sae(torch.randn(20, 8, generator=torch.Generator().manual_seed(0)))
        l0 = out.l0
        assert "codes" not in vars(out)
        torch.testing.assert_close(l0, (out.codes != 0).sum(-1).float().mean(-1))


def test_screened_above_is_the_float32_above(monkeypatch):
    """Through the bfloat16 screen (the floor folded into the bias) the entries above their floors are the float32
    ones, with their float32 values (to a few ulps), also for entries far closer to a floor than the screen's
    rounding (1e-4 against ~1e-2)."""
    monkeypatch.setattr(picks, "DENSE_SHARE", 1)
    E, B, d, n = 2, 48, 64, 256
    g = torch.Generator().manual_seed(0)
    x = torch.randn(E, B, d, generator=g) * torch.rand(E, B, 1, generator=g) * 3
    W = torch.randn(E, d, n, generator=g) / d ** 0.5
    b = torch.randn(E, n, generator=g) * 0.1
    pre = torch.baddbmm(b.unsqueeze(1), x, W)
    floor = torch.full((E, n), 1.5)
    floor[:, :8] = pre[:, 0, :8] - 1e-4  # entries a hair above their floors
    floor[:, 8:16] = pre[:, 1, 8:16] + 1e-4  # and a hair below
    want = torch.zeros(E, B, n, dtype=torch.bool).index_put_(torch.nonzero(pre > floor.unsqueeze(1), as_tuple=True),
                                                            torch.tensor(True))
    got = screened_above(x, W, b, floor, width=4, workspace=lambda name, *shape, dtype=None: None)
    rows = got.rows.unsqueeze(-1).expand_as(got.idx)
    mask = torch.zeros(E, B, n, dtype=torch.bool)
    for e in range(E):
        mask[e, rows[e][got.keep[e]], got.idx[e][got.keep[e]]] = True
    assert torch.equal(mask, want)
    for e in range(E):
        torch.testing.assert_close(got.values[e][got.keep[e]], pre[e][rows[e][got.keep[e]], got.idx[e][got.keep[e]]])


@pytest.mark.parametrize("kind,kw", [("batchtopk", {"k": [3, 5]}),
                                     ("jumprelu", {"init_threshold": [1.0, 1.5], "bandwidth": 0.3})])
def test_screened_step_equals_the_float32_step(kind, kw, monkeypatch):
    """float32, with the screen forced on and off: the same picks, so the same step up to float32 rounding (dot
    products summed in another order); the screen really ran."""
    from sparse_coding.dictionaries import screening

    monkeypatch.setattr(picks, "DENSE_SHARE", 1)
    ran = []
    for name in ("bf16_screen",):
        real = getattr(picks, name)
        monkeypatch.setattr(picks, name, lambda *a, _real=real, **k: ran.append(1) or _real(*a, **k))
    x = torch.randn(40, 32, generator=torch.Generator().manual_seed(2)) * 2
    results = []
    for screen in (True, False):
        monkeypatch.setattr(screening, "SCREEN", screen)
        sae = make_sae(kind, d_in=32, d_sae=256, seed=[0, 1], **kw)
        sae.train()
        results.append([_step(sae, x, type(sae)._forward, torch.tensor([1.0, 2.0])) for _ in range(2)])
    assert ran  # the screened path was taken
    for a, b in zip(*results):
        assert set(a) == set(b)
        for name in b:
            torch.testing.assert_close(a[name], b[name].to(a[name].dtype), rtol=1e-4, atol=1e-5, msg=name)
