"""Section 08 of the write-up states a difference between kinds of loss only where it exceeds the seed-to-seed
spread at one setting, and says "not separated" otherwise; missing numbers read as not measured."""

from __future__ import annotations

import math

from sparse_coding.plots.writeup_e2e import answer_08, compare


def metrics(l0_e2e: float, spread_e2e: list[float]) -> dict:
    return {"l0_at_matched_ce": {"local": 70.0, "e2e": l0_e2e},
            "seed_spread": {"local": {"l0": [69.0, 71.0]}, "e2e": {"l0": spread_e2e}}}


def test_a_difference_beyond_the_seed_spread_is_stated():
    text = compare(metrics(35.0, [34.0, 37.0]), "l0_at_matched_ce", "l0", "e2e", "local", "fewer", "more")
    assert "e2e fewer" in text and "not separated" not in text


def test_a_difference_within_the_seed_spread_is_not_separated():
    text = compare(metrics(60.0, [40.0, 80.0]), "l0_at_matched_ce", "l0", "e2e", "local", "fewer", "more")
    assert "not separated" in text and "fewer" not in text.split(":")[-1].split("(")[0]


def test_one_seed_is_never_separated_and_nan_is_not_measured():
    assert "one seed: not separated" in compare(metrics(35.0, [34.0]), "l0_at_matched_ce", "l0", "e2e", "local",
                                                "fewer", "more")
    m = metrics(math.nan, [34.0, 37.0])
    assert "not measured" in compare(m, "l0_at_matched_ce", "l0", "e2e", "local", "fewer", "more")
    assert answer_08({}) == "not measured in this run"


def test_the_comparison_table_says_yes_only_beyond_the_spread():
    from sparse_coding.plots.writeup_e2e import verdict

    assert verdict(metrics(35.0, [34.0, 37.0]), "l0_at_matched_ce", "l0", "e2e", "local").startswith("yes")
    assert verdict(metrics(60.0, [40.0, 80.0]), "l0_at_matched_ce", "l0", "e2e", "local").startswith(
        "same direction, not separated")
    assert verdict(metrics(90.0, [89.0, 91.0]), "l0_at_matched_ce", "l0", "e2e", "local").startswith(
        "no: the opposite")
    assert verdict(metrics(math.nan, [1.0, 2.0]), "l0_at_matched_ce", "l0", "e2e", "local") is None
