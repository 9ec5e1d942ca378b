"""Sweeps trained on token contexts through the model (notebook 08): one ensemble per (kind, loss, ratio, seed),
one member per sparsity value, every member on the same contexts, for each of the losses "local", "e2e" and
"e2e+ds" (`TrainSettings.loss`; Braun et al. 2024, arXiv 2405.12241). A local sweep here reads the activations of
the very contexts the e2e sweeps splice into (computed on the fly), so the kinds differ in their loss alone.

Saved in SAELens's layout under `<data_dir>/dictionaries/<model>/<revision>/<hook>/e2e/<kind>-<loss>-r<ratio>-s<seed>/`
(cfg.json's metadata records the loss), reused by a rerun with the same settings like `train_lm_sweep`'s."""

from __future__ import annotations

import io
import os
import shutil
import time
from pathlib import Path
from typing import Any, Mapping

import torch

from ..activations import Exclusion, safe_name
from ..activations.layout import revision_name
from ..arguments import checked
from ..checks import check_positive
from ..files import canonical
from ..paths import resolve
from .factory import make_sae
from .saelens_io import load_sweep, save_sweep
from .sweep import HISTORY_FILE, LMSweep, _run_cfg, _sweep_cfg, saved_sweep, state_dir
from .training import TrainSettings, train_sae
from .training.e2e import DEFAULT_BATCH_TOKENS, SplicedObjective, check_contexts

# Sweeps trained on contexts live apart from the store-trained ones, so `reference_dictionary` never takes one.
E2E_SUBDIR = "e2e"


@checked
def e2e_sweep_dir(data_dir: str | os.PathLike, model_name: str, revision: str, hook_name: str, kind: str, loss: str,
                  ratio: float, seed: int) -> Path:
    """``<data_dir>/dictionaries/<model>/<revision>/<hook>/e2e/<kind>-<loss>-r<ratio>-s<seed>`` ("e2e+ds" is
    spelt "e2e-ds" in the name)."""
    return (resolve(data_dir) / "dictionaries" / safe_name(model_name) / safe_name(revision_name(model_name, revision))
            / safe_name(hook_name) / E2E_SUBDIR / f"{kind}-{loss.replace('+', '-')}-r{ratio:g}-s{seed}")


@checked
def train_e2e_sweep(model: torch.nn.Module, tokens: torch.Tensor, hook_name: str, kind: str, ratio: float,
                    hparams: Mapping[str, Any], settings: TrainSettings | None = None, *, model_name: str,
                    revision: str = "final", data_dir: str | os.PathLike = "data", n_tokens: int,
                    exclude: Exclusion | None = None, device: str | torch.device = "cpu", progress: bool = True,
                    retrain: bool = False, snapshots: bool = False, **fields: Any) -> LMSweep:
    """Train one ensemble (one member per value in `hparams` lists) with `settings.loss` on token contexts, or
    reload it.

    hparams: the kind's hyperparameters, lists for one member each; "seed" (a list) gives members their own
    initialisation (default: every member from the settings' seed, which also orders the batches).
    tokens: training contexts [n_contexts, ctx_len] (integer ids; e.g. `lm.model_contexts(..., split="train")`);
    n_tokens: training tokens (steps = n_tokens // batch_size, batch_size in tokens, default 4096, rounded down to
    whole contexts). settings / fields: `TrainSettings` (loss "local", "e2e" or "e2e+ds", kl_coef,
    downstream_coef, lr, seed, warmup_steps, ...). model_name / revision name the folder and the metadata.
    exclude: positions left out of the SAE's inputs and the loss (as the harvest of this hook recorded them).
    A rerun with the same settings and contexts reloads the saved sweep; retrain=True replaces one trained with
    other settings (else FileExistsError). Raises ValueError for float tokens, fewer than one batch, or `steps` as
    a keyword (steps are n_tokens // batch_size)."""
    check_positive(ratio, "ratio", " (dictionary size / d_model)")
    tokens = check_contexts(model, tokens)
    cfg = _sweep_cfg(settings, fields, DEFAULT_BATCH_TOKENS)
    per_step = (cfg.batch_size // tokens.shape[1]) * tokens.shape[1]
    if per_step < 1 or n_tokens < per_step:
        raise ValueError(f"n_tokens={n_tokens} is less than one batch ({max(per_step, cfg.batch_size)} tokens of "
                         f"whole {tokens.shape[1]}-token contexts)")
    cfg = _run_cfg(cfg, n_tokens // per_step, snapshots, fields)
    folder = e2e_sweep_dir(data_dir, model_name, revision, hook_name, kind, cfg.loss, ratio, cfg.seed)
    settings_json = canonical({
        "kind": kind, "ratio": float(ratio), "loss": cfg.loss, "seed": cfg.seed, "n_tokens": int(n_tokens),
        "hparams": {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in hparams.items()},
        "train": {**cfg.resume_key(), **{k: getattr(cfg, k) for k in ("loss", "kl_coef", "downstream_coef")}},
        "snapshots": bool(snapshots), "model": model_name, "revision": revision, "hook": hook_name,
        "contexts": list(tokens.shape), "tokens_sum": int(tokens.sum()),
        "exclude": (exclude or Exclusion()).to_json()})
    saved = saved_sweep(folder, kind, ratio, settings_json, device, retrain)
    if saved is not None:
        return saved
    objective = SplicedObjective(model, hook_name, tokens, cfg.batch_size, cfg.seed, cfg.loss, exclude)
    # hparams may give each member its own initialisation seed ("seed": [...]); the batches follow cfg.seed
    init = {"seed": cfg.seed, **hparams}
    sae = make_sae(kind, int(objective(0).shape[1]), ratio=ratio, device=device, **init)
    if retrain:
        shutil.rmtree(state_dir(folder), ignore_errors=True)
    t0 = time.time()
    if cfg.loss == "local":  # the same contexts' activations, read on the fly: the kinds differ in their loss only
        history = train_sae(sae, objective, cfg, progress=progress, state_dir=state_dir(folder))
    else:
        history = train_sae(sae, tokens, cfg, progress=progress, state_dir=state_dir(folder), model=model,
                            hook_name=hook_name, exclude=exclude)
    seconds = time.time() - t0
    metadata = {"model_name": model_name, "revision": revision, "hook_name": hook_name,
                "context_size": int(tokens.shape[1]), "loss": cfg.loss}
    if exclude:
        metadata["exclude"] = exclude.to_json()
    buf = io.StringIO()
    history.to_csv(buf, index=False)
    s = float(sae.input_scale)
    save_sweep(sae, folder, metadata=metadata, files={HISTORY_FILE: buf.getvalue()},
               extra={"settings": settings_json, "seconds": seconds}, overwrite=retrain)
    if not snapshots:
        shutil.rmtree(state_dir(folder), ignore_errors=True)
    return LMSweep(folder.name, kind, float(ratio), folder, load_sweep(folder, device=device), history, s, seconds,
                   False, settings_json)
