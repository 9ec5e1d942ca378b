"""The kill-anywhere / full-disk harness (tests/faults.py) at small scale: every job killed at random moments
resumes to byte-identical outputs, and an injected ENOSPC fails clearly with nothing half-written."""

import json

import pytest

import faults

pytestmark = pytest.mark.slow


def test_kill_anywhere_and_full_disk_small(tmp_path):
    rc = faults.main(["--scale", "small", "--kills", "6", "--seed", "0", "--work", str(tmp_path / "work"),
                      "--json", str(tmp_path / "faults.json")])
    summary = json.loads((tmp_path / "faults.json").read_text())
    assert summary["kills"] >= 6
    assert summary["files_compared"] > 20 and summary["bytes_compared"] > 0
    assert summary["mismatches"] == []
    for e in summary["enospc"]:
        assert e["failed"] and e["clear_error"], e
        assert e["leftovers"] == [], e
    assert rc == 0
