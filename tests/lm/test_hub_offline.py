"""A hub name loads from the local Hugging Face cache with HF_HUB_OFFLINE=1 (the setup of GPU clusters without
internet): revision refs resolve to their own weights, "final" means "main", a missing revision names the cache
folder searched; a cached hub dataset loads offline too. Each case runs in a fresh process, because huggingface_hub
and datasets read HF_HOME and HF_HUB_OFFLINE when they are imported."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from hub_cache import PYTHIA, SIZES, add_cached_dataset, make_pythia_cache


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("hf_home")
    make_pythia_cache(home, tmp_path_factory.mktemp("hf_work"))
    add_cached_dataset(home, "NeelNanda/pile-10k", [f"def f{i}(x):\n    return x + {i}\n" * 20 for i in range(40)])
    return home


def _run(hf_home, code: str) -> dict:
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_hub_name_loads_each_revision_from_the_cache(hf_home, tmp_path):
    res = _run(hf_home, f"""
        import json, torch
        from sparse_coding import lm
        out = {{}}
        for rev in ["step0", "step1000", "main", "final", "step143000"]:
            tl = lm.load_model("{PYTHIA}", rev)
            w = lm.loaded(tl).weights["gpt_neox.embed_in.weight"]
            out[rev] = [float(w[0, 0]), float(w.sum())]
            out["shape"] = [tl.cfg.n_layers, tl.cfg.d_model, tl.cfg.n_heads, tl.cfg.d_vocab]
            out["hooks_ok"] = lm.check_hooks(tl, ["blocks.1.hook_resid_post"]) == ["blocks.1.hook_resid_post"]
        try:
            lm.load_model("{PYTHIA}", "step999")
        except ConnectionError as e:
            out["missing"] = str(e)
        print(json.dumps(out))
    """)
    assert res["shape"] == [2, 64, 8, SIZES["ci"]["vocab_size"]] and res["hooks_ok"]
    assert res["step0"] != res["step1000"] != res["main"]
    assert res["main"] == res["final"] == res["step143000"]
    assert "step999" in res["missing"] and str(hf_home / "hub") in res["missing"]


def test_cached_hub_dataset_loads_offline(hf_home):
    res = _run(hf_home, """
        import json
        from sparse_coding import corpus
        c = corpus.load_corpus("NeelNanda/pile-10k", val_fraction=0.2)
        try:
            corpus.load_corpus("NeelNanda/not-cached")
            missing = ""
        except ConnectionError as e:
            missing = str(e)
        print(json.dumps({"n": len(c.train) + len(c.val), "name": c.name, "missing": missing}))
    """)
    assert res["n"] == 40 and res["name"] == "hf:NeelNanda/pile-10k"
    assert "not in the datasets cache" in res["missing"] and "folder of text files" in res["missing"]
