"""Audit fixes: fine-tuning a loaded SAE keeps its function, a failed train_sae leaves the SAE as it came, and the
SAE's own entry points (forward/encode/decode, seeds, load_member_state_) refuse bad input by name."""

import numpy as np
import pytest
import torch

from sparse_coding.dictionaries import load_sae, make_sae, save_sae, train_sae
from sparse_coding.dictionaries.metrics import FVU
from sparse_coding.dictionaries.training.rescale import fit_scale_

pytestmark = pytest.mark.usefixtures("one_thread")

KINDS = [("relu", {}), ("topk", {"k": 4}), ("batchtopk", {"k": 4}), ("jumprelu", {"threshold_lr_mult": 10.0})]


def _data(rows=400, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, d, generator=g) * 10 + 1  # far from E‖x‖² = d_in: the input scale matters


@torch.no_grad()
def _measure(sae, x):
    """(FVU [E], codes, x̂) in eval mode."""
    sae.eval()
    return FVU().update(x, sae(x).x_hat).value(), sae.encode(x), sae(x).x_hat


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """kind -> (the trained SAE, its saved folder): 30 steps at the "auto" scale (about 0.1 on _data)."""
    x, out = _data(), {}
    for kind, kw in KINDS:
        sae = make_sae(kind, 16, 64, **kw)
        train_sae(sae, x, steps=30, batch_size=64, progress=False)
        out[kind] = sae, save_sae(sae, tmp_path_factory.mktemp(kind) / "sae")
    return out


# ----- 1. fine-tuning a loaded SAE keeps what it computes -----
@pytest.mark.parametrize("kind", ["relu", "topk", "jumprelu"])
@pytest.mark.parametrize("scale", ["auto", 1.0])
def test_fine_tuning_a_loaded_sae_with_no_lr_keeps_its_function(loaded, kind, scale):
    trained, folder = loaded[kind]
    x = _data()
    sae = load_sae(folder)
    fvu, codes, x_hat = _measure(sae, x)
    train_sae(sae, x, steps=1, lr=1e-12, batch_size=64, progress=False, input_scale=scale)
    fvu2, codes2, x_hat2 = _measure(sae, x)
    torch.testing.assert_close(fvu2, fvu, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(x_hat2, x_hat, rtol=1e-4, atol=1e-4 * float(x.abs().max()))
    norms = sae.W_dec.detach().norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=1e-5)  # trained with unit rows
    if scale == "auto":  # the scale it was trained at, unfolded from the weights; the same codes
        assert sae.input_scale == pytest.approx(trained.input_scale, rel=1e-5)
        torch.testing.assert_close(codes2, codes, rtol=1e-4, atol=1e-4 * float(codes.abs().max()))
    else:  # at scale 1 the codes carry the folded scale
        assert sae.input_scale == 1.0
        torch.testing.assert_close(codes2 * trained.input_scale, codes, rtol=1e-3,
                                   atol=1e-4 * float(codes.abs().max()))


@pytest.mark.parametrize("kind", [k for k, _ in KINDS])
@pytest.mark.parametrize("scale", [None, 1.0, 0.37])
def test_fit_scale_keeps_the_function_of_every_kind(loaded, kind, scale):
    x = _data()
    sae = load_sae(loaded[kind][1])
    before = _measure(sae, x)
    undo = fit_scale_(sae, scale)
    after = _measure(sae, x)
    torch.testing.assert_close(after[2], before[2], rtol=1e-4, atol=1e-4 * float(x.abs().max()))
    assert (after[1] != 0).sum() == (before[1] != 0).sum()  # the same latents fire
    undo()
    assert sae.input_scale == 1.0 and torch.equal(_measure(sae, x)[1], before[1])


@pytest.mark.parametrize("kind, kw", [("relu", {}), ("jumprelu", {})])
def test_decoder_rows_of_any_norm_are_folded_into_the_codes(kind, kw):
    sae = make_sae(kind, 16, 64, **kw)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # an SAELens file with rows of many norms
        sae.W_dec.mul_(torch.rand(1, 64, 1, generator=g) * 3 + 0.2)
        sae.b_enc.copy_(torch.randn(1, 64, generator=g) * 0.1)
    sae.fitted = True
    x = _data()
    before = _measure(sae, x)
    fit_scale_(sae, None)
    after = _measure(sae, x)
    torch.testing.assert_close(after[2], before[2], rtol=1e-4, atol=1e-3)
    norms = sae.W_dec.detach().norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=1e-5)


def test_topk_rows_of_different_norms_are_refused_untouched():
    sae = make_sae("topk", 16, 64, k=4)
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.5, 2.0, 64).view(1, 64, 1))
    sae.fitted = True
    W = sae.W_dec.detach().clone()
    with pytest.raises(ValueError, match="decoder rows differ in norm.*topk"):
        train_sae(sae, _data(), steps=1, batch_size=64, progress=False)
    assert torch.equal(sae.W_dec.detach(), W) and sae.input_scale == 1.0


def test_a_fresh_sae_still_estimates_its_scale_and_a_trained_one_keeps_it():
    x = _data()
    sae = make_sae("relu", 16, 32)
    train_sae(sae, x, steps=2, batch_size=64, progress=False)
    s = sae.input_scale
    assert s == pytest.approx(0.1, rel=0.2)
    train_sae(sae, x * 2, steps=2, batch_size=64, progress=False, seed=5)  # "auto" does not re-estimate
    assert sae.input_scale == s and sae.fitted


# ----- 2. a failed call leaves the SAE as it came -----
def test_a_wrong_width_is_refused_before_anything_changes():
    sae = make_sae("topk", 16, 64, k=3).eval()
    with pytest.raises(ValueError, match="width 8.*d_in=16"):
        train_sae(sae, torch.randn(100, 8) * 50, steps=5, progress=False)
    assert sae.input_scale == 1.0 and not sae.training
    with pytest.raises(ValueError, match="batch at step 0"):  # a callable's width shows at its first batch
        train_sae(sae, lambda step: torch.randn(32, 8) * 50, steps=5, progress=False)
    assert sae.input_scale == 1.0 and not sae.training
    assert not sae.fitted


def test_a_failure_before_the_first_step_restores_rewritten_weights(loaded):
    sae = load_sae(loaded["relu"][1])
    state = {k: v.clone() for k, v in sae.state_dict().items()}

    def source(step):
        raise RuntimeError("the source broke")

    with pytest.raises(RuntimeError, match="broke"):  # at scale 0.5 the weights are rewritten first
        train_sae(sae, source, steps=3, progress=False, input_scale=0.5)
    assert sae.input_scale == 1.0 and not sae.training
    assert all(torch.equal(v, state[k]) for k, v in sae.state_dict().items()) and sae.fitted


# ----- 3. an empty batch: one ValueError for every kind -----
@pytest.mark.parametrize("kind, kw", KINDS + [("relu_bias_decay", {})])
@pytest.mark.parametrize("training", [True, False])
def test_zero_rows_are_refused_by_every_kind(kind, kw, training):
    sae = make_sae(kind, 8, 32, **kw).train(training)
    for call in (sae, sae.encode, sae.pre_activations):
        with pytest.raises(ValueError, match=r"x has 0 rows"):
            call(torch.randn(0, 8))
    with pytest.raises(ValueError, match=r"x has 0 rows"):
        sae(torch.randn(sae.n_members, 0, 8))


def test_train_sae_refuses_an_empty_batch_from_a_callable():
    with pytest.raises(ValueError, match=r"batches gave 0 rows"):  # input_scale "auto" reads it first
        train_sae(make_sae("relu", 8, 16), lambda step: torch.randn(0, 8), steps=2, progress=False)
    with pytest.raises(ValueError, match=r"batch at step 0 must be \[batch >= 1"):
        train_sae(make_sae("relu", 8, 16), lambda step: torch.randn(0, 8), steps=2, progress=False, input_scale=1.0)


# ----- 4. decode converts or refuses the codes -----
def test_decode_converts_floating_codes_and_refuses_others():
    sae = make_sae("relu", 8, 32, seed=[0, 1])
    codes = torch.rand(2, 5, 32)
    torch.testing.assert_close(sae.decode(codes.double()), sae.decode(codes))
    for bad in ([[0.0] * 32], torch.zeros(2, 5, 32, dtype=torch.long)):
        with pytest.raises(ValueError, match="codes must be a floating-point"):
            sae.decode(bad)


# ----- 5. seeds: each member checked, any integer type -----
@pytest.mark.parametrize("seed", [[0, -1], [0, 2**70], [0, 1.0], 2**64])
def test_every_member_seed_is_range_checked(seed):
    with pytest.raises(ValueError, match="seed"):
        make_sae("relu", 8, 16, seed=seed)


def test_numpy_integer_seeds_are_taken():
    a, b = make_sae("relu", 8, 16, seed=np.int64(3)), make_sae("relu", 8, 16, seed=[np.uint8(3), np.int32(4)])
    assert type(a.hparams[0]["seed"]) is int and [h["seed"] for h in b.hparams] == [3, 4]
    assert torch.equal(a.W_dec[0], make_sae("relu", 8, 16, seed=3).W_dec[0]) and torch.equal(a.W_dec[0], b.W_dec[0])


# ----- 6. load_member_state_ checks what member_state gives -----
def test_load_member_state_refuses_a_bad_index_or_weights():
    sae = make_sae("relu", 8, 16, seed=[0, 1])
    state = sae.member_state(0)
    with pytest.raises(ValueError, match="out of range"):
        sae.load_member_state_(5, state)
    for name in ("W_dec", "b_enc"):
        bad = {**state, name: state[name].clone().fill_(float("nan"))}
        with pytest.raises(ValueError, match=rf"state\['{name}'\] contains NaN"):
            sae.load_member_state_(1, bad)
    with pytest.raises(ValueError, match=r"state\['b_dec'\] must be a floating-point tensor"):
        sae.load_member_state_(1, {**state, "b_dec": [0.0] * 8})
    assert not torch.equal(sae.W_dec[0], sae.W_dec[1]) and not sae.fitted  # nothing was copied


@pytest.mark.parametrize("kind, kw", KINDS)
def test_load_member_state_takes_numpy_arrays(kind, kw):
    sae = make_sae(kind, 8, 16, seed=[0, 1], **kw)
    sae.load_member_state_(1, {k: v.numpy() for k, v in sae.member_state(0).items()})
    assert torch.equal(sae.W_dec[0], sae.W_dec[1]) and torch.equal(sae.W_enc[0], sae.W_enc[1]) and sae.fitted


# ----- 7. x: a 1-D row and integer or bool inputs -----
@pytest.mark.parametrize("kind, kw", KINDS)
def test_encode_explains_a_1d_row_and_refuses_non_floating_x(kind, kw):
    sae = make_sae(kind, 8, 32, **kw)
    with pytest.raises(ValueError, match=r"\[batch, 8\].*r\[None\]"):
        sae.encode(torch.randn(8))
    for x in (torch.ones(4, 8, dtype=torch.long), torch.ones(4, 8, dtype=torch.bool)):
        with pytest.raises(ValueError, match="x must hold floating-point"):
            sae.encode(x)


@pytest.mark.parametrize("kind, kw", [("relu", {}), ("topk", {"k": 4})])
def test_an_interrupted_run_resumes_into_its_saved_and_reloaded_sae(kind, kw, tmp_path):
    """A reloaded SAE recovers its scale from its decoder rows, equal to the run's estimate up to the last bits: the
    resume takes the saved run's scale and ends where the uninterrupted run ends."""
    x = torch.randn(512, 16, generator=torch.Generator().manual_seed(0)) * 10 + 1
    src = lambda step: x[(step * 64) % 512:(step * 64) % 512 + 64]  # noqa: E731
    whole = make_sae(kind, 16, 32, seed=0, **kw)
    train_sae(whole, src, steps=8, progress=False, state_dir=tmp_path / "whole", state_every=2, log_every=1)

    def stop(step, sae):
        if step == 5:
            raise KeyboardInterrupt

    cut = make_sae(kind, 16, 32, seed=0, **kw)
    with pytest.raises(KeyboardInterrupt):
        train_sae(cut, src, steps=8, progress=False, state_dir=tmp_path / "cut", state_every=2, log_every=1,
                  callback=stop)
    again = load_sae(save_sae(cut, tmp_path / "saved"))
    train_sae(again, src, steps=8, progress=False, state_dir=tmp_path / "cut", state_every=2, log_every=1,
              resume=True)
    assert again.input_scale == whole.input_scale
    for name, t in whole.state_dict().items():
        torch.testing.assert_close(again.state_dict()[name], t, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("kind", ["relu", "topk"])
def test_weights_copied_by_load_state_dict_are_fine_tuned_at_their_own_scale(loaded, kind):
    # A copy through torch's own load_state_dict is an SAE with weights: "auto" must not estimate a new scale on top
    # of the one folded into them (before: the copy was trained as a fresh SAE and its function changed at step 0).
    x = _data()
    src = load_sae(loaded[kind][1])
    copy = make_sae(kind, 16, 64, **dict(KINDS)[kind])
    assert not copy.fitted
    copy.load_state_dict(src.state_dict())
    assert copy.fitted
    fvu, _, x_hat = _measure(copy, x)
    train_sae(copy, x, steps=1, lr=1e-12, batch_size=64, progress=False)
    fvu2, _, x_hat2 = _measure(copy, x)
    torch.testing.assert_close(x_hat2, x_hat, rtol=1e-4, atol=1e-4 * float(x.abs().max()))
    assert copy.input_scale == pytest.approx(loaded[kind][0].input_scale, rel=1e-5)


def test_a_jumprelu_with_zero_thresholds_trains_with_saved_states_and_resumes(tmp_path):
    # θ = 0 (a plain ReLU, as SAELens files may hold) is log θ = -inf; before, the state writer took it for damage
    # and raised TrainingDiverged at step 0.
    x = _data()

    def loaded_sae():
        sae = make_sae("jumprelu", 16, 64, threshold_lr_mult=1.0)
        state = sae.member_state(0)
        state["threshold"] = torch.cat([torch.full((32,), 0.1), torch.zeros(32)])
        sae.load_member_state_(0, state)
        return sae

    def stop_at_4(step, sae):
        if step == 4:
            raise KeyboardInterrupt

    whole = loaded_sae()
    train_sae(whole, x, steps=8, batch_size=64, progress=False, state_dir=tmp_path / "whole", state_every=2,
              log_every=1)
    cut = loaded_sae()
    with pytest.raises(KeyboardInterrupt):
        train_sae(cut, x, steps=8, batch_size=64, progress=False, state_dir=tmp_path / "cut", state_every=2,
                  log_every=1, callback=stop_at_4)
    resumed = loaded_sae()
    train_sae(resumed, x, steps=8, batch_size=64, progress=False, state_dir=tmp_path / "cut", state_every=2,
              log_every=1, resume=True)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(whole.threshold().detach()[0, 32:], torch.zeros(32))  # still exactly a ReLU there
    with torch.no_grad():
        whole.W_dec[0, 0, 0] = float("nan")  # real damage is still refused
    with pytest.raises(FloatingPointError):
        train_sae(whole, x, steps=2, batch_size=64, progress=False, state_dir=tmp_path / "nan")
