"""Online or offline is huggingface_hub's decision, not ours: a hub name downloads from whatever endpoint HF_ENDPOINT
names (here a Hub-compatible mirror served on 127.0.0.1) into HF_HOME's cache, HF_HUB_OFFLINE=1 reads only the cache
(and names it when the revision is missing), and `corpus.hub_offline()` reads HF_HUB_OFFLINE exactly as
huggingface_hub does for every spelling. Each case runs in a fresh process, because huggingface_hub reads HF_HOME,
HF_ENDPOINT and HF_HUB_OFFLINE when it is imported. No request leaves 127.0.0.1: the processes refuse any other
address (an audit hook), and the mirror logs what it was asked."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

REPO = "toy-org/neox-tiny"
REF = "step8"
TEXTS = [f"def func_{i}(a, b):\n    '''Add {i}.'''\n    return a + b * {i}\n\nclass K{i % 5}:\n    pass\n" for i in range(40)]
SAMPLE = "def func_7(a, b):\n    return a + b\n"
# Files served the way the Hub serves LFS files: HEAD /resolve answers a redirect to a CDN (another origin) carrying
# X-Linked-Etag (the sha256) and X-Linked-Size; the rest are plain git files (200, ETag = git blob sha1).
LFS = {"model.safetensors"}
# huggingface_hub's truthy spellings (constants.ENV_VARS_TRUE_VALUES, compared after .upper() by constants._is_true),
# written out as the known answer; test_offline_spellings_follow_huggingface_hub checks it still matches.
TRUTHY = {"1", "ON", "YES", "TRUE"}

# Refuses (and records) any connection or name lookup outside 127.0.0.1 in the child process.
GUARD = """
import json, sys
_outside = []
def _guard(event, args):
    if event == "socket.connect" and isinstance(args[1], tuple) and args[1][0] != "127.0.0.1":
        _outside.append(repr(args[1]))
        raise ConnectionRefusedError(f"test: no network outside 127.0.0.1 ({args[1]!r})")
    if event == "socket.getaddrinfo" and args[0] not in (None, "127.0.0.1", b"127.0.0.1"):
        _outside.append(repr(args[0]))
        raise OSError(f"test: no name lookups ({args[0]!r})")
sys.addaudithook(_guard)
"""

# Every hub-related setting of the parent is dropped, so only what a case sets counts.
DROP = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_ENDPOINT", "HF_HOME", "HF_HUB_CACHE",
        "HUGGINGFACE_HUB_CACHE", "HF_ASSETS_CACHE", "HF_XET_CACHE", "TRANSFORMERS_CACHE", "HF_DATASETS_CACHE",
        "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_HUB_DISABLE_XET", "HTTP_PROXY", "HTTPS_PROXY",
        "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


def _run(code: str, cwd: Path, **env: str) -> dict:
    full = {k: v for k, v in os.environ.items() if k not in DROP}
    full.update(NO_PROXY="127.0.0.1", no_proxy="127.0.0.1", HF_HUB_DISABLE_TELEMETRY="1", **env)
    out = subprocess.run([sys.executable, "-c", GUARD + textwrap.dedent(code)], env=full, cwd=cwd,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class Mirror:
    """A Hub-compatible endpoint for one model repo with one ref, as huggingface_hub 2.x downloads from it:
    HEAD/GET /{repo}/resolve/{rev}/{file}, GET /api/models/{repo}[/revision/{rev}] (model info: sha, siblings) and
    GET /api/models/{repo}/tree/{rev}[/{path}] (the file listing) on the hub origin, GET /cdn/{sha256} on a second
    origin (another port) for LFS files. Missing entries, revisions and repos get the Hub's 404/401 with
    X-Error-Code. `log` holds (origin, method, path) of every request, `unknown` the paths it has no route for."""

    def __init__(self, folder: Path, repo_id: str, ref: str):
        self.repo_id, self.ref = repo_id, ref
        self.files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
        h = hashlib.sha1()
        for name, data in self.files.items():
            h.update(name.encode() + b"\0" + data)
        self.commit = h.hexdigest()
        self.blobs = {hashlib.sha256(d).hexdigest(): d for n, d in self.files.items() if n in LFS}
        self.log: list[tuple[str, str, str]] = []
        self.unknown: list[str] = []
        self.lock = threading.Lock()
        self.servers = [self._server("hub"), self._server("cdn")]
        self.url, self.cdn = (f"http://127.0.0.1:{s.server_address[1]}" for s in self.servers)
        self.threads = [threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
                        for s in self.servers]

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        for s in self.servers:
            s.shutdown()
            s.server_close()
        for t in self.threads:
            t.join(timeout=10)

    def _server(self, origin: str) -> http.server.ThreadingHTTPServer:
        mirror = self

        class Handler(http.server.BaseHTTPRequestHandler):
            timeout = 10  # a stalled client cannot hold a handler thread

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                mirror._route(self, origin, body=False)

            def do_GET(self):
                mirror._route(self, origin, body=True)

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        return server

    def _reply(self, req, status: int, headers: dict, data: bytes = b"", body: bool = True, size: int | None = None):
        req.send_response(status)
        for k, v in headers.items():
            req.send_header(k, v)
        req.send_header("Content-Length", str(len(data) if size is None else size))
        req.end_headers()
        if body and data:
            req.wfile.write(data)

    def _error(self, req, status: int, code: str, body: bool, commit: bool = False):
        msg = json.dumps({"error": code}).encode()
        headers = {"Content-Type": "application/json", "X-Error-Code": code, "X-Error-Message": code}
        if commit:
            headers["X-Repo-Commit"] = self.commit
        self._reply(req, status, headers, msg, body)

    def _route(self, req, origin: str, body: bool):
        path = urlsplit(req.path).path
        with self.lock:
            self.log.append((origin, req.command, req.path))
        if origin == "cdn":
            m = re.fullmatch(r"/cdn/([0-9a-f]{64})", path)
            if m and m[1] in self.blobs:
                return self._reply(req, 200, {"Content-Type": "application/octet-stream", "ETag": f'"{m[1]}"'},
                                   self.blobs[m[1]], body)
            return self._unknown(req, path, body)
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path):
            repo, rev = m[1], unquote(m[2] or "main")
            if repo != self.repo_id:
                return self._error(req, 401, "RepoNotFound", body)
            if rev not in (self.ref, self.commit):
                return self._error(req, 404, "RevisionNotFound", body)
            info = {"_id": "0" * 24, "id": repo, "modelId": repo, "sha": self.commit, "private": False,
                    "gated": False, "disabled": False, "tags": [], "library_name": "transformers",
                    "siblings": [{"rfilename": n} for n in self.files]}
            return self._reply(req, 200, {"Content-Type": "application/json"}, json.dumps(info).encode(), body)
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path):
            repo, rev, sub = m[1], unquote(m[2]), unquote(m[3] or "").strip("/")
            if repo != self.repo_id:
                return self._error(req, 401, "RepoNotFound", body)
            if rev not in (self.ref, self.commit):
                return self._error(req, 404, "RevisionNotFound", body)
            if sub:  # the repo is flat: no folders
                return self._error(req, 404, "EntryNotFound", body)
            tree = [{"type": "file", "path": n, "size": len(d), "oid": _git_blob_sha1(d),
                     **({"lfs": {"oid": hashlib.sha256(d).hexdigest(), "size": len(d), "pointerSize": 134}}
                        if n in LFS else {})} for n, d in self.files.items()]
            return self._reply(req, 200, {"Content-Type": "application/json"}, json.dumps(tree).encode(), body)
        if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            repo, rev, name = m[1], unquote(m[2]), unquote(m[3])
            if repo != self.repo_id:
                return self._error(req, 401, "RepoNotFound", body)
            if rev not in (self.ref, self.commit):
                return self._error(req, 404, "RevisionNotFound", body)
            if name not in self.files:
                return self._error(req, 404, "EntryNotFound", body, commit=True)
            data = self.files[name]
            if name in LFS:
                sha = hashlib.sha256(data).hexdigest()
                return self._reply(req, 302, {"Location": f"{self.cdn}/cdn/{sha}", "X-Repo-Commit": self.commit,
                                              "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data)),
                                              "ETag": f'"{_git_blob_sha1(data)}"'}, b"", body)
            return self._reply(req, 200, {"Content-Type": "application/octet-stream", "X-Repo-Commit": self.commit,
                                          "ETag": f'"{_git_blob_sha1(data)}"'}, data, body)
        return self._unknown(req, path, body)

    def _unknown(self, req, path: str, body: bool):
        with self.lock:
            self.unknown.append(path)
        self._reply(req, 404, {"Content-Type": "text/plain"}, b"not found", body)


@pytest.fixture(scope="module")
def toy_repo(tmp_path_factory):
    """(folder, embed_in sum, token ids of SAMPLE) of a tiny random GPT-NeoX with a 300-token byte-level BPE."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from sparse_coding import corpus

    folder = tmp_path_factory.mktemp("toy_repo")
    tok = corpus.train_tokenizer(TEXTS, vocab_size=300, out_dir=folder)
    cfg = GPTNeoXConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                        vocab_size=320, max_position_embeddings=64, rotary_pct=0.25, use_parallel_residual=True,
                        tie_word_embeddings=False, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(8)
    model = GPTNeoXForCausalLM(cfg)
    model.save_pretrained(folder)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (folder / name).is_file(), sorted(p.name for p in folder.iterdir())
    return folder, float(model.gpt_neox.embed_in.weight.detach().sum()), tok(SAMPLE)["input_ids"]


LOAD = f"""
    from sparse_coding import lm
    from huggingface_hub import constants
    out = {{"outside": _outside, "cache": constants.HF_HUB_CACHE, "offline": constants.HF_HUB_OFFLINE}}
    try:
        m, tok = lm.load_hf_model({REPO!r}, {REF!r})
        out.update(hidden=m.config.hidden_size, layers=m.config.num_hidden_layers, training=m.training,
                   embed_sum=float(m.gpt_neox.embed_in.weight.sum()), ids=tok({SAMPLE!r})["input_ids"])
    except ConnectionError as e:
        out["error"] = str(e)
    print(json.dumps(out))
"""


def test_mirror_endpoint_downloads(toy_repo, tmp_path):
    folder, embed_sum, ids = toy_repo
    home = tmp_path / "hf_home"
    home.mkdir()
    with Mirror(folder, REPO, REF) as mirror:
        env = dict(HF_HOME=str(home), HF_ENDPOINT=mirror.url)

        # Offline with an empty cache: a ConnectionError naming the cache folder, and not one request.
        res = _run(LOAD, tmp_path, HF_HUB_OFFLINE="1", **env)
        assert res["offline"] is True and res["outside"] == [] and mirror.log == []
        assert res["cache"] == str(home / "hub") and str(home / "hub") in res["error"]
        assert REF in res["error"] and "HF_HUB_OFFLINE is set" in res["error"]
        assert "data/lm/offline" in res["error"]  # the message names the offline default

        # HF_HUB_OFFLINE unset: downloaded from the mirror, the same weights and tokenizer.
        res = _run(LOAD, tmp_path, **env)
        assert "error" not in res, res.get("error")
        assert res["offline"] is False and res["outside"] == []
        assert (res["hidden"], res["layers"], res["training"]) == (32, 1, False)
        assert res["embed_sum"] == pytest.approx(embed_sum, abs=1e-5) and res["ids"] == ids
        online_log, unknown = list(mirror.log), list(mirror.unknown)
        requested = {(o, meth, urlsplit(p).path) for o, meth, p in online_log}
        for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            # transformers resolves the ref to its commit first (GET /api/models/{repo}/revision/{ref}) and then asks
            # for files at the commit; either spelling is a download from the mirror.
            assert {("hub", "HEAD", f"/{REPO}/resolve/{rev}/{name}") for rev in (REF, mirror.commit)} & requested, \
                online_log
        sha = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
        assert ("cdn", "GET", f"/cdn/{sha}") in requested, online_log  # the LFS file came through the redirect
        assert unknown == [], f"routes the mirror does not serve were asked for: {unknown}"

        # The cache holds the repo as huggingface_hub lays it out: the ref, a snapshot of the commit, the LFS blob.
        entry = home / "hub" / f"models--{REPO.replace('/', '--')}"
        assert (entry / "refs" / REF).read_text() == mirror.commit
        for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            cached = entry / "snapshots" / mirror.commit / name
            assert cached.read_bytes() == (folder / name).read_bytes()
        assert (entry / "blobs" / sha).is_file()

        # Offline again: now the cache answers, still without a request.
        res = _run(LOAD, tmp_path, HF_HUB_OFFLINE="1", **env)
        assert "error" not in res, res.get("error")
        assert res["embed_sum"] == pytest.approx(embed_sum, abs=1e-5) and res["ids"] == ids
        assert mirror.log == online_log and res["outside"] == []
    print("\nmirror requests:", *sorted(set(online_log)), sep="\n  ")


SPELLINGS = ["1", "TRUE", "true", "yes", "ON", "0", "FALSE", "false", "no", "off", ""]


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_offline_spellings_follow_huggingface_hub(spelling, tmp_path):
    from huggingface_hub import constants

    assert set(constants.ENV_VARS_TRUE_VALUES) == TRUTHY, "huggingface_hub changed its truthy spellings"
    # TRANSFORMERS_OFFLINE is dropped from the child's environment (_run): huggingface_hub falls back to it when
    # HF_HUB_OFFLINE is empty, which would make the "" case depend on the parent's environment.
    res = _run("""
        from huggingface_hub import constants
        from sparse_coding import corpus
        print(json.dumps({"ours": corpus.hub_offline(), "hub": constants.HF_HUB_OFFLINE, "outside": _outside}))
    """, tmp_path, HF_HUB_OFFLINE=spelling, HF_HOME=str(tmp_path / "hf_home"))
    assert res["ours"] is res["hub"] is (spelling.upper() in TRUTHY)
    assert res["outside"] == []
