import json
import math

import pytest
import torch

from sparse_coding import files, paths
from sparse_coding.plots import writeup


def test_atomic_write_leaves_no_temp_and_replaces(tmp_path):
    target = tmp_path / "sub" / "x.json"
    files.save_json(target, {"a": 1})
    files.save_json(target, {"a": 2, "nan": math.nan})
    assert json.loads(target.read_text()) == {"a": 2, "nan": None}
    assert [p.name for p in target.parent.iterdir()] == ["x.json"]


def test_failed_write_keeps_old_file(tmp_path):
    target = tmp_path / "x.json"
    files.save_json(target, {"keep": True})

    class Boom:
        def tolist(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        files.save_json(target, {"bad": Boom()})
    assert files.load_json(target) == {"keep": True}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_tensor_round_trip(tmp_path):
    t = {"w": torch.randn(3, 4), "b": torch.arange(5)}
    files.save_tensors(tmp_path / "t.safetensors", t, metadata={"k": "v"})
    back = files.load_tensors(tmp_path / "t.safetensors")
    assert torch.equal(back["w"], t["w"]) and torch.equal(back["b"], t["b"])


def test_update_json_merges(tmp_path):
    f = tmp_path / "results.json"
    files.update_json(f, {"a": 1.0})
    files.update_json(f, {"b": 2.0})
    assert files.load_json(f) == {"a": 1.0, "b": 2.0}


def test_resolve_is_relative_to_repo_root(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_CODING_ROOT", str(tmp_path))
    assert paths.resolve("figures") == tmp_path / "figures"
    assert paths.resolve(tmp_path / "abs") == tmp_path / "abs"


def test_writeup_lists_only_measured_numbers(tmp_path):
    files.write_metrics(tmp_path, "01", {"best_sae_mmcs": 0.9991})
    (tmp_path / "01_mmcs_heatmap.png").write_bytes(b"png")
    text = writeup.build(tmp_path)
    assert "`best_sae_mmcs` | 0.9991" in text
    assert "![01_mmcs_heatmap](01_mmcs_heatmap.png)" in text
    assert "## 02" not in text


def test_written_files_and_folders_get_the_users_permissions(tmp_path):
    """Temp-then-rename must not leave owner-only (0600/0700) files: a shared data/ or figures/ stays readable."""
    import stat

    from sparse_coding.files import atomic_dir, atomic_write_text

    f = atomic_write_text(tmp_path / "a.json", "{}")
    with atomic_dir(tmp_path / "d") as d:
        (d / "x").write_text("1")
    assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~files._UMASK
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o777 & ~files._UMASK
    assert files._UMASK & 0o044 or stat.S_IMODE(f.stat().st_mode) & 0o044  # readable by others under umask 022


def test_update_json_merges_objects_one_level_deep(tmp_path):
    f = tmp_path / "r.json"
    files.update_json(f, {"slowdown": {"lm": 1.5, "harvest": 1.2}, "n": 1})
    got = files.update_json(f, {"slowdown": {"harvest": 1.4}, "n": {"x": 2}})
    assert got == {"slowdown": {"lm": 1.5, "harvest": 1.4}, "n": {"x": 2}}
