"""The LLM explainer and simulator against a fake OpenAI-compatible server on 127.0.0.1 (a thread in this test,
bounded in requests and time): a round trip explains and predicts a planted token; the key travels only in the
Authorization header and never reaches an error, a repr or a cache file; malformed replies, timeouts, HTTP errors
and a missing key give clear errors; the cache makes a repeated call free and never stores a failure."""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from sparse_coding.analyses import llm
from sparse_coding.analyses.interpretability import (Record, TokenTableExplainer, TokenTableSimulator,
                                                     score_direction, split_fragments)

KEY = "sk-test-" + "S3cr3tValue" * 3
MAX_REQUESTS, MAX_SECONDS = 200, 60  # the server stops by itself after either
PLANTED = "·foo"


class FakeLLM:
    """Answers the explainer ("fires on <the token at 10>") and the simulator (10 where the token equals the
    explained one, else 0) by reading the prompts; `mode` switches to a broken reply, a slow one or an HTTP 401."""

    def __init__(self):
        self.requests: list[dict] = []
        self.mode = "ok"
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                    mode = fake.mode
                if mode == "slow":
                    time.sleep(1.0)
                if mode == "401":
                    return self._send(401, {"error": {"message": f"Incorrect API key provided: {KEY}"}})
                content = {"notjson": "Sure! The activations are 10, 0 and 0.",
                           "wronglen": json.dumps({"activations": [0]})}.get(mode) or fake.answer(body)
                self._send(200, {"id": "x", "object": "chat.completion",
                                 "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]})

            def _send(self, status, obj):
                data = json.dumps(obj).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (timeout test)
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.timeout = 0.05
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        deadline = time.monotonic() + MAX_SECONDS
        while not self.stopped.is_set() and len(self.requests) < MAX_REQUESTS and time.monotonic() < deadline:
            self.server.handle_request()
        self.server.server_close()

    def stop(self):
        self.stopped.set()
        self.thread.join(5)

    @staticmethod
    def answer(body) -> str:
        user = body["messages"][-1]["content"]
        if user.startswith("Explanation: "):
            explained = re.match(r"Explanation: fires on (.*)", user).group(1)
            tokens = json.loads(re.search(r"^Tokens: (.*)$", user, re.M).group(1))
            return json.dumps({"activations": [10 if t == explained else 0 for _, t in tokens]})
        top = [json.loads(t) for t, a in re.findall(r'^(".*")\t(\d+)$', user, re.M) if a == "10"]
        return f"  fires on {top[0]}  \n\nIt is a very specific feature."


@pytest.fixture
def server():
    fake = FakeLLM()
    yield fake
    fake.stop()


@pytest.fixture
def client(server):
    return llm.ChatClient(server.url, "fake-model", KEY, timeout=5)


def _records(n=20, length=12):
    recs = []
    for i in range(n):
        toks = [f"·t{(i * 7 + j) % 11}" for j in range(length)]
        toks[(i + 3) % length] = PLANTED
        recs.append(Record(toks, [3.0 if t == PLANTED else 0.0 for t in toks]))
    return recs


def _files_text(folder: Path) -> str:
    return "".join(p.read_text() for p in sorted(Path(folder).rglob("*")) if p.is_file())


def test_round_trip_explains_and_predicts_the_planted_token(server, client):
    recs = dict(enumerate(_records()))
    split = split_fragments(list(range(20)), list(range(20)))
    explainer, simulator = llm.LLMExplainer(client), llm.LLMSimulator(client)
    assert explainer.name == simulator.name == "llm:fake-model"
    s = score_direction(recs, split, explainer, simulator)
    assert s.explanation == f"fires on {PLANTED}"  # stripped, first line only
    assert [s.top, s.random, s.top_and_random] == pytest.approx([1.0, 1.0, 1.0])
    pred = simulator.simulate(s.explanation, [["·a", PLANTED, "·b"], []])
    assert pred == [[0.0, 10.0, 0.0], []]
    assert len(server.requests) == 1 + 10 + 1  # one explanation, one request per non-empty fragment
    for r in server.requests:
        assert r["path"] == "/v1/chat/completions" and r["auth"] == f"Bearer {KEY}"
        assert r["body"]["model"] == "fake-model" and r["body"]["temperature"] == 0
    prompt = server.requests[0]["body"]["messages"][-1]["content"]
    assert f'"{PLANTED}"\t10' in prompt and '"·t1"\t0' in prompt  # the 0-10 scale, one token per line


def test_cache_makes_a_repeated_call_free_and_holds_no_key(server, client, tmp_path):
    explainer = llm.CachedExplainer(llm.LLMExplainer(client), tmp_path)
    simulator = llm.CachedSimulator(llm.LLMSimulator(client), tmp_path)
    recs, frags = _records(5), [["·a", PLANTED], [PLANTED, "·b", "·c"]]
    text = explainer.explain(recs)
    pred = simulator.simulate(text, frags)
    n = len(server.requests)
    assert n == 3
    assert explainer.explain(recs) == text and simulator.simulate(text, frags) == pred == [[0, 10], [10, 0, 0]]
    assert len(server.requests) == n and explainer.hits == simulator.hits == 1
    fresh = llm.CachedSimulator(llm.LLMSimulator(client), tmp_path)  # a new session reads the same files
    assert fresh.simulate(text, frags) == pred and len(server.requests) == n
    simulator.simulate(text, frags[:1])  # different input: a new call
    assert len(server.requests) == n + 1
    files = list(tmp_path.rglob("*.json"))
    assert len(files) == 3 and not list(tmp_path.rglob("*.tmp"))
    assert KEY not in _files_text(tmp_path) and "fake-model" in _files_text(tmp_path)


def test_cache_keys_the_endpoint_as_well_as_the_model_name(server, client, tmp_path):
    """One model name served by two endpoints can be two models: the second server's answer is not read from the
    first one's cache entries (the key holds the base URL; the files do not)."""
    other = FakeLLM()
    try:
        recs = _records(5)
        first = llm.CachedExplainer(llm.LLMExplainer(client), tmp_path)
        first.explain(recs)
        second = llm.CachedExplainer(llm.LLMExplainer(llm.ChatClient(other.url, "fake-model", KEY, timeout=5)),
                                     tmp_path)
        second.explain(recs)
        assert (second.hits, second.misses, len(other.requests)) == (0, 1, 1)
        again = llm.CachedExplainer(llm.LLMExplainer(llm.ChatClient(server.url + "/", "fake-model", KEY)), tmp_path)
        again.explain(recs)  # the same endpoint written with a trailing slash: a hit
        assert again.hits == 1 and len(server.requests) == 1
        assert len(list(tmp_path.rglob("*.json"))) == 2 and server.url not in _files_text(tmp_path)
    finally:
        other.stop()


@pytest.mark.parametrize("mode, message", [("notjson", "not JSON: 'Sure! The activations"),
                                           ("wronglen", "gave 1 activations for 3 tokens")])
def test_malformed_reply_is_a_clear_error_and_not_cached(server, client, tmp_path, mode, message):
    simulator = llm.CachedSimulator(llm.LLMSimulator(client), tmp_path)
    server.mode = mode
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        simulator.simulate(f"fires on {PLANTED}", [["·a", PLANTED, "·b"]])
    assert KEY not in str(e.value)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]
    server.mode = "ok"
    n = len(server.requests)
    assert simulator.simulate(f"fires on {PLANTED}", [["·a", PLANTED, "·b"]]) == [[0, 10, 0]]
    assert len(server.requests) == n + 1  # the failure left nothing behind: this was a real call


def test_timeout_names_the_url_and_the_timeout(server, tmp_path):
    server.mode = "slow"
    client = llm.ChatClient(server.url, "fake-model", KEY, timeout=0.2)
    explainer = llm.CachedExplainer(llm.LLMExplainer(client), tmp_path)
    t0 = time.monotonic()
    with pytest.raises(llm.LLMError, match=r"timeout of 0\.2 s") as e:
        explainer.explain(_records(5))
    assert time.monotonic() - t0 < 0.9
    assert f"{server.url}/chat/completions" in str(e.value) and KEY not in str(e.value)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_http_error_names_status_and_url_and_masks_an_echoed_key(server, client):
    server.mode = "401"
    with pytest.raises(llm.LLMError) as e:
        client.chat([{"role": "user", "content": "hi"}])
    msg = str(e.value)
    assert "HTTP 401" in msg and f"{server.url}/chat/completions" in msg and "Incorrect API key" in msg
    assert KEY not in msg and "<hidden>" in msg


def test_unreachable_server_is_a_clear_error(server):
    url = server.url
    server.stop()  # nothing listens on that port any more
    with pytest.raises(llm.LLMError, match="could not reach") as e:
        llm.ChatClient(url, "m", KEY, timeout=2).chat([{"role": "user", "content": "hi"}])
    assert KEY not in str(e.value)


def test_loopback_requests_skip_a_configured_proxy(server, monkeypatch):
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:1")  # a dead proxy: using it would fail
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:1")
    client = llm.ChatClient(server.url, "fake-model", KEY, timeout=5)
    assert llm.LLMSimulator(client).simulate(f"fires on {PLANTED}", [[PLANTED]]) == [[10.0]]


def _clear_env(monkeypatch):
    for v in ("SC_LLM_BASE_URL", "SC_LLM_MODEL", "SC_LLM_API_KEY", "OPENAI_BASE_URL", "OPENAI_API_KEY"):
        monkeypatch.delenv(v, raising=False)


def test_environment_configuration_and_missing_key(monkeypatch):
    _clear_env(monkeypatch)
    assert not llm.llm_configured()
    monkeypatch.setenv("SC_LLM_BASE_URL", "http://127.0.0.1:9/v1/")
    monkeypatch.setenv("SC_LLM_MODEL", "m")
    assert not llm.llm_configured()
    with pytest.raises(llm.LLMError, match="SC_LLM_API_KEY"):
        llm.ChatClient.from_env()
    with pytest.raises(llm.LLMError, match="SC_LLM_API_KEY"):
        llm.ChatClient("http://127.0.0.1:9/v1", "m", "")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # the fallback
    assert llm.llm_configured()
    c = llm.ChatClient.from_env()
    assert (c.url, c.model, c.timeout) == ("http://127.0.0.1:9/v1/chat/completions", "m", 60.0)
    monkeypatch.delenv("SC_LLM_BASE_URL")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:8/v1")
    assert llm.ChatClient.from_env().base_url == "http://127.0.0.1:8/v1"
    monkeypatch.delenv("SC_LLM_MODEL")
    assert not llm.llm_configured()
    with pytest.raises(llm.LLMError, match="SC_LLM_MODEL"):
        llm.ChatClient.from_env()


def test_key_is_in_no_repr():
    c = llm.ChatClient("http://127.0.0.1:9/v1", "m", KEY)
    shown = [repr(c), str(c), repr(llm.LLMExplainer(c)), repr(llm.LLMSimulator(c)),
             repr(llm.CachedSimulator(llm.LLMSimulator(c), "cache")),
             repr(llm.CachedExplainer(llm.LLMExplainer(c), "cache"))]
    assert not [s for s in shown if KEY in s] and "<hidden>" in shown[0]


@pytest.mark.parametrize("reply, ok", [('{"activations": [0, 10, 3]}', [0.0, 10.0, 3.0]),
                                       ('```json\n{"activations": [0, 10, 3.0]}\n```', [0.0, 10.0, 3.0]),
                                       ('{"activations": [0, 10]}', "gave 2 activations"),
                                       ('{"activations": [0, "10", 3]}', "numbers 0-10, got '10'"),
                                       ('{"activations": [0, true, 3]}', "numbers 0-10, got True"),
                                       ('{"activations": [0, 11, 3]}', "numbers 0-10, got 11"),
                                       ('[0, 10, 3]', 'no "activations" list'),
                                       ("0 10 3", "not JSON: '0 10 3'")])
def test_simulator_reply_is_parsed_strictly(reply, ok):
    if isinstance(ok, list):
        assert llm.parse_activations(reply, 3) == ok
    else:
        with pytest.raises(ValueError, match=re.escape(ok)):
            llm.parse_activations(reply, 3)


class _Counting:
    def __init__(self, inner):
        self.inner, self.name, self.calls = inner, inner.name, 0

    def explain(self, records):
        self.calls += 1
        return self.inner.explain(records)

    def simulate(self, explanation, fragments):
        self.calls += 1
        return self.inner.simulate(explanation, fragments)


def test_caches_wrap_the_offline_explainer_and_simulator(tmp_path):
    recs = _records(5)
    ex, sim = _Counting(TokenTableExplainer()), _Counting(TokenTableSimulator())
    cex, csim = llm.CachedExplainer(ex, tmp_path), llm.CachedSimulator(sim, tmp_path)
    assert cex.name == "token-table"
    text = cex.explain(recs)
    pred = csim.simulate(text, [r.tokens for r in recs])
    assert text == TokenTableExplainer().explain(recs) and cex.explain(recs) == text
    assert csim.simulate(text, [r.tokens for r in recs]) == pred and ex.calls == sim.calls == 1
    changed = [Record(r.tokens, [a * 2 for a in r.acts]) for r in recs]  # other activations: another key
    cex.explain(changed)
    assert ex.calls == 2


def test_scorers_cache_an_llm_but_not_the_offline_pair(tmp_path, monkeypatch):
    ex, sim = llm.scorers("offline", tmp_path)
    assert isinstance(ex, TokenTableExplainer) and isinstance(sim, TokenTableSimulator)
    monkeypatch.setenv("SC_LLM_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("SC_LLM_MODEL", "m")
    monkeypatch.setenv("SC_LLM_API_KEY", KEY)
    ex, sim = llm.scorers("auto", tmp_path)
    assert isinstance(ex, llm.CachedExplainer) and isinstance(sim, llm.CachedSimulator)
    assert isinstance(llm.scorers("offline", tmp_path)[0], TokenTableExplainer)  # offline forces it
    with pytest.raises(ValueError, match="'auto'"):
        llm.scorers("gpt", tmp_path)
