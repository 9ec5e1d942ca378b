"""Notebook 04's study: training rows and held-out rows, ladder comparisons with known
answers (planted containment, random dictionaries near the null, dead features left out), reuse rules, figures."""

import numpy as np
import pytest
import torch

import matplotlib.pyplot as plt

from sparse_coding import analyses, plots
from sparse_coding import dictionaries
from sparse_coding.activations import ToyConfig, ToyData
from sparse_coding.studies import nb04_mcs as M
from sparse_coding.studies import nb04_summary as MS

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def store(make_store):
    """Planted sparse data (16-d, 24 features), scaled x50 like a raw residual stream."""
    data = ToyData(ToyConfig(d=16, n_features=24, mean_active=2.0, correlated=False, seed=0))
    x, _ = data.sample(4096, generator=torch.Generator().manual_seed(0))
    return make_store(50 * x)


@pytest.fixture(scope="module")
def index_store(make_store):
    """Row i holds the value i, so a batch says which rows it came from."""
    x = torch.arange(1000, dtype=torch.float32).unsqueeze(1).repeat(1, 2)
    return make_store(x, ctx_len=8)


# ----------------------------------------------------------------------------------------------------------------
# rows


@pytest.mark.parametrize("n_tokens,batch_size,seed", [(300, 64, 0), (1000, 100, 3), (2500, 128, 1)])
def test_training_rows_are_the_rows_the_trainer_reads(index_store, n_tokens, batch_size, seed):
    steps = n_tokens // batch_size
    epochs = -(-steps * batch_size // index_store.n_tokens)
    stream = index_store.batches(batch_size, seed=seed, epochs=epochs, drop_last=True)
    read = np.zeros(index_store.n_tokens, dtype=bool)
    for _, x in zip(range(steps), stream):
        read[x[:, 0].long().numpy()] = True
    assert np.array_equal(M.training_rows(index_store.n_tokens, n_tokens, batch_size, seed), read)
    # And the rows the trainer itself reads when dictionaries.train_lm_sweep hands it the store.
    from sparse_coding.dictionaries.training import BatchSource as _Source

    src = _Source(index_store, batch_size, seed)
    read = np.zeros(index_store.n_tokens, dtype=bool)
    for step in range(steps):
        read[src(step)[:, 0].long().numpy()] = True
    assert np.array_equal(M.training_rows(index_store.n_tokens, n_tokens, batch_size, seed), read)


def test_held_out_rows_avoid_every_seed_and_fall_back_with_a_flag(index_store):
    rows, held_out = M.held_out_rows(index_store, 256, 64, [0, 1], 200)
    assert held_out and len(rows) == 200 and np.all(np.diff(rows) > 0)
    for s in (0, 1):
        assert not M.training_rows(1000, 256, 64, s)[rows].any()
    rows, held_out = M.held_out_rows(index_store, 1000, 100, [0], 50)  # one full epoch: nothing held out
    assert not held_out and len(rows) == 50
    with pytest.raises(ValueError, match="n_rows"):
        M.held_out_rows(index_store, 256, 64, [0], 0)


# ----------------------------------------------------------------------------------------------------------------
# comparisons with known answers


def _unit(n, d, seed):
    W = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return W / W.norm(dim=1, keepdim=True)


def _planted_ladder(d=24, seeds=(0, 1), dead=2):
    """Each size-2n dictionary holds every direction of every size-n one (a fixed set, permuted per seed), and the
    first `dead` features of each never fire: vs-larger and across-seed MCS of live features are exactly 1."""
    base = _unit(64, d, 123)
    dicts = {}
    for r, n in ((1, 16), (2, 32), (4, 64)):
        for s in seeds:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(10 * n + s))
            freq = torch.full((n,), 0.01, dtype=torch.float64)
            freq[perm[:dead]] = 0.0
            dicts[float(r), s] = M.Dictionary(float(r), s, base[:n][perm], freq)
    return dicts


def test_planted_containment_scores_one_and_dead_are_left_out():
    dicts = _planted_ladder()
    comps = M.compare_ladder(dicts)
    names = [c.name for c in comps]
    assert names.count("vs_larger") == 4 and names.count("vs_larger_same_seed") == 4
    assert names.count("across_seeds") == 6
    for c in comps:
        assert c.values.size == c.a.n - 2 and np.isnan(c.result.a_to_b[~c.a.alive]).all()
    vs = [c for c in comps if c.name == "vs_larger"]
    assert {(c.a.seed, c.b.seed) for c in vs} == {(0, 1), (1, 0)}
    table = MS.summary_table(comps)
    live = table[table["comparison"] == "vs_larger"]
    # Dead features of B can be the match of a live A feature; those A-features score below 1, so compare with a
    # direct computation rather than assume 1.
    direct = analyses.mcs(dicts[1.0, 0].directions, dicts[2.0, 1].directions, dicts[1.0, 0].alive,
                            dicts[2.0, 1].alive)
    assert np.isclose(vs[0].values.mean(), direct.mmcs)
    assert (live["n_dead"] == 4).all() and (live["n_alive"] == 2 * (live["n"] - 2)).all()
    m = MS.study_metrics(table)
    assert set(m["mmcs_vs_larger"]) == {"16", "32"} and set(m["mmcs_across_seeds"]) == {"16", "32", "64"}
    assert m["dead_features"] == {"16": 4, "32": 4, "64": 4}
    assert m["dead_fraction"] == {"16": round(4 / 32, 4), "32": round(4 / 64, 4), "64": round(4 / 128, 4)}
    assert m["note"].startswith("MCS vs the next-larger dictionary (other seed) is bimodal")
    for key in ("share_above_0.9", "random_baseline_mmcs", "mmcs_across_seeds_mean", "mmcs_vs_larger_hungarian",
                "sarle_vs_larger", "share_like_random_vs_larger"):
        assert key in m


def test_planted_containment_without_dead_features_is_exactly_one():
    comps = M.compare_ladder(_planted_ladder(dead=0))
    table = MS.summary_table(comps)
    assert np.allclose(table["mmcs"], 1.0, atol=1e-6) and np.allclose(table["share_above"], 1.0)
    assert np.allclose(table["share_random"], 0.0)
    note = MS.summary_sentence(table)
    assert "100% of live features reach 0.9, 0% are no better than random" in note
    assert "across seeds at the same size 100% reach 0.9" in note
    vs = table[table["comparison"] == "vs_larger"]
    assert np.allclose(vs["mmcs_1to1"], 1.0, atol=1e-6) and np.allclose(vs["share_above_1to1"], 1.0)


def test_random_dictionaries_sit_at_the_null():
    d = 32
    dicts = {(float(r), s): M.Dictionary(float(r), s, _unit(n, d, 100 * n + s), torch.full((n,), 0.1))
             for r, n in ((1, 256), (2, 512)) for s in (0, 1)}
    table = MS.summary_table(M.compare_ladder(dicts, hungarian=False))
    for _, row in table.iterrows():
        assert abs(row["mmcs"] - row["null_mmcs"]) < 0.02
        assert row["share_above"] == 0.0 and row["share_random"] > 0.9
    assert "mmcs_1to1" not in table


def test_one_seed_compares_vs_larger_within_the_seed():
    dicts = {k: v for k, v in _planted_ladder().items() if k[1] == 0}
    comps = M.compare_ladder(dicts, hungarian=False)
    assert {c.name for c in comps} == {"vs_larger"} and all(c.a.seed == c.b.seed == 0 for c in comps)


def test_bad_ladders_are_refused():
    dicts = _planted_ladder()
    del dicts[2.0, 1]
    with pytest.raises(ValueError, match="incomplete"):
        M.compare_ladder(dicts)
    with pytest.raises(ValueError, match="increasing order"):
        M._check_ladder([2, 1], [0])
    with pytest.raises(ValueError, match="at least two"):
        M._check_ladder([4], [0])
    with pytest.raises(ValueError, match="distinct ints"):
        M._check_ladder([1, 2], [0, 0])


# ----------------------------------------------------------------------------------------------------------------
# training, reuse and the whole pipeline on a toy store


KW = dict(n_tokens=1024, batch_size=128, lr=3e-3, progress=False)


def test_train_or_reuse_never_writes_into_the_shared_folder(store, tmp_path):
    # A notebook-03 sweep with other settings at the shared location: ours goes to 04_mcs, theirs is untouched.
    theirs = dictionaries.train_lm_sweep(store, "topk", 2, {"k": [2, 4]}, data_dir=tmp_path, **KW)
    ours = M.train_or_reuse(store, "topk", 2, {"k": 3}, data_dir=tmp_path, **KW)
    assert M.OWN_SUBDIR in ours.folder.parts and not ours.reused
    assert dictionaries.train_lm_sweep(store, "topk", 2, {"k": [2, 4]}, data_dir=tmp_path, **KW).reused
    # Identical settings at the shared location are reused from there.
    same = M.train_or_reuse(store, "topk", 2, {"k": [2, 4]}, data_dir=tmp_path, **KW)
    assert same.reused and same.folder == theirs.folder
    # Nothing shared yet: trained under 04_mcs, and the shared folder stays free for notebook 03.
    fresh = M.train_or_reuse(store, "topk", 1, {"k": 3}, data_dir=tmp_path, **KW)
    assert M.OWN_SUBDIR in fresh.folder.parts
    assert not dictionaries.sweep_dir(tmp_path, store, "topk", 1, 0).exists()
    assert M.train_or_reuse(store, "topk", 1, {"k": 3}, data_dir=tmp_path, **KW).reused
    # Other settings for a sweep of ours: an error, unless retrain=True (which never touches the shared folder).
    with pytest.raises(FileExistsError, match="retrain=True"):
        M.train_or_reuse(store, "topk", 1, {"k": 4}, data_dir=tmp_path, **KW)
    redone = M.train_or_reuse(store, "topk", 2, {"k": 4}, data_dir=tmp_path, retrain=True, **KW)
    assert M.OWN_SUBDIR in redone.folder.parts and not redone.reused
    assert dictionaries.train_lm_sweep(store, "topk", 2, {"k": [2, 4]}, data_dir=tmp_path, **KW).reused


def test_pipeline_on_a_toy_ladder(store, tmp_path):
    runs = M.train_ladder(store, "topk", {"k": 2}, [1, 2], [0, 1], data_dir=tmp_path, **KW)
    assert sorted(runs) == [(1.0, 0), (1.0, 1), (2.0, 0), (2.0, 1)]
    rows, held_out = M.held_out_rows(store, KW["n_tokens"], KW["batch_size"], [0, 1], 1024)
    assert held_out
    dicts = M.ladder_dictionaries(runs, store, rows)
    assert dicts[2.0, 1].directions.shape == (32, 16)
    assert torch.allclose(dicts[1.0, 0].directions.norm(dim=1), torch.ones(16))
    comps = M.compare_ladder(dicts)
    table = MS.summary_table(comps)
    m = MS.study_metrics(table)
    assert set(m["mmcs_vs_larger"]) == {"16"} and 0 < m["mmcs_vs_larger"]["16"] <= 1
    assert m["mmcs_vs_larger"]["16"] > m["random_baseline_mmcs"]["16"]
    # Same settings again: every sweep reused, the same numbers.
    again = M.train_ladder(store, "topk", {"k": 2}, [1, 2], [0, 1], data_dir=tmp_path, **KW)
    assert all(r.reused for r in again.values())
    assert MS.study_metrics(MS.summary_table(M.compare_ladder(M.ladder_dictionaries(again, store, rows)))) == m
    with pytest.raises(ValueError, match="member"):
        M.ladder_dictionaries(runs, store, rows, member=1)
    note = MS.bimodality_note(table)
    assert note.startswith("16 vs 32: Sarle")


def test_figures_build(tmp_path):
    comps = M.compare_ladder(_planted_ladder())
    table = MS.summary_table(comps)
    for fig, name in ((plots.plot_mcs_panels(MS.histogram_panels(comps, ["vs_larger", "vs_larger_same_seed"]), "t"),
                       "h.png"),
                      (plots.plot_mcs_panels(MS.histogram_panels(comps, ["across_seeds"]), "t"), "s.png"),
                      (plots.plot_high_mcs_vs_size(table), "z.png"),
                      (plots.plot_mcs_vs_frequency(MS.frequency_panels(comps)), "f.png")):
        assert plots.savefig(fig, tmp_path, name).stat().st_size > 1000
        plt.close(fig)
