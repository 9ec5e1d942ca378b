"""The 06/07 write-up text states only what the metrics separate, and says what is missing."""

from sparse_coding.plots import writeup_interp as W


def _iv(mean, low, high, n=150):
    return {"mean": mean, "low": low, "high": high, "n": n}


def _m07(step0_separated: bool):
    diff = {"mean": 0.05, "low": 0.01 if step0_separated else -0.01, "high": 0.1, "separated": step0_separated}
    return {"07": {
        "scores": {"0": {m: {"score_mean": v, "score_ci_low": v - 0.02, "score_ci_high": v + 0.02, "n_scored": 150}
                         for m, v in (("sae", 0.7), ("neurons", 0.4), ("ica", 0.69))}},
        "paired_difference_to_sae": {"0": {"neurons": {"mean": -0.3, "low": -0.35, "high": -0.25, "separated": True},
                                           "ica": {"mean": -0.01, "low": -0.04, "high": 0.02, "separated": False}}},
        "paired_difference_to_neurons": {"0": {"ica": {"separated": True, "low": 0.2, "high": 0.3}}},
        "detection": {"0": {"sae": _iv(0.77, 0.75, 0.79), "neurons": _iv(0.9, 0.87, 0.92, 90)}},
        "shuffled": {"0/sae": {"detection": 0.51}, "0/neurons": {"detection": 0.8}},
        "step0_same_budget_score": {"trained": _iv(0.5, 0.47, 0.53), "step0": _iv(0.55, 0.52, 0.58),
                                    "difference": diff, "n_tokens": 400000},
        "explainer": "token-table"}}


def test_answer_07_states_only_what_is_separated():
    text = W.answer_07(_m07(False))
    assert "SAE above neurons" in text and "not separated from ica" in text
    assert "at layer(s) none" in text  # ica is not separated: the SAE is not above every baseline
    assert W.answer_07({"07": {"explainer": "x"}}).startswith("Explain")  # no paired keys: no summary drawn
    assert "does not separate the recipe on the trained model" in text
    assert "above 0.6 for neurons" in text and "(shuffled 0.800)" in text
    assert "favours the untrained model" in text
    assert W.MISSING in text  # no fuzzing, ceiling or frequency keys in this run
    assert "separates the trained model's SAE" in W.answer_07(_m07(True))


def test_answer_06_reads_the_random_draws():
    m = {"06": {"case_studies": [{"role": "single_token", "feature": 3, "frequency": 0.01, "logit_lens_top": ["a"]}],
                "loss_recovered_high_mcs_only": 0.06, "loss_recovered_without_high_mcs": 0.98, "n_high_mcs": 3,
                "n_live": 512, "mcs_threshold": 0.9,
                "loss_recovered_random_same_count": {"mean": 0.03, "low": 0.003, "high": 0.097, "draws": 20},
                "reference_recipe": {"dictionary": {"kind": "topk", "seed": 0}, "reference": {"kind": "topk", "seed": 1}}}}
    text = W.answer_06(m)
    assert "not separated from frequency-matched random features" in text and "20 frequency-matched" in text
    assert "fires on 1.00 % of tokens" in text and "same recipe from another seed" in text
    assert "density limit: not measured" in text and "only 3 high-MCS" in text
    m["06"]["max_density"] = 0.05
    assert "under 5.0 % of tokens" in W.answer_06(m)
    m["06"]["loss_recovered_high_mcs_only"] = 0.5
    assert "above the random draws' range" in W.answer_06(m)
    assert W.MISSING in W.answer_06({})
