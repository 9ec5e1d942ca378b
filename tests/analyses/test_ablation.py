"""Ablations (`analyses.ablation`): known answers from an SAE that reconstructs the residual stream exactly (so an
ablation is a hand-made patch), a feature planted on one token at the embedding, and the bad-input errors."""

from __future__ import annotations

import pytest
import torch

from sparse_coding import lm
from sparse_coding.analyses.ablation import (edit_activation, feature_ablation, loss_with_features,
                                             special_token_ids, token_ablation)
from sparse_coding.analyses.features import sae_encoder
from sparse_coding.dictionaries import make_sae

pytestmark = pytest.mark.usefixtures("one_thread")

EMBED = "blocks.0.hook_resid_pre"  # GPT-NeoX: exactly the token embedding
DEEP = "blocks.1.hook_resid_pre"


@pytest.fixture(scope="module")
def setup(tiny_lm, one_thread):
    _, _, folder = tiny_lm
    model = lm.load_model(folder)
    tokens = lm.validation_contexts(folder, split="train")[:40]
    return model, tokens


def set_weights(sae, W_enc, b_enc, W_dec, b_dec=None):
    with torch.no_grad():
        sae.W_enc[0].copy_(W_enc)
        sae.b_enc[0].copy_(b_enc)
        sae.W_dec[0].copy_(W_dec)
        sae.b_dec[0].copy_(torch.zeros(W_dec.shape[1]) if b_dec is None else b_dec)
    return sae


def exact_sae(d: int):
    """d_sae = 2d, W_enc = [I, -I], W_dec = [I; -I], no biases: relu(x) - relu(-x) = x, so x̂ = x exactly and
    feature i (< d) is relu(x_i) along e_i."""
    sae = make_sae("relu", d_in=d, d_sae=2 * d, pre_bias=False)
    eye = torch.eye(d)
    return set_weights(sae, torch.cat([eye, -eye], 1), torch.zeros(2 * d), torch.cat([eye, -eye], 0))


@pytest.fixture(scope="module")
def planted(setup):
    """(sae, t, c): feature 0 fires exactly on token t (code c there), feature 1 never fires."""
    model, tokens = setup
    E = model.W_E.detach()
    present = set(tokens[:, 1:].flatten().tolist()) - {0}  # 0: the offline tokenizer's EOS/BOS
    best = None
    for t in sorted(present):
        u = E[t] / E[t].norm()
        proj = E @ u
        other = float(torch.cat([proj[:t], proj[t + 1:]]).max())
        margin = float(proj[t]) - other
        if best is None or margin > best[0]:
            best = (margin, t, u, (float(proj[t]) + other) / 2)
    margin, t, u, thr = best
    assert margin > 0.05
    d = model.cfg.d_model
    W_enc = torch.zeros(d, 2)
    W_enc[:, 0] = 10 * u
    g = torch.Generator().manual_seed(1)
    W_dec = torch.randn(2, d, generator=g)
    sae = set_weights(make_sae("relu", d_in=d, d_sae=2, pre_bias=False), W_enc, torch.tensor([-10 * thr, -1.0]),
                      W_dec / W_dec.norm(dim=1, keepdim=True))
    codes = sae_encoder(sae)(E)
    assert int((codes[:, 0] > 0).sum()) == 1 and codes[t, 0] > 0 and int((codes[:, 1] > 0).sum()) == 0
    return sae, t, float(codes[t, 0])


@torch.no_grad()
def hand_patch(model, tokens, hook, fn):
    """Logits with the activation at `hook` replaced by fn(activation)."""
    return model.run_with_hooks(tokens, fwd_hooks=[(hook, lambda act, hook: fn(act))], return_type="logits")


@torch.no_grad()
def clean_logits(model, tokens):
    return model(tokens)


def activation(model, tokens, hook):
    return lm.hook_reader(model, [hook], fast=False)(tokens)[hook].clone()


def mean_ce(logits, tokens):
    logp = logits[:, :-1].float().log_softmax(-1)
    return float(-logp.gather(-1, tokens[:, 1:, None]).mean())


def test_ablating_a_dead_feature_changes_nothing(setup, planted):
    """A feature that never fires: every mode leaves the loss exactly clean, no log-prob change, no positions."""
    model, tokens = setup
    sae, _, _ = planted
    for mode, value in (("zero", None), ("rank_one", None), ("clamp", 3.0)):
        eff = feature_ablation(model, sae, EMBED, tokens, 1, mode=mode, value=value)
        assert eff.loss_edited == eff.loss_clean and eff.n_positions == 0
        assert eff.logprob_change.shape == (model.cfg.d_vocab,) and not bool(eff.logprob_change.any())
        assert eff.loss_clean == pytest.approx(mean_ce(clean_logits(model, tokens), tokens), rel=1e-5)


def test_zero_ablation_equals_patching_reconstruction_minus_feature(setup):
    """With an exact SAE, zeroing feature i gives the log-probs and loss of patching x̂ - c_i·d_i by hand."""
    model, tokens = setup
    d = model.cfg.d_model
    sae = exact_sae(d)
    x = activation(model, tokens, DEEP)
    codes = sae_encoder(sae)(x.reshape(-1, d))
    x_hat = (codes @ sae.W_dec.detach()[0]).reshape(x.shape)
    torch.testing.assert_close(x_hat, x, rtol=0, atol=1e-6)  # the reconstruction is exact
    clean = clean_logits(model, tokens)
    logp_clean = clean[:, :-1].log_softmax(-1)
    for i in (3, d + 7):  # a positive and a negative half
        c = codes[:, i].reshape(x.shape[:2])
        d_i = sae.W_dec.detach()[0, i]
        patched = hand_patch(model, tokens, DEEP, lambda act: x_hat - c[..., None] * d_i)
        rows = (c > 0)[:, :-1]
        expected = (patched[:, :-1].log_softmax(-1) - logp_clean)[rows].mean(0)
        eff = feature_ablation(model, sae, DEEP, tokens, i, batch_size=7)
        assert eff.n_positions == int(rows.sum()) > 0
        torch.testing.assert_close(eff.logprob_change, expected, rtol=1e-4, atol=1e-5)
        assert eff.loss_edited == pytest.approx(mean_ce(patched, tokens), rel=1e-5)
        assert eff.loss_clean == pytest.approx(mean_ce(clean, tokens), rel=1e-5)
        assert abs(eff.loss_edited - eff.loss_clean) > 1e-4  # the ablation matters
        drops = eff.top_drops(5)
        assert [v for _, v in drops] == sorted(v for _, v in drops)
        assert drops[0][1] == pytest.approx(float(eff.logprob_change.min()))


def test_clamp_to_the_current_value_changes_nothing(setup, planted):
    """The planted feature has one value c wherever it fires: clamping it to c is a no-op; to 3c is not."""
    model, tokens = setup
    sae, t, c = planted
    n = int((tokens[:, :-1] == t).sum())
    eff = feature_ablation(model, sae, EMBED, tokens, 0, mode="clamp", value=c)
    assert eff.n_positions == n > 0
    assert eff.loss_edited == pytest.approx(eff.loss_clean, abs=1e-6)
    torch.testing.assert_close(eff.logprob_change, torch.zeros(model.cfg.d_vocab), rtol=0, atol=1e-5)
    stronger = feature_ablation(model, sae, EMBED, tokens, 0, mode="clamp", value=3 * c)
    assert stronger.n_positions == n and float(stronger.logprob_change.abs().max()) > 1e-3
    # Zero ablation at the embedding: x - c·d at exactly the occurrences of t, patched by hand.
    d0 = sae.W_dec.detach()[0, 0]
    patched = hand_patch(model, tokens, EMBED, lambda act: act - c * (tokens == t)[..., None] * d0)
    zero = feature_ablation(model, sae, EMBED, tokens, 0)
    assert zero.n_positions == n
    assert zero.loss_edited == pytest.approx(mean_ce(patched, tokens), rel=1e-5)
    # Steering everywhere edits every prediction.
    everywhere = feature_ablation(model, sae, EMBED, tokens, 0, mode="clamp", value=c, where="all")
    assert everywhere.n_positions == tokens[:, :-1].numel()


def test_rank_one_stops_exactly_at_the_turning_off_point(setup):
    """Less-than-rank-one: the feature is 0 after the shift t (= pre-activation / slope), 0.99·t still fires."""
    model, tokens = setup
    d = model.cfg.d_model
    sae = make_sae("relu", d_in=d, d_sae=8, seed=2, pre_bias=False)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        sae.W_enc[0].add_(0.5 * torch.randn(d, 8, generator=g))
    x = activation(model, tokens, DEEP).reshape(-1, d)
    encode = sae_encoder(sae)
    W_enc, W_dec = sae.W_enc.detach()[0], sae.W_dec.detach()[0]
    for f in range(8):
        u = W_dec[f] / W_dec[f].norm()
        slope = float(u @ W_enc[:, f])
        if slope <= 0.1:
            continue
        c = encode(x)[:, f]
        new, rows = edit_activation(sae, x, f, mode="rank_one")
        assert torch.equal(rows, c > 0) and bool(rows.any()) and not bool(rows.all())
        assert torch.equal(new[~rows], x[~rows])  # rows where it does not fire are untouched
        assert bool((encode(new)[rows, f] == 0).all())
        shift = (x - new)[rows] @ u
        torch.testing.assert_close(shift, c[rows] / slope, rtol=1e-3, atol=1e-4)
        # The shift is along u only, and just barely enough: 99% of it leaves the feature on.
        torch.testing.assert_close(x[rows] - new[rows], shift[:, None] * u, rtol=0, atol=1e-5)
        clear = c[rows] > 1e-3
        assert bool((encode(x[rows] - 0.99 * shift[:, None] * u)[clear, f] > 0).all())
        break
    else:
        pytest.fail("no feature with an encoder that reads its own decoder direction")


def test_rank_one_refuses_a_feature_it_cannot_turn_off():
    """A feature whose encoder grows against its decoder direction has no shift: a clear error, not a 2^60 shift."""
    sae = make_sae("relu", d_in=4, d_sae=2, pre_bias=False)
    eye = torch.eye(4)
    set_weights(sae, -eye[:, :2], torch.ones(2), eye[:2])
    x = 0.1 * torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="latent 0 does not turn off.*use mode='zero'"):
        edit_activation(sae, x, 0, mode="rank_one")
    new, rows = edit_activation(sae, x, 0, mode="zero")  # zero ablation still works: x - c·d
    torch.testing.assert_close(new[:, 0], x[:, 0] - (1 - x[:, 0]))


def test_token_ablation_of_the_planted_token(setup, planted):
    """At the embedding, replacing or dropping token t removes the planted feature (drop = c); other tokens: 0."""
    model, tokens = setup
    sae, t, c = planted
    ctx, pos = [int(v) for v in (tokens[:, 1:] == t).nonzero()[0]]
    pos += 1  # a position after the first, so earlier tokens exist
    context = tokens[ctx]
    for mode in ("replace", "drop"):
        drop = token_ablation(model, sae, EMBED, context, pos, 0, mode=mode)
        assert drop.shape == (pos + 1,)
        assert float(drop[pos]) == pytest.approx(c, rel=1e-5)
        torch.testing.assert_close(drop[:pos], torch.zeros(pos), rtol=0, atol=1e-6)
    # At a position without t there is nothing to remove.
    other = int((context != t).nonzero()[-1])
    assert not bool(token_ablation(model, sae, EMBED, context, other, 0).any())


def test_token_ablation_window_edits_only_the_last_tokens(setup, planted):
    """window=w gives the full run's last w drops (the same draws) and NaN before them, at a fraction of the cost."""
    model, tokens = setup
    sae, t, c = planted
    context = tokens[0]
    pos = context.shape[0] - 1
    for mode in ("replace", "drop"):
        full = token_ablation(model, sae, "blocks.0.hook_resid_post", context, pos, 0, mode=mode, n_draws=3)
        part = token_ablation(model, sae, "blocks.0.hook_resid_post", context, pos, 0, mode=mode, n_draws=3, window=4)
        assert part.shape == full.shape and bool(part[:-4].isnan().all())
        torch.testing.assert_close(part[-4:], full[-4:], rtol=1e-4, atol=1e-4)  # batched differently
    with pytest.raises(ValueError, match="window"):
        token_ablation(model, sae, EMBED, context, pos, 0, window=0)


def fed_tokens(monkeypatch, model) -> list[torch.Tensor]:
    """A spy on every token batch the model is run on."""
    seen, run = [], model.run_with_hooks

    def spy(tokens, *args, **kwargs):
        seen.append(tokens.detach().cpu().clone())
        return run(tokens, *args, **kwargs)

    monkeypatch.setattr(model, "run_with_hooks", spy)
    return seen


def test_token_ablation_replaces_with_neutral_tokens_never_eos(setup, monkeypatch):
    """Each of tokens 0..p is replaced by n_draws draws from the distribution: never a special (EOS/BOS) id nor the
    token it replaces, only that one token changed, the context cut after p; the same seed gives the same drops."""
    model, tokens = setup
    special = special_token_ids(model)
    assert 0 in special  # the offline tokenizer's EOS and BOS
    counts = torch.bincount(tokens.flatten(), minlength=model.cfg.d_vocab).float()
    counts[0] += 1e6  # EOS as the corpus' most common token: still never drawn
    sae = make_sae("relu", d_in=model.cfg.d_model, d_sae=8, seed=1, pre_bias=False)
    context, p, n = tokens[3], 9, 5
    seen = fed_tokens(monkeypatch, model)
    drop = token_ablation(model, sae, DEEP, context, p, 2, distribution=counts, n_draws=n, seed=7)
    fed = torch.cat(seen)
    assert drop.shape == (p + 1,) and fed.shape == (1 + (p + 1) * n, p + 1)
    assert torch.equal(fed[0], context[:p + 1])
    changed = fed[1:] != context[:p + 1]
    assert bool((changed.sum(1) == 1).all())  # exactly one token replaced per variant, never by itself
    assert torch.equal(changed.nonzero()[:, 1], torch.arange(p + 1).repeat_interleave(n))
    new = fed[1:][changed]
    assert not set(new.tolist()) & special and bool((counts[new] > 0).all())
    again = token_ablation(model, sae, DEEP, context, p, 2, distribution=counts, n_draws=n, seed=7)
    assert torch.equal(drop, again)
    seen.clear()
    token_ablation(model, sae, DEEP, context, p, 2, distribution=counts, n_draws=n, seed=8)
    assert not torch.equal(torch.cat(seen), fed)  # another seed, other draws
    # All the weight on one token: every replacement is that token.
    one = torch.zeros(model.cfg.d_vocab)
    u = next(t for t in range(1, model.cfg.d_vocab) if t not in special and t not in context[:p + 1].tolist())
    one[u] = 1.0
    seen.clear()
    token_ablation(model, sae, DEEP, context, p, 2, distribution=one, n_draws=2)
    assert set(torch.cat(seen)[1:][changed[::n].repeat_interleave(2, 0)].tolist()) == {u}


def test_token_ablation_cannot_see_later_tokens(setup, planted):
    """The feature at position p cannot see tokens after p (causal model): other later tokens, the same drops; at the
    embedding it sees only its own token, so every earlier position drops by exactly 0."""
    model, tokens = setup
    sae = make_sae("relu", d_in=model.cfg.d_model, d_sae=8, seed=1, pre_bias=False)
    context, p = tokens[5].clone(), 6
    drop = token_ablation(model, sae, DEEP, context, p, 3, seed=2)
    context[p + 1:] = torch.flip(context[p + 1:], [0]) + 1
    assert torch.equal(token_ablation(model, sae, DEEP, context, p, 3, seed=2), drop)
    sae_t, t, c = planted
    ctx, pos = [int(v) for v in (tokens[:, 1:] == t).nonzero()[0]]
    drop = token_ablation(model, sae_t, EMBED, tokens[ctx], pos + 1, 0, n_draws=3)
    assert bool((drop[:pos + 1] == 0).all()) and float(drop[pos + 1]) == pytest.approx(c, rel=1e-5)


def test_token_ablation_refuses_distributions_without_neutral_tokens(setup):
    model, tokens = setup
    sae = make_sae("relu", d_in=model.cfg.d_model, d_sae=8, seed=1, pre_bias=False)
    only_eos = torch.zeros(model.cfg.d_vocab)
    only_eos[0] = 5.0
    with pytest.raises(ValueError, match="no weight outside the special tokens"):
        token_ablation(model, sae, DEEP, tokens[0], 4, 0, distribution=only_eos)
    only_self = torch.zeros(model.cfg.d_vocab)
    only_self[int(tokens[0, 2])] = 1.0
    with pytest.raises(ValueError, match="all its weight on the tokens being replaced"):
        token_ablation(model, sae, DEEP, tokens[0], 4, 0, distribution=only_self)
    with pytest.raises(ValueError, match="finite weights >= 0"):
        token_ablation(model, sae, DEEP, tokens[0], 4, 0, distribution=-torch.ones(model.cfg.d_vocab))


def test_loss_with_features_known_sets(setup):
    """With an exact SAE: all features kept = clean = spliced; none kept = zero ablation; {e_i halves} = x_i·e_i."""
    model, tokens = setup
    d = model.cfg.d_model
    sae = exact_sae(d)
    i = 5
    out = loss_with_features(model, sae, DEEP, tokens, {"every": range(2 * d), "none": [], "one": [i, d + i]},
                             batch_size=6)
    clean = mean_ce(clean_logits(model, tokens), tokens)
    assert out["clean"] == pytest.approx(clean, rel=1e-5)
    assert out["all"] == pytest.approx(clean, rel=1e-5) and out["every"] == pytest.approx(clean, rel=1e-5)
    zero = hand_patch(model, tokens, DEEP, torch.zeros_like)
    assert out["none"] == pytest.approx(mean_ce(zero, tokens), rel=1e-5)
    e_i = torch.zeros(d)
    e_i[i] = 1
    one = hand_patch(model, tokens, DEEP, lambda act: act[..., i:i + 1] * e_i)
    assert out["one"] == pytest.approx(mean_ce(one, tokens), rel=1e-5)
    assert out["none"] != pytest.approx(clean, rel=1e-3)


def test_bad_input_errors(setup, planted):
    """Out-of-range features and positions, bad modes, unknown hooks and too-long contexts raise clear errors."""
    model, tokens = setup
    sae, t, c = planted
    with pytest.raises(ValueError, match=r"latent must be an int in \[0, 1\]"):
        feature_ablation(model, sae, EMBED, tokens, 2)
    with pytest.raises(ValueError, match=r"latent must be an int >= 0, got -1"):
        token_ablation(model, sae, EMBED, tokens[0], 3, -1)
    with pytest.raises(ValueError, match=r"position must be an int in \[0, 15\]"):
        token_ablation(model, sae, EMBED, tokens[0], 16, 0)
    with pytest.raises(ValueError, match="mode"):
        feature_ablation(model, sae, EMBED, tokens, 0, mode="mean")
    with pytest.raises(ValueError, match="mode"):
        token_ablation(model, sae, EMBED, tokens[0], 3, 0, mode="zero")
    with pytest.raises(ValueError, match="needs value="):
        feature_ablation(model, sae, EMBED, tokens, 0, mode="clamp")
    with pytest.raises(ValueError, match=r"unknown hook 'blocks.0.hook_nope'.*Valid"):
        feature_ablation(model, sae, "blocks.0.hook_nope", tokens, 0)
    long = torch.cat([tokens[:2], tokens[:2, :1]], dim=1)
    with pytest.raises(ValueError, match="17 tokens exceed the model's n_ctx=16"):
        feature_ablation(model, sae, EMBED, long, 0)
    with pytest.raises(ValueError, match="17 tokens exceed the model's n_ctx=16"):
        token_ablation(model, sae, EMBED, long[0], 3, 0)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 300\)"):
        feature_ablation(model, sae, EMBED, tokens + 300, 0)
    with pytest.raises(ValueError, match=r"feature set 'bad' has indices outside \[0, 2\)"):
        loss_with_features(model, sae, EMBED, tokens, {"bad": [0, 2]})
    with pytest.raises(ValueError, match="name 'all' is taken"):
        loss_with_features(model, sae, EMBED, tokens, {"all": [0]})
