"""The write-up's words for notebooks 06 and 07, built only from their metrics: what the paired intervals separate,
what they do not, what the controls say, and what the token-table scorer can and cannot see. Nothing here types a
number."""

from __future__ import annotations

import math
from typing import Any, Mapping

from .writeup_base import MISSING, Metrics, get as _get



def _n(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return MISSING
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _iv(iv: Mapping[str, Any] | None, digits: int = 3) -> str:
    """'0.713 [0.679, 0.744], n 150' of an {"mean", "low", "high", "n"} interval."""
    if not isinstance(iv, Mapping) or iv.get("mean") is None:
        return MISSING
    n = f", n {iv['n']}" if "n" in iv else ""
    return f"{_n(iv['mean'], digits)} [{_n(iv.get('low'), digits)}, {_n(iv.get('high'), digits)}]{n}"


def _per_layer(block: Mapping[str, Mapping[str, Any]] | None, methods: tuple[str, ...]) -> str:
    if not block:
        return MISSING
    return "; ".join(f"layer {L}: " + ", ".join(f"{m} {_iv(ms.get(m))}" for m in methods if m in ms)
                     for L, ms in block.items())


def _with_control(m: Metrics, key: str, methods: tuple[str, ...]) -> str:
    """Per layer, each method's {key} interval beside its mean under shuffled explanations (the control)."""
    block, shuffled = _get(m, "07", key) or {}, _get(m, "07", "shuffled") or {}
    if not block:
        return MISSING
    return "; ".join(f"layer {L}: " + ", ".join(
        f"{k} {_iv(ms.get(k))} (shuffled {_n((shuffled.get(f'{L}/{k}') or {}).get(key))})" for k in methods if k in ms)
        for L, ms in block.items())


def _separated(m: Metrics) -> str:
    diffs = _get(m, "07", "paired_difference_to_sae") or {}
    if not diffs:
        return MISSING
    parts = []
    for L, ds in diffs.items():
        above = [k for k, d in ds.items() if d.get("separated") and d.get("low", 0) > 0]
        below = [k for k, d in ds.items() if d.get("separated") and d.get("high", 0) < 0]
        tied = [k for k, d in ds.items() if not d.get("separated")]
        parts.append(f"layer {L}: SAE above {', '.join(below) or 'none'}; below {', '.join(above) or 'none'}; "
                     f"not separated from {', '.join(tied) or 'none'}")
    return "; ".join(parts)


def _neuron_pairs(m: Metrics) -> str:
    diffs = _get(m, "07", "paired_difference_to_neurons") or {}
    out = []
    for L, ds in diffs.items():
        tied = [k for k, d in ds.items() if not d.get("separated")]
        if tied:
            out.append(f"layer {L}: {', '.join(tied)}")
    return "; ".join(out) or "none"


def _frequency(m: Metrics) -> str:
    """The SAE against each method at matched firing frequency (`paired_by_frequency`), else the binned means."""
    by_bin = _get(m, "07", "paired_difference_to_sae_by_frequency")
    if by_bin:
        parts = []
        for rng, ds in by_bin.items():
            above = [k for k, d in ds.items() if d.get("separated") and d.get("high", 0) < 0]
            below = [k for k, d in ds.items() if d.get("separated") and d.get("low", 0) > 0]
            tied = [k for k, d in ds.items() if not d.get("separated")]
            parts.append(f"among directions firing on {rng.replace('-', ' to ')} of tokens (layers pooled; n SAE "
                         f"{next(iter(ds.values())).get('n_b')}): SAE above {', '.join(above) or 'none'}; below "
                         f"{', '.join(below) or 'none'}; not separated from {', '.join(tied) or 'none'}")
        return "; ".join(parts)
    sbf = _get(m, "07", "score_by_frequency") or {}
    if not sbf:
        return MISSING
    edges = next(iter(sbf.values()))["edges"]
    totals = [sum(v["n"][i] for v in sbf.values()) for i in range(len(edges) - 1)]
    i = max(range(len(totals)), key=totals.__getitem__)
    means = ", ".join(f"{k} {_n(v['mean'][i])} (n {v['n'][i]})" for k, v in sbf.items() if v["n"][i])
    return f"among directions firing on {edges[i]:g} to {edges[i + 1]:g} of tokens (the most populated bin): {means}"


def _step0(m: Metrics) -> str:
    s = _get(m, "07", "step0_same_budget_score")
    if not isinstance(s, Mapping):
        return MISSING
    if not isinstance(s.get("step0"), Mapping):
        return f"trained {_iv(s.get('trained'))}; step0: {s.get('step0') or MISSING}"
    d = s.get("difference") or {}
    verdict = ("separated" if d.get("separated") else "not separated")
    lean = ("the point estimate favours the untrained model" if (d.get("mean") or 0) > 0 else
            "the point estimate favours the trained model")
    layer = s.get("layer")
    full = _get(m, "07", "scores", str(layer), "sae", "score_mean") if layer is not None else None
    return (f"at layer {_n(layer)}, the recipe trained on the trained model {_iv(s['trained'])} vs on the untrained "
            f"(step0) model {_iv(s['step0'])}, both on {_n(s.get('n_tokens'))} tokens; paired difference step0 − "
            f"trained {_iv(d)} ({verdict}; {lean}). 03's SAE of the same recipe on {_n(s.get('recipe_n_tokens'))} "
            f"tokens scores {_n(full)}: more training raises the score, but at equal training this scorer does not "
            f"tell a trained model's features from an untrained model's — an untrained model's residual stream "
            f"already carries token identity, which is what a token table reads")


BASELINES = ("neurons", "random", "pca", "ica", "pca_topk", "ica_topk")


def _summary_07(m: Metrics) -> str:
    """One sentence of what is separated, built from the keys: where the SAE is above every baseline, whether the
    step0 control separates, which methods' detection fails its shuffled control."""
    diffs = _get(m, "07", "paired_difference_to_sae")
    if not diffs:
        return ""
    above = [L for L, ds in diffs.items() if any(b in ds for b in BASELINES)
             and all(ds[b].get("separated") and ds[b].get("high", 0) < 0 for b in BASELINES if b in ds)]
    s = _get(m, "07", "step0_same_budget_score") or {}
    d = s.get("difference") if isinstance(s, Mapping) else None
    step0 = (f"the step0 control: {MISSING}" if not isinstance(d, Mapping) else
             "the score does not separate the recipe on the trained model from the same recipe on the untrained "
             "one at the same token budget" if not d.get("separated") else
             "the score separates the trained model's SAE from the untrained model's at the same token budget")
    shuffled = _get(m, "07", "shuffled")
    failing = sorted({k.split("/")[1] for k, v in (shuffled or {}).items()
                      if isinstance(v.get("detection"), float) and v["detection"] > 0.6})
    control = (MISSING if shuffled is None else ", ".join(failing) or "no method")
    return (f"In short: the SAE's mean score is above every baseline's, separated by paired intervals, at layer(s) "
            f"{', '.join(above) or 'none'} — but its directions fire far more rarely than the baselines' (see "
            f"Frequency: at matched frequency the comparison is narrower); {step0}; detection with a wrong "
            f"explanation stays above 0.6 for {control}, so detection does not measure explanations there. ")


def answer_07(m: Metrics) -> str:
    """Notebook 07's answer: scores with intervals, what the paired intervals separate, the ceiling, detection and
    fuzzing, the controls, frequency, and what the scorer can see."""
    main = ("sae", "sae_paper", "neurons", "random", "pca", "ica", "pca_topk", "ica_topk")
    scores = _get(m, "07", "scores") or {}
    score_iv = {L: {k: {"mean": v.get("score_mean"), "low": v.get("score_ci_low"), "high": v.get("score_ci_high"),
                        "n": v.get("n_scored")} for k, v in ms.items()} for L, ms in scores.items()}
    return (_summary_07(m) + f"Explain–simulate–score ({_n(_get(m, '07', 'explainer'))} explainer; explanation and test fragments "
            f"from different documents; mean [95 % interval], n directions): {_per_layer(score_iv, main)}. "
            f"**What the paired intervals separate** (each method minus the SAE, the same resampled test documents "
            f"for both): {_separated(m)}. Pairs of baselines not separated from the neuron basis: {_neuron_pairs(m)}. "
            f"**Ceiling** (the 8-entry token table fitted by the same explainer on each direction's own test "
            f"fragments): "
            f"{_per_layer(_get(m, '07', 'ceiling_score'), main)}. "
            f"**Detection** (balanced accuracy, activating vs silent contexts; chance 0.5; in brackets its value "
            f"with another direction's explanation, the control — a method whose control is far above 0.5 is told "
            f"apart by something other than its explanation, e.g. silent contexts being unusual for a dense "
            f"direction; n: directions with silent contexts to draw): {_with_control(m, 'detection', main)}. "
            f"**Fuzzing** (in each activating test context, its most active tokens vs as many random silent "
            f"tokens): {_with_control(m, 'fuzzing', main)}. "
            f"**Controls**: shuffled explanations score {_n(_get(m, '07', 'shuffled_explanation_mean'))}; "
            f"{_step0(m)}. "
            f"**Frequency**: {_frequency(m)}. **What this scorer can see**: an explanation here is a table of "
            f"tokens and previous tokens, so a direction that depends on longer context, or on meaning rather than "
            f"token identity, scores low however interpretable it is; the ceiling (a greedy 8-entry fit, so an "
            f"approximation) shows what such a table reaches on each direction's own test text, and a method's "
            f"score is read against it, not against 1.")


def answer_06(m: Metrics) -> str:
    """Notebook 06's answer: the features picked (with frequencies), the same-recipe reference, and the loss
    recovered with part of the dictionary against frequency-matched random draws."""
    studies = _get(m, "06", "case_studies") or []
    picked = "; ".join(f"{s.get('role')}: feature {s.get('feature')} (fires on {_n(100 * s['frequency'], 2)} % of "
                       f"tokens; logit lens top {', '.join(map(repr, (s.get('logit_lens_top') or [])[:3]))})"
                       for s in studies if s.get("frequency") is not None)
    density = _get(m, "06", "max_density")
    rule = (f"every role but 'dense' fires on under {_n(100 * density, 1)} % of tokens" if density is not None
            else f"density limit: {MISSING}")
    ref = _get(m, "06", "reference_recipe") or {}
    rnd = _get(m, "06", "loss_recovered_random_same_count") or {}
    high, without = _get(m, "06", "loss_recovered_high_mcs_only"), _get(m, "06", "loss_recovered_without_high_mcs")
    n_high = _get(m, "06", "n_high_mcs")
    verdict = MISSING
    if isinstance(high, (int, float)) and rnd.get("low") is not None:
        verdict = ("above the random draws' range" if high > rnd["high"] else
                   "below the random draws' range" if high < rnd["low"] else
                   "inside the random draws' range: not separated from frequency-matched random features")
    diff = [k for k in ("kind", "ratio", "hparams", "n_tokens", "lr", "batch_size")
            if isinstance(ref.get("dictionary"), Mapping) and isinstance(ref.get("reference"), Mapping)
            and ref["dictionary"].get(k) != ref["reference"].get(k)]
    weak = (f" With only {n_high} high-MCS features the comparison is weak either way."
            if isinstance(n_high, int) and n_high < 10 else "")
    return (f"Features picked by rule ({rule}): {picked or MISSING}. "
            + ("Reference dictionary: the same recipe from another seed"
               + (f" (settings that differ besides the seed: {', '.join(diff)})" if diff else "")
               if ref else "Reference dictionary: another seed's dictionary of the same size (a user's folder: "
                           "its recipe is not checked)") +
            f"; {_n(n_high)} of {_n(_get(m, '06', 'n_live'))} live features have MCS ≥ "
            f"{_n(_get(m, '06', 'mcs_threshold'), 2)} against it. **Fraction of loss recovered** (0 = every feature "
            f"ablated with the error term kept, 1 = every feature kept with the error term, i.e. the clean model): "
            f"keeping only the high-MCS features {_n(high)}, {verdict} (mean {_n(rnd.get('mean'))}, 2.5-97.5 "
            f"percentile range [{_n(rnd.get('low'))}, {_n(rnd.get('high'))}] over {_n(rnd.get('draws'))} "
            f"frequency-matched random sets of the same size); removing only them keeps {_n(without)}.{weak}")
