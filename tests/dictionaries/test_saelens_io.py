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


def _identity_standard(tmp_path, **cfg_fields):
    """The issue's example: a 2-d identity StandardSAE saved by SAELens, with cfg fields set after saving."""
    from sae_lens import StandardSAEConfig

    cfg = StandardSAEConfig(d_in=2, d_sae=2)
    theirs = SAE.get_sae_class_for_architecture(cfg.architecture())(cfg)
    with torch.no_grad():
        theirs.W_enc.copy_(torch.eye(2))
        theirs.W_dec.copy_(torch.eye(2))
        theirs.b_enc.zero_()
        theirs.b_dec.zero_()
    theirs.save_model(str(tmp_path / "theirs"))
    path = tmp_path / "theirs" / "cfg.json"
    saved = json.loads(path.read_text())
    saved.update(cfg_fields)
    path.write_text(json.dumps(saved))
    return tmp_path / "theirs"


@pytest.mark.parametrize("field, value", [("normalize_activations", "layer_norm"),
                                          ("normalize_activations", "constant_norm_rescale"),
                                          ("reshape_activations", "hook_z")])
def test_fields_that_change_the_computation_are_refused_not_skipped(tmp_path, field, value):
    folder = _identity_standard(tmp_path, **{field: value})
    if field == "normalize_activations" and value == "layer_norm":
        # what SAELens computes for x = [3, 1]: codes [0.707, 0], x̂ [3, 2] (ours used to give [3, 1] and [3, 1])
        theirs = SAE.load_from_disk(str(folder))
        x = torch.tensor([[3.0, 1.0]])
        torch.testing.assert_close(theirs.encode(x), torch.tensor([[0.7071, 0.0]]), atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match=field):
        sae_io.load_sae(folder)


def test_topk_rescale_by_decoder_norm_is_refused_unless_it_is_a_no_op(tmp_path):
    sae = _perturbed(make_sae("topk", d_in=6, d_sae=12, k=3))
    sae.normalize_decoder_()
    sae_io.save_sae(sae, tmp_path / "m")
    cfg_path = tmp_path / "m" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["rescale_acts_by_decoder_norm"] = True
    cfg_path.write_text(json.dumps(cfg))
    sae_io.load_sae(tmp_path / "m")  # our decoder rows are unit norm: rescaling by them changes nothing
    from safetensors.torch import load_file, save_file
    w = load_file(str(tmp_path / "m" / "sae_weights.safetensors"))
    w["W_dec"] = w["W_dec"] * 2
    save_file(w, str(tmp_path / "m" / "sae_weights.safetensors"))
    with pytest.raises(ValueError, match="rescale_acts_by_decoder_norm"):
        sae_io.load_sae(tmp_path / "m")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_recorded_dtype_is_kept(tmp_path, dtype):
    sae = _perturbed(make_sae("topk", d_in=8, d_sae=16, k=3)).to(getattr(torch, dtype))
    sae_io.save_sae(sae, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "cfg.json").read_text())["dtype"] == dtype
    loaded = sae_io.load_sae(tmp_path / "m")
    assert loaded.dtype == getattr(torch, dtype)
    x = torch.randn(10, 8).to(loaded.dtype)
    assert torch.equal(loaded.encode(x), sae.encode(x))  # same dtype, same picks
    assert sae_io.load_sae(tmp_path / "m", dtype="float32").dtype == torch.float32


def test_nan_weights_and_bad_scales_are_refused(tmp_path):
    sae = make_sae("relu", d_in=4, d_sae=8)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="input_scale"):
            sae_io.save_sae(sae, tmp_path / f"s{bad}", input_scale=bad)
        assert not (tmp_path / f"s{bad}").exists()
    with torch.no_grad():
        sae.W_dec[0, 1, 2] = float("nan")
    with pytest.raises(ValueError, match="W_dec"):
        sae_io.save_sae(sae, tmp_path / "nan")
    sae_io.save_sae(make_sae("relu", d_in=4, d_sae=8), tmp_path / "m")
    from safetensors.torch import load_file, save_file
    w = load_file(str(tmp_path / "m" / "sae_weights.safetensors"))
    w["b_enc"][3] = float("inf")
    save_file(w, str(tmp_path / "m" / "sae_weights.safetensors"))
    with pytest.raises(ValueError, match=r"sae_weights.safetensors: tensor 'b_enc'"):
        sae_io.load_sae(tmp_path / "m")
    w = load_file(str(tmp_path / "m" / "sae_weights.safetensors"))
    w["b_enc"] = torch.zeros(9)
    save_file(w, str(tmp_path / "m" / "sae_weights.safetensors"))
    with pytest.raises(ValueError, match=r"b_enc has shape \(9,\)"):
        sae_io.load_sae(tmp_path / "m")


def test_loaded_batchtopk_is_inference_ready_and_agrees_with_saelens(tmp_path):
    sae = make_sae("batchtopk", d_in=16, d_sae=64, k=4, seed=0)
    x = torch.randn(4096, 16, generator=torch.Generator().manual_seed(0))
    from sparse_coding.dictionaries import train_sae
    train_sae(sae, x, steps=60, batch_size=256, lr=1e-2, progress=False)
    sae_io.save_sae(sae, tmp_path / "m")
    ours = sae_io.load_sae(tmp_path / "m")
    assert not ours.training
    theirs = SAE.load_from_disk(str(tmp_path / "m"))
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x)[0], theirs.encode(x), atol=1e-5, rtol=1e-5)
