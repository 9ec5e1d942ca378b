"""The write-up's words: each notebook's question, a one- or two-sentence answer built from its metrics file, and
the rows of the "original work vs this run" table (the original's numbers read from ../shared/original_work.json or
its copy in figures/original_work.json). Nothing here types a number: every value comes from a metrics file, and a
missing key reads "not measured in this run"."""

from __future__ import annotations

import json
import math
from typing import Any, Callable, Mapping

from .writeup_base import MISSING, Metrics, get as _get
from .writeup_e2e import E2E_COMPARISONS, answer_08
from .writeup_interp import answer_06, answer_07


QUESTIONS = {
    "00": "Can a small language model with Pythia's architecture, trained here offline, stand in for Pythia-70M?",
    "01": "On toy data with known features, does every kind of SAE recover them, and how do classical methods "
          "(PCA, ICA, K-SVD, online dictionary learning) compare?",
    "02": "What do the residual-stream activations we train on look like?",
    "03": "How well do SAEs of each kind reconstruct the residual stream at a given sparsity, and what does splicing "
          "their reconstruction in cost the model?",
    "04": "Do dictionaries of different sizes and seeds learn the same features (max cosine similarity)?",
    "05": "Are features stable over SAE training (in today's conditions and the original team's), and when do the "
          "final model's features emerge over the model's own training?",
    "06": "What do single features do: their top examples, what they write to the logits, what removing them costs?",
    "07": "Are SAE features more interpretable than the neuron basis, random directions, PCA and ICA?",
    "08": "At the same cost to the model's next-token loss, do SAEs trained end to end (on the KL of the model's "
          "output, Braun et al. 2024) need fewer features per token and fewer alive features than local ones, and "
          "what do they give up?",
}



def _f(value: Any, digits: int = 3) -> str:
    if value is None:
        return MISSING
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) >= 1000 else f"{value:.{digits}f}".rstrip("0").rstrip(".")
    if isinstance(value, Mapping):
        return ", ".join(f"{k}: {_f(v, digits)}" for k, v in value.items())
    return str(value)


def ranked(methods: Mapping[str, Mapping[str, Any]]) -> str:
    """Methods by mean score, joined by ">" only where the 95 % intervals do not overlap, else "≈" (an ordering
    the measurement does not separate is not stated)."""
    order = sorted(methods.items(), key=lambda kv: -(kv[1].get("score_mean") or -math.inf))
    out = ""
    for i, (k, v) in enumerate(order):
        if i:
            prev = order[i - 1][1]
            lo, hi = prev.get("score_ci_low"), v.get("score_ci_high")
            out += " > " if lo is not None and hi is not None and lo > hi else " ≈ "
        out += f"{k} {_f(v.get('score_mean'))}"
    return out


def _answer_00(m: Metrics) -> str:
    return (f"A {_f(_get(m, '00', 'n_layers'))}-layer, d_model {_f(_get(m, '00', 'd_model'))} GPT-NeoX trained on "
            f"{_f(_get(m, '00', 'train_tokens'))} tokens reaches validation loss {_f(_get(m, '00', 'val_loss'))} nats "
            f"against a unigram entropy of {_f(_get(m, '00', 'unigram_entropy'))}: it has learned far more than token "
            f"frequencies, so its residual stream carries structure worth decomposing.")


def _answer_01(m: Metrics) -> str:
    kinds = [k for k in ("relu", "topk", "batchtopk", "jumprelu") if _get(m, "01", f"best_{k}_mmcs") is not None]
    best = "; ".join(f"{k} {_f(_get(m, '01', f'best_{k}_mmcs'))} (L0 {_f(_get(m, '01', f'best_{k}_l0'), 2)})"
                     for k in kinds)
    return (f"Best MMCS with the true features per kind: {best or MISSING}; random directions score "
            f"{_f(_get(m, '01', 'random_mmcs'))}. PCA {_f(_get(m, '01', 'pca_mmcs'))}, ICA "
            f"{_f(_get(m, '01', 'ica_mmcs'))}, K-SVD told the true k {_f(_get(m, '01', 'omp_true_k_mmcs'))} and 2k "
            f"{_f(_get(m, '01', 'omp_wrong_k_mmcs'))}, online dictionary learning "
            f"{_f(_get(m, '01', 'online_dl_mmcs'))}. In the original team's small setting K-SVD's median MMCS by the "
            f"k it is told is {_f(_get(m, '01', 'ksvd_mmcs_by_k'))} (rounds to converge "
            f"{_f(_get(m, '01', 'ksvd_epochs_by_k'))}), the SAE's {_f(_get(m, '01', 'sae_mmcs_small_setting'))}. "
            f"Each kind's number is the best cell of its grid on one data seed, chosen and scored on the same "
            f"held-out samples, and BatchTopK's k were picked after pilot runs of other k on this data: they show "
            f"that every kind can recover the features, not an order between the kinds.")


def _answer_02(m: Metrics) -> str:
    text = (f"{_f(_get(m, '02', 'n_tokens'))} tokens per layer harvested at "
            f"{_f(_get(m, '02', 'harvest_tokens_per_s'), 3)} tokens/s, d_model {_f(_get(m, '02', 'd_model'))}.")
    massive = {h.split(".")[1]: o for h, o in (_get(m, "02", "massive_rows_kept") or {}).items() if o.get("n_rows")}
    if massive:
        text += (" Rows kept for the SAEs with a norm over 10x the median (massive activations the exclusion of "
                 "position 0 and special tokens did not catch), by layer: " +
                 "; ".join(f"layer {L}: {o['n_rows']} rows (most at positions "
                           f"{', '.join(f'{p} ({n})' for p, n in sorted(o['positions'].items(), key=lambda kv: -kv[1])[:4])}), "
                           f"{_f(o['share_of_sum_squares'])} of Σ‖x‖²" for L, o in massive.items()) +
                 ". They weigh on every SAE's MSE, FVU and input scale at those layers.")
    dropped = {h.split(".")[1]: n for h, n in (_get(m, "02", "massive_rows_excluded") or {}).items()}
    if any(dropped.values()):
        limits = _get(m, "02", "norm_limits") or {}
        text += (" Rows left out for their norm alone (over 10x the median at the layer, measured on the first "
                 "8 contexts: massive activations past position 0), by layer: " +
                 "; ".join(f"layer {L}: {n} (limit {limits.get(f'blocks.{L}.hook_resid_post') or float('nan'):.0f})"
                           for L, n in dropped.items()) + ".")
        kept = _get(m, "02", "massive_rows_kept") or {}
        tails = [h.split(".")[1] for h, n in (_get(m, "02", "massive_rows_excluded") or {}).items()
                 if n and (kept.get(h) or {}).get("max_norm", 0) > 0.9 * (limits.get(h) or float("inf"))]
        if tails:
            text += (f" At layer(s) {', '.join(tails)} the largest kept row lies within 10 % of the limit: there the "
                     f"rows left out are the tail of one continuous distribution cut at the threshold, not a "
                     f"separate cluster of massive activations.")
    return text


def _answer_03(m: Metrics) -> str:
    kinds = [k for k in ("relu", "topk", "batchtopk", "jumprelu") if _get(m, "03", f"best_{k}_fvu") is not None]
    rows = "; ".join(f"{k} FVU {_f(_get(m, '03', f'best_{k}_fvu'))} at L0 {_f(_get(m, '03', f'best_{k}_l0'), 3)}"
                     for k in kinds)
    return (f"Best member per kind within L0 ≤ {_f(_get(m, '03', 'l0_budget'))}: {rows or MISSING}. Perplexity "
            f"{_f(_get(m, '03', 'clean_perplexity'))} clean, {_f(_get(m, '03', 'spliced_perplexity'))} with the SAE "
            f"of lowest spliced perplexity ({_f(_get(m, '03', 'spliced_perplexity_kind'))}) spliced in; the best "
            f"ReLU gives {_f(_get(m, '03', 'best_relu_spliced_perplexity'))}. Measured on "
            f"{_f(_get(m, '03', 'n_loss_predictions'))} predictions with one seed per setting, no interval: kinds "
            f"whose perplexities differ by a few percent, at different L0, are not separated.")


def _answer_04(m: Metrics) -> str:
    return (f"MMCS against the next-larger dictionary {_f(_get(m, '04', 'mmcs_vs_larger'))} (random directions: "
            f"{_f(_get(m, '04', 'random_baseline_mmcs'))}); share of features above 0.9: "
            f"{_f(_get(m, '04', 'share_above_0.9'))}. {_f(_get(m, '04', 'note'))}")


def _answer_05(m: Metrics) -> str:
    cond = _get(m, "05", "conditions") or {}
    shares = "; ".join(f"{name}: {_f(c.get('share_reached_0.9_then_below_0.6'))}" for name, c in cond.items())
    return (f"Share of live features that reached 0.9 self-similarity and later fell below 0.6: "
            f"{shares or _f(_get(m, '05', 'share_reached_0.9_then_below_0.6'))}. Final-model features present "
            f"(1:1 match ≥ 0.9) by revision: {_f(_get(m, '05', 'final_features_present_by_step'))}.")


def _scored_ordering(m: Metrics, sep: str = "; ", prefix: str = "layer ") -> str | None:
    """Each layer's comparisons with the SAE that the paired intervals separate (`separated_from_sae`), or, for a
    run from before those, the methods by mean score with ">" only where the 95 % intervals separate them."""
    separated = _get(m, "07", "separated_from_sae")
    if separated:
        return sep.join(f"{prefix}{layer}: {', '.join(lines)}" for layer, lines in separated.items())
    scores = _get(m, "07", "scores")
    if scores:
        return sep.join(f"{prefix}{layer}: {ranked(methods)}" for layer, methods in scores.items())
    order = _get(m, "07", "ordering_by_layer")  # a run from before the intervals were recorded
    return None if not order else sep.join(f"{prefix}{layer}: {' > '.join(ms)}" for layer, ms in order.items())


ANSWERS: dict[str, Callable[[Metrics], str]] = {
    "00": _answer_00, "01": _answer_01, "02": _answer_02, "03": _answer_03, "04": _answer_04, "05": _answer_05,
    "06": answer_06, "07": answer_07, "08": answer_08}


def _ordering_07(m: Metrics) -> str | None:
    return _scored_ordering(m, prefix="L")


# (quantity, original_work.json key, function of our metrics -> this run's value, this run's setting)
COMPARISONS: list[tuple[str, str, Callable[[Metrics], Any], str]] = [
    ("Toy data: SAE MMCS", "toy_sae_mmcs", lambda m: _get(m, "01", "best_relu_mmcs"),
     "notebook 01, best ReLU-L1 of its grid (other kinds in its section)"),
    ("Toy data: K-SVD with k mis-set", "toy_ksvd_mmcs", lambda m: _get(m, "01", "omp_wrong_k_mmcs"),
     "notebook 01, exact K-SVD told 2× the true k, 512 features in 256 dims"),
    ("K-SVD, 10 standard-basis features, told k", "ksvd_small_experiment",
     lambda m: (None if _get(m, "01", "ksvd_mmcs_by_k") is None else
                f"MMCS by k {_f(_get(m, '01', 'ksvd_mmcs_by_k'))}; rounds to converge "
                f"{_f(_get(m, '01', 'ksvd_epochs_by_k'))}"), "notebook 01, median over seeds"),
    ("Perplexity, clean", "perplexity_clean_pythia70m", lambda m: _get(m, "03", "clean_perplexity"),
     "notebook 03, the offline model's held-out text (not Pythia, not the Pile)"),
    ("Perplexity, layer-2 residual reconstruction spliced in", "perplexity_spliced_layer2_residual",
     lambda m: _get(m, "03", "spliced_perplexity"), "notebook 03, best SAE within L0 ≤ 32, offline model"),
    ("Reached 0.9 self-similarity, later fell below 0.6", "share_reached_0.9_then_below_0.6",
     lambda m: ({k: v.get("share_reached_0.9_then_below_0.6") for k, v in (_get(m, "05", "conditions") or {}).items()}
                or _get(m, "05", "share_reached_0.9_then_below_0.6")),
     "notebook 05: today's TopK run and the original's conditions (tied ReLU-L1, constant lr, mini-runs)"),
    ("MCS against a larger dictionary: share above 0.9", "share_mcs_above_0.9_layer3",
     lambda m: _get(m, "04", "share_above_0.9"), "notebook 04, by dictionary size, offline model layer 2"),
    ("MCS bimodal?", "mcs_bimodal", lambda m: _get(m, "04", "bimodal_vs_larger"),
     "notebook 04, Sarle's coefficient > 5/9 per size"),
    ("Interpretability ordering", "interpretability_ordering", _ordering_07,
     "notebook 07, token-table explainer/simulator, offline model"),
    ("Features per token (residual ReLU SAE)", "features_per_token_residual",
     lambda m: _get(m, "03", "best_relu_l0"), "notebook 03, best ReLU-L1 within L0 ≤ 32"),
    *E2E_COMPARISONS,
]


def _original_cell(entry: Mapping[str, Any] | None) -> tuple[str, str]:
    if not entry:
        return "—", "—"
    value = entry.get("value")
    text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
    if entry.get("range_stated"):
        text += f" (stated: {entry['range_stated']})"
    return text, f"{entry.get('setting', '')}; {entry.get('source', '')}"


def comparison_table(original: Mapping[str, Any], metrics: Metrics) -> list[str]:
    """Markdown lines of the "original work vs this run" table."""
    lines = ["| quantity | original work | its setting and source | this run | this run's setting |",
             "|---|---|---|---|---|"]
    for name, key, ours, setting in COMPARISONS:
        value, where = _original_cell(original.get(key))
        mine = ours(metrics)
        lines.append(f"| {name} | {value} | {where} | {_f(mine) if mine is not None else MISSING} | {setting} |")
    return lines
