"""SAELens-layout interop: our saves load in SAELens and back, SAELens saves load here, normalisation folds."""

import json

import pytest
import torch

from sparse_coding.dictionaries import saelens_io as sae_io
from sparse_coding.dictionaries import make_sae

sae_lens = pytest.importorskip("sae_lens")
from sae_lens import SAE  # noqa: E402


def _perturbed(sae, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return sae


@pytest.mark.parametrize("kind,hp", [("relu", {"l1_coef": [1e-3, 2e-3]}), ("topk", {"k": [4, 6]})])
def test_round_trip_ours(tmp_path, kind, hp):
    sae = _perturbed(make_sae(kind, d_in=16, d_sae=48, seed=[1, 2], **hp))
    sae_io.save_sweep(sae, tmp_path / "sweep", metadata={"hook_name": "blocks.0.hook_resid_post"})
    back = sae_io.load_sweep(tmp_path / "sweep")
    x = torch.randn(32, 16)
    assert back.kind == kind and back.hparams == sae.hparams
    assert torch.allclose(back.encode(x), sae.encode(x), atol=1e-6)
    assert torch.allclose(back(x).x_hat, sae(x).x_hat, atol=1e-6)


@pytest.mark.parametrize("kind,hp", [("relu", {"l1_coef": 1e-3}), ("topk", {"k": 5})])
@pytest.mark.parametrize("pre_bias", [True, False])
def test_saelens_reads_ours(tmp_path, kind, hp, pre_bias):
    sae = _perturbed(make_sae(kind, d_in=16, d_sae=40, seed=3, pre_bias=pre_bias, **hp))
    sae_io.save_sae(sae, tmp_path / "one", metadata={"model_name": "offline", "hook_name": "blocks.1.hook_resid_post"})
    theirs = SAE.load_from_disk(str(tmp_path / "one"))
    x = torch.randn(64, 16)
    assert torch.allclose(theirs.encode(x), sae.encode(x)[0], atol=1e-5)
    assert torch.allclose(theirs.decode(theirs.encode(x)), sae(x).x_hat[0], atol=1e-5)
    assert theirs.cfg.metadata.hook_name == "blocks.1.hook_resid_post"


@pytest.mark.parametrize("arch", ["standard", "topk"])
def test_we_read_saelens(tmp_path, arch):
    from sae_lens import StandardSAEConfig, TopKSAEConfig

    cfg = StandardSAEConfig(d_in=12, d_sae=30) if arch == "standard" else TopKSAEConfig(d_in=12, d_sae=30, k=5)
    torch.manual_seed(0)
    theirs = SAE.get_sae_class_for_architecture(cfg.architecture())(cfg)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    theirs.save_model(str(tmp_path / "theirs"))
    ours = sae_io.load_sae(tmp_path / "theirs")
    x = torch.randn(50, 12)
    assert ours.kind == ("relu" if arch == "standard" else "topk")
    assert torch.allclose(ours.encode(x)[0], theirs.encode(x), atol=1e-5)
    assert torch.allclose(ours(x).x_hat[0], theirs.decode(theirs.encode(x)), atol=1e-5)


def test_input_scale_is_folded(tmp_path):
    sae = _perturbed(make_sae("relu", d_in=8, d_sae=24, seed=0))
    s = 0.25  # trained on x * s
    sae_io.save_sae(sae, tmp_path / "m", input_scale=s)
    loaded = sae_io.load_sae(tmp_path / "m")
    x = torch.randn(20, 8) * 10
    assert torch.allclose(loaded.encode(x), sae.encode(x * s), atol=1e-5)
    assert torch.allclose(loaded(x).x_hat, sae(x * s).x_hat / s, atol=1e-4)
    theirs = SAE.load_from_disk(str(tmp_path / "m"))
    assert torch.allclose(theirs.encode(x), sae.encode(x * s)[0], atol=1e-5)


def test_never_overwrites_silently(tmp_path):
    sae = make_sae("relu", d_in=4, d_sae=8)
    sae_io.save_sae(sae, tmp_path / "m")
    before = (tmp_path / "m" / "sae_weights.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        sae_io.save_sae(_perturbed(make_sae("relu", d_in=4, d_sae=8)), tmp_path / "m")
    assert (tmp_path / "m" / "sae_weights.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp folders left behind
    sae_io.save_sae(sae, tmp_path / "m", overwrite=True)


def test_bad_folders_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        sae_io.load_sae(tmp_path)
    sae_io.save_sae(make_sae("relu", d_in=4, d_sae=8), tmp_path / "m")
    (tmp_path / "m" / "sae_weights.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="truncated"):
        sae_io.load_sae(tmp_path / "m")
    sae_io.save_sae(make_sae("relu", d_in=4, d_sae=8), tmp_path / "m", overwrite=True)
    cfg = json.loads((tmp_path / "m" / "cfg.json").read_text())
    del cfg["sparse_coding"]
    cfg["architecture"] = "gated"
    (tmp_path / "m" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="not supported"):
        sae_io.load_sae(tmp_path / "m")
