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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd
import torch

from ..arguments import checked
from ..activations import ActivationStore, safe_name
from ..activations.layout import revision_name
from ..checks import check_positive
from ..files import canonical, load_json
from ..paths import resolve
from .base import SAE_KINDS
from .factory import make_sae
from .saelens_io import SWEEP_FILE, load_sweep, member_name, save_sweep, sweep_info
from .training import TrainSettings, tracking_schedule, train_sae
from .training.sources import DEFAULT_BATCH_SIZE

HISTORY_FILE = "history.csv"


@checked
def sweep_name(kind: str, ratio: float, seed: int) -> str:
    return f"{kind}-r{ratio:g}-s{seed}"


@checked
def state_dir(folder: Path) -> Path:
    """Where a sweep's training snapshots and resumable state live: beside the sweep folder, which is written whole
    at the end."""
    return folder.with_name(folder.name + ".training")


@checked
def sweep_dir(data_dir: str | os.PathLike, store: ActivationStore, kind: str, ratio: float, seed: int) -> Path:
    m = store.manifest
    return (resolve(data_dir) / "dictionaries" / safe_name(str(m["model"])) / safe_name(str(m["revision"]))
            / safe_name(str(m["hook"])) / sweep_name(kind, ratio, seed))


@checked
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
        key = SAE_KINDS[self.kind].sparsity_knob if self.kind in SAE_KINDS else ""
        knob = f"{key}={h[key]:g}" if key in h else f"m{member}"
        return f"{self.kind} r{self.ratio:g} {knob}"


def saved_sweep(folder: Path, kind: str, ratio: float, settings_json: dict, device: str | torch.device,
                retrain: bool) -> LMSweep | None:
    """The sweep saved in `folder` when it was trained with `settings_json` (compared after a JSON round trip),
    loaded onto `device`; None when there is none, or one trained otherwise and retrain=True (the caller replaces
    it); FileExistsError naming the folder for one trained otherwise without retrain."""
    if not (folder / SWEEP_FILE).exists():
        return None
    saved = sweep_info(folder)
    if canonical(saved.get("settings")) == settings_json:
        history = pd.read_csv(folder / HISTORY_FILE) if (folder / HISTORY_FILE).exists() else pd.DataFrame()
        return LMSweep(folder.name, kind, float(ratio), folder, load_sweep(folder, device=device), history,
                       float(saved["input_scale"]), float(saved.get("seconds", float("nan"))), True, settings_json)
    if not retrain:
        raise FileExistsError(f"{folder} holds a sweep trained with other settings; pass retrain=True to replace "
                              f"it, or use another data_dir")
    return None


def _sweep_cfg(settings: TrainSettings | None, fields: Mapping[str, Any], batch_size: int) -> TrainSettings:
    """A sweep's TrainSettings before its length is known (batch_size: the default batch). Raises ValueError for
    `steps` among the keywords: a sweep's steps are n_tokens // batch_size, so it would be ignored."""
    if "steps" in fields:
        raise ValueError(f"steps={fields['steps']!r} cannot be given to a sweep: it trains n_tokens // batch_size "
                         f"steps; pass n_tokens=steps * batch_size instead")
    cfg = TrainSettings.build(settings or TrainSettings(batch_size=batch_size), **fields)
    return cfg if cfg.batch_size is not None else replace(cfg, batch_size=batch_size)


def _run_cfg(cfg: TrainSettings, steps: int, snapshots: bool, fields: Mapping[str, Any]) -> TrainSettings:
    """`cfg` for a sweep of `steps` steps: a resumable state beside the sweep (every twentieth of the run unless
    cfg sets state_every), so a killed run continues where it stopped; with snapshots=True the weight snapshots at
    cfg's snapshot_steps ("log" by default), else only those given as a keyword."""
    snap = cfg.snapshot_steps if snapshots or "snapshot_steps" in fields else None
    return replace(cfg, steps=steps, snapshot_steps=snap, state_every=cfg.state_every or max(1, steps // 20))


def _settings(store: ActivationStore, kind: str, ratio: float, hparams: Mapping[str, Any], n_tokens: int,
              cfg: TrainSettings, snapshots: bool) -> dict:
    """What a sweep.json records and a rerun compares: the sweep's own settings and its TrainSettings whole (the
    fields a resume compares, `TrainSettings.resume_key`)."""
    m = store.manifest
    return canonical({"kind": kind, "ratio": float(ratio),
                      "hparams": {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in hparams.items()},
                      "seed": cfg.seed, "n_tokens": int(n_tokens), "batch_size": cfg.batch_size, "lr": cfg.lr,
                      "train": cfg.resume_key(), "snapshots": bool(snapshots),
                      "activations": {"model": m["model"], "revision": m["revision"], "hook": m["hook"],
                                      "n_tokens": store.n_tokens, "d": store.d}})


@checked
def train_lm_sweep(store: ActivationStore, kind: str, ratio: float, hparams: Mapping[str, Any],
                   settings: TrainSettings | None = None, *, data_dir: str | os.PathLike = "data",
                   n_tokens: int | None = None, device: str | torch.device = "cpu", progress: bool = True,
                   retrain: bool = False, snapshots: bool = False, **fields: Any) -> LMSweep:
    """Train one ensemble (kind, ratio; one member per value in `hparams` lists) on `store`, or reload it.

    settings: how every member trains (`TrainSettings`; here batch_size defaults to 4096 and steps are
    n_tokens // batch_size, so `steps` as a keyword is a ValueError); its fields given as keywords override it (seed,
    lr, batch_size, log_every, warmup_steps, decay, resample_every, ...). seed also seeds the members'
    initialisation (unless hparams gives "seed", one per member) and names the folder.
    n_tokens: training tokens (default: one pass over the store). snapshots=True keeps log-spaced weight snapshots
    in `<sweep folder>.training/` (notebook 05 tracks features across them; snapshot_steps overrides which) and lets
    a killed run resume there. A rerun with the same settings (compared after a JSON round trip) reloads the saved
    sweep; retrain=True replaces a saved sweep whose settings differ, otherwise that is a FileExistsError."""
    check_positive(ratio, "ratio", " (dictionary size / d_model)")
    cfg = _sweep_cfg(settings, fields, DEFAULT_BATCH_SIZE)
    n_tokens = int(n_tokens or store.n_tokens)
    if n_tokens < cfg.batch_size:
        raise ValueError(f"n_tokens={n_tokens} is less than one batch (batch_size={cfg.batch_size})")
    cfg = _run_cfg(cfg, n_tokens // cfg.batch_size, snapshots, fields)
    folder = sweep_dir(data_dir, store, kind, ratio, cfg.seed)
    settings_json = _settings(store, kind, ratio, hparams, n_tokens, cfg, snapshots)
    saved = saved_sweep(folder, kind, ratio, settings_json, device, retrain)
    if saved is not None:
        return saved

    # hparams may give each member its own initialisation seed ("seed": [...]); the batches follow cfg.seed
    sae = make_sae(kind, store.d, ratio=ratio, device=device, **{"seed": cfg.seed, **hparams})
    if retrain:
        shutil.rmtree(state_dir(folder), ignore_errors=True)  # another settings' unfinished state
    t0 = time.time()
    # The store itself (not an iterator over it) lets train_sae jump to any step when it resumes.
    history = train_sae(sae, store, cfg, progress=progress, state_dir=state_dir(folder))
    seconds = time.time() - t0
    s = float(sae.input_scale)  # the scale it trained at (input_scale "auto": `input_scale(store, seed)`)
    metadata = store_metadata(store)
    buf = io.StringIO()
    history.to_csv(buf, index=False)
    save_sweep(sae, folder, metadata=metadata, files={HISTORY_FILE: buf.getvalue()},
               extra={"settings": settings_json, "seconds": seconds}, overwrite=retrain)
    if not snapshots:
        shutil.rmtree(state_dir(folder), ignore_errors=True)  # only there to resume an unfinished run
    return LMSweep(folder.name, kind, float(ratio), folder, load_sweep(folder, device=device), history, s, seconds,
                   False, settings_json)


@checked
def train_revision_sae(store: ActivationStore, kind: str, ratio: float, hparams: Mapping[str, Any], *,
                       data_dir: str | os.PathLike = "data", n_tokens: int, batch_size: int = 4096,
                       snapshots: bool = False, n_even: int = 16, **kwargs: Any) -> LMSweep:
    """One SAE (kind, ratio, hparams: scalars, one member) on one revision's store, via `train_lm_sweep` (saved under
    data_dir, reused on rerun). snapshots=True also keeps its weights at `tracking_schedule(steps, n_even)` (in
    `state_dir(run.folder)`), for following features through training. kwargs: `train_lm_sweep`'s (seed, lr,
    device, progress, retrain, TrainSettings fields). Raises ValueError for lists in hparams or n_tokens under one
    batch."""
    lists = {k: v for k, v in hparams.items() if isinstance(v, (list, tuple))}
    if any(len(v) != 1 for v in lists.values()):
        raise ValueError(f"hparams must give one SAE per revision (scalars, e.g. {{'k': 16}}), got lists {lists}")
    if snapshots:
        steps = int(n_tokens) // batch_size
        if steps < 1:
            raise ValueError(f"n_tokens={n_tokens} is less than one batch (batch_size={batch_size})")
        kwargs = {**kwargs, "snapshot_steps": tracking_schedule(steps, n_even)}
    # snapshots=True keeps only a flag in the saved settings (not an absolute path), so a moved checkout reuses it.
    return train_lm_sweep(store, kind, ratio, dict(hparams), data_dir=data_dir, n_tokens=n_tokens,
                          batch_size=batch_size, snapshots=snapshots, **kwargs)


@checked
def reference_dictionary(roots: Sequence[str | os.PathLike], model: str, revision: str, hook: str, d_sae: int,
                         seed: int | None) -> Path | None:
    """Member 0 of a saved dictionary of size d_sae at (model, revision, hook) trained from another seed than
    `seed` (a sweep folder under `<root>/dictionaries/...`, the roots searched in order), or None: the reference a
    dictionary's features are compared against to ask whether they are found again (MCS)."""
    for root in roots:
        base = (resolve(root) / "dictionaries" / safe_name(model) / safe_name(revision_name(model, revision)) /
                safe_name(hook))
        for sweep in sorted(base.glob("*-r*-s*")) if base.is_dir() else []:
            member = sweep / member_name(0)
            if not (member / "cfg.json").exists() or sweep.name.rsplit("-s", 1)[-1] == str(seed):
                continue
            if int(load_json(member / "cfg.json")["d_sae"]) == d_sae:
                return member
    return None


@checked
def dictionary_seed(folder: str | os.PathLike) -> int | None:
    """The seed a dictionary folder of ours was trained from (None for one saved elsewhere)."""
    ours = load_json(resolve(folder) / "cfg.json").get("sparse_coding") or {}
    seed = (ours.get("hparams") or {}).get("seed")
    return None if seed is None else int(seed)


@checked
def sweep_settings(runs: Iterable[LMSweep]) -> dict[str, dict]:
    """{sweep name: its settings whole} (`LMSweep.settings`, what sweep.json records and a rerun compares: kind,
    ratio, hparams, seed, n_tokens, the TrainSettings fields, the store): what a notebook records about the sweeps
    it trained, passed on rather than copied by hand."""
    return {run.name: dict(run.settings) for run in runs}
