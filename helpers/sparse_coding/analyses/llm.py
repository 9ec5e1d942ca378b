"""An LLM explainer and simulator for `analyses.interpretability`, over any OpenAI-compatible chat API, and caches
that work with any explainer or simulator.

`ChatClient` posts `{"model", "messages", "temperature": 0}` to `{base_url}/chat/completions` with the key as a
Bearer token (stdlib `urllib`, no new dependency). `ChatClient.from_env()` reads `SC_LLM_BASE_URL`, `SC_LLM_MODEL`
and `SC_LLM_API_KEY` (falling back to `OPENAI_BASE_URL` / `OPENAI_API_KEY`); `llm_configured()` says whether all
three are set. The key is kept out of every repr and error message (any echo of it in a server's reply is masked)
and is never written to a cache file. Requests to a loopback host (a local server) never go through a proxy.

`LLMExplainer` shows the explanation records' tokens with their activations on the 0-10 scale, as OpenAI's
automated-interpretability explainer does (Bills et al. 2023), and asks for a one-line explanation. `LLMSimulator`
needs no logprobs: per fragment it sends the explanation and the indexed tokens and asks for
`{"activations": [one integer 0-10 per token]}`, parsed strictly (a ValueError quoting the reply otherwise).

`CachedExplainer` / `CachedSimulator` store each answer as a JSON file keyed by a sha256 of the wrapped object's
name, its endpoint (an LLM's base URL: one model name can mean different models on different servers) and its
inputs (`<cache_dir>/{explain,simulate}/<2 hex>/<sha256>.json`, written atomically); a hit makes no
call, and a failed call stores nothing."""

from __future__ import annotations

import hashlib
import http.client
import ipaddress
import json
import math
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Sequence

from ..arguments import checked
from ..files import jsonable, load_json, save_json
from ..paths import resolve
from .interpretability import (Explainer, Record, Simulator, TokenTableExplainer, TokenTableSimulator,
                               scale_0_10)

ENV_BASE_URL, ENV_MODEL, ENV_KEY = "SC_LLM_BASE_URL", "SC_LLM_MODEL", "SC_LLM_API_KEY"
FALLBACK_BASE_URL, FALLBACK_KEY = "OPENAI_BASE_URL", "OPENAI_API_KEY"
QUOTE_CHARS = 200  # how much of a bad reply an error quotes


class LLMError(RuntimeError):
    """The chat API could not be used: not configured, unreachable, timed out, or answered with an HTTP error."""


def _env(*names: str) -> str | None:
    for n in names:
        v = os.environ.get(n, "").strip()
        if v:
            return v
    return None


@checked
def llm_configured() -> bool:
    """True when a base URL, a model and a key are all set in the environment (see the module docstring)."""
    return bool(_env(ENV_BASE_URL, FALLBACK_BASE_URL) and _env(ENV_MODEL) and _env(ENV_KEY, FALLBACK_KEY))


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _start(text: str) -> str:
    return repr(text[:QUOTE_CHARS] + ("…" if len(text) > QUOTE_CHARS else ""))


@checked
class ChatClient:
    """One OpenAI-compatible chat endpoint. `chat(messages) -> str` returns the first choice's message text."""

    def __init__(self, base_url: str, model: str, api_key: str, timeout: float = 60):
        if not base_url:
            raise LLMError(f"no chat API base URL: set {ENV_BASE_URL} (e.g. http://127.0.0.1:8080/v1)")
        if not model:
            raise LLMError(f"no model name: set {ENV_MODEL}")
        if not api_key:
            raise LLMError(f"no API key: set {ENV_KEY} (or {FALLBACK_KEY}); a local server that ignores keys "
                           "accepts any value")
        if not timeout or timeout <= 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.base_url, self.model, self.timeout = base_url.rstrip("/"), model, float(timeout)
        self.__key = api_key
        self.url = f"{self.base_url}/chat/completions"
        host = urllib.parse.urlsplit(self.url).hostname
        # a proxy cannot reach this machine's loopback, so local servers are always asked directly
        handlers = [urllib.request.ProxyHandler({})] if _is_loopback(host) else []
        self._opener = urllib.request.build_opener(*handlers)

    @classmethod
    def from_env(cls, timeout: float = 60) -> "ChatClient":
        """A client from SC_LLM_BASE_URL, SC_LLM_MODEL, SC_LLM_API_KEY (or OPENAI_BASE_URL / OPENAI_API_KEY)."""
        return cls(_env(ENV_BASE_URL, FALLBACK_BASE_URL) or "", _env(ENV_MODEL) or "",
                   _env(ENV_KEY, FALLBACK_KEY) or "", timeout)

    def __repr__(self) -> str:
        return f"ChatClient(base_url={self.base_url!r}, model={self.model!r}, api_key=<hidden>, timeout={self.timeout})"

    def _redact(self, text: str) -> str:
        return text.replace(self.__key, "<hidden>")

    def chat(self, messages: Sequence[dict]) -> str:
        body = json.dumps({"model": self.model, "messages": list(messages), "temperature": 0}).encode("utf-8")
        req = urllib.request.Request(self.url, data=body, method="POST", headers={
            "Content-Type": "application/json", "Accept": "application/json",
            "Authorization": f"Bearer {self.__key}"})
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                data = resp.read()
            try:  # strictly: a reply damaged in transit is refused, not read with replacement characters
                raw = data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise LLMError(self._redact(f"the reply from {self.url} is not valid UTF-8 (byte {e.start} of "
                                            f"{len(data)}); check the server's encoding")) from None
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", errors="replace") if e.fp else ""
            msg = f"HTTP {e.code} {e.reason} from {self.url}" + (f": {_start(detail)}" if detail else "")
            raise LLMError(self._redact(msg)) from None
        except (OSError, http.client.HTTPException) as e:  # URLError, timeouts, resets, cut-off replies
            reason = getattr(e, "reason", e)
            if isinstance(e, TimeoutError) or isinstance(reason, TimeoutError):
                raise LLMError(self._redact(f"no reply from {self.url} within the timeout of {self.timeout:g} s; "
                                            "pass a larger timeout to ChatClient")) from None
            raise LLMError(self._redact(f"could not reach {self.url}: {reason}")) from None
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise ValueError(self._redact(f"{self.url} did not answer like an OpenAI chat completion: "
                                          f"{_start(raw)}")) from None
        if not isinstance(content, str):
            raise ValueError(self._redact(f"{self.url} sent a message without text: {_start(raw)}"))
        return content


TOKENS_NOTE = ("Tokens are written as JSON strings; in them · may stand for a space, ⏎ for a newline and ⇥ for a "
               "tab. ")

EXPLAIN_SYSTEM = (
    "We're studying features of a neural network: directions in a language model's activations. Each feature fires "
    "on some particular thing in a short piece of text. Look at the tokens where the feature fires and summarise in "
    "one short sentence what it fires on. Don't just list many example words.\n\n"
    "The activation format is token<tab>activation, one token per line. " + TOKENS_NOTE +
    "Activation values range from 0 to 10. A feature finding what it looks for has a non-zero activation; the "
    "higher the value, the stronger the match.")

SIMULATE_SYSTEM = (
    "We're studying features of a neural network: directions in a language model's activations. Given an "
    "explanation of what a feature fires on, predict its activation on each token of a text, as an integer from 0 "
    "(does not fire) to 10 (fires most strongly). Most tokens are usually 0. " + TOKENS_NOTE + "\n\n"
    'Reply with only a JSON object {"activations": [...]} holding exactly one integer 0-10 per token, in the '
    "order of the token indices, and nothing else.")


def _listing(tokens: Sequence[str], acts: Sequence[int]) -> str:
    return "\n".join(f"{json.dumps(t, ensure_ascii=False)}\t{a}" for t, a in zip(tokens, acts))


def explain_messages(records: Sequence[Record]) -> list[dict]:
    """OpenAI-style explainer prompt: every record's tokens with 0-10 activations, then the non-zero ones again."""
    scaled = scale_0_10(records)
    blocks = [f"<start>\n{_listing(r.tokens, s)}\n<end>" for r, s in zip(records, scaled)]
    kept = [[(t, a) for t, a in zip(r.tokens, s) if a > 0] for r, s in zip(records, scaled)]
    nonzero = [f"<start>\n{_listing([t for t, _ in k], [a for _, a in k])}\n<end>" for k in kept]
    user = ("Feature 1\nActivations:\n" + "\n".join(blocks) + "\n\nSame activations, with the zeros left out:\n"
            + "\n".join(nonzero) + "\n\nExplanation of feature 1 in one short line (no preamble, no quotes), "
            "starting with \"fires on\":")
    return [{"role": "system", "content": EXPLAIN_SYSTEM}, {"role": "user", "content": user}]


def simulate_messages(explanation: str, tokens: Sequence[str]) -> list[dict]:
    indexed = json.dumps([[i, t] for i, t in enumerate(tokens)], ensure_ascii=False)
    user = (f"Explanation: {explanation}\nTokens: {indexed}\n"
            f'Answer with {{"activations": [...]}} holding {len(tokens)} integers.')
    return [{"role": "system", "content": SIMULATE_SYSTEM}, {"role": "user", "content": user}]


_FENCE = re.compile(r"^```(?:json)?\s*\n?(.*?)\n?```$", re.DOTALL)


def parse_activations(reply: str, n_tokens: int) -> list[float]:
    """`{"activations": [n_tokens numbers in 0..10]}` (optionally inside one ```json fence) as floats; anything
    else is a ValueError quoting the start of the reply."""
    text = reply.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    try:
        obj = json.loads(text)
    except ValueError:
        raise ValueError(f"the simulator's reply is not JSON: {_start(reply)}") from None
    acts = obj.get("activations") if isinstance(obj, dict) else None
    if not isinstance(acts, list):
        raise ValueError(f'the simulator\'s reply has no "activations" list: {_start(reply)}')
    if len(acts) != n_tokens:
        raise ValueError(f"the simulator gave {len(acts)} activations for {n_tokens} tokens: {_start(reply)}")
    bad = [a for a in acts if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a)
           or not 0 <= a <= 10]
    if bad:
        raise ValueError(f"the simulator's activations must be numbers 0-10, got {bad[0]!r}: {_start(reply)}")
    return [float(a) for a in acts]


@checked
class LLMExplainer:
    """Explains a direction from its explanation records with one chat request; returns one stripped line."""

    version = "1"  # part of the cache key: bump when the prompt changes

    def __init__(self, client: ChatClient):
        # endpoint: part of the cache key, as one model name can mean different models on different servers
        self.client, self.name, self.endpoint = client, f"llm:{client.model}", client.base_url

    def __repr__(self) -> str:
        return f"LLMExplainer({self.client!r})"

    def explain(self, records: Sequence[Record]) -> str:
        reply = self.client.chat(explain_messages(records))
        lines = [ln.strip() for ln in reply.strip().splitlines() if ln.strip()]
        if not lines:
            raise ValueError(f"the explainer ({self.name}) sent an empty explanation: {_start(reply)}")
        return " ".join(lines[0].split())


@checked
class LLMSimulator:
    """Predicts each token's activation (0-10) from the explanation text, one chat request per fragment."""

    version = "1"

    def __init__(self, client: ChatClient):
        self.client, self.name, self.endpoint = client, f"llm:{client.model}", client.base_url

    def __repr__(self) -> str:
        return f"LLMSimulator({self.client!r})"

    def simulate(self, explanation: str, fragments: Sequence[Sequence[str]]) -> list[list[float]]:
        out = []
        for frag in fragments:
            frag = list(frag)
            out.append(parse_activations(self.client.chat(simulate_messages(explanation, frag)), len(frag))
                       if frag else [])
        return out


def _digest(kind: str, inner: Any, payload: Any) -> str:
    key = {"kind": kind, "name": inner.name, "version": getattr(inner, "version", None), "input": jsonable(payload)}
    endpoint = getattr(inner, "endpoint", None)
    if endpoint is not None:  # (absent from the keys of explainers without one, so theirs stay as they were)
        key["endpoint"] = endpoint
    return hashlib.sha256(json.dumps(key, ensure_ascii=False, sort_keys=True).encode("utf-8")).hexdigest()


class _Cache:
    kind = ""

    def __init__(self, inner: Any, cache_dir: str | os.PathLike):
        self.inner, self.cache_dir, self.name = inner, resolve(cache_dir), inner.name
        self.hits = self.misses = 0

    def _path(self, digest: str) -> Path:
        return self.cache_dir / self.kind / digest[:2] / f"{digest}.json"

    def _load(self, path: Path) -> Any:
        if not path.exists():
            return None
        entry = load_json(path)
        return entry.get("output") if isinstance(entry, dict) and entry.get("name") == self.name else None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.inner!r}, {str(self.cache_dir)!r})"


@checked
class CachedExplainer(_Cache):
    """Any explainer, with each explanation stored under a hash of (explainer name, records)."""

    kind = "explain"

    def __init__(self, explainer: Explainer, cache_dir: str | os.PathLike):
        super().__init__(explainer, cache_dir)

    def explain(self, records: Sequence[Record]) -> str:
        payload = [[list(r.tokens), [float(a) for a in r.acts]] for r in records]
        path = self._path(_digest(self.kind, self.inner, payload))
        hit = self._load(path)
        if isinstance(hit, str):
            self.hits += 1
            return hit
        self.misses += 1
        text = self.inner.explain(records)
        save_json(path, {"name": self.name, "kind": self.kind, "output": text})
        return text


@checked
class CachedSimulator(_Cache):
    """Any simulator, with each call's predictions stored under a hash of (simulator name, explanation,
    fragments)."""

    kind = "simulate"

    def __init__(self, simulator: Simulator, cache_dir: str | os.PathLike):
        super().__init__(simulator, cache_dir)

    def simulate(self, explanation: str, fragments: Sequence[Sequence[str]]) -> list[list[float]]:
        frags = [list(f) for f in fragments]
        path = self._path(_digest(self.kind, self.inner, [explanation, frags]))
        hit = self._load(path)
        if isinstance(hit, list) and [len(p) for p in hit] == [len(f) for f in frags]:
            self.hits += 1
            return [[float(a) for a in p] for p in hit]
        self.misses += 1
        pred = [[float(a) for a in p] for p in self.inner.simulate(explanation, frags)]
        if [len(p) for p in pred] != [len(f) for f in frags]:
            raise ValueError(f"the simulator ({self.name}) returned {[len(p) for p in pred]} predictions for "
                             f"fragments of {[len(f) for f in frags]} tokens")
        save_json(path, {"name": self.name, "kind": self.kind, "explanation": explanation, "output": pred})
        return pred


@checked
def scorers(llm: str, cache_dir: str | os.PathLike) -> tuple[Any, Any]:
    """(explainer, simulator) for interpretability scores: an LLM's (`ChatClient.from_env`), caching its answers
    under cache_dir (keyed by name, version and input), when llm="auto" and one is configured (`llm_configured`),
    else the offline token-table pair, uncached (llm="offline" forces it). Raises ValueError for another llm."""
    if llm not in ("auto", "offline"):
        raise ValueError(f"llm must be 'auto' (an LLM when configured, else offline) or 'offline', got {llm!r}")
    if llm == "auto" and llm_configured():
        client = ChatClient.from_env()
        explainer, simulator = LLMExplainer(client), LLMSimulator(client)
        return CachedExplainer(explainer, cache_dir), CachedSimulator(simulator, cache_dir)
    # The offline pair costs less than its cache would (hashing and writing a file per call): not cached.
    return TokenTableExplainer(), TokenTableSimulator()
