"""Notebook 01's whole grid (every kind × dictionary size × learning rate) as independent cells on worker processes.

Why processes: a cell's ensemble at the toy shape (d 256, 512-1024 latents, batch 256, 2-3 members) is a stream of
small kernels, where a second OpenMP thread buys little (with OMP_WAIT_POLICY=PASSIVE the threads' wake-ups cost
about what they save: TopK, BatchTopK and JumpReLU steps ran faster on one thread than on two, ReLU 20 % slower).
Two processes of one thread each keep both cores busy with whole steps instead. Each worker builds the toy data
from its config and draws the shared training stream itself (`ToyData.batches` is deterministic for a seed), so
every cell trains on the same batches wherever it runs; `workers=1` runs the same cells in this process.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

import torch
from tqdm.auto import tqdm

from ..activations.synthetic import ToyConfig, ToyData
from .nb01_toy import (ToySweepResult, _check_grid, _check_positive_int, _check_values, assemble, draw_stream,
                       eval_batch, train_cell)

_WORKER: dict[str, Any] = {}  # in a worker process: its toy data, stream and held-out batch


def _cells(grids: dict[str, dict]) -> list[tuple[str, list, float, int, float, dict]]:
    """(kind, values, per_true, size index, lr, fixed) for every cell, checked; the largest first (they take the
    longest, and a pool finishes sooner when the small ones come last)."""
    cells = []
    for kind, grid in grids.items():
        if not isinstance(grid, dict) or "values" not in grid or "per_true" not in grid:
            raise ValueError(f"grids[{kind!r}] must be a dict with 'values', 'per_true' and optionally 'lrs' and "
                             f"'fixed', got {grid!r}")
        values = _check_values(kind, grid["values"])
        per_true = _check_grid(grid["per_true"], f"grids[{kind!r}]['per_true']")
        lrs = _check_grid(grid.get("lrs", [1e-3]), f"grids[{kind!r}]['lrs']")
        cells += [(kind, values, p, i, lr, dict(grid.get("fixed", {}))) for lr in lrs for i, p in enumerate(per_true)]
    return sorted(cells, key=lambda c: -c[2] * len(c[1]))


def _setup(cfg: dict, device: str, batch_size: int, steps: int, seed: int, n_eval: int, threads: int) -> None:
    if threads:
        torch.set_num_threads(threads)
    data = ToyData(ToyConfig(**cfg), device=device)
    _WORKER.update(data=data, stream=draw_stream(data, batch_size, steps, seed), x_eval=eval_batch(data, n_eval, seed)[0])


def _run(cell: tuple, steps: int, seed: int, resample_every: int | None) -> tuple:
    kind, values, per_true, i, lr, fixed = cell
    return train_cell(_WORKER["data"], kind, values, per_true, i, lr, _WORKER["stream"], steps=steps, seed=seed,
                      x_eval=_WORKER["x_eval"], resample_every=resample_every, **fixed)


def run_toy_sweeps(data: ToyData, grids: dict[str, dict], steps: int, batch_size: int = 256, seed: int = 0,
                   n_eval: int = 4096, workers: int = 2, progress: bool = True, resample_every: int | None = None
                   ) -> dict[str, ToySweepResult]:
    """`run_toy_sweep` for every kind of `grids` ({kind: {"values": [...], "per_true": [...], "lrs": [...],
    "fixed": {...}}}), its cells spread over `workers` processes of one thread each (1: in this process, at this
    process's thread count). The same cells, batches, seeds and scores as run_toy_sweep; a bar counts finished
    cells. Each result's `seconds` is the wall time of the whole grid.

    Raises ValueError naming the argument for a bad grid, step count or worker count; a cell's own error (e.g. a
    k larger than its dictionary) is raised here as it was raised in the worker."""
    steps = _check_positive_int(steps, "steps")
    batch_size = _check_positive_int(batch_size, "batch_size")
    n_eval = _check_positive_int(n_eval, "n_eval")
    workers = _check_positive_int(workers, "workers")
    cells = _cells(grids)
    t0 = time.time()
    setup = (dataclasses.asdict(data.cfg), str(data.device), batch_size, steps, seed, n_eval)
    results: dict[int, tuple] = {}
    bar = tqdm(total=len(cells), desc=f"toy grid, {workers} worker{'s' * (workers > 1)}", disable=not progress)
    if workers == 1:
        _setup(*setup, threads=0)
        try:
            for j, cell in enumerate(cells):
                results[j] = _run(cell, steps, seed, resample_every)
                bar.update()
        finally:
            _WORKER.clear()
    else:
        # spawn: a forked child of a process whose OpenMP threads already ran can hang in its first parallel region.
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_setup,
                                 initargs=(*setup, 1)) as pool:
            futures = {pool.submit(_run, cell, steps, seed, resample_every): j for j, cell in enumerate(cells)}
            for f in as_completed(futures):
                results[futures[f]] = f.result()
                bar.update()
    bar.close()
    seconds = time.time() - t0
    out = {}
    for kind in grids:
        mine = sorted((j for j, c in enumerate(cells) if c[0] == kind), key=lambda j: (cells[j][4], cells[j][2]))
        values = cells[mine[0]][1]
        per_true = sorted({cells[j][2] for j in mine})
        lrs = sorted({cells[j][4] for j in mine})
        out[kind] = assemble(kind, values, per_true, lrs, [results[j] for j in mine], seconds)
    return out


