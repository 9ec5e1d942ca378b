"""SAELens-layout compatibility: older (pre-6.0) configs read as SAELens reads them, edited or unknown fields and
tensors refused rather than skipped, clear errors for damaged sweeps and unsavable metadata."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from sparse_coding.dictionaries import make_sae
from sparse_coding.dictionaries import saelens_io as sae_io

sae_lens = pytest.importorskip("sae_lens")
from sae_lens import SAE  # noqa: E402

D_IN, D_SAE = 12, 40
PRE6 = {"d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu", "hook_point": "blocks.0.hook_resid_pre",
        "sae_lens_version": "3.0.0"}


def _weights(seed=0, **extra):
    g = torch.Generator().manual_seed(seed)
    state = {"W_enc": 0.3 * torch.randn(D_IN, D_SAE, generator=g), "b_enc": 0.1 * torch.randn(D_SAE, generator=g),
             "W_dec": torch.randn(D_SAE, D_IN, generator=g), "b_dec": torch.randn(D_IN, generator=g)}
    return {**state, **extra}


def _folder(path, cfg, weights):
    path.mkdir(parents=True)
    save_file(weights, str(path / "sae_weights.safetensors"))
    (path / "cfg.json").write_text(json.dumps(cfg))
    return path


def _x(n=200):
    return 3 * torch.randn(n, D_IN, generator=torch.Generator().manual_seed(1)) + 0.5


def _same_codes_as_saelens(folder):
    ours, theirs, x = sae_io.load_sae(folder), SAE.load_from_disk(str(folder)), _x()
    with torch.no_grad():
        codes, expected = ours.encode(x)[0], theirs.encode(x)
        torch.testing.assert_close(codes, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours(x).x_hat[0], theirs.decode(expected), atol=1e-4, rtol=1e-4)
    return ours, codes


@pytest.mark.parametrize("extra", [{}, {"architecture": "standard"}, {"activation_fn_kwargs": {"k": 5}, "k": 9}])
def test_pre_6_0_topk_folder_loads_as_topk_like_saelens(tmp_path, extra):
    cfg = {**PRE6, "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 5}, **extra}
    ours, codes = _same_codes_as_saelens(_folder(tmp_path / "old", cfg, _weights()))
    assert ours.kind == "topk" and ours.hparams[0]["k"] == 5
    assert ((codes != 0).sum(-1) == 5).all()  # L0 = k, where the old loader built a ReLU SAE (L0 ~ 24)


@pytest.mark.parametrize("cfg, field", [({"activation_fn_str": "tanh-relu"}, "activation_fn_str"),
                                        ({"activation_fn_str": "topk"}, "activation_fn_kwargs"),
                                        ({"activation_fn_str": "topk", "activation_fn_kwargs": {"k": 0}},
                                         "activation_fn_kwargs.k"),
                                        ({"normalize_activations": True}, "normalize_activations"),
                                        ({"hook_point": "blocks.0.attn.hook_z"}, "reshape_activations"),
                                        ({"sae_lens_version": "three"}, "sae_lens_version")])
def test_pre_6_0_fields_we_cannot_honour_are_refused(tmp_path, cfg, field):
    folder = _folder(tmp_path / "old", {**PRE6, **cfg}, _weights())
    with pytest.raises(ValueError, match=re.escape(str(folder / "cfg.json")) + ".*" + re.escape(field)):
        sae_io.load_sae(folder)


@pytest.mark.parametrize("cfg", [{"activation_fn_str": "relu", "normalize_activations": False},
                                 {"activation_fn_str": "relu", "normalize_activations": "none"},
                                 {"apply_b_dec_to_input": False}, {}])
def test_pre_6_0_relu_folders_load_like_saelens(tmp_path, cfg):
    ours, _ = _same_codes_as_saelens(_folder(tmp_path / "old", {**PRE6, **cfg}, _weights()))
    assert ours.kind == "relu" and ours.pre_bias == cfg.get("apply_b_dec_to_input", True)


def _edited(tmp_path, kind="topk", **fields):
    sae = make_sae(kind, d_in=D_IN, d_sae=D_SAE, seed=0, **({"k": 4} if kind == "topk" else {}))
    with torch.no_grad():
        sae.b_dec.normal_()
    folder = sae_io.save_sae(sae, tmp_path / "m")
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg.update(fields)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("fields, ours_field", [({"k": 8}, "sparse_coding.hparams.k"),
                                                ({"apply_b_dec_to_input": False}, "sparse_coding.pre_bias"),
                                                ({"architecture": "standard"}, "sparse_coding.kind")])
def test_saelens_fields_that_disagree_with_ours_are_refused(tmp_path, fields, ours_field):
    folder = _edited(tmp_path, **fields)
    (field, value), = fields.items()
    if field == "k":  # SAELens runs the edited field: our block must not silently win over it
        with torch.no_grad():
            assert ((SAE.load_from_disk(str(folder)).encode(_x()) != 0).sum(-1) == value).all()
    with pytest.raises(ValueError, match=f"'{field}'.*{re.escape(ours_field)}"):
        sae_io.load_sae(folder)
    sae_io.save_sweep(make_sae("topk", d_in=D_IN, d_sae=D_SAE, k=[4, 4], seed=[0, 1]), tmp_path / "sweep")
    member = tmp_path / "sweep" / sae_io.member_name(1) / "cfg.json"
    member.write_text(json.dumps({**json.loads(member.read_text()), **fields}))
    with pytest.raises(ValueError, match=re.escape(str(member))):
        sae_io.load_sweep(tmp_path / "sweep")


def test_fields_that_agree_still_load(tmp_path):
    _same_codes_as_saelens(_edited(tmp_path, k=4, apply_b_dec_to_input=True))


@pytest.mark.parametrize("arch, extra, name", [("standard", {"foo": torch.ones(3)}, "foo"),
                                               ("standard", {"threshold": torch.zeros(D_SAE)}, "threshold"),
                                               ("topk", {"log_threshold": torch.zeros(D_SAE)}, "log_threshold")])
def test_unknown_tensors_are_refused(tmp_path, arch, extra, name):
    cfg = {**PRE6, "sae_lens_version": "6.0.0", "architecture": arch, "k": 5}
    folder = _folder(tmp_path / "m", cfg, _weights(**extra))
    with pytest.raises(RuntimeError, match="Unexpected key"):
        SAE.load_from_disk(str(folder))  # SAELens refuses them too
    with pytest.raises(ValueError, match=re.escape(str(folder / "sae_weights.safetensors")) + f".*'{name}'"):
        sae_io.load_sae(folder)


def test_pre_6_0_scaling_factor_is_refused_unless_all_ones(tmp_path):
    cfg = {**PRE6, "activation_fn_str": "relu", "finetuning_scaling_factor": True}
    scale = torch.rand(D_SAE, generator=torch.Generator().manual_seed(2)) + 0.5
    folder = _folder(tmp_path / "scaled", cfg, _weights(scaling_factor=scale))
    with pytest.raises(ValueError, match=r"'scaling_factor'.*finetuning_scaling_factor"):
        sae_io.load_sae(folder)
    ones = _folder(tmp_path / "ones", {**cfg, "finetuning_scaling_factor": False}, _weights(scaling_factor=torch.ones(
        D_SAE)))
    _same_codes_as_saelens(ones)  # all ones changes nothing: accepted and dropped, as SAELens does


def test_jumprelu_thresholds_load_like_saelens(tmp_path):
    cfg = {**PRE6, "sae_lens_version": "6.0.0", "architecture": "jumprelu"}
    theta = torch.randn(D_SAE, generator=torch.Generator().manual_seed(3))  # about half below 0
    ours, codes = _same_codes_as_saelens(_folder(tmp_path / "neg", cfg, _weights(threshold=theta)))
    assert (theta < 0).any() and (codes >= 0).all()  # below 0 acts as 0: SAELens's ReLU comes first
    # SAELens's training JumpReLU (older checkpoints) reads log_threshold as threshold = exp(log_threshold)
    _, expected = _same_codes_as_saelens(_folder(tmp_path / "exp", cfg, _weights(threshold=theta.exp())))
    with torch.no_grad():
        codes = sae_io.load_sae(_folder(tmp_path / "log", cfg, _weights(log_threshold=theta))).encode(_x())[0]
    torch.testing.assert_close(codes, expected, atol=1e-5, rtol=1e-5)


def test_damaged_sweep_json_names_the_file(tmp_path):
    sae_io.save_sweep(make_sae("relu", d_in=4, d_sae=8, seed=[0, 1]), tmp_path / "s")
    path = tmp_path / "s" / "sweep.json"
    good = json.loads(path.read_text())
    for bad, field in (({k: v for k, v in good.items() if k != "members"}, "members"), ({**good, "members": []},
                       "members"), ({**good, "members": [{"hparams": {}}]}, "folder"), ([1, 2], "JSON object")):
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=re.escape(str(path)) + f".*{field}"):
            sae_io.load_sweep(tmp_path / "s")


def test_nan_on_save_names_the_destination(tmp_path):
    sae = make_sae("relu", d_in=4, d_sae=8, seed=[0, 1])
    with torch.no_grad():
        sae.W_dec[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "nan")) + " .*W_dec") as e:
        sae_io.save_sae(sae, tmp_path / "nan", member=1)
    assert "/.nan." not in str(e.value)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "sweep" / sae_io.member_name(1))) + " "):
        sae_io.save_sweep(sae, tmp_path / "sweep")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("call", ["save_sae", "save_sweep"])
def test_metadata_json_cannot_hold_is_refused_naming_the_key(tmp_path, call):
    sae = make_sae("relu", d_in=4, d_sae=8)
    with pytest.raises(ValueError, match=r"metadata\['x'\].*object"):
        getattr(sae_io, call)(sae, tmp_path / "m", metadata={"ok": [1, 2.5, "a"], "x": object()})
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="metadata"):
        getattr(sae_io, call)(sae, tmp_path / "m", metadata=[("x", 1)])


def test_metadata_cannot_change_the_format_version(tmp_path):
    folder = sae_io.save_sae(make_sae("relu", d_in=4, d_sae=8), tmp_path / "m", metadata={"sae_lens_version": "dev"})
    assert json.loads((folder / "cfg.json").read_text())["metadata"]["sae_lens_version"] == "6.0.0"
    SAE.load_from_disk(str(folder))
    sae_io.load_sae(folder)


@pytest.mark.parametrize("version, old", [("5.9.1", True), ("6.0.0a1", True), ("6.0.0-rc.0", False), ("6.0.0", False),
                                          ("6.12.3", False), ("", True), ("v2.1", True)])
def test_which_configs_are_read_as_pre_6_0(version, old):
    from packaging.version import Version

    assert sae_io._pre_6_0({"sae_lens_version": version}, "cfg.json") is old
    if version:  # what SAELens's handle_config_defaulting decides
        assert (Version(version) < Version("6.0.0-rc.0")) is old


def test_overwrite_onto_a_file_leaves_nothing_behind(tmp_path):
    (tmp_path / "m").write_text("an old file")
    sae = make_sae("relu", d_in=4, d_sae=8)
    with pytest.raises(FileExistsError):
        sae_io.save_sae(sae, tmp_path / "m")
    assert (tmp_path / "m").read_text() == "an old file"
    sae_io.save_sae(sae, tmp_path / "m", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no ".m.old" left behind
    sae_io.load_sae(tmp_path / "m")
    (tmp_path / "link").symlink_to(tmp_path / "m")
    sae_io.save_sae(sae, tmp_path / "link", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "m"] and (tmp_path / "link").is_dir()
    assert not (tmp_path / "link").is_symlink() and (tmp_path / "m" / "cfg.json").exists()
