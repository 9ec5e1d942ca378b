"""The ReLU kind's training step keeps its [E, B, d_sae] tensors (codes, code gradient) from step to step instead of
allocating them afresh (page faults on CPU): training gives bit for bit what fresh tensors give, and the generic
autograd path's numbers in float64; the codes handed to callers never change under them; eval mode and
torch.no_grad keep nothing."""

import pandas as pd
import pytest
import torch

from sparse_coding.dictionaries import EnsembleSAE, ReLUSAE, make_sae
from sparse_coding.dictionaries.training import train_sae

pytestmark = pytest.mark.usefixtures("one_thread")

D_IN, D_SAE = 8, 24
L1 = [0.05, 0.3, 1.0]


def _sae(kind="relu", E=3, tied=False, pre_bias=True, dtype=torch.float32):
    sae = make_sae(kind, d_in=D_IN, d_sae=D_SAE, l1_coef=L1[:E], seed=list(range(E)), tied=tied, pre_bias=pre_bias,
                   dtype=dtype)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # biases away from zero, so that pre_bias and b_enc matter from the first step
        sae.b_enc.copy_(0.1 * torch.randn(sae.b_enc.shape, generator=g))
        sae.b_dec.copy_(0.5 * torch.randn(sae.b_dec.shape, generator=g))
    return sae


def _batches(dtype, n=4, sizes=(32, 32, 20, 32)):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(sizes[i % len(sizes)], D_IN, generator=g, dtype=dtype) for i in range(n)]


def _train(sae, xs):
    """Every step logged, so the trainer reads out.codes on every step (its log's l0 column)."""
    log = train_sae(sae, lambda s: xs[s], steps=len(xs), lr=1e-2, log_every=1, input_scale=1.0, progress=False)
    return {n: p.detach().clone() for n, p in sae.named_parameters()}, log


def _no_buffers(monkeypatch):
    monkeypatch.setattr(ReLUSAE, "_step_buffers", lambda self: None)


CASES = [(kind, E, tied, pre_bias) for kind in ("relu", "relu_bias_decay") for E in (1, 3)
         for tied in (False, True) for pre_bias in (False, True)]


@pytest.mark.parametrize("kind,E,tied,pre_bias", CASES)
def test_training_with_kept_buffers_is_bit_for_bit_training_with_fresh_ones(kind, E, tied, pre_bias, monkeypatch):
    """4 steps (the buffers reused from the second, and reallocated when the batch size changes at the third): the
    same weights and log, bit for bit, as fresh tensors every step (the step as it was), and again on a rerun."""
    xs = _batches(torch.float32)
    kept, log = _train(_sae(kind, E, tied, pre_bias), xs)
    again, log_again = _train(_sae(kind, E, tied, pre_bias), xs)
    with monkeypatch.context() as m:
        _no_buffers(m)
        fresh, log_fresh = _train(_sae(kind, E, tied, pre_bias), xs)
    for name in fresh:
        assert torch.equal(kept[name], fresh[name]), name
        assert torch.equal(kept[name], again[name]), name
    pd.testing.assert_frame_equal(log, log_fresh, check_exact=True)
    pd.testing.assert_frame_equal(log, log_again, check_exact=True)
    assert (log["l0"] > 0).all()


@pytest.mark.parametrize("kind,E,tied,pre_bias", CASES)
def test_training_matches_generic_autograd_in_float64(kind, E, tied, pre_bias, monkeypatch):
    """The hand step with its kept buffers against the generic autograd forward (EnsembleSAE._forward, as
    benchmarks/bench_ensemble.py's AutogradReLU), over several steps."""
    xs = _batches(torch.float64)
    ours, log = _train(_sae(kind, E, tied, pre_bias, torch.float64), xs)
    with monkeypatch.context() as m:
        m.setattr(ReLUSAE, "_forward", EnsembleSAE._forward)  # relu_bias_decay adds its term on top of it
        ref, log_ref = _train(_sae(kind, E, tied, pre_bias, torch.float64), xs)
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-10, atol=1e-10, msg=name)
    pd.testing.assert_frame_equal(log, log_ref, check_exact=False, rtol=1e-10, atol=1e-10)


def _step(sae, x):
    out = sae(x)
    out.loss.sum().backward()
    return out


def test_buffers_are_kept_reused_and_reallocated_on_a_new_shape():
    sae = _sae()
    sae.train()
    xs = _batches(torch.float32, n=3, sizes=(16, 16, 9))
    _step(sae, xs[0])
    ws = sae.__dict__["_workspaces"]
    assert set(ws) == {"codes", "g_codes", "x_aug", "W_aug", "g_aug", "W_dec_aug"}
    assert ws["codes"].shape == ws["g_codes"].shape == (3, 16, D_SAE)
    ptrs = {k: v.data_ptr() for k, v in ws.items()}
    _step(sae, xs[1])
    assert {k: v.data_ptr() for k, v in ws.items()} == ptrs  # the same memory, written again
    _step(sae, xs[2])
    assert ws["codes"].shape == ws["g_codes"].shape == (3, 9, D_SAE)
    sae.double()
    _step(sae, xs[0].double())
    assert ws["codes"].dtype == ws["g_codes"].dtype == torch.float64


def test_eval_and_no_grad_keep_nothing():
    sae = _sae()
    x = _batches(torch.float32)[0]
    sae.train()
    with torch.no_grad():
        out = sae(x)
    assert "_workspaces" not in sae.__dict__
    assert isinstance(out.codes_or_fn, torch.Tensor)  # fresh, handed out as it is
    _step(sae, x)
    assert "_workspaces" in sae.__dict__
    sae.eval()  # drops them
    assert "_workspaces" not in sae.__dict__
    out = _step(sae, x)  # eval mode with autograd on: fresh tensors too
    assert "_workspaces" not in sae.__dict__
    assert isinstance(out.codes_or_fn, torch.Tensor)
    torch.testing.assert_close(out.codes, sae.encode(x))


def test_codes_handed_out_are_a_copy_that_later_steps_never_change():
    """In training the codes live in the reused buffer; SAEOutput.codes is a copy made when read. Read within the
    step (as the trainer's log does) it is this batch's codes and stays so; a first read after a later forward pass
    rewrote the buffer raises rather than give that batch's codes. (No optimizer step here: the weights, and so
    each batch's codes, stay the same throughout.)"""
    sae = _sae()
    sae.train()
    xs = _batches(torch.float32, n=5, sizes=(16, 16, 16, 16, 9))
    with torch.no_grad():
        expected = [sae.encode(x) for x in xs]
    out = _step(sae, xs[0])
    codes = out.codes
    torch.testing.assert_close(codes, expected[0])  # the eval path rounds the bias in another order
    assert codes.data_ptr() != sae.__dict__["_workspaces"]["codes"].data_ptr()
    unread = _step(sae, xs[1])
    _step(sae, xs[2])  # rewrites the buffer that `unread`'s codes are in
    torch.testing.assert_close(codes, expected[0])  # the eval path rounds the bias in another order
    with pytest.raises(RuntimeError, match="overwritten by a later forward pass"):
        unread.codes
    # Any later forward pass counts (it may have rewritten the buffer), whatever its batch size.
    unread = _step(sae, xs[3])
    _step(sae, xs[4])
    with pytest.raises(RuntimeError, match="overwritten by a later forward pass"):
        unread.codes


def test_two_forwards_then_one_backward_get_their_own_codes(monkeypatch):
    """Losses of two batches summed before one backward: the second forward must not overwrite the first's codes
    (kept for its backward), so it takes fresh ones; the gradients are those of fresh tensors throughout."""
    xs = _batches(torch.float32, n=2)
    grads = []
    for fresh in (False, True):
        with monkeypatch.context() as m:
            if fresh:
                _no_buffers(m)
            sae = _sae()
            sae.train()
            for _ in range(2):  # the second round finds the buffer left by the first
                sae.zero_grad()
                a = sae(xs[0])
                codes_a = a.codes  # read before the next forward pass, as the codes of a training step must be
                b = sae(xs[1])
                (a.loss.sum() + b.loss.sum()).backward()
            grads.append({n: p.grad.clone() for n, p in sae.named_parameters()})
            assert not torch.equal(codes_a, b.codes)
    for name in grads[1]:
        assert torch.equal(grads[0][name], grads[1][name]), name


def test_backward_of_a_graph_whose_codes_a_later_step_rewrote_raises():
    """Loud, never silent: autograd's saved-tensor check sees the codes buffer rewritten."""
    sae = _sae()
    sae.train()
    xs = _batches(torch.float32, n=2)
    out = sae(xs[0])
    out.loss.sum().backward(retain_graph=True)  # hands the codes buffer back for the next step
    _step(sae, xs[1])
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.loss.sum().backward()


def test_a_loss_without_the_reconstruction_uses_the_kept_gradient_buffer_too(monkeypatch):
    """Backward from the L1 term alone (no gradient reaches x̂): the code gradient is the L1's constant, copied into
    the buffer a full step left behind; the same gradients as fresh tensors."""
    xs = _batches(torch.float32, n=2)
    grads = []
    for fresh in (False, True):
        with monkeypatch.context() as m:
            if fresh:
                _no_buffers(m)
            sae = _sae()
            sae.train()
            _step(sae, xs[0])
            sae.zero_grad()
            sae(xs[1]).losses["l1"].sum().backward()
            grads.append({n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None})
    assert set(grads[0]) == set(grads[1]) and grads[0]
    for name in grads[1]:
        assert torch.equal(grads[0][name], grads[1][name]), name


@pytest.mark.parametrize("shared", [True, False])
def test_squared_error_is_the_mse_with_its_gradients(shared):
    """The fused loss every kind's forward uses: (x̂ − x)² summed over d_in, averaged over the batch, per member, with
    gradients for x̂ and x (gradcheck in float64)."""
    from sparse_coding.dictionaries.kernels import SquaredError

    g = torch.Generator().manual_seed(0)
    x_hat = torch.randn(3, 7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(*((7, 5) if shared else (3, 7, 5)), generator=g, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(SquaredError.apply(x_hat, x), (x_hat - x).pow(2).sum(-1).mean(-1))
    assert torch.autograd.gradcheck(SquaredError.apply, (x_hat, x))
