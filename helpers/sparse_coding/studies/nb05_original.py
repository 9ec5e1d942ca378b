"""Notebook 05's second condition: an SAE trained as the original team trained theirs — tied ReLU + L1, a constant
learning rate of 1e-3, in "mini-runs" over successive chunks of activations (several epochs each), with a snapshot
after every mini-run — so that the share of features that "reached 0.9 self-similarity and later fell below 0.6" can
be compared with theirs (20-40 %) in their own conditions rather than in today's short decayed TopK runs."""

from __future__ import annotations

import io
import os
import time
from typing import Any

import numpy as np
import pandas as pd
import torch

from .. import dictionaries
from ..activations import ActivationStore, row_order, safe_name
from ..checks import check_int
from ..files import canonical
from ..paths import resolve
from .nb05_tracking import TRACKING_SUBDIR


class MiniRuns:
    """step -> batch [batch_size, d]: `n_runs` consecutive chunks of the store's rows, each read for `epochs`
    shuffled epochs before the next chunk starts (a pure function of the step, so a killed run resumes exactly)."""

    def __init__(self, store: ActivationStore, n_runs: int, epochs: int, batch_size: int, seed: int = 0):
        check_int(n_runs, "n_runs", 1)
        check_int(epochs, "epochs", 1)
        self.store, self.batch_size, self.seed, self.n_runs = store, batch_size, seed, n_runs
        self.chunk = store.n_tokens // n_runs
        self.per_epoch = self.chunk // batch_size
        if self.per_epoch < 1:
            raise ValueError(f"a chunk of {self.chunk} rows holds no batch of {batch_size}: lower n_runs or batch_size")
        self.steps_per_run = self.per_epoch * epochs
        self._cached: tuple[int, int, np.ndarray] | None = None

    @property
    def steps(self) -> int:
        return self.n_runs * self.steps_per_run

    def boundaries(self) -> list[int]:
        """Steps completed at the start and at the end of every mini-run: where snapshots are taken."""
        return [m * self.steps_per_run for m in range(self.n_runs + 1)]

    def __call__(self, step: int) -> torch.Tensor:
        m, r = divmod(step, self.steps_per_run)
        e, i = divmod(r, self.per_epoch)
        if self._cached is None or self._cached[:2] != (m, e):
            self._cached = (m, e, row_order(self.chunk, self.seed * 1009 + m, e))
        rows = m * self.chunk + self._cached[2][i * self.batch_size:(i + 1) * self.batch_size]
        return self.store.rows(rows)


def train_mini_runs(store: ActivationStore, *, ratio: float, l1_coef: float, n_runs: int = 8, epochs: int = 3,
                    batch_size: int = 1024, lr: float = 1e-3, seed: int = 0, data_dir: str | os.PathLike = "data",
                    device: str = "cpu", progress: bool = True) -> dictionaries.LMSweep:
    """A tied ReLU + L1 SAE trained in mini-runs at a constant lr with a snapshot after each (see the module
    docstring); saved under `<data_dir>/tracking/` with its snapshots beside it and reused on rerun."""
    m = store.manifest
    folder = (resolve(data_dir) / TRACKING_SUBDIR / "original" / safe_name(str(m["model"])) /
              safe_name(str(m["revision"])) / safe_name(str(m["hook"])) / f"relu-tied-r{ratio:g}-s{seed}")
    source = MiniRuns(store, n_runs, epochs, batch_size, seed)
    settings = canonical({"ratio": ratio, "l1_coef": l1_coef, "n_runs": n_runs, "epochs": epochs,
                          "batch_size": batch_size, "lr": lr, "seed": seed, "store_rows": store.n_tokens})
    scale = dictionaries.default_input_scale(store, seed)
    if (folder / dictionaries.saelens_io.SWEEP_FILE).exists():
        saved = dictionaries.sweep_info(folder)
        if canonical(saved.get("settings")) == settings:
            hist = pd.read_csv(folder / "history.csv")
            return dictionaries.LMSweep(folder.name, "relu", float(ratio), folder,
                                        dictionaries.load_sweep(folder, device=device), hist, scale,
                                        float(saved.get("seconds", float("nan"))), True, settings)
    sae = dictionaries.make_sae("relu", store.d, ratio=ratio, l1_coef=l1_coef, tied=True, seed=seed, device=device)
    t0 = time.time()
    hist = dictionaries.train_sae(sae, source, steps=source.steps, lr=lr, input_scale=scale, seed=seed,
                                  progress=progress, log_every=max(1, source.steps_per_run // 4),
                                  state_dir=dictionaries.state_dir(folder), snapshot_steps=source.boundaries())
    seconds = time.time() - t0
    buf = io.StringIO()
    hist.to_csv(buf, index=False)
    meta = dictionaries.store_metadata(store)
    dictionaries.save_sweep(sae, folder, metadata=meta, files={"history.csv": buf.getvalue()},
                            extra={"settings": settings, "seconds": seconds}, overwrite=True)
    return dictionaries.LMSweep(folder.name, "relu", float(ratio), folder, dictionaries.load_sweep(folder, device=device),
                                hist, scale, seconds, False, settings)


def condition_summary(traj: Any, high: float = 0.9, low: float = 0.6) -> dict[str, Any]:
    """The numbers compared between conditions (keys as in 05_metrics.json): the share of features alive at the end
    that reached `high` self-similarity with the previous snapshot and later fell below `low`
    (`share_reached_0.9_then_below_0.6` at the defaults), the same against the final direction, the snapshot count
    and the features alive at the end."""
    s = traj.summary(high, low)
    key = f"share_reached_{high:g}_then_below_{low:g}"
    return {key: round(float(s[key]), 4), f"{key}_to_final": round(float(s[f"{key}_to_final"]), 4),
            "n_snapshots": len(traj.steps), "n_alive_final": int(s["n_alive_final"]),
            "n_features": int(s["n_features"])}


def compare_conditions(trajectories: dict[str, Any], high: float = 0.9, low: float = 0.6) -> pd.DataFrame:
    """condition_summary for each named condition, one row each."""
    return pd.DataFrame.from_dict({name: condition_summary(t, high, low) for name, t in trajectories.items()},
                                  orient="index")
