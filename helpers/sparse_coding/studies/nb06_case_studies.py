"""Notebook 06: case studies of single features — which dictionary, which features ("auto" picks them by rule),
and everything one study shows: examples, activation histogram, logit lens, feature and token ablation; plus the
loss with only the features another seed's dictionary also found."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import torch

from .. import analyses, dictionaries
from ..activations import safe_name
from ..activations.layout import revision_name
from ..analyses.ablation import feature_ablation, loss_with_features, token_ablation
from ..analyses.features import check_feature
from ..analyses.logit_lens import logit_lens, top_tokens
from ..analyses.mining import Mined
from ..files import load_json
from ..paths import resolve


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


def pick_features(mined: Mined, model, sae: Any, texts: Sequence[str], seed: int = 0, min_count: int = 20
                  ) -> dict[str, int]:
    """Features picked by rule among those firing on at least `min_count` tokens:
    closing_paren: the most top examples end just before a token starting with ")" and the logit lens ranks such a
    token highest (the paper's closing-parenthesis case, natural on Python source); single_token: the largest share
    of its top and random examples on one token id; dense: fires most often; random: a seeded live feature. Each
    role gets a different feature (later roles skip features already chosen)."""
    live = (mined.count >= min_count).nonzero().squeeze(1).tolist()
    if not live:
        raise ValueError(f"no feature fires on {min_count} or more of the {mined.n_tokens} mined tokens; mine more "
                         f"text or pick features by hand")
    paren = {i for i, t in enumerate(texts) if t.startswith(")")}
    W = sae.member_state(0)["W_dec"]
    best_paren, best_score = None, -1.0
    for f in live:
        nxt = _next_tokens(mined, f)
        share = sum(t in paren for t in nxt) / max(1, len(nxt))
        if share == 0:
            continue
        lens = logit_lens(model, W[f])
        rank = int((lens > max(float(lens[i]) for i in paren)).sum())
        score = share / (1 + rank)
        if score > best_score:
            best_paren, best_score = f, score
    purity = {}
    for f in live:
        toks = [e.tokens[e.target] for e in mined.top_examples(f) + mined.random_examples(f)]
        purity[f] = Counter(toks).most_common(1)[0][1] / len(toks) if toks else 0.0
    # Each role gets its own feature: a closing-paren feature can also be the densest, and a card shown twice
    # teaches nothing.
    chosen = {"closing_paren": best_paren}
    pool = [f for f in live if f != best_paren] or live
    chosen["single_token"] = max(pool, key=lambda f: (purity[f], int(mined.count[f])))
    pool = [f for f in pool if f != chosen["single_token"]] or pool
    chosen["dense"] = max(pool, key=lambda f: int(mined.count[f]))
    rest = [f for f in live if f not in chosen.values()]
    g = torch.Generator().manual_seed(seed)
    chosen["random"] = rest[int(torch.randint(len(rest), (1,), generator=g))] if rest else None
    return {k: v for k, v in chosen.items() if v is not None}


def case_study(model, sae: Any, hook: str, mined: Mined, feature: int, texts: Sequence[str], *,
               token_counts: torch.Tensor | None = None, n_contexts: int = 20, n_quantile_bins: int = 10,
               per_bin: int = 3, steer: float = 2.0, seed: int = 0, exclude: Any = None) -> dict[str, Any]:
    """Everything shown for one feature: moments, histogram, top and quantile examples, logit lens (rare tokens
    left out), the zero / less-than-rank-one / clamp(steer × max) ablation effects over its top contexts, and the
    token ablation of its strongest context. exclude: positions left out of the SAE's inputs (never edited)."""
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
    drops = token_ablation(model, sae, hook, mined.tokens[first.context], first.position, f)
    m = {k: float(v[f]) for k, v in mined.moments().items()}
    return {"feature": f, "frequency": float(mined.frequency()[f]), "max": float(mined.max[f]), **m,
            "edges": mined.bin_edges(f), "hist": mined.hist[f], "top": tops, "quantiles": quant,
            "logit_lens_up": [(texts[i], v) for i, v in up], "logit_lens_down": [(texts[i], v) for i, v in down],
            "effects": effects, "token_ablation": drops,
            "token_ablation_tokens": mined.tokens[first.context, :first.position + 1].tolist(), "texts": texts}


def study_metrics(study: dict[str, Any], role: str) -> dict[str, Any]:
    """The 06_metrics.json entry of one case study."""
    texts = study["texts"]
    targets = Counter(texts[e.tokens[e.target]] for e in study["top"])
    drop = study["effects"]["zero"].top_drops(1)
    d = study["token_ablation"]
    i = int(d.argmax())
    src = texts[study["token_ablation_tokens"][i]]
    return {"role": role, "feature": study["feature"], "frequency": round(study["frequency"], 6),
            "max": round(study["max"], 4), "skew": round(study["skew"], 3), "kurtosis": round(study["kurtosis"], 3),
            "top_tokens": [t for t, _ in targets.most_common(5)],
            "logit_lens_top": [t for t, _ in study["logit_lens_up"][:5]],
            "ablation_top_logprob_drop": [texts[drop[0][0]], round(drop[0][1], 4)] if drop else None,
            "token_ablation_top_input": [src, round(float(d[i]), 4)],
            "loss_change_zero_ablation": round(study["effects"]["zero"].loss_edited
                                               - study["effects"]["zero"].loss_clean, 5)}


def loss_by_feature_set(model, sae: Any, hook: str, tokens: torch.Tensor, reference: Any | None,
                        mined: Mined, threshold: float = 0.9, seed: int = 0,
                        exclude: Any = None) -> dict[str, Any]:
    """Spliced loss with the whole reconstruction, with only the live features whose MCS against the reference
    dictionary (another seed's) is >= threshold plus the error term, and with as many random live features plus the
    error term (`ablation.loss_with_features`)."""
    live = mined.count > 0
    if reference is None:
        high = torch.zeros(0, dtype=torch.long)
    else:
        res = analyses.mcs(sae.W_dec.detach()[0], reference.W_dec.detach()[0], alive_a=live)
        high = ((res.a_to_b >= threshold) & live).nonzero().squeeze(1)
    g = torch.Generator().manual_seed(seed)
    pool = live.nonzero().squeeze(1)
    rnd = pool[torch.randperm(len(pool), generator=g)[:len(high)]]
    loss = loss_with_features(model, sae, hook, tokens, {"high_mcs": high.tolist(), "random": rnd.tolist()},
                              exclude=exclude)
    return {"loss_clean": loss["clean"], "loss_spliced_all": loss["all"], "loss_spliced_high_mcs_only":
            loss["high_mcs"], "loss_spliced_random_same_count": loss["random"], "n_high_mcs": int(len(high)),
            "n_live": int(live.sum()), "mcs_threshold": threshold}
