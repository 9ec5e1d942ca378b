"""A sweep's cached evaluation (eval.csv) is keyed on what it reads: reused for the same store, tokens and settings,
recomputed when any of them changes (it used to be reused whenever the file existed)."""

import torch

from sparse_coding import dictionaries
from sparse_coding.activations import write_store
from sparse_coding.analyses import sweep_table


def test_evaluation_is_reused_only_for_the_same_content(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 8, generator=g)
    store = write_store(tmp_path / "a", x, model="m", hook="h")
    kw = dict(data_dir=tmp_path, n_tokens=2048, batch_size=256, progress=False)
    run = dictionaries.train_lm_sweep(store, "topk", 2, {"k": 2}, **kw)
    calls = []
    real = sweep_table.evaluate_sweep
    monkeypatch.setattr(sweep_table, "evaluate_sweep", lambda *a, **k: calls.append(1) or real(*a, **k))

    def evaluate(store, run, **extra):
        return sweep_table.evaluate_lm_sweep(None, run, store, None, n_eval_tokens=1024, progress=False, **extra)

    first = evaluate(store, run)
    run = dictionaries.train_lm_sweep(store, "topk", 2, {"k": 2}, **kw)  # reloaded: reused
    assert run.reused
    again = evaluate(store, run)
    assert len(calls) == 1 and again.table["fvu"].tolist() == first.table["fvu"].tolist()
    evaluate(store, run, seed=2)  # other rows read
    assert len(calls) == 2
    # the same sweep evaluated on another store of the same shape (other content): recomputed
    other = write_store(tmp_path / "b", x.flip(0), model="m", hook="h")
    evaluate(other, run)
    assert len(calls) == 3
    evaluate(other, run)
    assert len(calls) == 3
    assert sweep_table.evaluation_key(store, None) != sweep_table.evaluation_key(other, None)
    t = torch.arange(12).reshape(2, 6)
    assert sweep_table.evaluation_key(store, t) != sweep_table.evaluation_key(store, t.flip(1))
