"""Audit fixes in `analyses.ablation`, `analyses.splicing` and `analyses.reconstruction`: argument checks that name
the argument, a clear error when a norm-limit exclusion leaves nothing, and every evaluation in eval mode with the
caller's train/eval mode given back."""

from __future__ import annotations

import pytest
import torch

from sparse_coding.activations import Exclusion
from sparse_coding.analyses import (density_histogram, edit_activation, feature_ablation, loss_with_features,
                                    mean_l0, sparsity_stats, spliced_loss, token_ablation)
from sparse_coding.dictionaries import make_sae

pytestmark = pytest.mark.usefixtures("one_thread")

H = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def setup(tiny_model):
    model, tokens, _ = tiny_model
    return model, tokens[:4]


def relu_sae(d: int):
    torch.manual_seed(0)
    s = make_sae("relu", d_in=d, d_sae=8)
    with torch.no_grad():
        s.b_enc.fill_(0.1)
    return s


def batchtopk_sae(d: int):
    """A train-mode BatchTopK SAE whose inference threshold (eval mode) differs from its batch top k·B."""
    torch.manual_seed(0)
    s = make_sae("batchtopk", d_in=d, d_sae=32, k=4, aux_k=4)
    with torch.no_grad():
        s.threshold.fill_(0.05)
    return s.train()


def test_token_ablation_requires_one_context(setup):
    model, tokens = setup
    s = relu_sae(model.cfg.d_model)
    with pytest.raises(ValueError, match=r"context must be one context, a 1-D tensor .* got shape \(2, 8\)"):
        token_ablation(model, s, H, tokens[:2, :8], 10, 0, n_draws=1)  # used to join the two contexts
    one = token_ablation(model, s, H, tokens[0, :8], 3, 0, n_draws=1)
    assert one.shape == (4,)
    assert torch.equal(token_ablation(model, s, H, tokens[:1, :8], 3, 0, n_draws=1), one)  # a batch of one


def test_edit_activation_latent_out_of_range(setup):
    model, _ = setup
    s = relu_sae(model.cfg.d_model)
    with pytest.raises(ValueError, match=r"latent must be an int in \[0, 7\] .*d_sae=8"):
        edit_activation(s, torch.randn(4, model.cfg.d_model), 8)


def test_norm_limit_that_excludes_everything(setup):
    model, tokens = setup
    s = relu_sae(model.cfg.d_model)
    allout = Exclusion(max_norm=((H, 1e-9),))
    with pytest.raises(ValueError, match="max_norm"):
        loss_with_features(model, s, H, tokens[:2], {"a": [0]}, exclude=allout)  # was ZeroDivisionError
    with pytest.raises(ValueError, match="max_norm.*no activation to average"):
        spliced_loss(model, tokens[:2], H, s, exclude=allout, progress=False)  # was "mean_act contains NaN/inf"
    with pytest.raises(ValueError, match="max_norm.*no prediction is left to score"):
        spliced_loss(model, tokens[:2], H, s, exclude=allout, ablations=(), progress=False)  # ZeroDivisionError


def test_mean_l0_member_and_histogram_bounds():
    s = make_sae("relu", d_in=4, d_sae=8)
    with pytest.raises(ValueError, match=r"member must be an int in \[0, 0\]"):
        mean_l0(s, torch.randn(5, 4), member=3)
    with pytest.raises(ValueError, match="lo=1.* must be below hi=0"):
        density_histogram(torch.rand(2, 10), lo=1.0, hi=0.0)


def test_sparsity_stats_in_eval_mode_and_mode_restored():
    s = batchtopk_sae(16)
    x = torch.randn(512, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = float((s.eval().encode(x)[0] > 0).sum(1).float().mean())
    s.train()
    table, _ = sparsity_stats(s, [x], progress=False)
    assert s.training and all(m.training for m in s.modules())
    assert table.l0[0] == pytest.approx(expected) and expected != pytest.approx(4.0)  # train mode gave k = 4
    assert mean_l0(s, x) == pytest.approx(expected)
    assert s.training  # mean_l0 used to leave it in eval mode
    s.eval()
    sparsity_stats(s, [x], progress=False)
    assert not s.training


def test_spliced_loss_and_ablations_in_eval_mode(setup):
    model, tokens = setup
    s = batchtopk_sae(model.cfg.d_model)
    train_mode = spliced_loss(model, tokens[:2], H, s, ablations=(), progress=False)
    assert s.training
    s.eval()
    eval_mode = spliced_loss(model, tokens[:2], H, s, ablations=(), progress=False)
    assert not s.training
    assert train_mode.ce_spliced[0] == eval_mode.ce_spliced[0]
    s.train()
    feature_ablation(model, s, H, tokens[:2], 0)
    loss_with_features(model, s, H, tokens[:2], {"a": [0]})
    token_ablation(model, s, H, tokens[0, :6], 3, 0, n_draws=1)
    edit_activation(s, torch.randn(3, model.cfg.d_model), 0)
    assert s.training  # each used to leave it in eval mode
