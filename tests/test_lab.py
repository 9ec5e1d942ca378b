"""JupyterLab works from a fresh clone: started headless on loopback (as `make lab` starts it, with the project's
kernel), a notebook opened in headless Chromium renders and starts a kernel, and the server stops cleanly."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import screenshot

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def _isolated_env(tmp: Path) -> dict:
    """Jupyter's config/data/runtime dirs under tmp (nothing written to ~), without the news/update toast."""
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(tmp / "config"), "JUPYTER_DATA_DIR": str(tmp / "data"),
           "JUPYTER_RUNTIME_DIR": str(tmp / "runtime"), "IPYTHONDIR": str(tmp / "ipython")}
    (tmp / "config" / "labconfig").mkdir(parents=True)
    (tmp / "config" / "labconfig" / "default_setting_overrides.json").write_text(json.dumps(
        {"@jupyterlab/apputils-extension:notification": {"fetchNews": "false", "checkForUpdates": False,
                                                          "doNotDisturbMode": True}}))
    return env


def test_lab_opens_a_notebook_headless(tmp_path, chromium):
    jupyter = Path(sys.executable).with_name("jupyter")
    pytest.importorskip("jupyterlab", reason="JupyterLab is installed by `make lab` / the dev extra")
    port, token = _free_port(), "sc-test"
    cmd = [str(jupyter), "lab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
           "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
           f"--ServerApp.root_dir={ROOT / 'notebooks'}", "--LabApp.news_url=None",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_isolated_env(tmp_path))
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                _get(f"{base}/api/status?token={token}")
                break
            except OSError:
                if server.poll() is not None:
                    pytest.fail(f"jupyter lab exited: {(tmp_path / 'server.log').read_text()[-2000:]}")
                time.sleep(0.5)
        else:
            pytest.fail("jupyter lab did not answer within 120 s")
        shot = screenshot(chromium, f"{base}/lab/tree/01_toy_models.ipynb?reset&token={token}",
                          tmp_path / "lab.png", size="1400,1000", budget_ms=8000, timeout=120)
        # The page opened the notebook: the server runs a kernel session for it with the project's python.
        sessions = _get(f"{base}/api/sessions?token={token}")
        assert any(s["path"].endswith("01_toy_models.ipynb") for s in sessions), sessions
        from PIL import Image

        img = Image.open(shot).convert("L")
        w, h = img.size
        # The notebook area (right of the file browser) holds rendered text: many dark pixels, not a blank page.
        area = img.crop((w // 3, h // 8, w - 20, h - 40))
        dark = sum(1 for p in area.getdata() if p < 128) / (area.size[0] * area.size[1])
        assert dark > 0.01, f"the notebook area is blank ({dark:.4f} dark)"
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    assert server.returncode is not None
    shutil.rmtree(tmp_path / "runtime", ignore_errors=True)
