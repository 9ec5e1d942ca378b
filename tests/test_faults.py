"""The kill-anywhere / full-disk harness (tests/faults.py) at small scale: every job killed at seeded points of its
progress (the N-th write or rename) resumes to byte-identical outputs, and an injected ENOSPC fails clearly with
nothing half-written. The kill points are counted, not timed, so the outcome is the same on a busy machine."""

import json

import pytest

import faults

pytestmark = pytest.mark.slow


def test_kill_anywhere_and_full_disk_small(tmp_path):
    rc = faults.main(["--scale", "small", "--kills", "6", "--seed", "0", "--work", str(tmp_path / "work"),
                      "--json", str(tmp_path / "faults.json")])
    summary = json.loads((tmp_path / "faults.json").read_text())
    assert summary["kills"] == 6  # every kill lands: none depends on how fast the machine runs the job
    assert summary["files_compared"] > 20 and summary["bytes_compared"] > 0
    assert summary["mismatches"] == []
    for e in summary["enospc"]:
        assert e["failed"] and e["clear_error"], e
        assert e["leftovers"] == [], e
    assert rc == 0
