"""The recipe of notebook 03's best SAE, shared by notebooks 06 and 07: read it back, train it again on another
store (another layer, the step-0 model, another seed), and the paper's residual-stream recipe beside it
(Cunningham et al. 2023, arXiv 2309.08600)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from .. import dictionaries
from ..activations import ActivationStore, safe_name
from ..activations.layout import revision_name
from ..arguments import checked
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
    return _train_run(store, recipe, data_dir, SUBDIR, n_tokens=n_tokens, device=device, progress=progress).sae


# Where the same-recipe reference of notebook 06 lives; notebook 07 passes the same subdir to reuse it.
REFERENCE_SUBDIR = "06_case_studies"
# The settings that make a recipe (everything but where its SAE is); the reference differs from the recipe only in
# its seed.
SUMMARY_KEYS = ("kind", "ratio", "hparams", "n_tokens", "batch_size", "lr", "seed")


def _train_run(store: ActivationStore, recipe: Mapping[str, Any], data_dir: str | os.PathLike, subdir: str, *,
               n_tokens: int | None, device: str, progress: bool, clip: bool = True):
    n = int(n_tokens or recipe["n_tokens"])
    if clip:  # at most one pass over the store; clip=False keeps the recipe's own count (passes wrap, as 03's did)
        n = min(n, store.n_tokens)
        n -= n % recipe["batch_size"]
    # The recipe's training settings whole (an older sweep.json lists only the fields it changed), its data
    # settings on top.
    cfg = dictionaries.TrainSettings.from_json(dict(recipe["train"]))
    return dictionaries.train_lm_sweep(store, recipe["kind"], recipe["ratio"], dict(recipe["hparams"]), cfg,
                                       data_dir=resolve(data_dir) / subdir, seed=recipe["seed"], n_tokens=n,
                                       batch_size=recipe["batch_size"], lr=recipe["lr"], device=device,
                                       progress=progress)


@checked
def reference_recipe(recipe: Mapping[str, Any], seed: int | None = None) -> dict[str, Any]:
    """The recipe with another seed (default: the recipe's seed + 1) and nothing else changed — kind, ratio,
    hyperparameters, tokens, batch size, lr and schedule are the recipe's — and no SAE folder yet: the reference
    that asks whether a dictionary's features are found again (MCS, Cunningham et al. 2023, arXiv 2309.08600,
    Section 2). ValueError when `seed` is the recipe's own."""
    s = int(recipe["seed"]) + 1 if seed is None else seed
    if s == int(recipe["seed"]):
        raise ValueError(f"seed={s} is the recipe's own seed: a reference needs another one")
    train = dict(recipe["train"])
    if "seed" in train:
        train["seed"] = s  # the recorded settings say the seed train_recipe trains with
    return {**recipe, "seed": s, "train": train, "folder": None}


@checked
def train_reference(store: ActivationStore, recipe: Mapping[str, Any], data_dir: str | os.PathLike,
                    seed: int | None = None, *, subdir: str = REFERENCE_SUBDIR, device: str = "cpu",
                    progress: bool = True) -> tuple[Any, Path]:
    """(SAE, its member folder): the recipe trained again with another seed (`reference_recipe`) on `store`, the
    recipe's own tokens and steps, under `<data_dir>/<subdir>/` (a rerun with the same arguments reuses it: notebook
    07 finds notebook 06's). The SAE is a 1-member ensemble taking raw activations. ValueError when the store is at
    another hook than the recipe's (the reference would differ in more than its seed)."""
    ref = reference_recipe(recipe, seed)
    hook = store.manifest.get("hook")
    if hook != recipe["hook"]:
        raise ValueError(f"the store is at {hook!r} but the recipe was trained at {recipe['hook']!r}: pass the "
                         f"activation store of the recipe's hook")
    # The recipe's own token count even where the store holds fewer rows (exclusions, e.g. SmolLM2's position 0):
    # 03 trained on that count too, wrapping around the store.
    run = _train_run(store, ref, data_dir, subdir, n_tokens=None, device=device, progress=progress, clip=False)
    return run.sae, run.folder / dictionaries.member_name(0)


@checked
def reference_settings(recipe: Mapping[str, Any], seed: int | None = None) -> dict[str, dict[str, Any]]:
    """{"dictionary": the recipe's settings, "reference": its same-recipe reference's} (SUMMARY_KEYS: kind, ratio,
    hparams, n_tokens, batch_size, lr, seed), for the metrics: no folders (machine paths)."""
    return {name: {k: r[k] for k in SUMMARY_KEYS}
            for name, r in (("dictionary", recipe), ("reference", reference_recipe(recipe, seed)))}
