"""The hub-name path end to end without a network: notebooks 02 -> 07 at smoke scale with
`-p model EleutherAI/pythia-70m-deduped` and HF_HUB_OFFLINE=1, on a cache entry holding a random GPT-NeoX with
Pythia-70M-deduped's config fields (shrunk for CI; PYTHIA_SIZE=full runs the exact 6 x 512 architecture, marked
slow). Hooks resolve, activations have the model's width, dictionaries carry SAELens metadata naming the hub model
and revision, and SAELens's own loader reads them."""

from __future__ import annotations

import json
import os

import pytest

from hub_cache import PYTHIA, SIZES, make_pythia_cache
from sparse_coding import runner
from sparse_coding.files import load_json

NOTEBOOKS = ["02", "03", "04", "05", "06", "07"]
HUB = {"model": PYTHIA}
PER_NOTEBOOK = {"02_activations": {"ctx_len": 64},
                "05_tracking": {"revisions": ["step0", "step1000", "main"]},
                "06_case_studies": {"ctx_len": 64}}


def _run_notebooks(tmp_path, size: str):
    import logging

    from papermill.exceptions import PapermillExecutionError

    hf_home = tmp_path / "hf"
    make_pythia_cache(hf_home, tmp_path / "work", size=size)
    out = tmp_path / "run"
    out.mkdir()
    log = logging.getLogger("papermill")
    for nb in runner.notebooks(NOTEBOOKS):
        params = {**runner.smoke_parameters(nb, out), **HUB, **PER_NOTEBOOK.get(nb.stem, {})}
        try:
            runner.run_one(nb, out, params, log, console=False)
        except PapermillExecutionError as e:
            pytest.fail(f"{nb.name} failed at cell [{e.exec_count}]: {e.ename}: {e.evalue} ({out / nb.name})")
    return out


def _check(out, size: str):
    width = SIZES[size]["hidden_size"]
    acts = out / "data" / "activations" / "EleutherAI__pythia-70m-deduped" / "main"
    manifests = sorted(acts.glob("*/manifest.json"))
    assert manifests and all(load_json(m)["d"] == width for m in manifests)
    assert all(load_json(m)["model"] == PYTHIA and load_json(m)["revision"] == "main" for m in manifests)
    cfgs = sorted((out / "data" / "dictionaries").rglob("member-000/cfg.json"))
    assert cfgs
    meta = load_json(cfgs[0])["metadata"]
    assert meta["model_name"] == PYTHIA and meta["revision"] == "main" and meta["hook_name"].startswith("blocks.")
    from sae_lens import SAE

    sae = SAE.load_from_disk(str(cfgs[0].parent))
    assert sae.cfg.d_in == width
    revisions = load_json(out / "figures" / "05_metrics.json")["final_features_present_by_step"]
    assert list(revisions) == ["step0", "step1000", "main"]
    for nn in ("06", "07"):
        assert (out / "figures" / f"{nn}_metrics.json").exists()
    assert load_json(out / "figures" / "06_metrics.json")["model"] == PYTHIA


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    return tmp_path


def test_pythia_shaped_hub_model_runs_notebooks_offline(offline_hub):
    out = _run_notebooks(offline_hub, "ci")
    _check(out, "ci")


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("PYTHIA_SIZE") != "full", reason="the full-size run: set PYTHIA_SIZE=full")
def test_pythia_70m_shape_runs_notebooks_offline(offline_hub):
    out = _run_notebooks(offline_hub, "full")
    _check(out, "full")
    print(json.dumps(load_json(out / "figures" / "03_metrics.json"))[:500])
