"""What a training run leaves on disk: the full state to resume from, and weight snapshots to track features across
training.

A state folder holds

    state.safetensors            the latest full training state (weights, firing counters, Adam moments and step,
                                 RNG states); its JSON metadata carries the step, data position, settings and log
    snapshots/step-00000064.safetensors   the ensemble's weights (W_enc, b_enc, W_dec, b_dec, tokens_since_fired)
                                 after that many optimizer steps; step 0 is the initialisation
    training.json                an index: which snapshots exist, the latest full-state step, the settings

Why the split: resuming needs everything (Adam's moments are twice the weights), tracking needs only weights at
log-spaced steps. So the full state is kept once (the latest, replaced in place) and every snapshot is kept, at a
third of the size. Each file is one safetensors file written atomically, so weights and the JSON that describes them
never disagree and a killed write leaves the previous file intact.

Snapshot weights are in training units: when inputs were scaled by `input_scale` the snapshot is the SAE of the
scaled inputs; `load_snapshot(..., fold=True)` gives the weights for raw inputs (as dictionaries.saelens_io saves)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors import safe_open

from ...arguments import checked
from ...files import canonical, load_tensors, save_json, save_tensors
from ...paths import resolve
from ..base import EnsembleSAE, fold_input_scale
from .optim import load_optimizer, optimizer_tensors

STATE_FILE = "state.safetensors"
SNAPSHOT_DIR = "snapshots"
INDEX_FILE = "training.json"
FORMAT_VERSION = 1
_SNAP_RE = re.compile(r"^step-(\d+)\.safetensors$")


def _intact(p: torch.Tensor, log: bool) -> bool:
    """Whether parameter p holds no damage (NaN, inf). In a log parameter (the kind's `log_params`) -inf is log 0,
    which exp() maps back to exactly 0 and which Adam leaves alone (its gradient is 0)."""
    if log:
        return not bool((p.isnan() | (p == float("inf"))).any())
    return bool(torch.isfinite(p).all())


class TrainingDiverged(FloatingPointError):
    """A loss became NaN or inf during training (the message says where and which saved state is intact)."""


# ---------------------------------------------------------------------------------------------------- files

def snapshot_path(folder: str | os.PathLike, step: int) -> Path:
    return resolve(folder) / SNAPSHOT_DIR / f"step-{int(step):08d}.safetensors"


@checked
def snapshot_steps(folder: str | os.PathLike) -> list[int]:
    """Steps with a weight snapshot, ascending."""
    d = resolve(folder) / SNAPSHOT_DIR
    if not d.is_dir():
        return []
    return sorted(int(m.group(1)) for p in d.iterdir() if (m := _SNAP_RE.match(p.name)))


def _read(path: Path, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
    if header.get("format") != str(FORMAT_VERSION) or "meta" not in header:
        raise ValueError(f"{path} is not a training file of format {FORMAT_VERSION}; delete it or pass resume=False")
    return load_tensors(path, device=device), json.loads(header["meta"])


def load_state(folder: str | os.PathLike, device: str | torch.device = "cpu"
               ) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """(tensors, meta) of the latest full state, or None when the folder has none."""
    path = resolve(folder) / STATE_FILE
    if not path.exists():
        return None
    try:
        return _read(path, device)
    except ValueError as e:
        raise ValueError(f"{path} could not be read ({e}); delete it to start over, or pass resume=False") from e


@checked
def load_snapshot(folder: str | os.PathLike, step: int, fold: bool = False,
                  device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The ensemble's weights at `step` ({W_enc, b_enc, W_dec, b_dec, tokens_since_fired}, member axis first).
    fold=True folds the training input scale in (weights for raw activations, as saelens_io saves them)."""
    path = snapshot_path(folder, step)
    if not path.exists():
        raise ValueError(f"no snapshot for step={step} in {folder}; available steps: {snapshot_steps(folder)}")
    t, meta = _read(path, device)
    return fold_input_scale(t, float(meta.get("input_scale", 1.0))) if fold else t


@checked
def load_decoder_trajectory(folder: str | os.PathLike, member: int = 0) -> tuple[list[int], torch.Tensor]:
    """(steps, W_dec [T, d_sae, d_in]) of one member across every snapshot: the input of analyses.track_training."""
    steps = snapshot_steps(folder)
    if not steps:
        raise ValueError(f"{folder} holds no snapshots; train with state_dir=... and snapshot_steps='log'")
    return steps, torch.stack([load_snapshot(folder, s)["W_dec"][member] for s in steps])


# ---------------------------------------------------------------------------------------------------- one run

class TrainingState:
    """The state folder of one run: resume from it, and save weights (at `snapshot_at`) and the full state (there,
    every `state_every` steps and at the end). What is saved and restored: the SAE's weights and buffers, Adam's
    state, the batch source's position and the resampling generators."""

    def __init__(self, folder: str | os.PathLike, sae: EnsembleSAE, opt: torch.optim.Optimizer, source: Any,
                 generators: Sequence[torch.Generator], settings: Mapping[str, Any], input_scale: float,
                 snapshot_at: set[int], state_every: int | None, steps: int):
        self.folder, self.sae, self.opt, self.source = resolve(folder), sae, opt, source
        self.generators, self.settings, self.input_scale = list(generators), dict(settings), float(input_scale)
        self.snapshot_at, self.state_every, self.steps = snapshot_at, state_every, steps
        self.last_good: int | None = None

    def describe_last_good(self) -> str:
        if self.last_good is None:
            return "no training state was written"
        return f"the last good training state ({self.folder / STATE_FILE}, step {self.last_good}) is intact"

    def resume(self) -> dict[str, Any] | None:
        """Restore the SAE, optimizer, data position and generators from the saved state and return its meta (step,
        counters, log), or None when there is none. Raises ValueError when the state has other settings."""
        loaded = load_state(self.folder, device=self.sae.device)
        if loaded is None:
            return None
        tensors, meta = loaded
        ours = canonical({"config": self.sae.config, "settings": self.settings})
        diff = [f"{part}.{k}" for part in ours for k in sorted(set(ours[part]) | set(meta[part]))
                if ours[part].get(k) != meta[part].get(k) and not (k == "input_scale" and _close(ours[part].get(k),
                                                                                              meta[part].get(k)))]
        if canonical(self.sae.hparams) != meta["hparams"]:
            diff.append("hparams")
        if diff:
            raise ValueError(f"{self.folder} holds a run with other settings ({', '.join(diff)}); pass resume=False "
                             f"to start over there, or use another state_dir")
        # The saved run's scale: an SAE reloaded from a save of this run gets it back from its decoder rows, equal
        # to the estimate up to the last bits (`training.rescale`), and the saved weights are in the saved scale.
        scale = float(meta["settings"].get("input_scale", self.input_scale))
        self.input_scale = self.settings["input_scale"] = self.sae.input_scale = scale
        with torch.no_grad():
            for name, t in self.sae.state_dict().items():
                t.copy_(tensors[f"sae.{name}"])
        load_optimizer(self.opt, self.sae, tensors, meta["param_groups"])
        self.source.restore({k: v.cpu() for k, v in tensors.items()}, int(meta["step"]))
        for m, g in enumerate(self.generators):
            g.set_state(tensors["rng.resample"][m].cpu().clone())
        self.last_good = int(meta["step"])
        return meta

    def due(self, done: int) -> bool:
        return done in self.snapshot_at or done == self.steps or bool(self.state_every and done % self.state_every == 0)

    def save(self, done: int, progress: Mapping[str, Any]) -> None:
        """Write the snapshot of step `done` (if one is due) and the full state with `progress` (JSON-able)."""
        if not all(_intact(p, name in self.sae.log_params) for name, p in self.sae.named_parameters()):
            raise TrainingDiverged(f"weights are NaN/inf after step {done}; nothing was written, {self.folder} keeps "
                                   f"the state of step {self.last_good}")
        weights = dict(self.sae.state_dict())
        meta = {"input_scale": self.input_scale, "config": self.sae.config, "hparams": self.sae.hparams}
        if done in self.snapshot_at:
            save_tensors(snapshot_path(self.folder, done), weights,
                         {"format": str(FORMAT_VERSION), "meta": json.dumps(canonical({"step": done, **meta}))})
        tensors = {f"sae.{k}": v for k, v in weights.items()}
        opt_tensors, groups = optimizer_tensors(self.opt, self.sae)
        tensors.update(opt_tensors)
        tensors.update(self.source.state())
        if self.generators:
            tensors["rng.resample"] = torch.stack([g.get_state() for g in self.generators])
        full = canonical({**meta, "step": done, "settings": self.settings, "param_groups": groups, **progress})
        save_tensors(self.folder / STATE_FILE, tensors, {"format": str(FORMAT_VERSION), "meta": json.dumps(full)})
        save_json(self.folder / INDEX_FILE, {"format": FORMAT_VERSION, "latest_state_step": done,
                                             "snapshots": snapshot_steps(self.folder), "settings": self.settings,
                                             "input_scale": self.input_scale})
        self.last_good = done


def _close(a: Any, b: Any, rel: float = 1e-6) -> bool:
    """Two input scales equal to float rounding (an estimate against the same scale recovered from saved weights)."""
    return isinstance(a, (int, float)) and isinstance(b, (int, float)) and abs(a - b) <= rel * max(abs(a), abs(b))

