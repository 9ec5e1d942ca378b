"""Notebook 07's two-sided mining glue on a synthetic reader: every record maps back to its own fragment of the
pool, explanation and test records come from disjoint documents, the silent-context maxima line up with the test
side, and the shuffled control scores each direction with another direction's explanation."""

import torch

from sparse_coding.analyses import TokenTableExplainer, TokenTableSimulator, document_sides, mine
from sparse_coding.studies import nb07_interpretability as study

V, T = 12, 8


def _pool(n=240, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (n, T), generator=g), torch.arange(n) // 3  # three fragments per document


def _sides(fragments, doc):
    read = lambda tb: {"h": torch.nn.functional.one_hot(tb, V).float()}  # noqa: E731  direction j fires on token j
    enc = {"0/onehot": ("h", lambda x: x)}
    sides = document_sides(doc, 0)
    ie, it = sides.nonzero().squeeze(1), (~sides).nonzero().squeeze(1)
    mined = [mine(read, enc, fragments[i], batch_size=16, n_top=20, n_random=15, per_bin=0, window=None,
                  progress=False, keep_context_max=True) for i in (ie, it)]
    return study.Sides(mined[0]["0/onehot"], mined[1]["0/onehot"], ie, it, mined[1]["0/onehot"].context_max)


def test_records_map_back_to_their_fragments_and_sides_never_share_a_document():
    fragments, doc = _pool()
    texts = [f"t{i}" for i in range(V)]
    s = _sides(fragments, doc)
    for d in (1, 5):
        records, split = study.prepare(s, d, texts)
        assert split is not None
        for f, r in records.items():
            assert r.tokens == [texts[t] for t in fragments[f].tolist()]
            assert r.acts == [float(t == d) for t in fragments[f].tolist()]
        explain_docs = {int(doc[f]) for f in split.explain}
        assert explain_docs.isdisjoint({int(doc[f]) for f in split.top + split.random})
    # the maxima are the test fragments', in test_index order
    assert torch.equal(s.test_maxima[:, 3] > 0, (fragments[s.test_index] == 3).any(1))


def test_score_method_reads_each_direction_and_shuffles_explanations():
    fragments, doc = _pool(seed=1)
    texts = [f"t{i}" for i in range(V)]
    s = _sides(fragments, doc)
    ex, sim = TokenTableExplainer(), TokenTableSimulator()
    table, skipped = study.score_method(s, texts, ex, sim, fragments, doc, n_directions=V)
    assert skipped + len(table) == V
    assert (table["top_and_random"] > 0.99).all()  # a one-token direction is explained exactly
    assert (table["fuzzing"] == 1.0).all() and (table["ceiling"] > 0.99).all()
    own = dict(zip(table["latent"], table["explanation"]))
    shuf, _ = study.score_method(s, texts, ex, sim, fragments, doc, n_directions=V, shuffled=True, explanations=own)
    assert set(shuf["explanation"]) == set(own.values())
    assert all(own[d] != e for d, e in zip(shuf["latent"], shuf["explanation"]))
    assert shuf["top_and_random"].mean() < 0.2 and shuf["ceiling"].isna().all()
