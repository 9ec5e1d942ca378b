"""The bfloat16 screen finds the same top k as float32 (screening), whatever the CPU: the tests force it on."""

import pytest
import torch

from sparse_coding.dictionaries import make_sae, screening
from sparse_coding.dictionaries.screening import bf16_screen, screen_radius, screened_topk, screens


def _case(seed: int, E: int, B: int, d: int, n: int, col_scale: float = 1.0, bias: float = 0.0,
          heavy: bool = False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(E, B, d, generator=g)
    if heavy:  # heavy-tailed rows and coordinates, as residual streams have
        x = x * torch.empty(E, B, 1).exponential_(generator=g) * torch.empty(1, 1, d).exponential_(generator=g)
    W = torch.randn(E, d, n, generator=g) / d ** 0.5
    W = W * torch.exp(col_scale * torch.randn(E, 1, n, generator=g))  # columns of different norms
    b = bias * torch.randn(E, n, generator=g)
    return x, W, b


@pytest.mark.parametrize("E,B,d,n,k,kw", [
    (1, 256, 64, 4096, 16, {}),
    (1, 300, 96, 2048, 8, {"heavy": True}),
    (2, 128, 40, 1024, 32, {"col_scale": 1.5, "bias": 3.0}),  # d + 1 not a multiple of 32; strong biases
    (3, 64, 128, 8192, 64, {"bias": -2.0}),  # mostly negative pre-activations
    (1, 64, 32, 96, 20, {}),  # n / 8 < 2k: no groups
])
def test_screened_topk_picks_what_float32_topk_picks(E, B, d, n, k, kw):
    x, W, b = _case(0, E, B, d, n, **kw)
    ref_values, ref_idx = torch.baddbmm(b.unsqueeze(1), x, W).topk(k, dim=-1, sorted=True)
    values, idx = screened_topk(x, W, b, k, sorted=True)
    assert torch.equal(idx.sort(-1).values, ref_idx.sort(-1).values)  # no exact ties in random data
    torch.testing.assert_close(values, ref_values, rtol=1e-5, atol=1e-5)
    # The values are the pre-activations of the latents returned, in descending order.
    pre = torch.baddbmm(b.unsqueeze(1), x, W)
    torch.testing.assert_close(values, pre.gather(-1, idx), rtol=1e-5, atol=1e-5)
    assert bool((values[..., :-1] >= values[..., 1:]).all())


def test_the_bound_holds_on_hard_inputs():
    """|screen - pre| <= radius + u'|screen| on heavy-tailed inputs with uneven columns and large biases: the whole
    exactness argument rests on it (a bound that failed would drop true picks silently)."""
    for seed in range(4):
        x, W, b = _case(seed, 2, 512, 200, 2048, col_scale=2.0, bias=5.0, heavy=True)
        screen, xa = bf16_screen(x, W, b)
        pre = torch.baddbmm(b.unsqueeze(1).double(), x.double(), W.double())
        slack = screen_radius(x, xa, W, b).unsqueeze(-1) + screening._UP * screen.float().abs()
        err = (screen.double() - pre).abs()
        assert bool((err <= slack).all())
        assert err.max() > 0.01 * slack.max()  # the check is not vacuous: the screen does round


def test_exact_ties_keep_the_values():
    """Duplicated columns tie exactly: any of the tied latents may be picked, but the values are float32 topk's."""
    x, W, b = _case(1, 1, 64, 32, 1024)
    W[..., 512:] = W[..., :512]
    ref_values, _ = torch.baddbmm(b.unsqueeze(1), x, W).topk(10, dim=-1)
    values, idx = screened_topk(x, W, b, 10, sorted=True)
    torch.testing.assert_close(values, ref_values, rtol=1e-5, atol=1e-5)


def test_a_large_bias_does_not_widen_the_bound(monkeypatch):
    """Biases far larger than x·W (an SAE early in training) leave the candidates few: the bias's rounding is
    bounded on its own, not through ‖x‖·|b|."""
    x, W, b = _case(4, 1, 128, 64, 4096)
    b = 50 * torch.randn(1, 4096, generator=torch.Generator().manual_seed(5)).abs()
    seen = []
    rescore = screening._rescore_top
    monkeypatch.setattr(screening, "_rescore_top", lambda *a: seen.append(a[3].numel()) or rescore(*a))
    values, idx = screened_topk(x, W, b, 8, sorted=True)
    ref = torch.baddbmm(b.unsqueeze(1), x, W).topk(8, dim=-1, sorted=True)
    assert torch.equal(idx.sort(-1).values, ref.indices.sort(-1).values)
    assert seen and seen[0] < 128 * 4096 / 16


def test_indistinguishable_values_take_the_float32_pass(monkeypatch):
    """Weights near zero under one shared bias: the screen cannot order the latents, so rather than rescore all of
    them the float32 pass answers (the same top k)."""
    x, W, b = _case(5, 1, 64, 32, 2048)
    W = W * 1e-6
    b = torch.full((1, 2048), 3.0)
    dense = []
    original = screening._dense_topk
    monkeypatch.setattr(screening, "_dense_topk", lambda *a: dense.append(1) or original(*a))
    values, idx = screened_topk(x, W, b, 8, sorted=True)
    ref = torch.baddbmm(b.unsqueeze(1), x, W).topk(8, dim=-1, sorted=True)
    assert dense and torch.equal(idx, ref.indices) and torch.equal(values, ref.values)


def test_subnormal_inputs_answer_like_float32():
    """Inputs below float32's normal range (AMX tiles flush them to zero): still float32's answer."""
    x, W, b = _case(6, 1, 32, 64, 1024)
    x, W = x * 1e-39, W * 1e6
    ref = torch.baddbmm(b.unsqueeze(1), x, W).topk(4, dim=-1, sorted=True)
    values, idx = screened_topk(x, W, b, 4, sorted=True)
    assert torch.equal(idx.sort(-1).values, ref.indices.sort(-1).values)


def test_non_finite_inputs_answer_like_float32():
    x, W, b = _case(2, 1, 16, 32, 512)
    x[0, 3, 0] = float("nan")
    x[0, 5, 1] = float("inf")
    ref = torch.baddbmm(b.unsqueeze(1), x, W).topk(4, dim=-1, sorted=True)
    values, idx = screened_topk(x, W, b, 4, sorted=True)
    torch.testing.assert_close(values, ref.values, equal_nan=True)


def test_bad_inputs_are_named():
    x, W, b = _case(0, 1, 8, 16, 256)
    with pytest.raises(ValueError, match="float32"):
        screened_topk(x.double(), W.double(), b.double(), 4)
    with pytest.raises(ValueError, match="do not fit"):
        screened_topk(x, W[..., :-1], b, 4)


def test_screens_only_where_it_pays(monkeypatch):
    x = torch.zeros(1, 4, 512)
    assert not screens(x.double(), 1 << 14, 32)  # float64 keeps its own precision
    monkeypatch.setattr(screening, "_bf16_matmul_is_fast", lambda: True)
    assert screens(x, 1 << 14, 32) and not screens(x, 1 << 12, 32)  # few latents per pick: nothing to gain
    assert not screens(x[..., :128], 1 << 14, 32)  # a narrow matmul: little to gain
    monkeypatch.setattr(screening, "_bf16_matmul_is_fast", lambda: False)
    assert not screens(x, 1 << 14, 32)
    monkeypatch.setattr(screening, "SCREEN", True)
    assert screens(x, 64, 32)


@pytest.mark.parametrize("dead_share", [0.0, 0.1, 0.75])  # AuxK off, over the dead columns, over all latents
def test_topk_sae_trains_the_same_screened(monkeypatch, dead_share):
    """A TopK SAE's loss and gradients are float32's with the screen forced on (AuxK's paths included)."""
    x = torch.randn(256, 48, generator=torch.Generator().manual_seed(3))
    results = []
    for forced_screen in (False, True):
        monkeypatch.setattr(screening, "SCREEN", forced_screen)
        sae = make_sae("topk", d_in=48, d_sae=1024, k=[4, 8], seed=[0, 1], aux_k=24)
        with torch.no_grad():
            sae.tokens_since_fired[:, :int(dead_share * 1024)] = 10**12
            sae.tokens_since_fired[:, int(dead_share * 1024):] = 0
        out = sae(x)
        out.loss.sum().backward()
        results.append((out.loss.detach(), out.losses["aux"].detach(), out.codes.detach(),
                        {name: p.grad for name, p in sae.named_parameters()}))
    (loss0, aux0, codes0, g0), (loss1, aux1, codes1, g1) = results
    assert torch.equal(codes0 != 0, codes1 != 0)  # the same latents fire
    torch.testing.assert_close(codes1, codes0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(aux1, aux0, rtol=1e-5, atol=1e-7)
    assert (aux0 > 0).all() == (dead_share > 0)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-6, msg=name)


def test_encode_screens_only_without_autograd(monkeypatch):
    """`encode` under no_grad screens (codes equal float32's to ulps, the same latents); with autograd it keeps the
    float32 pass, so gradients with respect to the codes stay available."""
    x = torch.randn(200, 48, generator=torch.Generator().manual_seed(7))
    sae = make_sae("topk", d_in=48, d_sae=1024, k=[4, 8], seed=[0, 1]).eval()
    monkeypatch.setattr(screening, "SCREEN", False)
    with torch.no_grad():
        reference = sae.encode(x)
    monkeypatch.setattr(screening, "SCREEN", True)
    calls = []
    original = screening.screened_topk
    monkeypatch.setattr("sparse_coding.dictionaries.kinds.topk.screened_topk",
                        lambda *a, **kw: calls.append(1) or original(*a, **kw))
    with torch.no_grad():
        screened = sae.encode(x)
    assert calls and torch.equal(screened != 0, reference != 0)
    torch.testing.assert_close(screened, reference, rtol=1e-5, atol=1e-6)
    assert ((screened != 0).sum(-1) == torch.tensor([4, 8]).view(2, 1)).all()  # each member keeps its own k
    calls.clear()
    codes = sae.encode(x)
    assert not calls and codes.requires_grad and torch.equal(codes.detach(), reference)
