"""Training checkpoints: the full state to resume from, and weight snapshots to track features across training.

A checkpoint folder holds

    state.safetensors            the latest full training state (weights, firing counters, Adam moments and step,
                                 RNG states); its JSON metadata carries the step, data position, settings and log
    snapshots/step-00000064.safetensors   the ensemble's weights (W_enc, b_enc, W_dec, b_dec, tokens_since_fired)
                                 after that many optimizer steps; step 0 is the initialisation
    checkpoints.json             an index: which snapshots exist, the latest full-state step, the settings

Why the split: resuming needs everything (Adam's moments are twice the weights), tracking needs only weights at
log-spaced steps. So the full state is kept once (the latest, replaced in place) and every snapshot is kept, at a
third of the size. Each file is one safetensors file written to a temporary name and renamed, so weights and the
JSON that describes them can never disagree and a killed write leaves the previous file intact.

Snapshot weights are in training units: when inputs were scaled by `input_scale` (see train.estimate_input_scale)
the snapshot is the SAE of the scaled inputs. Directions (what tracking compares) are the same either way;
`load_snapshot(..., fold=True)` folds the scale in the way sae_io does on save."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open

from .io import load_tensors, save_json, save_tensors

STATE_FILE = "state.safetensors"
SNAPSHOT_DIR = "snapshots"
INDEX_FILE = "checkpoints.json"
FORMAT_VERSION = 1
_SNAP_RE = re.compile(r"^step-(\d+)\.safetensors$")


def snapshot_path(folder: str | os.PathLike, step: int) -> Path:
    return Path(folder) / SNAPSHOT_DIR / f"step-{int(step):08d}.safetensors"


def save_state(folder: str | os.PathLike, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Path:
    """Write the full training state atomically (one file: tensors + JSON metadata)."""
    return save_tensors(Path(folder) / STATE_FILE, tensors,
                        {"format": str(FORMAT_VERSION), "meta": json.dumps(meta)})


def load_state(folder: str | os.PathLike, device: str | torch.device = "cpu"
               ) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """(tensors, meta) of the latest full state, or None when the folder has none."""
    path = Path(folder) / STATE_FILE
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        tensors = load_tensors(path, device=device)
    except Exception as e:  # safetensors raises its own error types for truncated files
        raise ValueError(f"{path} could not be read ({e}); delete it to start over, or pass resume=False") from e
    if header.get("format") != str(FORMAT_VERSION) or "meta" not in header:
        raise ValueError(f"{path} is not a training state of format {FORMAT_VERSION}; delete it or pass resume=False")
    return tensors, json.loads(header["meta"])


def save_snapshot(folder: str | os.PathLike, step: int, tensors: Mapping[str, torch.Tensor],
                  meta: Mapping[str, Any]) -> Path:
    return save_tensors(snapshot_path(folder, step), tensors,
                        {"format": str(FORMAT_VERSION), "meta": json.dumps({"step": int(step), **meta})})


def write_index(folder: str | os.PathLike, latest_step: int, meta: Mapping[str, Any]) -> Path:
    return save_json(Path(folder) / INDEX_FILE, {"format": FORMAT_VERSION, "latest_state_step": int(latest_step),
                                                 "snapshots": snapshot_steps(folder), **meta})


def snapshot_steps(folder: str | os.PathLike) -> list[int]:
    """Steps with a weight snapshot, ascending."""
    d = Path(folder) / SNAPSHOT_DIR
    if not d.is_dir():
        return []
    return sorted(int(m.group(1)) for p in d.iterdir() if (m := _SNAP_RE.match(p.name)))


def load_snapshot(folder: str | os.PathLike, step: int, fold: bool = False,
                  device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The ensemble's weights at `step` ({W_enc, b_enc, W_dec, b_dec, tokens_since_fired}, member axis first).
    fold=True folds the training input scale in (weights for raw activations, as sae_io saves them)."""
    path = snapshot_path(folder, step)
    if not path.exists():
        raise ValueError(f"no snapshot for step={step} in {folder}; available steps: {snapshot_steps(folder)}")
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("meta", "{}"))
    t = load_tensors(path, device=device)
    s = float(meta.get("input_scale", 1.0))
    if fold and s != 1.0:
        if "W_enc" in t:
            t["W_enc"] = t["W_enc"] * s
        t["W_dec"], t["b_dec"] = t["W_dec"] / s, t["b_dec"] / s
    return t


def load_decoder_trajectory(folder: str | os.PathLike, member: int = 0) -> tuple[list[int], torch.Tensor]:
    """(steps, W_dec [T, d_sae, d_in]) of one member across every snapshot: the input of tracking.track_training."""
    steps = snapshot_steps(folder)
    if not steps:
        raise ValueError(f"{folder} holds no snapshots; train with checkpoint_dir=... and checkpoint_steps='log'")
    return steps, torch.stack([load_snapshot(folder, s)["W_dec"][member] for s in steps])
