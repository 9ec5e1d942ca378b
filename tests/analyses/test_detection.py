"""Known answers for the scores notebook 07 adds: the ceiling of the token-table form, detection and fuzzing
(arXiv 2410.13928), the document-level split and the paired bootstrap interval."""

import numpy as np
import pytest
import torch

from sparse_coding.analyses import detection as det
from sparse_coding.analyses import interpretability as I
from sparse_coding.analyses.paired import paired_difference

VOCAB = [f"w{i}" for i in range(30)]


def _fragments(n, length=16, seed=0):
    rng = np.random.default_rng(seed)
    return [[VOCAB[i] for i in rng.integers(0, len(VOCAB), length)] for _ in range(n)]


def _planted_bigram(frags, a="w1", b="w2"):
    """Fires (1.0) on b right after a; b elsewhere and a alone stay 0."""
    out = []
    for f in frags:
        f = list(f)
        f[3], f[4] = a, b          # one firing pair per fragment
        f[9] = b                   # b after something else: silent
        out.append(I.Record(f, [1.0 if i and f[i - 1] == a and t == b else 0.0 for i, t in enumerate(f)]))
    return out


def test_ceiling_sees_the_two_token_context_a_unigram_table_cannot():
    recs = _planted_bigram(_fragments(10))
    assert det.ceiling_score(recs) == pytest.approx(1.0)
    unigram_ceiling = det.ceiling_score(recs, context="unigram")
    explainer, sim = I.TokenTableExplainer(bigrams=False), I.TokenTableSimulator()
    text = explainer.explain(recs[:5])
    unigram_table = I.pooled_correlation([r.acts for r in recs[5:]], sim.simulate(text, [r.tokens for r in recs[5:]]))
    assert unigram_table < 0.9 and unigram_ceiling < 0.9
    assert det.ceiling_score(recs) > unigram_table + 0.1
    with pytest.raises(ValueError, match="bigram"):
        det.ceiling_score(recs, context="trigram")


def test_ceiling_is_the_table_fitted_on_the_records_themselves():
    recs = [I.Record(["a", "b", "a", "c"], [1.0, 0.0, 1.0, 0.0])]   # fires on "a": one entry explains it all
    assert det.ceiling_score(recs) == pytest.approx(1.0)
    ex, sim = I.TokenTableExplainer(), I.TokenTableSimulator()
    rng = np.random.default_rng(0)
    noisy = [I.Record(f, list(rng.random(len(f)))) for f in _fragments(6, seed=5)]  # no token structure
    want = I.pooled_correlation([r.acts for r in noisy], sim.simulate(ex.explain(noisy), [r.tokens for r in noisy]))
    assert det.ceiling_score(noisy) == pytest.approx(want) and want < 0.9  # 8 entries cannot memorise the noise
    assert det.ceiling_score(noisy, max_items=1) <= det.ceiling_score(noisy) + 1e-12


def _single_token_records(frags, tok):
    return [I.Record(f, [1.0 if t == tok else 0.0 for t in f]) for f in frags]


def test_detection_of_a_planted_single_token_feature():
    sim = I.TokenTableSimulator()
    frags = _fragments(40, seed=1)
    for f in frags[:20]:
        f[5] = "w7"
    pos = [f for f in frags[:20]]
    neg = [[t if t != "w7" else "w8" for t in f] for f in frags[20:]]   # the direction is 0: no w7
    right = I.TokenTableExplainer().explain(_single_token_records(pos[:5], "w7"))
    assert "w7" in right
    assert det.detection_score(right, sim, pos, neg) >= 0.95
    wrong = 'fires on "w3" ≈10'                                        # another direction's explanation
    shuffled = det.detection_score(wrong, sim, pos, neg)
    assert abs(shuffled - 0.5) <= 0.15
    assert np.isnan(det.detection_score(right, sim, pos, []))


def test_fuzzing_tells_firing_tokens_from_random_ones():
    sim = I.TokenTableSimulator()
    frags = _fragments(12, seed=2)
    for f in frags:
        f[2] = "w7"
    recs = _single_token_records(frags, "w7")
    assert det.fuzzing_score('fires on "w7" ≈10', sim, recs) == 1.0
    assert det.fuzzing_score('fires on "w9" ≈10', sim, recs) == pytest.approx(0.5, abs=0.2)
    every = [I.Record(["x", "y"], [1.0, 2.0])]                          # fires everywhere: nothing to fuzz
    assert np.isnan(det.fuzzing_score('fires on "x" ≈10', sim, every))


def test_document_split_leaves_no_document_on_both_sides():
    doc = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 5, 5, 6, 7])
    sides = I.document_sides(doc, seed=3)
    assert set(doc[sides].tolist()).isdisjoint(doc[~sides].tolist())
    assert sides.any() and (~sides).any()
    assert torch.equal(sides, I.document_sides(doc, seed=3))
    with pytest.raises(ValueError, match="at least 2"):
        I.document_sides(torch.zeros(5, dtype=torch.long))
    ranked_e, ranked_t = list(range(20)), list(range(100, 120))
    split = I.split_by_document(ranked_e, ranked_t, list(range(100, 140)))
    assert set(split.explain).isdisjoint(split.top + split.random)
    assert split.top == [102, 106, 110, 114, 118] and len(split.random) == 5
    with pytest.raises(ValueError, match="both sides"):
        I.split_by_document(ranked_e, ranked_e, ranked_e)
    assert I.split_by_document(ranked_e[:10], ranked_t, ranked_t) is None


def test_matched_negatives_come_from_the_same_document_first():
    doc = torch.tensor([0, 0, 1, 1, 2, 2, 3])
    neg = det.matched_negatives([0, 2], silent=[1, 3, 6], doc=doc)
    assert neg == [1, 3]
    neg = det.matched_negatives([0, 4], silent=[1, 6], doc=doc)    # document 2 has no silent fragment
    assert neg[0] == 1 and neg[1] == 6
    assert det.matched_negatives([0, 2, 4], silent=[1], doc=doc) == [1]


def test_sums_give_the_pooled_correlation():
    rng = np.random.default_rng(0)
    t = [rng.random(7), rng.random(5)]
    p = [rng.random(7), rng.random(5)]
    S = I.fragment_sums(t, p).sum(0)
    assert float(I.correlation_from_sums(S)) == pytest.approx(I.pooled_correlation(t, p))
    assert float(I.correlation_from_sums(I.fragment_sums([[1, 2]], [[3, 3]]).sum(0))) == 0.0  # constant prediction


def _method(seed, shift=0.0, n=40):
    rng = np.random.default_rng(seed)
    sums, docs = [], []
    for _ in range(n):
        t = [rng.random(8) for _ in range(4)]
        p = [x + rng.normal(0, 0.3 + shift, 8) for x in t]
        sums.append(I.fragment_sums(t, p))
        docs.append(rng.integers(0, 30, 4).tolist())
    return sums, docs


def test_paired_interval_of_identical_methods_covers_zero():
    s, d = _method(0)
    res = paired_difference(s, d, s, d, n_boot=500)
    assert res["low"] <= 0 <= res["high"] and res["mean"] == 0 and not res["separated"]


def test_paired_interval_separates_a_clearly_better_method():
    good, bad = _method(1), _method(2, shift=2.0)
    res = paired_difference(*good, *bad, n_boot=500)
    assert res["separated"] and res["low"] > 0 and res["n_a"] == res["n_b"] == 40
    with pytest.raises(ValueError, match="same directions"):
        paired_difference(good[0], good[1][:3], *bad)


def test_context_maxima_match_the_encoded_activations():
    from sparse_coding.analyses.mining import mine
    tokens = torch.arange(24).reshape(4, 6)
    read = lambda tb: {"h": torch.nn.functional.one_hot(tb, 24).float()}  # noqa: E731
    enc = {"m": ("h", lambda x: torch.relu(x[:, :3]))}
    mx = mine(read, enc, tokens, batch_size=3, per_bin=0, window=None, progress=False,
              keep_context_max=True)["m"].context_max
    assert mx.shape == (4, 3)
    assert mx[0].tolist() == [1, 1, 1] and mx[1:].sum() == 0
    assert mine(read, enc, tokens, progress=False)["m"].context_max is None  # only when asked
