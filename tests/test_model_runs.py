"""A run on another model (`make figures-real`, `runner --model`): its parameters, where its figures go, and the
write-up's side-by-side table reading every cell from the runs' metrics files."""

from __future__ import annotations

import json

import pytest

from sparse_coding import files, runner
from sparse_coding.paths import repo_root
from sparse_coding.plots import writeup


def test_runner_model_parameters():
    nb = repo_root() / "notebooks" / "03_train.ipynb"
    params = runner.model_parameters(nb, "smollm2-135m")
    real = json.loads((repo_root() / "notebooks" / "real.json").read_text())
    assert params["model"] == "smollm2-135m" and params["layer"] == real["smollm2-135m"]["03_train"]["layer"]
    with pytest.raises(SystemExit, match="no sizes for model"):  # SmolLM2's layer 14 would not fit another model
        runner.model_parameters(nb, "EleutherAI/pythia-70m-deduped")
    assert params["figures_dir"].endswith("figures/smollm2-135m")
    assert runner.model_figures_name("/x/y/tiny.gguf") == "tiny"
    smoke = runner.smoke_parameters(repo_root() / "notebooks" / "05_tracking.ipynb", repo_root() / "build" / "s",
                                    "t.gguf")
    assert smoke["model"] == "t.gguf" and smoke["revisions"] == ["final"]
    assert "model" not in runner.smoke_parameters(nb, repo_root() / "build" / "s")  # the offline default
    names = [p.name[:2] for p in runner.notebooks()]
    assert {"00", "01"} <= set(names) and set(runner.MODEL_NOTEBOOKS) <= set(names)


def test_side_by_side_table_reads_each_run(tmp_path):
    files.write_metrics(tmp_path, "03", {"model": "offline", "hook": "blocks.2.hook_resid_post", "clean_loss": 3.5,
                                         "clean_perplexity": 33.1, "best_topk_fvu": 0.125, "best_topk_l0": 16.0,
                                         "best_topk_loss_recovered": 0.99})
    files.write_metrics(tmp_path, "02", {"n_layers": 4})
    sub = tmp_path / "smollm2-135m"
    files.write_metrics(sub, "03", {"model": "smollm2-135m", "hook": "blocks.14.hook_resid_post", "clean_loss": 2.25,
                                    "clean_perplexity": 9.49})
    files.write_metrics(sub, "02", {"n_layers": 30, "n_tokens": 1000, "harvest_tokens_per_s": 900.0,
                                    "exclude": {"positions": [0], "token_ids": [0, 1, 2], "norm_ratio": 10.0},
                                    "massive_rows_excluded": {"blocks.14.hook_resid_post": 17},
                                    "norm_limits": {"blocks.14.hook_resid_post": 512.5}})
    text = writeup.build(tmp_path)
    table = text[text.index("side by side"):]
    row = next(line for line in table.splitlines() if line.startswith("| clean loss"))
    assert "3.5 nats/token" in row and "2.25 nats/token" in row
    depth = next(line for line in table.splitlines() if line.startswith("| model, hook"))
    assert "depth 0.75" in depth and "depth 0.50" in depth  # (2+1)/4 and (14+1)/30
    topk = next(line for line in table.splitlines() if line.startswith("| best topk"))
    assert "FVU 0.125 at L0 16" in topk and "not measured in this run" in topk  # the model run has no TopK key
    assert "[smollm2-135m](smollm2-135m/README.md)" in text
    writeup.main(["--figures", str(tmp_path)])
    sub_text = (sub / "README.md").read_text()
    assert "30 blocks" in sub_text and "The original work vs this run" not in sub_text
    assert "position(s) [0], token ids [0, 1, 2]" in sub_text and "over 10.0x the median" in sub_text  # 02's
    assert "layer 14: 17 (limit 512)" in sub_text
