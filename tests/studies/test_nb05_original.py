"""The original team's training condition for notebook 05: mini-runs over successive chunks, several epochs each."""

import numpy as np
import pytest
import torch

from sparse_coding.studies.nb05_original import MiniRuns


def test_mini_runs_read_each_chunk_for_its_epochs_then_move_on(make_store):
    x = torch.arange(1024, dtype=torch.float32).unsqueeze(1).repeat(1, 4)  # row i holds the value i
    store = make_store(x, ctx_len=16)
    src = MiniRuns(store, n_runs=4, epochs=3, batch_size=64, seed=0)
    assert src.chunk == 256 and src.per_epoch == 4 and src.steps_per_run == 12 and src.steps == 48
    assert src.boundaries() == [0, 12, 24, 36, 48]
    for m in range(4):
        for e in range(3):
            rows = np.concatenate([src(m * 12 + e * 4 + i)[:, 0].numpy() for i in range(4)]).astype(int)
            # one epoch = every row of mini-run m's chunk exactly once, in a shuffled order
            assert sorted(rows.tolist()) == list(range(m * 256, (m + 1) * 256))
            assert rows.tolist() != sorted(rows.tolist())
    # a pure function of the step: a resumed run sees the same batches
    assert torch.equal(MiniRuns(store, 4, 3, 64, seed=0)(17), src(17))


def test_mini_runs_refuse_chunks_smaller_than_a_batch(make_store):
    store = make_store(torch.randn(128, 4), ctx_len=16)
    with pytest.raises(ValueError, match="n_runs or batch_size"):
        MiniRuns(store, n_runs=8, epochs=1, batch_size=64)
