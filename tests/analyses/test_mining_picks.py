"""Mining from each token's picks (`mining.RowPicks`: a TopK SAE's k values and latents per token) keeps exactly
what mining the dense codes keeps, field for field (windows, whole contexts, exclusion, context maxima, any batch
size), so that a wide dictionary is mined without its [tokens, d_sae] codes; a TopK SAE's `encode_picks`, scattered,
are its `encode`; bad picks from an encoder are a ValueError naming it."""

from __future__ import annotations

import math

import pytest
import torch

import sparse_coding.analyses.features as features_module
from sparse_coding import lm
from sparse_coding.activations import Exclusion
from sparse_coding.analyses import mining_sources
from sparse_coding.analyses.features import mine_dictionary, sae_encoder, sae_picks_encoder
from sparse_coding.analyses.mining import RowPicks, mine
from sparse_coding.dictionaries import make_sae

pytestmark = pytest.mark.usefixtures("one_thread")

N, T, D, W = 23, 7, 40, 6  # at most W of the D directions fire on a token
FIELDS = list(features_module._FIELDS)


def codes(seed: int = 0) -> torch.Tensor:
    """[N, T, D] non-negative, at most W nonzero per token, values over many octaves; some tokens fire nothing,
    direction 0 is one constant value wherever it fires (every context's max ties) and direction D-1 never fires."""
    g = torch.Generator().manual_seed(seed)
    score = torch.rand(N, T, D, generator=g)
    score[..., -1] = -1.0
    keep = torch.zeros(N, T, D, dtype=torch.bool).scatter_(-1, score.topk(W, dim=-1).indices, True)
    keep &= torch.rand(N, T, D, generator=g) < 0.7
    a = torch.exp(torch.randn(N, T, D, generator=g) * 3.0) * keep
    a[..., 0] = 0.75 * keep[..., 0]
    return a


def as_picks(flat: torch.Tensor, width: int) -> RowPicks:
    """Dense codes [rows, D] as RowPicks of `width` picks per row (zero-valued picks where a row has fewer), the
    latents in a scrambled order: mining must not depend on it."""
    values, latents = flat.topk(width, dim=-1, sorted=False)
    perm = torch.randperm(width, generator=torch.Generator().manual_seed(1))
    return RowPicks(values[:, perm], latents[:, perm], flat.shape[1])


def mine_both(a: torch.Tensor, width: int = W, **kw):
    tokens = torch.arange(N * T).reshape(N, T)
    flat = a.reshape(-1, D)
    read = lambda tb: {"h": flat[tb]}  # noqa: E731
    enc = {"dense": ("h", lambda x: x), "picks": ("h", lambda x: as_picks(x, width))}
    kw = {"n_top": 4, "n_random": 3, "per_bin": 2, "progress": False, **kw}
    return mine(read, enc, tokens, **kw)


def assert_same(x, y):
    for name in FIELDS:
        torch.testing.assert_close(getattr(x, name), getattr(y, name), rtol=0, atol=0, equal_nan=True, msg=name)
    assert x.n_tokens == y.n_tokens
    if x.context_max is not None:
        assert torch.equal(x.context_max, y.context_max)


@pytest.fixture(params=["scattered", "searched"])
def columns_by(request, monkeypatch):
    """Both ways a PickSource finds columns and windows: scattering a small batch's picks into dense codes, or (a
    wide dictionary's batch) searching the firing pairs for each requested (context, direction)."""
    if request.param == "searched":
        monkeypatch.setattr(mining_sources, "DENSE_BELOW", 0)
    return request.param


@pytest.mark.parametrize("window", [(2, 1), None])
@pytest.mark.parametrize("batch_size", [1, 4, N])
def test_picks_keep_what_dense_codes_keep(window, batch_size, columns_by):
    a = codes()
    out = mine_both(a, window=window, batch_size=batch_size, keep_context_max=True)
    assert_same(out["dense"], out["picks"])
    m = out["picks"]
    assert int(m.count[-1]) == 0 and int((m.count > 0).sum()) == D - 1
    assert int((m.sample_context >= 0).sum()) > 50 and m.top_context[0].tolist() == sorted(m.top_context[0].tolist())
    # wider picks (more zero-valued ones per row) change nothing either
    assert_same(out["dense"], mine_both(a, width=W + 5, window=window, batch_size=batch_size,
                                        keep_context_max=True)["picks"])


def test_picks_with_exclusion(columns_by):
    a = codes(seed=2)
    ex = Exclusion(token_ids=(3, 10, 11))  # tokens here are their own flat index: three tokens left out
    out = mine_both(a, batch_size=5, exclude=ex)
    assert_same(out["dense"], out["picks"])
    assert out["picks"].n_tokens == N * T - 3


def test_bad_picks_name_the_encoder():
    tokens = torch.arange(N * T).reshape(N, T)
    flat = codes().reshape(-1, D)
    read = lambda tb: {"h": flat[tb]}  # noqa: E731
    bad = {"float latents": lambda x: RowPicks(x[:, :2], x[:, :2], D),
           "wrong rows": lambda x: RowPicks(x[:-1, :2], torch.zeros(len(x) - 1, 2, dtype=torch.long), D),
           "shape mismatch": lambda x: RowPicks(x[:, :2], torch.zeros(len(x), 3, dtype=torch.long), D),
           "out of range": lambda x: RowPicks(x[:, :2], torch.full((len(x), 2), D, dtype=torch.long), D),
           "a latent twice": lambda x: RowPicks(x[:, :2] + 1, torch.zeros(len(x), 2, dtype=torch.long), D)}
    for label, f in bad.items():
        with pytest.raises(ValueError, match="encoder 'e' gave"):
            mine(read, {"e": ("h", f)}, tokens, batch_size=4, progress=False)
    neg = lambda x: RowPicks(-x[:, :2] - 1, torch.arange(2).expand(len(x), 2), D)  # noqa: E731
    with pytest.raises(ValueError, match="encoder 'e' gave negative activations"):
        mine(read, {"e": ("h", neg)}, tokens, batch_size=4, progress=False)
    nan = lambda x: RowPicks(torch.full((len(x), 2), math.nan), torch.arange(2).expand(len(x), 2), D)  # noqa: E731
    with pytest.raises(ValueError, match="encoder 'e' gave non-finite"):
        mine(read, {"e": ("h", nan)}, tokens, batch_size=4, progress=False)


@pytest.mark.parametrize("ks", [[4], [4, 2]])
def test_topk_encode_picks_scatter_to_its_codes(ks):
    sae = make_sae("topk", d_in=16, d_sae=48, k=ks, seed=0)
    x = torch.randn(200, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        values, idx = sae.encode_picks(x)
        dense = sae.encode(x)
    assert values.shape == idx.shape == (len(ks), 200, max(ks))
    assert torch.equal(torch.zeros_like(dense).scatter_(-1, idx, values), dense)
    with torch.no_grad():  # the definition, written out: each member's k largest pre-activations, ReLU'd
        pre = sae.pre_activations(x)
        for e, k in enumerate(ks):
            v, i = pre[e].topk(k, dim=-1)
            assert torch.equal(torch.zeros_like(pre[e]).scatter_(-1, i, v.relu()), dense[e])
    assert bool((idx.sort(-1).values.diff(dim=-1) > 0).all())  # distinct latents within a row
    assert all(int((values[e] > 0).sum(-1).max()) <= k for e, k in enumerate(ks))  # past a member's own k: zeros
    assert make_sae("batchtopk", d_in=16, d_sae=48, k=4).encode_picks(x) is None  # a batch-level choice


def test_mine_dictionary_of_a_topk_sae_equals_the_dense_path(tiny_lm, one_thread, monkeypatch):
    """Through `sae_picks_encoder` (picks) and through `sae_encoder` (dense codes): the same Mined."""
    _, _, folder = tiny_lm
    model = lm.load_model(folder)
    tokens = lm.validation_contexts(folder, split="train")[:40]
    hook = "blocks.1.hook_resid_post"
    sae = make_sae("topk", d_in=model.cfg.d_model, d_sae=96, k=5, seed=1)
    a = mine_dictionary(model, sae, hook, tokens, batch_size=6, n_top=5, per_bin=3, window=None, progress=False)
    monkeypatch.setattr(features_module, "sae_picks_encoder", sae_encoder)
    b = mine_dictionary(model, sae, hook, tokens, batch_size=6, n_top=5, per_bin=3, window=None, progress=False)
    assert_same(a, b)
    assert int((a.count > 0).sum()) > 50 and 2 < float(a.frequency().sum()) <= 5  # L0: at most k
    enc = sae_picks_encoder(sae)
    x = torch.randn(10, model.cfg.d_model)
    assert isinstance(enc(x), RowPicks) and torch.is_tensor(sae_picks_encoder(make_sae("relu", 32, 64))(x))
