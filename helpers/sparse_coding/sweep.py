"""SAE sweeps on harvested language-model activations (notebooks 03-05).

A sweep is one ensemble: one SAE kind at one dictionary ratio, one member per hyperparameter value, all trained on
the same shuffled batches of one activation store. It is saved in SAELens's layout under
`<data_dir>/dictionaries/<model>/<revision>/<hook>/<kind>-r<ratio>-s<seed>/` with its training log, and a rerun
with the same settings reuses it instead of training again (so a notebook can be re-executed cheaply); different
settings for an existing folder are an error rather than a silent overwrite.

Inputs are normalised so that E||s x||^2 = d_in during training (one scale per store, estimated on a seeded sample);
the scale is folded into the saved weights, so a loaded sweep takes raw activations."""

from __future__ import annotations

import io as _io
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch

from . import evaluate
from .activations import ActivationStore, safe_name
from .paths import resolve
from .sae import make_sae
from .sae_io import SWEEP_FILE, load_sweep, save_sweep, sweep_info
from .train import estimate_input_scale, train_sae

HISTORY_FILE = "history.csv"


def sweep_name(kind: str, ratio: float, seed: int) -> str:
    return f"{kind}-r{ratio:g}-s{seed}"


def checkpoint_dir(folder: Path) -> Path:
    """Where a sweep's training snapshots live: beside the sweep folder, which is written whole at the end."""
    return folder.with_name(folder.name + ".checkpoints")


def sweep_dir(data_dir: str | os.PathLike, store: ActivationStore, kind: str, ratio: float, seed: int) -> Path:
    m = store.manifest
    return (resolve(data_dir) / "dictionaries" / safe_name(str(m["model"])) / safe_name(str(m["revision"]))
            / safe_name(str(m["hook"])) / sweep_name(kind, ratio, seed))


def input_scale(store: ActivationStore, seed: int = 0) -> float:
    """s with E||s x||^2 = d_in, from 16 seeded batches of 4096 rows: SAE hyperparameters (L1 coefficient,
    learning rate) then mean the same at every layer and on every model, whatever the raw activation norm."""
    return estimate_input_scale(store, n_batches=16, batch_size=4096, seed=seed)


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
                   progress: bool = True, log_every: int = 50, retrain: bool = False, checkpoints: bool = False,
                   **train_kwargs: Any) -> LMSweep:
    """Train one ensemble (kind, ratio; one member per value in `hparams` lists) on `store`, or reload it.

    n_tokens: training tokens (default: one pass over the store). train_kwargs go to `train.train_sae`
    (warmup_steps, decay, resample_every, ...). checkpoints=True keeps log-spaced training snapshots in
    `<sweep folder>.checkpoints/` (notebook 05 tracks features across them) and lets a killed run resume there.
    retrain=True replaces a saved sweep whose settings differ; otherwise that is an error."""
    if not isinstance(ratio, (int, float)) or ratio <= 0:
        raise ValueError(f"ratio must be > 0 (dictionary size / d_model), got {ratio!r}")
    n_tokens = int(n_tokens or store.n_tokens)
    if n_tokens < batch_size:
        raise ValueError(f"n_tokens={n_tokens} is less than one batch (batch_size={batch_size})")
    folder = sweep_dir(data_dir, store, kind, ratio, seed)
    settings = _settings(store, kind, ratio, hparams, seed, n_tokens, batch_size, lr, train_kwargs)
    settings["checkpoints"] = bool(checkpoints)
    if (folder / SWEEP_FILE).exists():
        saved = sweep_info(folder)
        if saved.get("settings") == settings:
            history = pd.read_csv(folder / HISTORY_FILE) if (folder / HISTORY_FILE).exists() else pd.DataFrame()
            return LMSweep(folder.name, kind, float(ratio), folder, load_sweep(folder, device=device), history,
                           float(saved["input_scale"]), float(saved.get("seconds", float("nan"))), True, settings)
        if not retrain:
            raise FileExistsError(f"{folder} holds a sweep trained with other settings; pass retrain=True to "
                                  f"replace it, or use another data_dir")

    s = input_scale(store, seed=seed)
    sae = make_sae(kind, store.d, ratio=ratio, seed=seed, device=device, **hparams)
    if checkpoints:
        train_kwargs.setdefault("checkpoint_dir", checkpoint_dir(folder))
        train_kwargs.setdefault("checkpoint_steps", "log")
    t0 = time.time()
    # The store itself (not an iterator over it) lets train_sae jump to any step when it resumes.
    history = train_sae(sae, store, steps=n_tokens // batch_size, lr=lr, batch_size=batch_size, input_scale=s,
                        progress=progress, log_every=log_every, seed=seed, **train_kwargs)
    seconds = time.time() - t0
    m = store.manifest
    metadata = {"model_name": str(m["model"]), "revision": str(m["revision"]), "hook_name": str(m["hook"]),
                "context_size": int(store.ctx_len), "dataset_path": str(m.get("corpus", ""))}
    buf = _io.StringIO()
    history.to_csv(buf, index=False)
    save_sweep(sae, folder, input_scale=s, metadata=metadata, files={HISTORY_FILE: buf.getvalue()},
               extra={"settings": settings, "seconds": seconds}, overwrite=retrain)
    return LMSweep(folder.name, kind, float(ratio), folder, load_sweep(folder, device=device), history, s, seconds,
                   False, settings)


def evaluate_lm_sweep(model: Any, run: LMSweep, store: ActivationStore, tokens: torch.Tensor | None, *,
                      n_eval_tokens: int = 65536, batch_size: int = 8, seed: int = 1, progress: bool = True,
                      reuse: bool = True) -> evaluate.SweepEvaluation:
    """evaluate.evaluate_sweep for a trained sweep, cached as eval.csv in its folder (reused when present and the
    sweep was not retrained). FVU/L0 use `n_eval_tokens` rows of the store in an order unlike training's."""
    if reuse and run.reused and (run.folder / "eval.csv").exists():
        return evaluate.SweepEvaluation.load(run.folder)
    batches = store.batches(4096, seed=seed + 1000, device=run.sae.device)
    ev = evaluate.evaluate_sweep(model, run.sae, batches, tokens, str(store.manifest["hook"]),
                                 max_tokens=n_eval_tokens, batch_size=batch_size, progress=progress)
    ev.table.insert(1, "sweep", run.name)
    ev.table.insert(2, "ratio", run.ratio)
    ev.table["train_seconds"] = run.seconds
    ev.save(run.folder)
    return ev


def model_source(model: str, data_dir: str | os.PathLike = "data") -> str:
    """What lm.load_model takes: the offline model's folder for "offline", else the hub name as given."""
    from . import lm

    return str(lm.offline_dir(data_dir)) if model == "offline" else model


def ensure_activations(tl: Any, model: str, revision: str, hook: str, n_tokens: int, *,
                       data_dir: str | os.PathLike = "data", ctx_len: int = 128, batch_size: int = 32,
                       chunk_rows: int = 131072, seed: int = 0, progress: bool = True) -> ActivationStore:
    """The activation store for (model, revision, hook), harvested now if it is missing or short; an existing
    harvest of at least n_tokens is reused as is (also one made by notebook 02 with every layer)."""
    from . import activations, lm

    folder = activations.hook_folder(resolve(data_dir) / "activations", model, revision, hook)
    if (folder / activations.MANIFEST).exists():
        store = ActivationStore(folder)
        if store.manifest.get("complete") and store.n_tokens >= n_tokens:
            return store
    lm.check_hooks(tl, [hook])
    ctxs = training_contexts(tl, model, data_dir=data_dir, ctx_len=ctx_len)
    activations.harvest(tl, ctxs, [hook], n_tokens=n_tokens, out_root=resolve(data_dir) / "activations",
                        model_name=model, revision=revision, chunk_rows=chunk_rows, batch_size=batch_size,
                        corpus="stdlib", seed=seed, progress=progress)
    return ActivationStore(folder)


def training_contexts(tl: Any, model: str, *, data_dir: str | os.PathLike = "data", ctx_len: int = 128,
                      split: str = "train") -> torch.Tensor:
    """Token contexts to harvest (split="train") or to measure the spliced loss on (split="val"): the offline
    model's own tokenized splits, or the standard library tokenized with a hub model's tokenizer."""
    from . import corpus, lm

    if model == "offline":
        return lm.validation_contexts(lm.offline_dir(data_dir), split=split)
    c = corpus.load_corpus("stdlib")
    return corpus.contexts(corpus.tokenize(c.train if split == "train" else c.val, tl.tokenizer), ctx_len)


def best_members(table: pd.DataFrame, l0_budget: float) -> pd.DataFrame:
    """Per kind, the member with the lowest FVU among those with L0 <= l0_budget (the sparsest member if none
    is that sparse): one row per kind, indexed by kind."""
    rows = []
    for kind, sub in table.groupby("kind", sort=False):
        ok = sub[sub["l0"] <= l0_budget]
        rows.append(ok.loc[ok["fvu"].idxmin()] if len(ok) else sub.loc[sub["l0"].idxmin()])
    return pd.DataFrame(rows).set_index("kind", drop=False)


def fvu_vs_reference(table: pd.DataFrame, kind: str, reference: str = "relu") -> float:
    """Mean log2 ratio of `kind`'s FVU to `reference`'s FVU interpolated (in log-log) at the same L0, over the
    kind's members inside the reference's L0 range: < 0 means kind's frontier lies below. NaN if no overlap."""
    ref = table[table["kind"] == reference].sort_values("l0")
    sub = table[table["kind"] == kind]
    if len(ref) < 2 or not len(sub):
        return float("nan")
    lx, ly = np.log(ref["l0"].to_numpy()), np.log(ref["fvu"].to_numpy())
    inside = sub[(sub["l0"] >= ref["l0"].min()) & (sub["l0"] <= ref["l0"].max())]
    if not len(inside):
        return float("nan")
    ref_at = np.interp(np.log(inside["l0"].to_numpy()), lx, ly)
    return float(np.mean((np.log(inside["fvu"].to_numpy()) - ref_at) / np.log(2)))


def frontier_metrics(table: pd.DataFrame, best: pd.DataFrame, l0_budget: float | None = None) -> dict[str, Any]:
    """The notebook-03 metrics: per kind best_<kind>_fvu / _l0 / _loss_recovered / _spliced_perplexity, the
    frontier comparison against ReLU + L1, max_dead_fraction, and clean vs spliced perplexity of the sweep's best
    SAE: the lowest FVU among the kinds' best members within `l0_budget` (among all of them if none is), named in
    spliced_perplexity_sweep / _member. Each kind's own spliced perplexity is in best_<kind>_spliced_perplexity."""
    out: dict[str, Any] = {}
    for kind, row in best.iterrows():
        out[f"best_{kind}_fvu"] = float(row["fvu"])
        out[f"best_{kind}_l0"] = float(row["l0"])
        out[f"best_{kind}_loss_recovered"] = float(row.get("loss_recovered", float("nan")))
        out[f"best_{kind}_spliced_perplexity"] = float(row.get("ppl_spliced", float("nan")))
        if kind != "relu" and "relu" in best.index:
            out[f"{kind}_log2_fvu_vs_relu_at_same_l0"] = fvu_vs_reference(table, kind)
    out["max_dead_fraction"] = float(table["dead_frac"].max())
    out["clean_perplexity"] = float(table["ppl_clean"].iloc[0]) if "ppl_clean" in table else float("nan")
    within = best[best["l0"] <= l0_budget] if l0_budget is not None else best
    within = within if len(within) else best
    ref = within.loc[within["fvu"].idxmin()] if "fvu" in within and within["fvu"].notna().any() else best.iloc[0]
    out["spliced_perplexity"] = float(ref.get("ppl_spliced", float("nan")))
    out["spliced_perplexity_kind"] = str(ref.get("kind", ""))
    if "sweep" in ref and "member" in ref:
        out["spliced_perplexity_sweep"], out["spliced_perplexity_member"] = str(ref["sweep"]), int(ref["member"])
    return out
