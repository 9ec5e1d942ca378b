"""The evaluation of a sweep as one tidy table, one row per member: hyperparameters, reconstruction and sparsity
(`reconstruction.sparsity_stats`), and the spliced loss (`spliced_loss.spliced_loss`); saved beside the sweep as
CSV + safetensors and reused on rerun. `best_members` picks each kind's best member within an L0 budget."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from ..arguments import checked
from ..activations import Exclusion
from ..activations.store import ActivationStore
from ..dictionaries import LMSweep
from ..files import atomic_write_text, load_json, load_tensors, save_json, save_tensors
from ..paths import resolve
from .reconstruction import DENSE_THRESHOLD, check_sae, sparsity_stats
from .splicing import spliced_loss


EVAL_KEY = "eval_key.json"


@dataclass
class SweepEvaluation:
    """table: one row per member (hyperparameters, sparsity stats, spliced-loss numbers); feature_freq [E, d_sae]."""

    table: pd.DataFrame
    feature_freq: torch.Tensor

    def save(self, folder: str | Path, name: str = "eval", overwrite: bool = False) -> tuple[Path, Path]:
        """`<name>.csv` and `<name>_feature_freq.safetensors` in folder, both written atomically. An evaluation
        already there is replaced only when it is this sweep's (the same `sweep` column), or with overwrite=True;
        otherwise FileExistsError names the folder and both sweeps."""
        folder = resolve(folder)
        if (folder / f"{name}.csv").exists() and not overwrite:
            theirs = pd.read_csv(folder / f"{name}.csv")
            mine = set(map(str, self.table["sweep"])) if "sweep" in self.table else None
            held = set(map(str, theirs["sweep"])) if "sweep" in theirs else None
            if mine is None or held is None or mine != held:
                raise FileExistsError(f"{folder / (name + '.csv')} holds the evaluation of another sweep "
                                      f"({sorted(held) if held else 'unnamed'}, this one: "
                                      f"{sorted(mine) if mine else 'unnamed'}); pass overwrite=True to replace it, "
                                      f"or save under another name or folder")
        csv = atomic_write_text(folder / f"{name}.csv", self.table.to_csv(index=False))
        freq = save_tensors(folder / f"{name}_feature_freq.safetensors", {"feature_freq": self.feature_freq})
        return csv, freq

    @staticmethod
    def load(folder: str | Path, name: str = "eval") -> "SweepEvaluation":
        folder = resolve(folder)
        return SweepEvaluation(pd.read_csv(folder / f"{name}.csv"),
                               load_tensors(folder / f"{name}_feature_freq.safetensors")["feature_freq"])


def _hparam_columns(sae: Any) -> pd.DataFrame:
    """Per-member hyperparameters as columns (scalars only, so the CSV stays flat), plus kind, d_in, d_sae."""
    E = int(sae.n_members)
    hp = list(getattr(sae, "hparams", None) or [{} for _ in range(E)])
    if len(hp) != E:
        raise ValueError(f"sae.hparams has {len(hp)} entries for {E} members")
    rows = []
    for i, h in enumerate(hp):
        row = {"member": i, "kind": getattr(sae, "kind", type(sae).__name__),
               "d_in": int(sae.d_in), "d_sae": int(sae.d_sae)}
        for k, v in dict(h).items():
            if isinstance(v, (bool, int, float, str, np.integer, np.floating)) and k not in row:
                row[k] = v
        rows.append(row)
    return pd.DataFrame(rows)


@checked
def evaluate_sweep(model: torch.nn.Module | None, sae: Any, batches: Iterable[torch.Tensor], tokens: torch.Tensor | None,
                   hook_name: str, *, max_tokens: int | None = None, batch_size: int = 8,
                   ablations: Sequence[str] = ("zero", "mean"), mean_act: torch.Tensor | None = None,
                   keep_first_position: bool = False, dense_threshold: float = DENSE_THRESHOLD,
                   input_scale: float = 1.0, exclude: Exclusion | None = None,
                   progress: bool = True) -> SweepEvaluation:
    """The whole evaluation of one sweep: hyperparameters + `sparsity_stats` on `batches` + `spliced_loss` on
    `tokens`, joined into one tidy table (one row per member, CSV-ready). tokens=None (or model=None) skips the
    language-model part; exclude: positions left out of the SAE's inputs (the store's `exclusion`), kept clean and
    unscored in the spliced loss. See those functions for each column's meaning."""
    check_sae(sae)
    stats, freq = sparsity_stats(sae, batches, max_tokens, dense_threshold=dense_threshold,
                                 input_scale=input_scale, progress=progress)
    table = _hparam_columns(sae).merge(stats, on="member")
    if tokens is not None and model is not None:
        loss = spliced_loss(model, tokens, hook_name, sae, batch_size=batch_size, ablations=ablations,
                            mean_act=mean_act, keep_first_position=keep_first_position, input_scale=input_scale,
                            exclude=exclude, progress=progress)
        table = table.merge(loss, on="member", how="left")
    table.insert(1, "hook_name", hook_name)
    table.attrs["dense_threshold"] = dense_threshold
    return SweepEvaluation(table, freq)


def evaluation_key(store: ActivationStore, tokens: torch.Tensor | None, **settings: Any) -> str:
    """sha256 of what an evaluation of a sweep reads: the store (its manifest: chunk checksums, exclusion, model_id),
    the token contexts of the spliced loss (their bytes) and the evaluation's settings. A cached evaluation is
    reused only under the same key (content, not the file's age or name)."""
    h = hashlib.sha256(json.dumps({"manifest": store.manifest, "settings": settings}, sort_keys=True,
                                  default=str).encode())
    if tokens is not None:
        h.update(str(tuple(tokens.shape)).encode())
        h.update(tokens.detach().to("cpu", torch.long).contiguous().numpy().tobytes())
    return h.hexdigest()


@checked
def evaluate_lm_sweep(model: torch.nn.Module | None, run: LMSweep, store: ActivationStore, tokens: torch.Tensor | None, *,
                      n_eval_tokens: int = 65536, batch_size: int = 8, seed: int = 1, progress: bool = True,
                      reuse: bool = True) -> SweepEvaluation:
    """`evaluate_sweep` for a trained sweep (a dictionaries.LMSweep), cached as eval.csv in its folder, reused when
    the sweep was not retrained and the evaluation would read the same content (`evaluation_key`, kept in
    eval_key.json). FVU/L0 use `n_eval_tokens` rows of the store in an order unlike training's."""
    key = evaluation_key(store, tokens, n_eval_tokens=n_eval_tokens, batch_size=batch_size, seed=seed)
    key_file = run.folder / EVAL_KEY
    if reuse and run.reused and (run.folder / "eval.csv").exists() and key_file.exists() \
            and load_json(key_file).get("key") == key:
        return SweepEvaluation.load(run.folder)
    batches = store.batches(4096, seed=seed + 1000, device=run.sae.device)
    ev = evaluate_sweep(model, run.sae, batches, tokens, str(store.manifest["hook"]), max_tokens=n_eval_tokens,
                        batch_size=batch_size, exclude=store.exclusion, progress=progress)
    ev.table.insert(1, "sweep", run.name)
    ev.table.insert(2, "ratio", run.ratio)
    ev.table["train_seconds"] = run.seconds
    ev.save(run.folder)
    save_json(key_file, {"key": key})  # after the evaluation: a run killed in between recomputes it
    return ev


@checked
def best_members(table: pd.DataFrame, l0_budget: float) -> pd.DataFrame:
    """Per kind, the member with the lowest FVU among those with L0 <= l0_budget (the sparsest member if none
    is that sparse): one row per kind, indexed by kind. Members whose FVU or L0 is NaN (not measured, e.g. a
    diverged run) are never picked. Raises ValueError for a table without rows or without the kind, l0 and fvu
    columns, or a kind none of whose members has both numbers."""
    missing = [c for c in ("kind", "l0", "fvu") if c not in table.columns]
    if missing or not len(table):
        raise ValueError(f"table must be a sweep evaluation (evaluate_sweep(...).table) with rows and the columns "
                         f"kind, l0 and fvu; got {len(table)} rows" + (f", missing {missing}" if missing else ""))
    rows = []
    for kind, sub in table.groupby("kind", sort=False):
        # an unmeasured FVU is not a low one (idxmin skips NaN, and fails outright when all of them are NaN)
        sub = sub[sub["fvu"].notna() & sub["l0"].notna()]
        if not len(sub):
            raise ValueError(f"kind {kind!r} has no member with both fvu and l0 measured (all NaN): evaluate it "
                             f"again, or drop the kind from the table")
        ok = sub[sub["l0"] <= l0_budget]
        rows.append(ok.loc[ok["fvu"].idxmin()] if len(ok) else sub.loc[sub["l0"].idxmin()])
    return pd.DataFrame(rows).set_index("kind", drop=False)
