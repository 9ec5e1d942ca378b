"""The baseline directions of notebook 07 (Cunningham et al. 2023, arXiv 2309.08600), each on a case small enough to
work out by hand: every baseline is centred and split into [ReLU(z), ReLU(−z)]; random directions are seeded unit
vectors; PCA finds a known axis; top-K ranks whitened scores, so a low-variance component wins a row where it is the
more unusual; ICA unmixes known sources and reports how its fit went; plain and top-K share one fit; bad input is
refused naming the argument."""

import math

import pytest
import torch
from sklearn.exceptions import ConvergenceWarning

from sparse_coding.analyses import directions as D

# Three rows in 2-D, mean (1, 1): x − mean = [[0, 1], [2, −3], [−2, 2]].
X3 = torch.tensor([[1.0, 2.0], [3.0, -2.0], [-1.0, 3.0]])

# Points on the line y = 2x plus a small orthogonal offset, around (5, −1): along u1 = (1, 2)/√5 the coordinates
# t = ±1, ±2 (sample variance 20/7 over these 8 rows), along u2 = (−2, 1)/√5 e = ±0.1 (variance 0.08/7), with
# t, e and t·e summing to zero so that u1 and u2 are exactly the principal axes.
U1 = torch.tensor([1.0, 2.0], dtype=torch.float64) / math.sqrt(5)
U2 = torch.tensor([-2.0, 1.0], dtype=torch.float64) / math.sqrt(5)
OFFSET = torch.tensor([5.0, -1.0], dtype=torch.float64)
T = torch.tensor([-2.0, -1.0, 1.0, 2.0] * 2, dtype=torch.float64)
E = torch.tensor([0.1, -0.1, -0.1, 0.1] * 2, dtype=torch.float64)
LINE = OFFSET + T[:, None] * U1 + E[:, None] * U2
SD1, SD2 = math.sqrt(20 / 7), math.sqrt(0.08 / 7)


def _halves(z):
    return torch.cat([torch.relu(z), torch.relu(-z)], dim=1)


def _ica_data():
    """Two independent uniform sources (unit variance) mixed by a known matrix: (x [4000, 2], sources)."""
    g = torch.Generator().manual_seed(0)
    s = (torch.rand(4000, 2, generator=g, dtype=torch.float64) - 0.5) * math.sqrt(12)
    return s @ torch.tensor([[2.0, 1.0], [1.0, 1.0]], dtype=torch.float64).T, s


def test_neuron_encoder_is_centred_and_split():
    enc = D.neuron_encoder(X3)
    expected = torch.tensor([[0.0, 1.0, 0.0, 0.0],   # relu(x − m) | relu(m − x), worked out by hand
                             [2.0, 0.0, 0.0, 3.0],
                             [0.0, 2.0, 2.0, 0.0]])
    assert torch.equal(enc.mean, torch.tensor([1.0, 1.0])) and torch.equal(enc.W, torch.eye(2))
    assert torch.equal(enc(X3), expected)
    assert enc.info["method"] == "neurons" and enc.info["n_directions"] == 4 and enc.info["top_k"] is None
    assert torch.equal(enc(torch.tensor([[1.0, 1.0]])), torch.zeros(1, 4))  # the mean itself activates nothing


def test_random_encoder_is_seeded_unit_directions_centred_and_split():
    enc = D.random_encoder(X3, 3, seed=5)
    assert enc.W.shape == (2, 3) and torch.allclose(enc.W.norm(dim=0), torch.ones(3))
    assert torch.equal(D.random_encoder(X3, 3, seed=5).W, enc.W)
    assert not torch.allclose(D.random_encoder(X3, 3, seed=6).W, enc.W)
    assert torch.equal(enc.mean, torch.tensor([1.0, 1.0]))
    W = enc.W
    for r, row in enumerate(X3.tolist()):  # z_j = Σ_i (x_i − 1) W_ij, one entry at a time
        for j in range(3):
            z = (row[0] - 1) * W[0, j].item() + (row[1] - 1) * W[1, j].item()
            assert enc(X3)[r, j].item() == pytest.approx(max(z, 0.0), abs=1e-6)
            assert enc(X3)[r, 3 + j].item() == pytest.approx(max(-z, 0.0), abs=1e-6)
    assert D.random_encoder(X3).info == {"method": "random", "seed": 0, "d_in": 2, "n_components": 2, "fit_rows": 3,
                                         "n_flat": 0, "n_directions": 4, "top_k": None, "whitened": False}


def test_pca_finds_the_known_axis():
    enc = D.pca_encoder(LINE.float())
    W = enc.W.double()
    assert abs(W[:, 0] @ U1) == pytest.approx(1.0, abs=1e-6)  # (1, 2)/√5 up to sign
    assert abs(W[:, 1] @ U2) == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(enc.mean.double(), OFFSET, atol=1e-6)
    assert torch.allclose(enc.std.double(), torch.tensor([SD1, SD2], dtype=torch.float64), rtol=1e-4)
    assert enc.info["explained_variance_ratio"] == pytest.approx(1.0)
    z = (LINE - OFFSET) @ W  # = ±t, ±e
    assert torch.allclose(z[:, 0].abs(), T.abs(), atol=1e-5) and torch.allclose(z[:, 1].abs(), E.abs(), atol=1e-5)
    assert torch.allclose(enc(LINE.float()).double(), _halves(z), atol=1e-5)


def test_topk_ranks_whitened_scores():
    """A row 1 along u1 (0.59 of that axis' std) and 0.1 along u2 (0.94 of its std): the raw scores rank u1 first,
    the whitened ones u2, and top-1 keeps u2's half, valued in units of its std."""
    plain, top = D.pca_encoder(LINE.float()), D.pca_encoder(LINE.float(), top_k=1)
    row = (OFFSET + 1.0 * U1 + 0.1 * U2)[None].float()
    raw = plain(row)[0]
    assert raw.max().item() == pytest.approx(1.0, abs=1e-5) and raw.max() in (raw[0], raw[2])  # u1 wins raw
    half = 1 if (plain.W[:, 1].double() @ U2) > 0 else 3  # u2's positive half if W's sign agrees, else its negative
    expected = torch.zeros(4)
    expected[half] = 0.1 / SD2
    assert torch.allclose(top(row)[0], expected, rtol=1e-4)
    assert 0.1 / SD2 > 1.0 / SD1 and top.info["whitened"] and top.info["top_k"] == 1


def test_topk_lets_low_variance_components_fire():
    """The review's complaint: ranked raw, the high-variance components take every top-K slot and the rest never
    fire; ranked whitened, every half-direction fires on a fair share of the rows."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 6, generator=g) * torch.tensor([10.0, 5.0, 2.0, 1.0, 0.5, 0.2])
    plain, top = D.pca_encoder(x), D.pca_encoder(x, top_k=2)
    h = plain(x)
    raw_fired = torch.zeros_like(h).scatter_(1, h.topk(2, dim=1).indices, 1.0).mean(0)
    low = [4, 5, 10, 11]  # both halves of the two smallest components
    assert (raw_fired[low] < 0.01).all() and (raw_fired[[5, 11]] == 0).all()  # the old ranking starves them
    fired = (top(x) > 0).float().mean(0)
    assert ((top(x) > 0).sum(1) <= 2).all() and (fired > 0.05).all()


def test_ica_recovers_known_sources():
    x, s = _ica_data()
    enc = D.ica_encoder(x.float(), seed=0)
    z = enc.scores(x.float()).double()
    corr = torch.corrcoef(torch.cat([z, s], dim=1).T)[:2, 2:].abs()
    assert (corr.max(dim=1).values > 0.95).all() and set(corr.argmax(dim=1).tolist()) == {0, 1}  # a permutation
    assert torch.allclose(enc.std, torch.ones(2), atol=1e-3)  # unit-variance sources
    assert torch.allclose(enc(x.float()), _halves(z.float()), atol=1e-5)
    info = enc.info
    assert info["method"] == "ica" and isinstance(info["n_iter"], int) and 1 <= info["n_iter"] < info["max_iter"]
    assert info["converged"] is True and info["warning"] is None and info["max_iter"] == 400


def test_ica_non_convergence_is_recorded_not_silenced():
    x, _ = _ica_data()
    with pytest.warns(ConvergenceWarning, match="max_iter=1"):
        enc = D.ica_encoder(x.float(), seed=0, max_iter=1)
    assert enc.info["converged"] is False and enc.info["n_iter"] == 1 and "did not converge" in enc.info["warning"]
    assert (enc(x[:10].float()) >= 0).all()  # the last unmixing is still usable


def _encoders(x):
    return {"neurons": D.neuron_encoder(x), "random": D.random_encoder(x, 5, seed=1),
            "pca": D.pca_encoder(x, n_components=4), "pca_topk": D.pca_encoder(x, n_components=4, top_k=3),
            "ica": D.ica_encoder(x, n_components=4), "ica_topk": D.ica_encoder(x, n_components=4, top_k=3)}


def test_every_encoder_is_non_negative_with_two_halves_per_component():
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(500, 6, generator=g) - 0.5) @ torch.randn(6, 6, generator=g) + 3.0  # non-Gaussian: ICA converges
    for name, enc in _encoders(x).items():
        h = enc(x[:100])
        n = enc.W.shape[1]
        assert h.shape == (100, 2 * n) == (100, enc.info["n_directions"]), name
        assert (h >= 0).all(), name
        assert ((h[:, :n] > 0) & (h[:, n:] > 0)).sum() == 0, name  # a component is positive or negative, never both
        if enc.top_k is None:
            assert torch.allclose(h[:, :n] - h[:, n:], enc.scores(x[:100]), atol=1e-5), name
        else:
            assert ((h > 0).sum(1) <= enc.top_k).all(), name
        assert enc(x[:100].to(torch.bfloat16)).shape == h.shape, name  # any float dtype


def test_plain_and_topk_share_one_fit():
    """One fit of the same sample for a method's plain and top-K encoders (a 576-dim ICA takes minutes)."""
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(300, 6, generator=g) - 0.5) @ torch.randn(6, 6, generator=g)  # non-Gaussian: ICA converges
    plain, topk = D.ica_encoder(x, seed=0), D.ica_encoder(x, top_k=2, seed=0)
    assert len(D._FITS[id(x)]) == 1 and plain.W is topk.W and plain.mean is topk.mean and plain.std is topk.std
    assert plain.info["n_iter"] == topk.info["n_iter"]
    whitened = plain(x[:20]) / torch.cat([plain.std, plain.std])
    k = topk(x[:20])
    v, i = whitened.topk(2, dim=1)  # the top 2 of the whitened activations, nothing else
    assert torch.allclose(k, torch.zeros_like(k).scatter_(1, i, v), atol=1e-6)
    p, t = D.pca_encoder(x, seed=0), D.pca_encoder(x, top_k=2, seed=0)
    assert len(D._FITS[id(x)]) == 2 and p.W is t.W
    D.pca_encoder(x, n_components=3)
    assert len(D._FITS[id(x)]) == 3  # another size is another fit


@pytest.mark.parametrize("call,match", [
    (lambda: D.neuron_encoder(torch.ones(4)), "x must have 2 dimensions"),
    (lambda: D.neuron_encoder(torch.tensor([[1.0, math.nan]])), "x contains 1 NaN"),
    (lambda: D.random_encoder(X3, 0), "n must be"),
    (lambda: D.pca_encoder(X3[:2]), "x has 2 rows for width 2.*more rows"),
    (lambda: D.ica_encoder(X3[:2]), "more rows"),
    (lambda: D.pca_encoder(LINE.float(), n_components=3), "n_components must be <= d_in = 2.*pass None"),
    (lambda: D.ica_encoder(LINE.float(), n_components=0), "n_components must be"),
    (lambda: D.pca_encoder(LINE.float(), top_k=5), "top_k must be <= 2·n_components = 4"),
    (lambda: D.pca_encoder(LINE.float(), top_k=0), "top_k must be"),
    (lambda: D.ica_encoder(LINE.float(), max_iter=0), "max_iter must be an int >= 1"),
    (lambda: D.pca_encoder(LINE.float(), seed=2**40), "seed must be"),
    (lambda: D.neuron_encoder(X3)(torch.ones(3, 5)), "x must be a tensor \\[rows, d_in\\] with d_in = 2"),
    (lambda: D.pca_encoder(LINE.float())(torch.ones(2)), "d_in = 2.*reshape"),
])
def test_bad_input_is_refused_naming_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()
