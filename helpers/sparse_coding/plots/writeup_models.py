"""The write-up's side-by-side table: the offline model, each real pretrained model run with `make figures-real`
(figures/<model>/), and the original work, for the keys they share. Every cell is read from a metrics file or
original_work.json; a key a run did not write reads "not measured in this run"."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Mapping

from .writeup_base import MISSING, Metrics, get as _get
from .writeup_text import _f, ranked

KINDS = ("relu", "topk", "batchtopk", "jumprelu")


def load_metrics(folder: Path) -> dict[str, dict]:
    """{notebook number: its metrics} of one figures folder."""
    return {p.name[:2]: json.loads(p.read_text()) for p in sorted(folder.glob("[0-9][0-9]_metrics.json"))}


def model_runs(figures_dir: Path) -> dict[str, dict[str, dict]]:
    """{folder name: metrics} of every figures/<model>/ holding a run (`make figures-real`)."""
    return {d.name: load_metrics(d) for d in sorted(figures_dir.iterdir())
            if d.is_dir() and any(d.glob("[0-9][0-9]_metrics.json"))}


def _depth(m: Metrics) -> Any:
    hook, n = _get(m, "03", "hook"), _get(m, "02", "n_layers") or _get(m, "00", "n_layers")
    if hook is None:
        return None
    layer = int(str(hook).split(".")[1]) if str(hook).startswith("blocks.") else None
    if layer is None or not n:
        return hook
    return f"{hook} (after {layer + 1} of {n} blocks: depth {(layer + 1) / n:.2f})"


def _kind_cell(m: Metrics, kind: str) -> Any:
    fvu, l0 = _get(m, "03", f"best_{kind}_fvu"), _get(m, "03", f"best_{kind}_l0")
    if fvu is None:
        return None
    return f"FVU {_f(fvu)} at L0 {_f(l0, 3)}, loss recovered {_f(_get(m, '03', f'best_{kind}_loss_recovered'))}"


def _interp(m: Metrics) -> Any:
    separated = _get(m, "07", "separated_from_sae")
    if separated:  # what the paired intervals separate from the SAE, per layer
        return "; ".join(f"L{layer}: {', '.join(lines)}" for layer, lines in separated.items())
    scores = _get(m, "07", "scores")
    if not scores:
        return None
    return "; ".join(f"L{layer}: " + ranked(dict(sorted(methods.items(), key=lambda kv: -(
        kv[1].get("score_mean") or -math.inf))[:4])) for layer, methods in scores.items())


def _studies(m: Metrics) -> Any:
    studies = _get(m, "06", "case_studies")
    if not studies:
        return None
    return "; ".join(f"{s.get('role')}: f{s.get('feature')} top-activating tokens "
                     f"{', '.join(map(repr, (s.get('top_tokens') or [])[:3]))}" for s in studies)


def _clean_loss(m: Metrics) -> Any:
    loss, ppl = _get(m, "03", "clean_loss"), _get(m, "03", "clean_perplexity")
    if loss is None and ppl is not None:  # a run from before clean_loss was recorded: the same number
        loss = math.log(ppl)
    return None if loss is None else f"{_f(loss)} nats/token (perplexity {_f(ppl)})"


def _exclusion(m: Metrics) -> str:
    ex = _get(m, "02", "exclude")
    if not ex:
        return "nothing left out"
    limits = _get(m, "02", "norm_limits") or {}
    dropped = _get(m, "02", "massive_rows_excluded") or {}
    per_layer = ", ".join(f"L{h.split('.')[1]} {dropped.get(h, '?')} (limit {v:.0f})" for h, v in limits.items()
                          if v is not None)
    return (f"left out: positions {ex.get('positions')}, token ids {ex.get('token_ids')}"
            + (f", rows over {ex['norm_ratio']:g}x the median norm: {per_layer}" if ex.get("norm_ratio") else ""))


# (row, function of a run's metrics, original_work.json key or None)
ROWS: list[tuple[str, Callable[[Metrics], Any], str | None]] = [
    ("model, hook (relative depth)", lambda m: (f"{_get(m, '03', 'model')}: {_depth(m)}"
                                                if _get(m, "03", "model") else None), None),
    ("harvest: tokens per layer, tokens/s, positions left out", lambda m: (
        None if _get(m, "02", "n_tokens") is None else
        f"{_f(_get(m, '02', 'n_tokens'))} tokens, {_f(_get(m, '02', 'harvest_tokens_per_s'), 3)} tokens/s, "
        f"{_exclusion(m)}"), None),
    ("clean loss on held-out text (perplexity)", _clean_loss, "perplexity_clean_pythia70m"),
    ("perplexity with the best SAE spliced in", lambda m: (
        None if _get(m, "03", "spliced_perplexity") is None else
        f"{_f(_get(m, '03', 'spliced_perplexity'))} ({_get(m, '03', 'spliced_perplexity_kind')})"),
     "perplexity_spliced_layer2_residual"),
    *[(f"best {k} within the L0 budget", (lambda k: lambda m: _kind_cell(m, k))(k), None) for k in KINDS],
    ("features per token, best ReLU-L1", lambda m: _get(m, "03", "best_relu_l0"), "features_per_token_residual"),
    ("MMCS vs the next-larger dictionary", lambda m: _get(m, "04", "mmcs_vs_larger"), None),
    ("share of live features with MCS ≥ 0.9 vs larger", lambda m: _get(m, "04", "share_above_0.9"),
     "share_mcs_above_0.9_layer3"),
    ("dead fraction by dictionary size (04)", lambda m: _get(m, "04", "dead_fraction"), None),
    ("MMCS across seeds (same size)", lambda m: _get(m, "04", "mmcs_across_seeds"), None),
    ("share ≥ 0.9 across seeds", lambda m: _get(m, "04", "share_above_0.9_across_seeds"), None),
    ("reached 0.9 self-similarity, later below 0.6", lambda m: (
        {k: v.get("share_reached_0.9_then_below_0.6") for k, v in (_get(m, "05", "conditions") or {}).items()}
        or None), "share_reached_0.9_then_below_0.6"),
    ("interpretability: methods against the SAE, paired intervals", _interp, "interpretability_ordering"),
    ("case-study features (06)", _studies, None),
]


# Original-work values that are perplexities, shown in a row of losses as ln(perplexity) too.
_PERPLEXITIES = {"perplexity_clean_pythia70m"}


def _original(original: Mapping[str, Any], key: str | None) -> str:
    if not key or key not in original:
        return "—"
    value = original[key].get("value")
    text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
    if key in _PERPLEXITIES and isinstance(value, (int, float)):
        text = f"{math.log(value):.3g} nats/token (perplexity {value})"
    return f"{text} ({original[key].get('setting', '')})"


def side_by_side(offline: Metrics, runs: Mapping[str, Metrics], original: Mapping[str, Any]) -> list[str]:
    """Markdown lines: one row per shared quantity; columns the offline model, each model run, the original work."""
    names = list(runs)
    lines = ["| quantity | offline model | " + " | ".join(names) + " | original work (its setting) |",
             "|---" * (3 + len(names)) + "|"]
    for row, get, key in ROWS:
        cells = [get(offline)] + [get(runs[n]) for n in names]
        text = [_f(c) if c is not None else MISSING for c in cells]
        lines.append(f"| {row} | " + " | ".join(t.replace("|", "/") for t in text) + f" | {_original(original, key)} |")
    return lines
