"""Notebook 06's glue (`studies.nb06_case_studies`) and its same-recipe reference (`studies.recipes`): known answers
for the fraction of loss recovered, frequency-matched random draws, tie reporting, the density rule of the role
picks, a reference that differs from its recipe only in the seed, and metrics without machine paths."""

from __future__ import annotations

import json

import matplotlib
import pytest
import torch

from sparse_coding import corpus, dictionaries, lm, plots
from sparse_coding.analyses.features import mine_dictionary
from sparse_coding.analyses.mining import Mined
from sparse_coding.studies import nb06_case_studies as study
from sparse_coding.studies import recipes

matplotlib.use("Agg")
pytestmark = pytest.mark.usefixtures("one_thread")

HOOK = "blocks.1.hook_resid_pre"


@pytest.fixture(scope="module")
def tiny(tiny_lm, one_thread):
    """(model, tokens, sae, mined): the tiny model, 40 training contexts, a random TopK SAE (16 dead features) mined
    on them."""
    _, _, folder = tiny_lm
    model = lm.load_model(folder)
    tokens = lm.validation_contexts(folder, split="train")[:40]
    sae = dictionaries.make_sae("topk", d_in=model.cfg.d_model, d_sae=64, k=8, seed=3)
    with torch.no_grad():  # features 48.. never fire: dead ones, as a trained dictionary has
        sae.W_enc[0, :, 48:] = 0
        sae.b_enc[0, 48:] = -100
    mined = mine_dictionary(model, sae, HOOK, tokens, n_top=5, window=None, progress=False)
    return model, tokens, sae, mined


def test_loss_recovered_is_one_for_every_feature_and_zero_for_none(tiny):
    """The reference = the dictionary itself: every live feature has MCS 1, so "high-MCS only" keeps every feature
    that fires on these tokens (FLR 1, the clean loss) and "without" keeps only dead ones (FLR 0, error only).
    With no reference the high set is empty: FLR 0 for it, 1 for its complement; the random draws are empty too."""
    model, tokens, sae, mined = tiny
    live = int((mined.count > 0).sum())
    assert 8 < live < 64 - 8  # some dead features, enough live ones to match
    out = study.loss_by_feature_set(model, sae, HOOK, tokens, sae, mined, threshold=0.99, n_draws=4)
    assert out["n_high_mcs"] == live == out["n_live"]
    assert out["loss_all_features_with_error"] == pytest.approx(out["loss_clean"], abs=1e-5)  # x itself
    assert out["loss_error_only"] > out["loss_clean"] + 0.05 and out["loss_spliced_all"] != out["loss_clean"]
    assert out["loss_recovered_high_mcs_only"] == pytest.approx(1.0, abs=1e-4)
    assert out["loss_recovered_without_high_mcs"] == pytest.approx(0.0, abs=1e-4)
    assert out["loss_recovered_random_same_count"]["draws"] == 0  # no other live features to match with
    none = study.loss_by_feature_set(model, sae, HOOK, tokens, None, mined, n_draws=3)
    assert none["n_high_mcs"] == 0 and none["loss_recovered_high_mcs_only"] == 0.0
    assert none["loss_recovered_without_high_mcs"] == pytest.approx(1.0, abs=1e-4)
    assert none["loss_recovered_random_same_count"] == {"mean": 0.0, "low": 0.0, "high": 0.0, "draws": 3}
    json.dumps(out)  # metrics-ready
    fig = plots.plot_loss_by_feature_set(out)
    assert fig.axes[0].get_ylim()[0] <= 0 and fig.axes[0].get_ylim()[1] >= 1


def test_random_draws_of_a_partial_set_lie_between_the_ends(tiny):
    """A reference that shares a few features: frequency-matched draws of the same size, FLR within [low, high]."""
    model, tokens, sae, mined = tiny
    ref = dictionaries.make_sae("topk", d_in=model.cfg.d_model, d_sae=64, k=8, seed=4)
    live = (mined.count > 0).nonzero().squeeze(1)
    with torch.no_grad():
        ref.W_dec[0, :4] = sae.W_dec[0, live[:4]]
    out = study.loss_by_feature_set(model, sae, HOOK, tokens, ref, mined, threshold=0.999, n_draws=20, seed=1)
    assert out["high_mcs_features"] == live[:4].tolist()
    r = out["loss_recovered_random_same_count"]
    assert r["draws"] == 20 and r["low"] <= r["mean"] <= r["high"]
    assert len(out["loss_random_draws"]) == 20 and len(set(out["loss_random_draws"])) > 1


def test_frequency_matched_draws_stay_in_the_chosen_bins():
    """20 seeded, distinct draws; each chosen feature replaced by a live, unchosen feature of its frequency bin."""
    g = torch.Generator().manual_seed(0)
    frequency = torch.rand(400, generator=g).pow(4)
    live = frequency > 0.001
    chosen = frequency.topk(6).indices  # the most frequent, like high-MCS features
    draws = study.frequency_matched_draws(frequency, chosen, live, n_draws=20, n_bins=10, seed=5)
    assert draws.shape == (20, 6)
    bins = study.frequency_bins(frequency, live, 10)
    assert torch.equal(bins[draws], bins[chosen].expand(20, -1))  # the same bin, slot by slot
    assert not bool(torch.isin(draws, chosen).any()) and bool(live[draws].all())
    assert all(len(set(d.tolist())) == 6 for d in draws)
    assert len({frozenset(d.tolist()) for d in draws}) == 20
    assert torch.equal(study.frequency_matched_draws(frequency, chosen, live, n_draws=20, n_bins=10, seed=5), draws)
    assert not torch.equal(study.frequency_matched_draws(frequency, chosen, live, n_draws=20, seed=6), draws)
    assert sorted(torch.bincount(bins[live], minlength=10).tolist())[0] >= int(live.sum()) // 10 - 1  # equal counts
    with pytest.raises(ValueError, match="too few to match"):
        study.frequency_matched_draws(frequency, live.nonzero().squeeze(1)[:-2], live)


def test_ties_are_all_reported():
    """Every position within rtol of the max, not the first argmax only."""
    assert study.tied_top(torch.tensor([1.0, 3.0, 3.0 - 1e-9, 2.0, 3.0])) == [1, 2, 4]
    assert study.tied_top(torch.tensor([1.0, 3.0, 2.999, 2.0])) == [1]
    assert study.tied_top(torch.zeros(4)) == [0, 1, 2, 3]
    s = {"texts": ["a", "b", "c"], "top": [], "effects": {"zero": dictionaries_effect()}, "feature": 0,
         "frequency": 0.01, "max": 1.0, "skew": 0.0, "kurtosis": 0.0, "logit_lens_up": [],
         "token_ablation": torch.tensor([2.0, 0.5, 2.0]), "token_ablation_tokens": [2, 1, 0], "token_ablation_draws": 8}
    m = study.study_metrics(s, "x")
    assert m["token_ablation_top_input"] == [["c", 0, 2.0], ["a", 2, 2.0]] and m["token_ablation_ties"] == 2


def test_case_study_token_ablation_draws_from_the_corpus(tiny):
    """A whole case study on the tiny model: token ablation with the corpus' counts (8 draws), metrics and figure."""
    model, tokens, sae, mined = tiny
    texts = corpus.token_texts(model.tokenizer, n_vocab=model.cfg.d_vocab)
    counts = torch.bincount(tokens.flatten(), minlength=len(texts))
    f = int(mined.count.argmax())
    s = study.case_study(model, sae, HOOK, mined, f, texts, token_counts=counts, n_contexts=3, seed=1)
    top = s["top"][0]
    assert s["token_ablation"].shape == (top.position + 1,) and s["token_ablation_draws"] == 8
    m = study.study_metrics(s, "dense")
    assert m["token_ablation_ties"] == len(m["token_ablation_top_input"]) >= 1
    assert max(float(v) for v in s["token_ablation"]) == pytest.approx(m["token_ablation_top_input"][0][2], abs=1e-4)
    fig = plots.plot_token_ablation({"dense": s})
    assert "corpus-frequency tokens, mean of 8 draws" in fig.axes[0].get_title()


def dictionaries_effect():
    from sparse_coding.analyses.ablation import AblationEffect
    return AblationEffect(0, "zero", torch.tensor([-1.0, 0.0, 0.5]), 1.0, 1.1, 3)


def hand_mined(tokens: torch.Tensor, examples: dict[int, tuple[int, list[int]]], n_tokens: int) -> Mined:
    """A Mined with features {f: (count, [contexts])}: each example at position 3 of its context."""
    n, k = len(examples), max(len(c) for _, c in examples.values())
    T = tokens.shape[1]
    ctx = torch.full((n, k), -1, dtype=torch.long)
    for f, (_, cs) in examples.items():
        ctx[f, :len(cs)] = torch.tensor(cs)
    val = torch.where(ctx >= 0, 1.0, 0.0)
    pos, acts = torch.full((n, k), 3), torch.zeros(n, k, T)
    count = torch.tensor([c for c, _ in examples.values()])
    return Mined(tokens=tokens, count=count, power_sums=torch.zeros(n, 4, dtype=torch.float64),
                 hist=torch.zeros(n, 64, dtype=torch.long), top_value=val, top_context=ctx, top_position=pos,
                 top_acts=acts, random_value=val, random_context=ctx, random_position=pos, random_acts=acts,
                 sample_value=torch.zeros(n, 64, 1), sample_context=torch.full((n, 64, 1), -1),
                 sample_position=torch.zeros(n, 64, 1, dtype=torch.long), sample_acts=torch.zeros(n, 64, 1, 1),
                 meta={"window": None, "n_kept": n_tokens})


def test_pick_features_keeps_every_role_but_dense_sparse(tiny, capsys):
    """Roles other than "dense" take features firing on < max_density of the tokens; a role no feature qualifies
    for is left out and said so."""
    model, _, _, _ = tiny
    texts = corpus.token_texts(model.tokenizer, n_vocab=model.cfg.d_vocab)
    paren = next(i for i, t in enumerate(texts) if t.startswith(")"))
    fill = [i for i, t in enumerate(texts) if not t.startswith(")")][5:15]
    A, B, C = fill[:3]
    toks = torch.tensor(fill[3:9] * 2)[:8].repeat(12, 1)  # 12 contexts of 8 neutral tokens
    toks[0:2, 3], toks[0:2, 4] = A, paren   # feature 0, dense (50 %): top examples on A before ")"
    toks[2:4, 3] = B                        # feature 1 (2 %): always on B, a single-token feature
    toks[4:6, 3], toks[4:6, 4] = C, paren   # feature 2 (3 %): before ")", the sparse closing-paren one
    toks[6, 3], toks[7, 3] = A, B           # feature 3 (4 %): mixed tokens; feature 4 (30 %) dense but not densest
    mined = hand_mined(toks, {0: (500, [0, 1]), 1: (20, [2, 3]), 2: (30, [4, 5]), 3: (40, [6, 7]),
                              4: (300, [8, 9])}, n_tokens=1000)
    sae = dictionaries.make_sae("relu", d_in=model.cfg.d_model, d_sae=5, seed=0)
    roles = study.pick_features(mined, model, sae, texts, min_count=20)
    assert roles == {"closing_paren": 2, "single_token": 1, "dense": 0, "random": 3}
    freq = mined.frequency()
    assert all(float(freq[f]) < 0.05 for r, f in roles.items() if r != "dense")
    assert study.single_token_share(mined, 1) == 1.0 and study.single_token_share(mined, 3) == 0.5
    capsys.readouterr()
    strict = study.pick_features(mined, model, sae, texts, min_count=20, max_density=0.025)
    assert strict == {"single_token": 1, "dense": 0}
    said = capsys.readouterr().out
    assert "no feature qualifies as 'closing_paren'" in said and "'random'" in said


def recipe_of(store) -> dict:
    train = dictionaries.TrainSettings(warmup_steps=2, decay="linear").to_json()
    return {"kind": "topk", "ratio": 2.0, "seed": 0, "hparams": {"k": 4}, "n_tokens": 2048, "batch_size": 256,
            "lr": 3e-3, "train": train, "hook": store.manifest["hook"], "folder": None}


def test_reference_recipe_differs_only_in_the_seed(make_store, tmp_path):
    """reference_recipe changes the seed alone; train_reference trains it under <data_dir>/06_case_studies/ with
    settings equal to the recipe's own run but for the seed, and reuses it on rerun."""
    x = 30 * torch.randn(4096, 16, generator=torch.Generator().manual_seed(0))
    store = make_store(x)
    recipe = recipe_of(store)
    ref = recipes.reference_recipe(recipe)
    assert ref["seed"] == 1 and ref["train"]["seed"] == 1 and ref["folder"] is None
    assert {k: v for k, v in ref.items() if k not in ("seed", "train", "folder")} == \
           {k: v for k, v in recipe.items() if k not in ("seed", "train", "folder")}
    assert {k: v for k, v in ref["train"].items() if k != "seed"} == \
           {k: v for k, v in recipe["train"].items() if k != "seed"}
    with pytest.raises(ValueError, match="the recipe's own seed"):
        recipes.reference_recipe(recipe, 0)
    sae, folder = recipes.train_reference(store, recipe, tmp_path, progress=False)
    assert folder.parent.name == "topk-r2-s1" and (tmp_path / "06_case_studies") in folder.parents
    own = recipes.train_recipe(store, recipe, tmp_path, progress=False)
    mine = json.loads((folder.parent / "sweep.json").read_text())["settings"]
    theirs = json.loads((next((tmp_path / "07_interpretability").rglob("sweep.json"))).read_text())["settings"]
    assert mine["seed"] == 1 and theirs["seed"] == 0
    mine["seed"], mine["train"]["seed"] = 0, 0
    assert mine == theirs
    assert not torch.equal(sae.W_dec, own.W_dec)
    again, folder2 = recipes.train_reference(store, recipe, tmp_path, progress=False)
    assert folder2 == folder and torch.equal(again.W_dec, sae.W_dec)
    settings = recipes.reference_settings(recipe)
    assert settings["dictionary"]["seed"] == 0 and settings["reference"]["seed"] == 1
    assert set(settings["reference"]) == {"kind", "ratio", "hparams", "n_tokens", "batch_size", "lr", "seed"}
    # More tokens than the store holds (rows left out by an exclusion): the recipe's own count, wrapping, as 03 did.
    big, big_folder = recipes.train_reference(store, {**recipe, "n_tokens": store.n_tokens + recipe["batch_size"]},
                                              tmp_path / "big", progress=False)
    steps = json.loads((big_folder.parent / "sweep.json").read_text())["settings"]["train"]["steps"]
    assert steps == (store.n_tokens + recipe["batch_size"]) // recipe["batch_size"]
    with pytest.raises(ValueError, match="but the recipe was trained at"):
        recipes.train_reference(store, {**recipe, "hook": "blocks.9.hook_resid_post"}, tmp_path, progress=False)


def test_metrics_paths_are_never_absolute(tmp_path):
    """Paths under data_dir become relative to it, others keep only their last part; token texts stay as they are."""
    data = tmp_path / "data"
    member = data / "06_case_studies" / "dictionaries" / "m" / "member-000"
    assert study.data_relative(member, data) == "06_case_studies/dictionaries/m/member-000"
    assert study.data_relative("/elsewhere/models/mine", data) == "mine"
    meta = {"model_name": str(tmp_path / "models" / "local"), "nested": [str(member)], "dataset_path": "stdlib"}
    out = study.portable({"model": str(data / "lm" / "offline"), "settings": {"dictionary": meta}}, data)
    assert out == {"model": "lm/offline", "settings": {"dictionary": {"model_name": "local", "nested": [
        "06_case_studies/dictionaries/m/member-000"], "dataset_path": "stdlib"}}}
    assert study.portable("/", data) == "/"
