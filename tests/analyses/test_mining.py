"""Feature mining (`analyses.mining`, `analyses.features`): known answers from a feature planted on one token of the
tiny offline model, brute-force statistics over the dense codes, exact synthetic activations, and the bad-input
errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

import sparse_coding.analyses.features as features_module
from sparse_coding import lm
from sparse_coding.analyses.features import (check_feature, check_width, examples_at, load_mined, mine_dictionary,
                                             sae_encoder, save_mined)
from sparse_coding.analyses.mining import N_BINS, mine
from sparse_coding.dictionaries import make_sae

pytestmark = pytest.mark.usefixtures("one_thread")

EMBED = "blocks.0.hook_resid_pre"  # GPT-NeoX: exactly the token embedding (no positional embedding)
DEEP = "blocks.1.hook_resid_post"
WINDOW = (3, 2)
BATCH = 10  # does not divide the 119 contexts: the last batch is short


@pytest.fixture(scope="module")
def setup(tiny_lm, one_thread):
    _, _, folder = tiny_lm
    model = lm.load_model(folder)
    tokens = lm.validation_contexts(folder, split="train")
    assert len(tokens) % BATCH != 0
    return model, tokens


def planted_token(model, tokens) -> tuple[int, torch.Tensor, float]:
    """(t, unit embedding direction of t, threshold): the token (not id 0, in several but not all contexts) whose
    embedding stands out most along its own direction; every other token's embedding projects below threshold."""
    E = model.W_E.detach()
    counts = tokens.flatten().bincount(minlength=E.shape[0])
    contexts = torch.stack([(tokens == t).any(1).sum() for t in range(E.shape[0])])
    best = None
    for t in range(1, E.shape[0]):
        if not 3 <= int(contexts[t]) < len(tokens) or int(counts[t]) > 200:
            continue
        u = E[t] / E[t].norm()
        proj = E @ u
        other = float(torch.cat([proj[:t], proj[t + 1:]]).max())
        margin = (float(proj[t]) - other) / float(proj[t])
        if best is None or margin > best[0]:
            best = (margin, t, u, (float(proj[t]) + other) / 2)
    margin, t, u, thr = best
    assert margin > 0.3, "the embedding of the planted token must stand clear of every other token's"
    return t, u, thr


def planted_sae(model, tokens, scale: float = 10.0):
    """relu SAE at EMBED: feature 0 fires exactly on token t (decoder row: a fixed random unit direction), feature 1
    is dead, feature 2 fires on every token whose embedding leans towards t (a second, denser feature)."""
    t, u, thr = planted_token(model, tokens)
    d = model.cfg.d_model
    sae = make_sae("relu", d_in=d, d_sae=3, pre_bias=False)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        W_enc = torch.zeros(d, 3)
        b_enc = torch.zeros(3)
        W_enc[:, 0], b_enc[0] = scale * u, -scale * thr
        b_enc[1] = -1.0
        W_enc[:, 2] = u
        W_dec = torch.randn(3, d, generator=g)
        sae.W_enc[0].copy_(W_enc)
        sae.b_enc[0].copy_(b_enc)
        sae.W_dec[0].copy_(W_dec / W_dec.norm(dim=1, keepdim=True))
        sae.b_dec.zero_()
    return sae, t


def graded_sae(model, tokens, d_sae: int = 12, seed: int = 3):
    """A random relu SAE at DEEP whose features fire on shares of tokens from 50% down to a handful, plus one dead."""
    sae = make_sae("relu", d_in=model.cfg.d_model, d_sae=d_sae, seed=seed, pre_bias=False)
    x = lm.hook_reader(model, [DEEP])(tokens)[DEEP].reshape(-1, model.cfg.d_model)
    q = torch.tensor(np.geomspace(0.5, 0.002, d_sae - 1), dtype=torch.float32)
    with torch.no_grad():
        pre = sae.pre_activations(x.clone())[0]
        b = torch.stack([-torch.quantile(pre[:, j], 1 - q[j]) for j in range(d_sae - 1)] + [torch.tensor(-1e3)])
        sae.b_enc[0].copy_(b)
    return sae


def dense_codes(model, sae, hook, tokens) -> torch.Tensor:
    """[n_contexts, T, d_sae] every code, computed in one pass (the brute force the streaming pass must match)."""
    x = lm.hook_reader(model, [hook])(tokens)[hook]
    N, T, d = x.shape
    return sae_encoder(sae)(x.reshape(N * T, d)).reshape(N, T, -1).float()


def window_of(row: torch.Tensor, pos: int, window, fill):
    """row[pos - before .. pos + after] with `fill` past the edges."""
    before, after = window
    return [row[i].item() if 0 <= i < len(row) else fill for i in range(pos - before, pos + after + 1)]


@pytest.fixture(scope="module")
def planted(setup):
    model, tokens = setup
    sae, t = planted_sae(model, tokens)
    mined = mine_dictionary(model, sae, EMBED, tokens, batch_size=BATCH, n_top=8, n_random=4, window=WINDOW,
                            progress=False)
    return sae, t, mined


@pytest.fixture(scope="module")
def graded(setup):
    model, tokens = setup
    sae = graded_sae(model, tokens)
    mined = mine_dictionary(model, sae, DEEP, tokens, batch_size=BATCH, n_top=8, n_random=5, per_bin=3,
                            window=WINDOW, progress=False)
    return sae, mined, dense_codes(model, sae, DEEP, tokens)


# ---------------------------------------------------------------------------------------------- planted feature

def test_planted_feature_reads_its_token(setup, planted):
    """A feature firing exactly on token t: every top example is about t and it fires once per occurrence of t."""
    model, tokens = setup
    sae, t, mined = planted
    c = sae_encoder(sae)(model.W_E.detach())  # the code of every vocabulary token at the embedding
    assert c[t, 0] > 0 and int((c[:, 0] > 0).sum()) == 1
    examples = mined.top_examples(0)
    assert len(examples) == 8
    for ex in examples:
        assert ex.tokens[ex.target] == t == int(tokens[ex.context, ex.position])
        assert ex.value == pytest.approx(float(c[t, 0]), rel=1e-5)
        assert ex.acts[ex.target] == pytest.approx(ex.value, rel=1e-6)
    assert int(mined.count[0]) == int((tokens == t).sum())
    assert int(mined.count[1]) == 0 and mined.max[1] == 0 and mined.top_examples(1) == []
    assert float(mined.max[0]) == pytest.approx(float(c[t, 0]), rel=1e-5)
    assert mined.frequency()[0] == pytest.approx(float((tokens == t).double().mean()))
    # The random sample holds only contexts containing t, around an occurrence of t.
    for ex in mined.random_examples(0):
        assert ex.tokens[ex.target] == t


# ---------------------------------------------------------------------------------------------- brute force

def test_streaming_top_n_equals_brute_force_sort(setup, graded):
    """The streamed top contexts equal a sort of every context's max over the dense codes, windows included."""
    model, tokens = setup
    sae, mined, codes = graded
    cmax = codes.amax(1)  # [N, d_sae]
    n_top = mined.top_value.shape[1]
    saw_short = False
    for f in range(sae.d_sae):
        firing = cmax[:, f][cmax[:, f] > 0]
        expected = firing.sort(descending=True).values[:n_top]
        k = len(expected)
        saw_short |= k < n_top
        torch.testing.assert_close(mined.top_value[f, :k], expected, rtol=1e-5, atol=1e-6)
        assert bool((mined.top_value[f, k:] <= 0).all()) and bool((mined.top_context[f, k:] == -1).all())
        examples = mined.top_examples(f)
        assert len(examples) == k
        assert len({ex.context for ex in examples}) == k  # distinct contexts
        for ex in examples:
            row = codes[ex.context, :, f]
            assert ex.acts[ex.target] == pytest.approx(float(row[ex.position]), rel=1e-5, abs=1e-6)
            assert ex.value == pytest.approx(float(row.max()), rel=1e-5, abs=1e-6)
            np.testing.assert_allclose(ex.acts, window_of(row, ex.position, WINDOW, math.nan), rtol=1e-5,
                                       atol=1e-6)
            assert ex.tokens == window_of(tokens[ex.context], ex.position, WINDOW, -1)
    assert saw_short, "the graded SAE should have features firing in fewer contexts than n_top"


def test_whole_context_windows(setup, graded):
    """window=None keeps every context's full row of activations and tokens, the target at the max's position."""
    model, tokens = setup
    sae, _, codes = graded
    mined = mine_dictionary(model, sae, DEEP, tokens, batch_size=BATCH, n_top=3, window=None, progress=False)
    for f in range(sae.d_sae - 1):
        for ex in mined.top_examples(f):
            assert ex.tokens == tokens[ex.context].tolist() and ex.target == ex.position
            np.testing.assert_allclose(ex.acts, codes[ex.context, :, f].numpy(), rtol=1e-5, atol=1e-6)
    locations = [loc for _, _, locs in mined.quantile_locations(0, n_bins=3, per_bin=2) for loc in locs]
    for ex, (c, p, v) in zip(examples_at(model, sae, DEEP, mined, 0, locations), locations):
        assert ex.tokens == tokens[c].tolist() and ex.target == p and ex.value == pytest.approx(v, rel=1e-5)
        np.testing.assert_allclose(ex.acts, codes[c, :, 0].numpy(), rtol=1e-5, atol=1e-6)


def test_counts_moments_and_histogram_equal_scipy(graded):
    """Firing counts, mean/var/skew/kurtosis equal scipy.stats on all dense codes; the histogram bins them."""
    sae, mined, codes = graded
    flat = codes.reshape(-1, sae.d_sae).double()
    m = mined.moments()
    assert int(mined.count[-1]) == 0 and int((mined.count > 0).sum()) >= 8
    assert mined.n_tokens == flat.shape[0]
    for f in range(sae.d_sae):
        a = flat[:, f].numpy()
        assert int(mined.count[f]) == int((a > 0).sum())
        assert int(mined.hist[f].sum()) == int(mined.count[f])
        if not (a > 0).any():  # a dead feature (the last one, at least): no variance, no shape
            assert float(m["mean"][f]) == 0 and float(m["var"][f]) == 0
            assert math.isnan(m["skew"][f]) and math.isnan(m["kurtosis"][f])
            continue
        assert float(m["mean"][f]) == pytest.approx(a.mean(), rel=1e-5)
        assert float(m["var"][f]) == pytest.approx(a.var(), rel=1e-4)
        assert float(m["skew"][f]) == pytest.approx(stats.skew(a), rel=1e-3)
        assert float(m["kurtosis"][f]) == pytest.approx(stats.kurtosis(a), rel=1e-3)
        # Each firing token sits in the geometric bin whose edges hold it (end bins take what lies beyond).
        edges = mined.bin_edges(f).numpy()
        v = a[a > 0]
        expected = np.bincount(np.clip(np.searchsorted(edges, v, side="right") - 1, 0, N_BINS - 1),
                               minlength=N_BINS)
        near_edge = int((np.abs(v[:, None] / edges[None] - 1) < 1e-5).any(1).sum())
        assert np.abs(mined.hist[f].numpy() - expected).sum() <= 2 * near_edge


# ---------------------------------------------------------------------------------------------- samples

def test_quantile_locations_lie_in_their_bins(setup, graded):
    """Every quantile location lies in its bin (lo, hi], holds the dense code there, and examples_at recomputes it."""
    model, tokens = setup
    sae, mined, codes = graded
    for f in (0, 4, 8):
        bins = mined.quantile_locations(f, n_bins=5, per_bin=3)
        assert len(bins) == 5
        assert bins[0][0] == 0 and bins[-1][1] == pytest.approx(float(mined.max[f]))
        locations = [loc for _, _, locs in bins for loc in locs]
        assert locations
        for lo, hi, locs in bins:
            assert len(locs) <= 3
            for c, p, v in locs:
                assert lo < v <= hi
                assert v == pytest.approx(float(codes[c, p, f]), rel=1e-5, abs=1e-6)
        examples = examples_at(model, sae, DEEP, mined, f, locations)
        for ex, (c, p, v) in zip(examples, locations):
            assert (ex.context, ex.position) == (c, p)
            assert ex.value == pytest.approx(v, rel=1e-5, abs=1e-6)
            assert ex.acts[ex.target] == pytest.approx(v, rel=1e-5, abs=1e-6)
            assert ex.tokens == window_of(tokens[c], p, WINDOW, -1)
    assert examples_at(model, sae, DEEP, mined, 0, []) == []


def exact_mined(values: torch.Tensor, per_bin: int, batch_size: int = 2, seed: int = 0):
    """Mine one direction whose activation at (context i, position j) is values[i, j] exactly (an identity
    encoder on a stand-in reader): tokens hold their own flat index."""
    N, T = values.shape
    tokens = torch.arange(N * T).reshape(N, T)
    read = lambda tb: {"h": values.flatten()[tb].unsqueeze(-1)}  # noqa: E731
    return mine(read, {"x": ("h", lambda x: x)}, tokens, batch_size=batch_size, n_top=3, n_random=2,
                per_bin=per_bin, window=(1, 1), seed=seed, progress=False)["x"]


def test_quantile_bins_are_closed_on_the_right():
    """With every firing token kept, each equal-width bin (lo, hi] returns exactly the values in it, edges included."""
    values = torch.tensor([[1.0, 0.5, 0.0, 0.25], [0.75, 0.1, 0.6, 0.0], [0.3, 0.5, 0.9, 0.2]])
    mined = exact_mined(values, per_bin=16)
    assert int(mined.count[0]) == 10 and float(mined.max[0]) == 1.0
    bins = mined.quantile_locations(0, n_bins=4, per_bin=100)
    assert [(lo, hi) for lo, hi, _ in bins] == [(0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0)]
    got = [sorted(v for _, _, v in locs) for _, _, locs in bins]
    assert got == [[pytest.approx(x) for x in b] for b in
                   [[0.1, 0.2, 0.25], [0.3, 0.5, 0.5], [0.6, 0.75], [0.9, 1.0]]]
    for _, _, locs in bins:
        for c, p, v in locs:
            assert float(values[c, p]) == v
    # The histogram holds each value in its power-of-2^(1/4) bin of the fixed grid (1.0 is an edge of it).
    edges = mined.bin_edges(0)
    assert float(edges[N_BINS // 2]) == 1.0
    firing = values[values > 0].double()
    expected = torch.bincount((torch.searchsorted(edges, firing, right=True) - 1).clamp(0, N_BINS - 1),
                              minlength=N_BINS)
    assert torch.equal(mined.hist[0], expected)


def test_random_samples_fire_and_are_seeded(setup, graded):
    """Random examples come from firing contexts (all of them when few fire); same seed, same result."""
    model, tokens = setup
    sae, mined, codes = graded
    cmax = codes.amax(1)
    n_random = mined.random_context.shape[1]
    for f in range(sae.d_sae):
        firing = set((cmax[:, f] > 0).nonzero().squeeze(1).tolist())
        examples = mined.random_examples(f)
        assert len(examples) == min(n_random, len(firing))
        assert len({ex.context for ex in examples}) == len(examples)
        for ex in examples:
            assert ex.context in firing
            assert ex.value == pytest.approx(float(cmax[ex.context, f]), rel=1e-5, abs=1e-6)
            assert ex.acts[ex.target] == pytest.approx(ex.value, rel=1e-6)
        if len(firing) <= n_random:
            assert {ex.context for ex in examples} == firing
    again = mine_dictionary(model, sae, DEEP, tokens, batch_size=BATCH, n_top=8, n_random=5, per_bin=3,
                            window=WINDOW, progress=False)
    assert_same_mined(again, mined)
    other = mine_dictionary(model, sae, DEEP, tokens, batch_size=BATCH, n_top=8, n_random=5, per_bin=3,
                            window=WINDOW, seed=1, progress=False)
    assert not torch.equal(other.random_context, mined.random_context)
    assert torch.equal(other.count, mined.count) and torch.equal(other.top_context, mined.top_context)


def test_random_sample_is_uniform_over_firing_contexts():
    """Every firing context is about equally likely to be drawn, whatever batch it came in (bottom-k sketch)."""
    values = torch.zeros(12, 4)
    values[:, 1] = torch.linspace(0.5, 1.0, 12)  # every context fires once, at position 1
    hits = torch.zeros(12)
    for seed in range(300):
        mined = exact_mined(values, per_bin=1, batch_size=5, seed=seed)
        hits[mined.random_context[0]] += 1
    # 600 draws over 12 contexts: 50 expected each; a 5-sigma band (sd ≈ 6.7) catches a biased sketch.
    assert int(hits.sum()) == 600 and float(hits.min()) > 20 and float(hits.max()) < 80


# ---------------------------------------------------------------------------------------------- saving and caching

def assert_same_mined(a, b):
    for name in features_module._FIELDS + ["tokens"]:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True, msg=name)


def test_save_load_round_trip(planted, tmp_path):
    """load_mined(save_mined(m)) has equal tensors (NaN windows included) and meta."""
    _, _, mined = planted
    save_mined(mined, tmp_path / "m")
    back = load_mined(tmp_path / "m")
    assert_same_mined(back, mined)
    assert back.meta == mined.meta
    with pytest.raises(FileExistsError):
        save_mined(mined, tmp_path / "m")


def test_mine_dictionary_reuses_its_cache(setup, planted, tmp_path, monkeypatch):
    """A second call with the same settings loads the saved result (mine is not called); other settings recompute."""
    model, tokens = setup
    sae, _, _ = planted
    kw = dict(folder=tmp_path, batch_size=BATCH, n_top=5, n_random=3, window=WINDOW, progress=False)
    first = mine_dictionary(model, sae, EMBED, tokens, **kw)
    assert len(list(tmp_path.glob("mining-*"))) == 1

    def refuse(*a, **k):
        raise AssertionError("mine was called although the result is cached")

    monkeypatch.setattr(features_module, "mine", refuse)
    second = mine_dictionary(model, sae, EMBED, tokens, **kw)
    assert_same_mined(second, first)
    assert second.meta == first.meta
    with pytest.raises(AssertionError, match="cached"):
        mine_dictionary(model, sae, EMBED, tokens, **{**kw, "seed": 1})
    with pytest.raises(AssertionError, match="cached"):
        mine_dictionary(model, sae, EMBED, tokens[:-1], **kw)


# ---------------------------------------------------------------------------------------------- errors

def test_bad_input_errors(setup, planted):
    """Wrong width, unknown hook, too-long contexts, bad feature indices and dead features give clear errors."""
    model, tokens = setup
    sae, _, mined = planted
    wide = make_sae("relu", d_in=model.cfg.d_model + 1, d_sae=4)
    with pytest.raises(ValueError, match=rf"d_in=33.*{EMBED}.*width 32"):
        mine_dictionary(model, wide, EMBED, tokens, progress=False)
    with pytest.raises(ValueError, match="d_in=33"):
        check_width(model, wide, EMBED)
    assert check_width(model, sae, EMBED) == 32
    with pytest.raises(ValueError, match=r"unknown hook 'blocks.0.hook_nope'.*Valid"):
        mine_dictionary(model, sae, "blocks.0.hook_nope", tokens, progress=False)
    with pytest.raises(ValueError, match="layer 7 is out of range"):
        mine_dictionary(model, sae, "blocks.7.hook_resid_pre", tokens, progress=False)
    long = torch.cat([tokens[:2], tokens[:2, :1]], dim=1)
    with pytest.raises(ValueError, match="17 tokens exceed the model's n_ctx=16"):
        mine_dictionary(model, sae, EMBED, long, progress=False)
    for bad in (3, -1, 1.0):
        with pytest.raises(ValueError, match=r"latent must be an int in \[0, 2\]"):
            check_feature(mined, bad)
        with pytest.raises(ValueError, match=r"latent must be an int in \[0, 2\]"):
            mined.top_examples(bad)
    with pytest.raises(ValueError, match=r"feature 1 never fired.*e\.g\. one of \[0, 2\]"):
        check_feature(mined, 1)
    assert check_feature(mined, 1, allow_dead=True) == 1 and check_feature(mined, 0) == 0
    with pytest.raises(ValueError, match="member"):
        sae_encoder(sae, member=1)
    with pytest.raises(ValueError, match="negative activations"):
        mine(lambda tb: {"h": -torch.ones(*tb.shape, 2)}, {"x": ("h", lambda x: x)}, tokens[:2], progress=False)
    for bad in (math.nan, math.inf):  # before: a NaN reached the histogram as an int64 bin (bincount's error)
        acts = torch.zeros(4, tokens.shape[1], 2)
        acts[3, 5, 1] = bad
        with pytest.raises(ValueError, match=r"'x' gave non-finite activations \(NaN or inf\) in contexts 2\.\.3"):
            batches = iter(acts.split(2))  # the second batch (contexts 2, 3) holds the bad value
            mine(lambda tb, it=batches: {"h": next(it)}, {"x": ("h", lambda x: x)}, tokens[:4], batch_size=2,
                 progress=False)
    with pytest.raises(ValueError, match="integer token ids"):
        mine(lambda tb: {}, {"x": ("h", lambda x: x)}, tokens[:2].float(), progress=False)
    with pytest.raises(ValueError, match="encoders is empty"):
        mine(lambda tb: {}, {}, tokens[:2], progress=False)
