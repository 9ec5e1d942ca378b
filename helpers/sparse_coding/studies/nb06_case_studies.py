"""Notebook 06: case studies of single features (Cunningham et al. 2023, arXiv 2309.08600, Section 5) — which
dictionary, which features ("auto" picks sparse ones by rule), and everything one study shows: examples, activation
histogram, logit lens, feature and token ablation; plus the fraction of the loss recovered by the features a
same-recipe, other-seed dictionary also found.

The loss is read as the fraction of the loss recovered (FLR) between two ends that both keep the SAE's error term
x − x̂: the error-only model (every feature ablated, x − Σᵢ cᵢ·dᵢ) and every feature kept (x itself, the clean
model): FLR(S) = (L_error_only − L_S) / (L_error_only − L_all). The high-MCS set is compared with random sets of the
same size matched in firing frequency (high-MCS features are frequent ones) and with its complement."""

from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .. import analyses, dictionaries
from ..activations import ensure_activations, safe_name
from ..activations.layout import revision_name
from ..analyses.ablation import feature_ablation, loss_with_features, token_ablation
from ..analyses.features import check_feature
from ..analyses.logit_lens import logit_lens, top_tokens
from ..analyses.mining import Mined
from ..arguments import checked
from ..files import load_json
from ..paths import repo_root, resolve
from . import recipes


def best_dictionary(figures_dir: str | os.PathLike, data_dir: str | os.PathLike) -> tuple[Path, dict]:
    """(member folder, its SAELens cfg metadata) of notebook 03's best SAE within its L0 budget, as named in
    `figures_dir/03_metrics.json`. FileNotFoundError says to run notebook 03 first."""
    path = resolve(figures_dir) / "03_metrics.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run notebook 03 first (it names the best dictionary), or pass a "
                                f"dictionary folder (SAELens layout) as `dictionary`")
    m = load_json(path)
    hook_dir = (resolve(data_dir) / "dictionaries" / safe_name(m["model"]) /
                safe_name(revision_name(m["model"], m["revision"])) / safe_name(m["hook"]))
    folder = hook_dir / m["spliced_perplexity_sweep"] / dictionaries.member_name(int(m["spliced_perplexity_member"]))
    return folder, dictionary_metadata(folder)


def dictionary_metadata(folder: str | os.PathLike) -> dict:
    """The SAELens cfg.json `metadata` of a dictionary folder (model_name, revision, hook_name, ...)."""
    cfg = resolve(folder) / "cfg.json"
    if not cfg.exists():
        raise FileNotFoundError(f"{folder} is not a dictionary folder (no cfg.json); pass a SAELens-layout folder")
    return load_json(cfg).get("metadata", {})


def _next_tokens(mined: Mined, feature: int) -> list[int]:
    T = mined.tokens.shape[1]
    return [int(mined.tokens[e.context, e.position + 1]) for e in mined.top_examples(feature) if e.position + 1 < T]


@checked
def single_token_share(mined: Mined, feature: int) -> float:
    """The share of the feature's top AND of its random examples on one token id: the id most common over both,
    the smaller of its two shares (a feature whose top examples sit on one token but whose typical ones do not is
    no single-token feature). 0 without examples."""
    top = [e.tokens[e.target] for e in mined.top_examples(feature)]
    rnd = [e.tokens[e.target] for e in mined.random_examples(feature)]
    if not top or not rnd:
        return 0.0
    tok = Counter(top + rnd).most_common(1)[0][0]
    return min(top.count(tok) / len(top), rnd.count(tok) / len(rnd))


ROLES = ("closing_paren", "single_token", "dense", "random")


@checked
def pick_features(mined: Mined, model, sae: Any, texts: Sequence[str], seed: int = 0, min_count: int = 20,
                  max_density: float = 0.05, min_share: float = 0.5) -> dict[str, int]:
    """{role: feature} picked by rule among features firing on at least `min_count` tokens. Every role but "dense"
    takes a sparse feature, one firing on under `max_density` of the tokens (the paper's case studies are sparse
    features; a feature on half the tokens is no closing-parenthesis detector):
    closing_paren: the most top examples end just before a token starting with ")" and the logit lens ranks such a
    token highest (the paper's closing-parenthesis case, natural on Python source); single_token: the largest
    `single_token_share` (at least `min_share`); dense: fires most often (any density); random: a seeded sparse
    feature. Each role gets a different feature (later roles skip features already chosen); a role no feature
    qualifies for is left out and printed. ValueError when no feature fires on `min_count` tokens."""
    live = (mined.count >= min_count).nonzero().squeeze(1).tolist()
    if not live:
        raise ValueError(f"no feature fires on {min_count} or more of the {mined.n_tokens} mined tokens; mine more "
                         f"text or pick features by hand")
    freq = mined.frequency()
    sparse = [f for f in live if float(freq[f]) < max_density]
    paren = {i for i, t in enumerate(texts) if t.startswith(")")}
    W = sae.member_state(0)["W_dec"]
    best_paren, best_score = None, 0.0
    for f in sparse:
        nxt = _next_tokens(mined, f)
        share = sum(t in paren for t in nxt) / max(1, len(nxt))
        if share == 0:
            continue
        lens = logit_lens(model, W[f])
        rank = int((lens > max(float(lens[i]) for i in paren)).sum())
        score = share / (1 + rank)
        if score > best_score:
            best_paren, best_score = f, score
    # Each role gets its own feature: a card shown twice teaches nothing.
    chosen: dict[str, int | None] = {"closing_paren": best_paren}
    shares = {f: single_token_share(mined, f) for f in sparse if f != best_paren}
    single = [f for f, v in shares.items() if v >= min_share]
    chosen["single_token"] = max(single, key=lambda f: (shares[f], int(mined.count[f]))) if single else None
    pool = [f for f in live if f not in chosen.values()]
    chosen["dense"] = max(pool, key=lambda f: int(mined.count[f])) if pool else None
    rest = [f for f in sparse if f not in chosen.values()]
    g = torch.Generator().manual_seed(seed)
    chosen["random"] = rest[int(torch.randint(len(rest), (1,), generator=g))] if rest else None
    for role, f in chosen.items():
        if f is None:
            print(f"no feature qualifies as {role!r} (among {len(sparse)} live features firing on < {max_density:.0%} "
                  f"of tokens): role left out")
    return {k: v for k, v in chosen.items() if v is not None}


@checked
def case_study(model, sae: Any, hook: str, mined: Mined, feature: int, texts: Sequence[str], *,
               token_counts: torch.Tensor | None = None, n_contexts: int = 20, n_quantile_bins: int = 10,
               per_bin: int = 3, steer: float = 2.0, seed: int = 0, exclude: Any = None,
               n_token_draws: int = 8, token_window: int | None = 32) -> dict[str, Any]:
    """Everything shown for one feature: moments, histogram, top and quantile examples, logit lens (rare tokens
    left out), the zero / less-than-rank-one / clamp(steer × max) ablation effects over its top contexts, and the
    token ablation of its strongest context (each earlier token replaced by `n_token_draws` neutral tokens drawn
    from `token_counts`, the corpus' unigram counts, `ablation.token_ablation`; only the `token_window` tokens up to
    the example's, NaN before). exclude: positions left out of the
    SAE's inputs (never edited)."""
    f = check_feature(mined, feature)
    tops = mined.top_examples(f)
    quant = mined.quantile_examples(f, n_quantile_bins, per_bin, seed)
    ctx = mined.tokens[[e.context for e in tops[:n_contexts]]]
    W = sae.member_state(0)["W_dec"]
    up, down = top_tokens(logit_lens(model, W[f]), 10, token_counts, min_count=5 if token_counts is not None else 0)
    effects = {mode: feature_ablation(model, sae, hook, ctx, f, mode=mode,
                                      value=steer * float(mined.max[f]) if mode == "clamp" else None,
                                      exclude=exclude)
               for mode in ("zero", "rank_one", "clamp")}
    first = tops[0]
    drops = token_ablation(model, sae, hook, mined.tokens[first.context], first.position, f,
                           distribution=token_counts, n_draws=n_token_draws, seed=seed, window=token_window)
    m = {k: float(v[f]) for k, v in mined.moments().items()}
    return {"feature": f, "frequency": float(mined.frequency()[f]), "max": float(mined.max[f]), **m,
            "edges": mined.bin_edges(f), "hist": mined.hist[f], "top": tops, "quantiles": quant,
            "logit_lens_up": [(texts[i], v) for i, v in up], "logit_lens_down": [(texts[i], v) for i, v in down],
            "effects": effects, "token_ablation": drops, "token_ablation_draws": n_token_draws,
            "token_ablation_tokens": mined.tokens[first.context, :first.position + 1].tolist(), "texts": texts}


@checked
def tied_top(values: torch.Tensor, rtol: float = 1e-6) -> list[int]:
    """Every index whose value is within rtol × |max| of the max (at least the argmax), in order: an argmax alone
    would break ties by position and hide them."""
    v = torch.as_tensor(values).double().flatten()
    top = float(v.nan_to_num(-math.inf).max())  # NaN: a position not edited (outside the token window)
    return (v >= top - rtol * abs(top)).nonzero().squeeze(1).tolist()


def study_metrics(study: dict[str, Any], role: str) -> dict[str, Any]:
    """The 06_metrics.json entry of one case study. token_ablation_top_input: [token, position, drop] for every
    input position tied for the largest drop (`tied_top`); token_ablation_ties: how many positions that is."""
    texts = study["texts"]
    targets = Counter(texts[e.tokens[e.target]] for e in study["top"])
    drop = study["effects"]["zero"].top_drops(1)
    d = study["token_ablation"]
    tied = tied_top(d)
    return {"role": role, "feature": study["feature"], "frequency": round(study["frequency"], 6),
            "max": round(study["max"], 4), "skew": round(study["skew"], 3), "kurtosis": round(study["kurtosis"], 3),
            "top_tokens": [t for t, _ in targets.most_common(5)],
            "logit_lens_top": [t for t, _ in study["logit_lens_up"][:5]],
            "ablation_top_logprob_drop": [texts[drop[0][0]], round(drop[0][1], 4)] if drop else None,
            "token_ablation_top_input": [[texts[study["token_ablation_tokens"][i]], i, round(float(d[i]), 4)]
                                         for i in tied],
            "token_ablation_ties": len(tied), "token_ablation_draws": study.get("token_ablation_draws"),
            "loss_change_zero_ablation": round(study["effects"]["zero"].loss_edited
                                               - study["effects"]["zero"].loss_clean, 5)}


@checked
def same_recipe_reference(tl, model: str, revision: str, figures_dir: str | os.PathLike,
                          data_dir: str | os.PathLike, *, seed: int = 0, device: str = "cpu",
                          progress: bool = True) -> tuple[Any, Path, dict]:
    """(SAE, member folder, settings): notebook 03's best recipe trained again with the next seed on the trained
    model's activation store at 03's hook (`recipes.train_reference`, under `<data_dir>/06_case_studies/`, reused on
    rerun; notebook 07 reaches the same one), and both dictionaries' settings (`recipes.reference_settings`). seed:
    the harvest's seed, should the store need harvesting. FileNotFoundError without notebook 03's metrics."""
    recipe = recipes.best_recipe(figures_dir, data_dir)
    store = ensure_activations(tl, model, revision, recipe["hook"], recipe["n_tokens"], data_dir=data_dir, seed=seed)
    sae, folder = recipes.train_reference(store, recipe, data_dir, device=device, progress=progress)
    return sae, folder, recipes.reference_settings(recipe)


@checked
def frequency_bins(frequency: torch.Tensor, live: torch.Tensor, n_bins: int = 10) -> torch.Tensor:
    """[d] long: each live feature's bin among `n_bins` equal-count bins of the live features' log firing
    frequency (quantile edges), -1 for the others. frequency [d] (share of tokens), live [d] bool."""
    logf = torch.log(frequency.double().clamp_min(1e-300))
    edges = torch.quantile(logf[live], torch.linspace(0, 1, n_bins + 1, dtype=torch.float64))
    bins = torch.bucketize(logf, edges[1:-1].contiguous())
    return torch.where(live, bins, torch.full_like(bins, -1))


@checked
def frequency_matched_draws(frequency: torch.Tensor, chosen: torch.Tensor, live: torch.Tensor, n_draws: int = 20,
                            n_bins: int = 10, seed: int = 0) -> torch.Tensor:
    """[n_draws, len(chosen)] long: random feature sets matched to `chosen` in firing frequency — each chosen
    feature replaced by a live, unchosen feature of its `frequency_bins` bin, drawn without replacement within a
    set (a bin with too few candidates borrows from its nearest bins). Seeded; the sets differ from each other
    where the pools allow. ValueError when fewer live unchosen features exist than chosen ones."""
    bins = frequency_bins(frequency, live, n_bins)
    chosen = torch.as_tensor(chosen, dtype=torch.long).flatten()
    free = live.clone()
    free[chosen] = False
    if int(free.sum()) < len(chosen):
        raise ValueError(f"{int(free.sum())} live features outside the chosen {len(chosen)}: too few to match")
    need = Counter(bins[chosen].tolist())
    pools = {}
    for b, n in need.items():
        r = 0
        while int((free & ((bins - b).abs() <= r)).sum()) < n:
            r += 1
        pools[b] = (free & ((bins - b).abs() <= r)).nonzero().squeeze(1)
    g = torch.Generator().manual_seed(seed)
    out, seen = [], set()
    for _ in range(n_draws):
        for _attempt in range(100):
            draw = torch.empty(len(chosen), dtype=torch.long)
            taken: set[int] = set()
            for b, n in need.items():
                pool = [f for f in pools[b][torch.randperm(len(pools[b]), generator=g)].tolist() if f not in taken]
                slots = (bins[chosen] == b).nonzero().squeeze(1)
                draw[slots] = torch.tensor(pool[:n], dtype=torch.long)
                taken.update(pool[:n])
            if frozenset(taken) not in seen:
                break
        seen.add(frozenset(taken))
        out.append(draw)
    return torch.stack(out) if out else torch.zeros(0, len(chosen), dtype=torch.long)


@checked
def loss_recovered(loss: float, error_only: float, full: float) -> float:
    """(error_only − loss) / (error_only − full): 0 at the error-only loss, 1 at every feature's (nats in, a
    fraction out); NaN when the two ends coincide."""
    gap = error_only - full
    return float("nan") if abs(gap) < 1e-12 else (error_only - loss) / gap


# What 06_metrics.json records of `loss_by_feature_set` (losses in nats per token).
LOSS_METRICS = ("loss_clean", "loss_spliced_all", "loss_error_only", "loss_all_features_with_error",
                "loss_spliced_high_mcs_only", "loss_spliced_without_high_mcs", "loss_spliced_random_same_count",
                "loss_random_draws", "loss_recovered_high_mcs_only", "loss_recovered_random_same_count",
                "loss_recovered_without_high_mcs", "n_high_mcs", "n_live", "mcs_threshold", "frequency_bins",
                "high_mcs_features")


@checked
def loss_by_feature_set(model, sae: Any, hook: str, tokens: torch.Tensor, reference: Any | None, mined: Mined,
                        threshold: float = 0.9, seed: int = 0, exclude: Any = None, n_draws: int = 20,
                        n_bins: int = 10) -> dict[str, Any]:
    """Next-token losses (nats per token) on tokens [n_contexts, T] with the error term kept and: no feature
    (error only), every feature, only the live features whose MCS against `reference` is >= threshold, every
    feature but those, and `n_draws` frequency-matched random sets of the same size (`frequency_matched_draws`,
    firing frequencies from `mined`); each as the fraction of the loss recovered (module docstring), the random
    draws as their mean and 2.5-97.5 percentile interval. Also the clean loss and the whole reconstruction without
    the error term ("loss_spliced_all"). reference None: no high-MCS features."""
    live = mined.count > 0
    high = torch.zeros(0, dtype=torch.long)
    if reference is not None:
        res = analyses.mcs(sae.W_dec.detach()[0], reference.W_dec.detach()[0], alive_a=live)
        high = ((res.a_to_b >= threshold) & live).nonzero().squeeze(1)
    everything = torch.arange(int(sae.d_sae))
    rest = everything[~torch.isin(everything, high)]
    # Too few other live features to match (a tiny dictionary): no random draws rather than a failed notebook.
    matchable = 0 < len(high) <= int(live.sum()) - len(high)
    draws = (frequency_matched_draws(mined.frequency(), high, live, n_draws, n_bins, seed) if matchable
             else torch.zeros(n_draws if not len(high) else 0, 0, dtype=torch.long))
    sets = {"error_only": [], "every_feature": everything.tolist(), "high_mcs_only": high.tolist(),
            "without_high_mcs": rest.tolist(),
            # An empty draw is the error-only model: not run again.
            **({f"random_{i}": d.tolist() for i, d in enumerate(draws)} if matchable else {})}
    loss = loss_with_features(model, sae, hook, tokens, sets, exclude=exclude)
    lo, hi = loss["error_only"], loss["every_feature"]
    rnd_loss = [loss.get(f"random_{i}", lo) for i in range(len(draws))]
    rnd = np.array([loss_recovered(v, lo, hi) for v in rnd_loss])
    low, high_q = np.percentile(rnd, [2.5, 97.5]) if len(rnd) else (float("nan"), float("nan"))
    return {"loss_clean": loss["clean"], "loss_spliced_all": loss["all"], "loss_error_only": lo,
            "loss_all_features_with_error": hi, "loss_spliced_high_mcs_only": loss["high_mcs_only"],
            "loss_spliced_without_high_mcs": loss["without_high_mcs"],
            "loss_spliced_random_same_count": float(np.mean(rnd_loss)) if rnd_loss else float("nan"),
            "loss_random_draws": rnd_loss,
            "loss_recovered_high_mcs_only": loss_recovered(loss["high_mcs_only"], lo, hi),
            "loss_recovered_random_same_count": {"mean": float(rnd.mean()) if len(rnd) else float("nan"),
                                                 "low": float(low), "high": float(high_q), "draws": len(rnd)},
            "loss_recovered_without_high_mcs": loss_recovered(loss["without_high_mcs"], lo, hi),
            "n_high_mcs": int(len(high)), "n_live": int(live.sum()), "mcs_threshold": threshold,
            "frequency_bins": n_bins, "high_mcs_features": high.tolist()}


@checked
def data_relative(path: str | os.PathLike, data_dir: str | os.PathLike) -> str:
    """A path for committed metrics, never a machine's absolute path: relative to data_dir when under it, else to
    the repo when under it, else its last part only."""
    p = resolve(path).resolve()
    for root in (resolve(data_dir).resolve(), repo_root()):
        try:
            return str(p.relative_to(root))
        except ValueError:
            pass
    return p.name


@checked
def portable(value: Any, data_dir: str | os.PathLike) -> Any:
    """`value` (JSON-like) with every absolute path string in it replaced by `data_relative`'s form."""
    if isinstance(value, dict):
        return {k: portable(v, data_dir) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v, data_dir) for v in value]
    if isinstance(value, str) and os.path.isabs(value) and len(Path(value).parts) > 1:
        return data_relative(value, data_dir)
    return value
