"""The recipe of notebook 03's best SAE, shared by notebooks 06 and 07: read it back, train it again on another
store (another layer, the step-0 model, another seed), and the paper's residual-stream recipe beside it
(Cunningham et al. 2023, arXiv 2309.08600)."""

from __future__ import annotations

import os
from typing import Any, Mapping

from .. import dictionaries
from ..activations import ActivationStore, safe_name
from ..activations.layout import revision_name
from ..files import load_json
from ..paths import resolve

SUBDIR = "07_interpretability"


def best_recipe(figures_dir: str | os.PathLike, data_dir: str | os.PathLike) -> dict[str, Any]:
    """Notebook 03's best SAE as a recipe: its sweep's kind, ratio, seed and training settings with the best member's
    hyperparameters, plus where that SAE is (layer hook, member folder)."""
    path = resolve(figures_dir) / "03_metrics.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run notebook 03 first (its best SAE is the recipe scored here)")
    m = load_json(path)
    sweep = (resolve(data_dir) / "dictionaries" / safe_name(m["model"]) /
             safe_name(revision_name(m["model"], m["revision"])) / safe_name(m["hook"]) / m["spliced_perplexity_sweep"])
    s = load_json(sweep / "sweep.json")["settings"]
    member = int(m["spliced_perplexity_member"])
    hp = {k: (v[member] if isinstance(v, list) else v) for k, v in s["hparams"].items()}
    return {"kind": s["kind"], "ratio": s["ratio"], "seed": s["seed"], "hparams": hp, "n_tokens": s["n_tokens"],
            "batch_size": s["batch_size"], "lr": s["lr"], "train": s["train"], "hook": m["hook"],
            "folder": sweep / dictionaries.member_name(member)}


def paper_recipe(base: Mapping[str, Any], l1_coef: float) -> dict[str, Any]:
    """The paper's residual-stream recipe (tied ReLU + L1, ratio 2) with `base`'s data and schedule settings."""
    train = {k: v for k, v in base["train"].items() if k in ("warmup_steps", "decay", "decay_frac")}
    train.update({"coef_warmup_steps": 100, "resample_every": 100})
    return {**base, "kind": "relu", "ratio": 2.0, "hparams": {"l1_coef": l1_coef, "tied": True}, "train": train,
            "folder": None}


def recipe_settings(recipe: Mapping[str, Any], paper_l1: float) -> dict[str, Any]:
    """Both recipes' settings whole, for the metrics (the SAE folder left out: a machine path)."""
    return {name: {k: v for k, v in r.items() if k != "folder"}
            for name, r in (("recipe", recipe), ("paper_recipe", paper_recipe(recipe, paper_l1)))}


def train_recipe(store: ActivationStore, recipe: Mapping[str, Any], data_dir: str | os.PathLike, *,
                 n_tokens: int | None = None, device: str = "cpu", progress: bool = True):
    """One SAE of the recipe on `store` under `<data_dir>/07_interpretability/` (reused on rerun); its 1-member
    ensemble, taking raw activations."""
    n = min(int(n_tokens or recipe["n_tokens"]), store.n_tokens)
    n -= n % recipe["batch_size"]
    # The recipe's training settings whole (an older sweep.json lists only the fields it changed), its data
    # settings on top.
    cfg = dictionaries.TrainSettings.from_json(dict(recipe["train"]))
    run = dictionaries.train_lm_sweep(store, recipe["kind"], recipe["ratio"], dict(recipe["hparams"]), cfg,
                                      data_dir=resolve(data_dir) / SUBDIR, seed=recipe["seed"], n_tokens=n,
                                      batch_size=recipe["batch_size"], lr=recipe["lr"], device=device,
                                      progress=progress)
    return run.sae
