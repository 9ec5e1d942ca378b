"""Explain–simulate–score with known answers: a planted direction is named and predicted; noise and shuffled
explanations score about zero; the pooled correlation is scipy's; the split never reuses a fragment; the bootstrap
interval covers the true mean at its nominal rate (the baseline directions: test_directions.py)."""

import numpy as np
import pytest
from scipy.stats import pearsonr

from sparse_coding.analyses.interpretability import (MIN_FRAGMENTS, Record, TokenTableExplainer,
                                                     TokenTableSimulator, bootstrap_ci, pooled_correlation,
                                                     score_direction, split_fragments)

VOCAB = [f"tok{i}" for i in range(60)] + ['"quote"', "back\\slash", "·(", "⏎"]


def _records(rule, n, rng, length=64):
    out = []
    for _ in range(n):
        toks = [VOCAB[i] for i in rng.integers(0, len(VOCAB), length)]
        out.append(Record(toks, [float(rule(toks, i, rng)) for i in range(length)]))
    return out


def _score(rule, rng, explanation=None):
    recs = dict(enumerate(_records(rule, 20, rng)))
    split = split_fragments(list(range(20)), list(range(20)))
    return score_direction(recs, split, TokenTableExplainer(), TokenTableSimulator(), explanation)


@pytest.mark.parametrize("token", ['"quote"', "back\\slash", "·("])
def test_planted_direction_is_named_and_predicted(token):
    rng = np.random.default_rng(0)
    s = _score(lambda t, i, r: 3.0 if t[i] == token else 0.0, rng)
    assert f'"{token}"' in s.explanation.replace('\\"', '"').replace("\\\\", "\\")  # names the token, quoted
    assert s.top_and_random >= 0.95 and s.top >= 0.95


def test_previous_token_context_is_explained():
    rng = np.random.default_rng(1)
    rule = lambda t, i, r: 2.0 if t[i] == "·(" and i and t[i - 1] == "tok3" else (1.0 if t[i] == "·(" else 0.0)  # noqa
    recs = _records(rule, 5, rng) + [Record(["tok3", "·(", "tok5", "·("], [0, 2.0, 0, 1.0])]
    text = TokenTableExplainer().explain(recs)
    pred = TokenTableSimulator().simulate(text, [["tok3", "·(", "tok9", "·("]])[0]
    assert pred[1] > pred[3] > 0 and pred[0] == pred[2] == 0


def test_noise_scores_about_zero():
    rng = np.random.default_rng(2)
    rs = [_score(lambda t, i, r: r.random() * (r.random() < 0.1), rng).top_and_random for _ in range(60)]
    assert abs(np.mean(rs)) < 0.1


def test_shuffled_explanations_score_about_zero():
    rng = np.random.default_rng(3)
    rs = []
    for k in range(40):
        own, other = VOCAB[k], VOCAB[(k + 7) % 40]
        wrong = TokenTableExplainer().explain(_records(lambda t, i, r: float(t[i] == other), 5, rng))
        rs.append(_score(lambda t, i, r: float(t[i] == own), rng, explanation=wrong).top_and_random)
    assert abs(np.mean(rs)) < 0.1


def test_pooled_correlation_is_scipys_pearson_over_concatenated_tokens():
    rng = np.random.default_rng(4)
    true = [rng.random(7).tolist(), rng.random(5).tolist()]
    pred = [rng.random(7).tolist(), rng.random(5).tolist()]
    r = pearsonr(np.concatenate(true), np.concatenate(pred)).statistic
    assert pooled_correlation(true, pred) == pytest.approx(r, abs=1e-12)
    assert pooled_correlation(true, [[0.0] * 7, [0.0] * 5]) == 0.0  # a silent simulator explains nothing
    with pytest.raises(ValueError, match="tokens"):
        pooled_correlation(true, [[0.0] * 7])


def test_split_never_reuses_a_fragment_and_skips_rare_directions():
    ranked = list(range(100, 120))
    firing = [119, 104, 3, 102, 4, 5, 6, 7, 8]
    s = split_fragments(ranked, firing)
    assert s.explain == [100, 104, 108, 112, 116] and s.top == [102, 106, 110, 114, 118]
    assert s.random == [119, 3, 4, 5, 6]
    assert not (set(s.explain) & set(s.top)) and not (set(s.explain + s.top) & set(s.random))
    assert split_fragments(ranked[:MIN_FRAGMENTS - 1], firing) is None


def test_bootstrap_interval_covers_the_true_mean_at_its_nominal_rate():
    rng = np.random.default_rng(5)
    hits = 0
    for trial in range(300):
        scores = rng.beta(2, 5, size=150)  # true mean 2/7
        _, lo, hi, se95 = bootstrap_ci(scores, n_boot=500, seed=trial)
        hits += lo <= 2 / 7 <= hi
        assert se95 > 0
    assert 0.91 <= hits / 300 <= 0.98
