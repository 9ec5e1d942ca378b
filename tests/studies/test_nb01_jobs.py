"""Notebook 01's grid on worker processes: the same cells, batches and scores as the sweep in one process (one
thread each, so the arithmetic is the same bit for bit), results back in grid order, errors surfaced."""

import pandas as pd
import pytest
import torch

from sparse_coding.activations import ToyConfig, ToyData
from sparse_coding.studies.nb01_jobs import run_toy_sweeps
from sparse_coding.studies.nb01_toy import run_toy_sweep

pytestmark = pytest.mark.usefixtures("one_thread")

GRIDS = {"relu": {"values": [0.3, 1.0], "per_true": [2, 1], "lrs": [1e-2, 3e-3]},
         "topk": {"values": [3, 2], "per_true": [1], "lrs": [3e-3]},
         "jumprelu": {"values": [1.0], "per_true": [1], "lrs": [3e-3], "fixed": {"init_threshold": 0.3}}}


@pytest.fixture(scope="module")
def easy():
    return ToyData(ToyConfig(d=16, n_features=24, mean_active=2.0, seed=0))


def test_workers_match_one_process_and_the_single_sweep(easy):
    kw = dict(steps=40, batch_size=32, seed=1, n_eval=128, progress=False)
    pooled = run_toy_sweeps(easy, GRIDS, workers=2, **kw)
    here = run_toy_sweeps(easy, GRIDS, workers=1, **kw)
    assert set(pooled) == set(GRIDS)
    for kind, grid in GRIDS.items():
        single = run_toy_sweep(easy, kind, grid["values"], grid["per_true"], steps=40, lrs=grid["lrs"],
                               batch_size=32, seed=1, n_eval=128, **grid.get("fixed", {}))
        for other in (here[kind], single):
            pd.testing.assert_frame_equal(pooled[kind].table, other.table)
            pd.testing.assert_frame_equal(pooled[kind].history, other.history)
            assert pooled[kind].dictionaries.keys() == other.dictionaries.keys()
            for key in other.dictionaries:
                assert torch.equal(pooled[kind].dictionaries[key], other.dictionaries[key])
    relu = pooled["relu"].table
    assert len(relu) == 2 * 2 * 2 and relu["mmcs_vs_larger"].notna().sum() == 4  # the smaller size vs the larger


def test_bad_grids_and_cell_errors_are_named(easy):
    with pytest.raises(ValueError, match="workers"):
        run_toy_sweeps(easy, GRIDS, steps=5, workers=0)
    with pytest.raises(ValueError, match=r"grids\['topk'\]"):
        run_toy_sweeps(easy, {"topk": {"values": [2]}}, steps=5)
    with pytest.raises(ValueError, match="kind must be one of"):
        run_toy_sweeps(easy, {"gated": {"values": [1], "per_true": [1]}}, steps=5)
    with pytest.raises(ValueError, match="exceeds the dictionary size"):  # raised in a worker, surfaced here
        run_toy_sweeps(easy, {"topk": {"values": [30], "per_true": [1]}}, steps=5, workers=2, progress=False)
