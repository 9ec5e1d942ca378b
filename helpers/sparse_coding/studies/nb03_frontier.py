"""Notebook 03's summary: each kind's frontier against ReLU + L1 at the same L0, and the metrics file's numbers."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd


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
    out["clean_loss"] = float(table["ce_clean"].iloc[0]) if "ce_clean" in table else float("nan")  # nats/token
    if "n_predictions" in table:
        out["n_loss_predictions"] = int(table["n_predictions"].iloc[0])
    within = best[best["l0"] <= l0_budget] if l0_budget is not None else best
    within = within if len(within) else best
    ref = within.loc[within["fvu"].idxmin()] if "fvu" in within and within["fvu"].notna().any() else best.iloc[0]
    out["spliced_perplexity"] = float(ref.get("ppl_spliced", float("nan")))
    out["spliced_perplexity_kind"] = str(ref.get("kind", ""))
    if "sweep" in ref and "member" in ref:
        out["spliced_perplexity_sweep"], out["spliced_perplexity_member"] = str(ref["sweep"]), int(ref["member"])
    return out
