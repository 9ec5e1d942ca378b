"""The SAE's Adam: column-major parameters (W_enc) stepped through row-major aliases give exactly torch's fused Adam
update, whatever layout a hand-set gradient has; moments round-trip through the saved-state tensors."""

import pytest
import torch

from sparse_coding.dictionaries import make_sae
from sparse_coding.dictionaries.training import SAEAdam, adam, param_state
from sparse_coding.dictionaries.training.optim import load_optimizer, optimizer_tensors


def _sae(kind="topk"):
    hp = {"k": 4} if kind == "topk" else {"l1_coef": 1e-2}
    return make_sae(kind, d_in=16, d_sae=48, seed=[0, 1], **hp)


def _grads(sae, seed):
    g = torch.Generator().manual_seed(seed)
    # empty_like keeps each parameter's layout, as autograd's gradients do
    return {n: torch.empty_like(p).normal_(generator=g) for n, p in sae.named_parameters()}


def _run(sae, opt, steps, layout=None):
    for s in range(steps):
        for n, p in sae.named_parameters():
            grad = _grads(sae, s)[n]
            p.grad = grad.contiguous() if layout == "row-major" else grad
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_w_enc_is_column_major_and_stepped_through_a_row_major_alias_of_its_storage():
    sae = _sae()
    opt = adam(sae, 1e-2, (0.9, 0.999))
    assert not sae.W_enc.is_contiguous() and sae.W_enc.mT.is_contiguous()
    alias = opt.stepped(sae.W_enc)
    assert alias is not sae.W_enc and alias.is_contiguous()
    assert alias.data_ptr() == sae.W_enc.data_ptr() and alias.shape == sae.W_enc.mT.shape
    assert opt.stepped(sae.W_dec) is sae.W_dec  # already row-major: no alias


@pytest.mark.parametrize("kind", ["topk", "relu"])
def test_steps_equal_torch_fused_adam_bit_for_bit(kind):
    ours, ref = _sae(kind), _sae(kind)
    opt = adam(ours, 1e-2, (0.9, 0.99))
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2, betas=(0.9, 0.99), fused=True)
    _run(ours, opt, 5)
    _run(ref, ref_opt, 5)
    for (n, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), n
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(param_state(opt, p)[key], ref_opt.state[q][key]), (n, key)
            assert param_state(opt, p)[key].shape == p.shape
        assert p.grad is None  # zero_grad reaches the module's parameters too


def test_a_hand_set_gradient_of_another_layout_gets_the_right_update():
    # torch's fused CPU kernel pairs param and gradient memory element by element, so a row-major gradient on the
    # column-major W_enc would be applied to the wrong entries; the alias is handed a gradient of its own layout.
    ours, ref = _sae(), _sae()
    opt = adam(ours, 1e-2, (0.9, 0.99))
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2, betas=(0.9, 0.99), foreach=False)
    _run(ours, opt, 3, layout="row-major")
    _run(ref, ref_opt, 3)
    for (n, p), q in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)


def test_moments_round_trip_through_the_saved_tensors_in_the_parameters_shapes():
    sae = _sae()
    opt = adam(sae, 1e-2, (0.9, 0.99))
    _run(sae, opt, 2)
    tensors, groups = optimizer_tensors(opt, sae)
    assert tensors["adam.W_enc.exp_avg"].shape == sae.W_enc.shape  # the file format is the parameter's shape
    twin = _sae()
    twin.load_state_dict(sae.state_dict())
    twin_opt = adam(twin, 1e-3, (0.5, 0.5))
    load_optimizer(twin_opt, twin, {k: v.contiguous().clone() for k, v in tensors.items()}, groups)
    _run(sae, opt, 2)
    _run(twin, twin_opt, 2)
    for p, q in zip(sae.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_a_plain_torch_optimizer_still_works_with_the_state_helpers():
    sae = _sae()
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    assert param_state(opt, sae.W_enc) == {}
    _run(sae, opt, 1)
    assert param_state(opt, sae.W_enc)["exp_avg"].shape == sae.W_enc.shape
    assert isinstance(adam(sae, 1e-2, (0.9, 0.99)), SAEAdam)


def test_param_groups_are_accepted_and_stepped_through_the_aliases():
    ours, ref = _sae(), _sae()
    groups = [{"params": [ours.W_enc, ours.W_dec], "lr": 1e-2}, {"params": [ours.b_enc, ours.b_dec], "lr": 1e-3}]
    opt = SAEAdam(groups, betas=(0.9, 0.99), fused=True)
    ref_opt = torch.optim.Adam([{"params": [ref.W_enc, ref.W_dec], "lr": 1e-2},
                                {"params": [ref.b_enc, ref.b_dec], "lr": 1e-3}], betas=(0.9, 0.99), fused=True)
    assert opt.stepped(ours.W_enc) is opt.param_groups[0]["params"][0]
    _run(ours, opt, 3)
    _run(ref, ref_opt, 3)
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert torch.equal(p, q)
