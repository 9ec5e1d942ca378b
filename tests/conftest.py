"""Fixtures shared by every stage's tests: one thread for tiny tensors, an activation store written from tensors, and
the tiny offline model trained once per session."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from sparse_coding import activations, lm

DOCS = [f"def func_{i}(a, b):\n    '''Add {i}.'''\n    return a + b * {i}\n\nclass K{i % 5}:\n    pass\n" for i in range(60)]
TINY = dict(n_layers=2, d_model=32, n_heads=2, d_mlp=64, vocab_size=300, ctx_len=16, batch_size=8, steps=60,
            warmup_steps=4, lr=1e-2, eval_every=10, eval_contexts=16)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: a second intra-op thread buys nothing and, on a busy machine, waiting for it costs 10-40x.
    Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def make_store(tmp_path_factory):
    """make_store(x [rows, d], tokens=None, ctx_len=16, **manifest) -> an ActivationStore in a fresh folder, written
    by `activations.write_store` (the same files a harvest writes)."""

    def make(x: torch.Tensor, tokens: torch.Tensor | None = None, ctx_len: int = 16, *, model: str = "toy/model",
             revision: str = "final", hook: str = "blocks.0.hook_resid_post", chunk_rows: int | None = None,
             folder=None):
        folder = folder or tmp_path_factory.mktemp("store") / "acts"
        return activations.write_store(folder, x, tokens, model=model, revision=revision, hook=hook, ctx_len=ctx_len,
                                       chunk_rows=chunk_rows, corpus="toy")

    return make


def train_tiny(root, seed: int = 0, **kw) -> dict:
    """The tiny offline model (2 layers, d=32, a 300-token BPE) trained on 60 small Python modules under root."""
    folder = root / "texts"
    if not folder.exists():
        folder.mkdir(parents=True)
        for i, d in enumerate(DOCS):
            (folder / f"m{i:02d}.py").write_text(d)
    return lm.train_offline_model(root / "data", lm.LMConfig(seed=seed, **{**TINY, **kw}), source=str(folder),
                                  progress=False)


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory):
    """(root, train log, model folder) of the tiny model trained for 60 steps, once per session."""
    root = tmp_path_factory.mktemp("lm")
    log = train_tiny(root)
    return root, log, lm.offline_dir(root / "data")


@pytest.fixture(scope="module")
def tiny_model(tiny_lm, one_thread):
    """(the tiny model loaded, its training contexts [n, 16], its folder), once per module."""
    _, _, folder = tiny_lm
    return lm.load_model(folder), lm.validation_contexts(folder, split="train"), folder


@pytest.fixture(scope="session")
def chromium() -> str:
    """Path of a headless Chromium (Debian's package), installed with apt-get when missing and possible; the test
    is skipped with the reason when it is not."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip("no chromium here, and apt-get as root is not available to install it")
    try:
        subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], check=True, capture_output=True, timeout=600,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    except (subprocess.SubprocessError, OSError) as e:
        pytest.skip(f"could not install chromium with apt-get ({e})")
    found = shutil.which("chromium")
    if not found:
        pytest.skip("apt-get installed no chromium binary")
    return found


def screenshot(chromium: str, url: str, out: Path, size: str = "1200,900", budget_ms: int = 5000,
               timeout: int = 90) -> Path:
    """A headless screenshot of a file:// or loopback URL with every other host unreachable (no network)."""
    profile = tempfile.mkdtemp(prefix="chromium-")
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           f"--user-data-dir={profile}", "--no-first-run", "--disable-extensions", "--disable-background-networking",
           "--disable-sync", "--disable-component-update",
           "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE localhost , EXCLUDE 127.0.0.1",
           "--proxy-server=http://127.0.0.1:9", "--hide-scrollbars", "--force-device-scale-factor=1",
           f"--window-size={size}", f"--virtual-time-budget={budget_ms}", f"--screenshot={out}", url]
    try:
        subprocess.run(cmd, capture_output=True, timeout=timeout)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    if not out.exists():
        raise AssertionError(f"chromium wrote no screenshot of {url}")
    return out
