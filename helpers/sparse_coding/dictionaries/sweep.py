"""SAE sweeps on harvested language-model activations (notebooks 03-07).

A sweep is one ensemble: one SAE kind at one dictionary ratio, one member per hyperparameter value, all trained on
the same shuffled batches of one activation store. It is saved in SAELens's layout under
`<data_dir>/dictionaries/<model>/<revision>/<hook>/<kind>-r<ratio>-s<seed>/` with its training log, and a rerun
with the same settings reuses it instead of training again (so a notebook can be re-executed cheaply); different
settings for an existing folder are an error rather than a silent overwrite.

Inputs are normalised so that E||s x||^2 = d_in during training (one scale per store, estimated on a seeded sample);
the scale is folded into the saved weights, so a loaded sweep takes raw activations."""

from __future__ import annotations

import io
import shutil
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import pandas as pd
import torch

from ..activations import ActivationStore, safe_name
from ..checks import check_positive
from ..files import canonical
from ..paths import resolve
from .factory import make_sae
from .saelens_io import SWEEP_FILE, load_sweep, save_sweep, sweep_info
from .training import estimate_input_scale, train_sae

HISTORY_FILE = "history.csv"


def sweep_name(kind: str, ratio: float, seed: int) -> str:
    return f"{kind}-r{ratio:g}-s{seed}"


def state_dir(folder: Path) -> Path:
    """Where a sweep's training snapshots and resumable state live: beside the sweep folder, which is written whole
    at the end."""
    return folder.with_name(folder.name + ".training")


def sweep_dir(data_dir: str | os.PathLike, store: ActivationStore, kind: str, ratio: float, seed: int) -> Path:
    m = store.manifest
    return (resolve(data_dir) / "dictionaries" / safe_name(str(m["model"])) / safe_name(str(m["revision"]))
            / safe_name(str(m["hook"])) / sweep_name(kind, ratio, seed))


def input_scale(store: ActivationStore, seed: int = 0) -> float:
    """s with E||s x||^2 = d_in, from 16 seeded batches of 4096 rows: SAE hyperparameters (L1 coefficient,
    learning rate) then mean the same at every layer and on every model, whatever the raw activation norm."""
    return estimate_input_scale(store, n_batches=16, batch_size=4096, seed=seed)


def store_metadata(store: ActivationStore) -> dict:
    """The SAELens cfg.json ``metadata`` of a dictionary trained on `store`: model_name, revision, hook_name,
    context_size, dataset_path, plus what identifies the model's weights (``model_id``: a GGUF file's quantisation
    and sha256) and the positions left out of its inputs (``exclude``), where the harvest recorded them."""
    m = store.manifest
    meta = {"model_name": str(m["model"]), "revision": str(m["revision"]), "hook_name": str(m["hook"]),
            "context_size": int(store.ctx_len), "dataset_path": str(m.get("corpus", ""))}
    for key in ("model_id", "exclude"):
        if m.get(key) is not None:
            meta[key] = m[key]
    return meta


@dataclass
class LMSweep:
    """A trained (or reloaded) sweep. `sae` takes raw activations (the scale is folded in)."""

    name: str
    kind: str
    ratio: float
    folder: Path
    sae: Any
    history: pd.DataFrame
    input_scale: float
    seconds: float
    reused: bool
    settings: dict = field(default_factory=dict)

    def label(self, member: int) -> str:
        h = self.sae.hparams[member]
        knob = next((f"{k}={h[k]:g}" for k in ("l1_coef", "k", "l0_coef") if k in h), f"m{member}")
        return f"{self.kind} r{self.ratio:g} {knob}"


def _settings(store: ActivationStore, kind: str, ratio: float, hparams: Mapping[str, Any], seed: int,
              n_tokens: int, batch_size: int, lr: float, train_kwargs: Mapping[str, Any]) -> dict:
    m = store.manifest
    return {"kind": kind, "ratio": float(ratio), "hparams": {k: (list(v) if isinstance(v, (list, tuple)) else v)
                                                             for k, v in hparams.items()},
            "seed": int(seed), "n_tokens": int(n_tokens), "batch_size": int(batch_size), "lr": float(lr),
            "train": {k: v for k, v in train_kwargs.items()},
            "activations": {"model": m["model"], "revision": m["revision"], "hook": m["hook"],
                            "n_tokens": store.n_tokens, "d": store.d}}


def train_lm_sweep(store: ActivationStore, kind: str, ratio: float, hparams: Mapping[str, Any], *,
                   data_dir: str | os.PathLike = "data", seed: int = 0, n_tokens: int | None = None,
                   batch_size: int = 4096, lr: float = 1e-3, device: str | torch.device = "cpu",
                   progress: bool = True, log_every: int = 50, retrain: bool = False, snapshots: bool = False,
                   **train_kwargs: Any) -> LMSweep:
    """Train one ensemble (kind, ratio; one member per value in `hparams` lists) on `store`, or reload it.

    n_tokens: training tokens (default: one pass over the store). train_kwargs go to `training.train_sae`
    (warmup_steps, decay, resample_every, ...). snapshots=True keeps log-spaced weight snapshots in
    `<sweep folder>.training/` (notebook 05 tracks features across them) and lets a killed run resume there.
    A rerun with the same settings (compared after a JSON round trip) reloads the saved sweep; retrain=True
    replaces a saved sweep whose settings differ, otherwise that is a FileExistsError."""
    check_positive(ratio, "ratio", " (dictionary size / d_model)")
    n_tokens = int(n_tokens or store.n_tokens)
    if n_tokens < batch_size:
        raise ValueError(f"n_tokens={n_tokens} is less than one batch (batch_size={batch_size})")
    folder = sweep_dir(data_dir, store, kind, ratio, seed)
    settings = _settings(store, kind, ratio, hparams, seed, n_tokens, batch_size, lr, train_kwargs)
    settings["snapshots"] = bool(snapshots)
    settings = canonical(settings)
    if (folder / SWEEP_FILE).exists():
        saved = sweep_info(folder)
        if canonical(saved.get("settings")) == settings:
            history = pd.read_csv(folder / HISTORY_FILE) if (folder / HISTORY_FILE).exists() else pd.DataFrame()
            return LMSweep(folder.name, kind, float(ratio), folder, load_sweep(folder, device=device), history,
                           float(saved["input_scale"]), float(saved.get("seconds", float("nan"))), True, settings)
        if not retrain:
            raise FileExistsError(f"{folder} holds a sweep trained with other settings; pass retrain=True to "
                                  f"replace it, or use another data_dir")

    s = input_scale(store, seed=seed)
    sae = make_sae(kind, store.d, ratio=ratio, seed=seed, device=device, **hparams)
    # A resumable state beside the sweep (every twentieth of the run), so a killed run continues where it stopped;
    # snapshots=True also keeps log-spaced weight snapshots there.
    steps = n_tokens // batch_size
    if retrain:
        shutil.rmtree(state_dir(folder), ignore_errors=True)  # another settings' unfinished state
    train_kwargs.setdefault("state_dir", state_dir(folder))
    train_kwargs.setdefault("snapshot_steps", "log" if snapshots else None)
    train_kwargs.setdefault("state_every", max(1, steps // 20))
    t0 = time.time()
    # The store itself (not an iterator over it) lets train_sae jump to any step when it resumes.
    history = train_sae(sae, store, steps=steps, lr=lr, batch_size=batch_size, input_scale=s,
                        progress=progress, log_every=log_every, seed=seed, **train_kwargs)
    seconds = time.time() - t0
    metadata = store_metadata(store)
    buf = io.StringIO()
    history.to_csv(buf, index=False)
    save_sweep(sae, folder, metadata=metadata, files={HISTORY_FILE: buf.getvalue()},
               extra={"settings": settings, "seconds": seconds}, overwrite=retrain)
    if not snapshots and train_kwargs["state_dir"] == state_dir(folder):
        shutil.rmtree(state_dir(folder), ignore_errors=True)  # only there to resume an unfinished run
    return LMSweep(folder.name, kind, float(ratio), folder, load_sweep(folder, device=device), history, s, seconds,
                   False, settings)
