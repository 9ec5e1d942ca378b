"""Resumable state of the offline model's training: everything the loop needs to continue exactly where a killed
run stopped (weights, AdamW's moments, the data-order generator and permutation, the step, the loss history), saved
as one folder of safetensors + JSON replaced atomically, so a kill at any moment leaves either the previous state or
the new one, never half of each."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..files import atomic_dir, load_json, load_tensors, save_json, save_tensors
from ..paths import resolve

STATE_DIR = "resume"


def _flat_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors = {f"{i}.{name}": t for i, st in sd["state"].items() for name, t in st.items()}
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "state_keys": {str(i): list(st) for i, st in sd["state"].items()}}


def save_state(folder: str | os.PathLike, model: torch.nn.Module, opt: torch.optim.Optimizer,
               gen: torch.Generator, perm: torch.Tensor, loop: dict[str, Any]) -> Path:
    """Write `<folder>/resume/` whole (atomic replace). `loop`: step, cursor, history, t_train, running."""
    opt_tensors, opt_meta = _flat_optimizer(opt)
    with atomic_dir(resolve(folder) / STATE_DIR, overwrite=True) as tmp:
        save_tensors(tmp / "model.safetensors", {k: v for k, v in model.state_dict().items()})
        save_tensors(tmp / "optimizer.safetensors", opt_tensors)
        save_tensors(tmp / "data.safetensors", {"generator": gen.get_state(), "perm": perm})
        save_json(tmp / "state.json", {"loop": loop, "optimizer": opt_meta})
    return resolve(folder) / STATE_DIR


def load_state(folder: str | os.PathLike, model: torch.nn.Module, opt: torch.optim.Optimizer,
               gen: torch.Generator) -> tuple[torch.Tensor, dict[str, Any]] | None:
    """Restore what `save_state` wrote into model, opt and gen; returns (perm, loop), or None when there is no
    saved state. Raises ValueError naming the folder when the state does not fit this model."""
    d = resolve(folder) / STATE_DIR
    if not (d / "state.json").exists():
        return None
    meta = load_json(d / "state.json")
    try:
        model.load_state_dict(load_tensors(d / "model.safetensors"))
    except RuntimeError as e:
        raise ValueError(f"{d} holds the training state of a different model ({e}); delete it or retrain with "
                         "overwrite=True") from e
    flat = load_tensors(d / "optimizer.safetensors")
    state = {int(i): {name: flat[f"{i}.{name}"] for name in names}
             for i, names in meta["optimizer"]["state_keys"].items()}
    opt.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
    data = load_tensors(d / "data.safetensors")
    gen.set_state(data["generator"])
    return data["perm"], meta["loop"]
