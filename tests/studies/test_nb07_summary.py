"""Notebook 07's summary on hand-made score tables: intervals, paired differences, what is separated, the score
by frequency."""

import math

import numpy as np
import pandas as pd
import pytest

from sparse_coding.analyses.interpretability import fragment_sums
from sparse_coding.studies import nb07_summary as S


def _table(seed, noise, n=30, freq=0.01):
    rng = np.random.default_rng(seed)
    rows = []
    for d in range(n):
        t = [rng.random(8) for _ in range(4)]
        p = [x + rng.normal(0, noise, 8) for x in t]
        sums = fragment_sums(t, p)
        r = float(np.corrcoef(np.concatenate(t), np.concatenate(p))[0, 1])
        rows.append({"latent": d, "frequency": freq * (1 + d % 3), "top": r, "random": r, "top_and_random": r,
                     "ceiling": 1.0, "detection": 0.9, "fuzzing": 0.8, "sums": sums,
                     "docs": rng.integers(0, 40, 4).tolist()})
    t = pd.DataFrame(rows)
    t.attrs["skipped"] = 2
    return t


def test_paired_and_separated_ordering():
    tables = {"0/sae": _table(0, 0.2), "0/neurons": _table(1, 3.0), "0/pca": _table(2, 0.2)}
    scores = S.scores(tables)
    assert scores["0"]["sae"]["n_scored"] == 30 and scores["0"]["sae"]["n_skipped"] == 2
    to_sae = S.paired(tables, "sae", n_boot=300)
    assert set(to_sae["0"]) == {"neurons", "pca"}
    assert to_sae["0"]["neurons"]["separated"] and to_sae["0"]["neurons"]["high"] < 0
    assert to_sae["0"]["pca"]["low"] > to_sae["0"]["neurons"]["high"]  # pca, as noisy as the SAE, lies nearer 0
    lines = S.separated_ordering(scores, to_sae)["0"]
    assert "sae > neurons" in lines
    iv = S.column(tables, "detection")["0"]["sae"]
    assert iv["mean"] == pytest.approx(0.9) and iv["n"] == 30


def test_same_table_is_not_separated_from_itself():
    t = _table(3, 0.5)
    res = S.paired({"0/a": t, "0/b": t}, "b", n_boot=300)["0"]["a"]
    assert res["low"] <= 0 <= res["high"] and not res["separated"]


def test_score_by_frequency_bins_by_hand():
    t = _table(4, 0.5, n=6, freq=0.002)   # frequencies 0.002, 0.004, 0.006: one bin, 1e-3 .. 1e-2
    out = S.score_by_frequency({"0/sae": t, "1/sae": t})
    assert out["sae"]["n"] == [0, 0, 12, 0, 0]
    assert out["sae"]["mean"][2] == pytest.approx(t["top_and_random"].mean())
    assert math.isnan(out["sae"]["mean"][0])
    pts = S.frequency_points({"0/sae": t})
    assert len(pts["sae"][0]) == 6


def test_paired_by_frequency_keeps_only_matched_directions():
    sae, ica = _table(5, 0.2, n=30, freq=0.02), _table(6, 3.0, n=30, freq=0.2)  # 0.02-0.06 vs 0.2-0.6
    out = S.paired_by_frequency({"0/sae": sae, "0/ica": ica}, n_boot=200, min_n=5)
    assert out == {}  # no bin holds both: nothing is compared
    both = S.paired_by_frequency({"0/sae": sae, "0/ica": _table(7, 3.0, n=30, freq=0.02)}, n_boot=200, min_n=5)
    assert list(both) == ["0.01-0.1"] and both["0.01-0.1"]["ica"]["separated"]


def test_save_tables_round_trips_the_rows(tmp_path):
    import json
    t = _table(8, 0.5, n=3)
    t.loc[0, "detection"] = float("nan")
    path = S.save_tables({"0/sae": t}, {"0/sae": t.iloc[:0]}, tmp_path / "rows.json")
    back = json.loads(path.read_text())
    assert len(back["own"]["0/sae"]) == 3 and back["shuffled"]["0/sae"] == []
    assert back["own"]["0/sae"][0]["detection"] is None and "sums" not in back["own"]["0/sae"][0]
    assert back["own"]["0/sae"][1]["top"] == pytest.approx(t["top"][1])
