"""The dictionary page (figures/06_dictionary.html): every live feature in a searchable list and a card per feature,
offline, with hostile token texts shown as text. The browser tests drive the page through its URL fragment
(`#q=...`, `#f=...`) in headless Chromium with every network host unreachable, and read the DOM it prints
(--dump-dom) after the scripts ran; the data tests read the JSON blob back."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from sparse_coding.analyses.mining import mine
from sparse_coding.plots import dictionary_page, lens_tables, save_dictionary_page
from sparse_coding.plots.dictionary_html import page_data

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["·alpha", "·beta", "·gamma", "</script><b>x", "·delta", "⏎", "'q\"&amp;", "·eps"]
ALPHA, BETA, EVIL = 0, 1, 3
A, B, C, DEAD = 0, 1, 2, 3  # A fires on ·alpha, B on ·beta, C on the hostile text, DEAD never
LENS = {A: ([("·alpha", 2.5), ("</script><b>x", 1.25)], [("·beta", -1.5)]), B: ([("·gamma", 0.75)], [])}


def _read(toks: torch.Tensor) -> dict[str, torch.Tensor]:
    """Activations we control: A on ·alpha growing with the position (1 .. 4.75: several histogram bins), B on ·beta
    (2, 4 or 6), C 0.5 on the hostile token, DEAD 0."""
    pos = torch.arange(toks.shape[1]).expand_as(toks).float()
    a = (toks == ALPHA) * (1 + pos / 4)
    b = (toks == BETA) * 2.0 * (1 + pos % 3)
    c = (toks == EVIL) * 0.5
    return {"h": torch.stack([a, b, c, torch.zeros_like(a)], -1).float()}


@pytest.fixture(scope="module")
def mined():
    tokens = torch.randint(0, len(TEXTS), (24, 16), generator=torch.Generator().manual_seed(0))
    return mine(_read, {"sae": ("h", lambda x: x)}, tokens, n_top=8, per_bin=2, progress=False)["sae"]


@pytest.fixture(scope="module")
def page(mined, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dictionary") / "06_dictionary.html"
    return save_dictionary_page(mined, TEXTS, path, "dictionary <i>of</i> test", logit_lens=LENS)


# ----------------------------------------------------------------------------------------------- reading the DOM

class _Node:
    def __init__(self, tag: str, attrs: dict, parent: "_Node | None"):
        self.tag, self.attrs, self.parent, self.children = tag, attrs, parent, []

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def find_all(self, pred) -> list["_Node"]:
        out = []
        for c in self.children:
            if isinstance(c, _Node):
                out += ([c] if pred(c) else []) + c.find_all(pred)
        return out

    def by_class(self, cls: str) -> list["_Node"]:
        return self.find_all(lambda n: cls in n.attrs.get("class", "").split())


class _Tree(HTMLParser):
    VOID = {"meta", "input", "br", "img", "link", "hr"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = self.at = _Node("root", {}, None)

    def handle_starttag(self, tag, attrs):
        node = _Node(tag, {k: v or "" for k, v in attrs}, self.at)
        self.at.children.append(node)
        if tag not in self.VOID:
            self.at = node

    def handle_endtag(self, tag):
        n = self.at
        while n is not None and n.tag != tag:
            n = n.parent
        if n is not None and n.parent is not None:
            self.at = n.parent

    def handle_data(self, data):
        self.at.children.append(data)


def _dom(chromium: str, url: str, budget_ms: int = 5000, timeout: int = 90) -> _Node:
    """The DOM headless Chromium prints for url once its scripts ran, every host but localhost unreachable."""
    profile = tempfile.mkdtemp(prefix="chromium-")
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           f"--user-data-dir={profile}", "--no-first-run", "--disable-extensions", "--disable-background-networking",
           "--disable-sync", "--disable-component-update",
           "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE localhost , EXCLUDE 127.0.0.1",
           "--proxy-server=http://127.0.0.1:9", f"--virtual-time-budget={budget_ms}", "--dump-dom", url]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert "<body" in out.stdout, f"chromium printed no DOM for {url}: {out.stderr[-2000:]}"
    tree = _Tree()
    tree.feed(out.stdout)
    return tree.root


def _alpha(style: str) -> float:
    """The opacity of an inline background colour (Chromium writes rgb(...) when it is 1); 0 when there is none."""
    m = re.search(r"background-color:\s*rgba?\(([^)]*)\)", style)
    if not m:
        return 0.0
    parts = [float(x) for x in m.group(1).split(",")]
    return parts[3] if len(parts) == 4 else 1.0


def _listed(root: _Node) -> list[int]:
    return [int(tr.attrs["data-f"]) for tr in root.by_class("row")]


# ------------------------------------------------------------------------------------------------ browser tests

def test_search_lists_features_by_top_token(page, chromium):
    root = _dom(chromium, page.resolve().as_uri() + "#q=ALPHA")  # case-insensitive substring of "·alpha"
    assert _listed(root) == [A]
    root = _dom(chromium, page.resolve().as_uri() + "#q=" + "%3C%2Fscript")  # "</script": C's token, as text
    assert _listed(root) == [C]
    summary = root.find_all(lambda n: n.attrs.get("id") == "summary")[0].text()
    assert "3 live features of 4 (1 dead" in summary
    assert "dictionary <i>of</i> test" in root.find_all(lambda n: n.tag == "h1")[0].text()  # the title as text
    assert not root.find_all(lambda n: n.tag == "i")


def test_fragment_opens_a_card_with_coloured_tokens_histogram_and_lens(page, mined, chromium):
    root = _dom(chromium, page.resolve().as_uri() + f"#q=beta&f={A}")
    assert _listed(root) == [B]  # the search box and the card at once
    card = root.find_all(lambda n: n.attrs.get("id") == "card")[0]
    assert card.find_all(lambda n: n.tag == "h2")[0].text() == f"Feature {A}"
    assert "·alpha" in card.by_class("stats")[-1].text()  # top tokens
    bars = card.by_class("bar")
    assert len(bars) >= 3 and sum("height: 100%" in b.attrs.get("style", "") for b in bars) == 1
    up = [li.text() for li in card.by_class("lens-up")[0].find_all(lambda n: n.tag == "li")]
    down = [li.text() for li in card.by_class("lens-down")[0].find_all(lambda n: n.tag == "li")]
    assert up == ["·alpha2.50", "</script><b>x1.25"] and down == ["·beta-1.50"]
    first = card.by_class("top")[0].by_class("ex")[0]
    toks = first.by_class("tok")
    target = [t for t in toks if "tgt" in t.attrs["class"].split()]
    assert len(target) == 1 and target[0].text() == "·alpha"
    strengths = [_alpha(t.attrs.get("style", "")) for t in toks]
    assert _alpha(target[0].attrs.get("style", "")) == 1.0 == max(strengths)  # the top example's token: the max
    silent = [t for t in toks if t.text() != "·alpha"]
    assert silent and all(_alpha(t.attrs.get("style", "")) == 0 for t in silent)  # A fires on ·alpha only
    assert all(t.attrs["title"] == "activation 0" for t in silent)
    assert float(target[0].attrs["title"].split()[-1]) == pytest.approx(float(mined.max[A]), rel=1e-2)
    hostile = [t for t in card.by_class("tok") + card.by_class("chip") if t.text() == "</script><b>x"]
    assert hostile and not card.find_all(lambda n: n.tag == "b")  # shown as text, never as markup
    assert card.by_class("quantiles") and card.by_class("bin")


def test_index_search_and_dead_feature(page, chromium):
    root = _dom(chromium, page.resolve().as_uri() + f"#q={C}&f={DEAD}")
    assert _listed(root)[0] == C  # a feature index lists that feature first
    card = root.find_all(lambda n: n.attrs.get("id") == "card")[0]
    assert f"Feature {DEAD} is dead" in card.text()


# --------------------------------------------------------------------------------------------------- data tests

def _blob(text: str) -> dict:
    m = re.search(r'<script type="application/json" id="data">(.*?)</script>', text, re.S)
    return json.loads(m.group(1))


def test_page_is_offline_and_escaped(page, mined):
    text = page.read_text(encoding="utf-8")
    assert not re.search(r"https?://", text)  # nothing to fetch: no URL at all
    assert text.count("</script>") == text.count("<script") == 2  # no token text ends a script element
    assert "<b>" not in text and "<i>" not in text and "&lt;i&gt;of&lt;/i&gt;" in text
    assert _blob(text) == page_data(mined, TEXTS, logit_lens=LENS)
    assert not [p for p in page.parent.iterdir() if p.name.startswith(".")]  # the atomic write left no temporary


def test_data_round_trips_statistics(mined):
    data = page_data(mined, TEXTS, logit_lens=LENS, n_top=5)
    assert (data["n_directions"], data["n_dead"], data["n_tokens"]) == (4, 1, mined.n_tokens)
    feats = {f[0]: f for f in data["features"]}
    assert sorted(feats) == [A, B, C]
    vocab = data["vocab"]
    for d, (i, count, top, top_tokens, (edges, counts), tops, quantiles, lens) in feats.items():
        assert count / data["n_tokens"] == float(mined.frequency()[d])  # exact: the count is stored
        assert top == pytest.approx(float(mined.max[d]), rel=5e-6)  # 6 significant digits
        assert sum(counts) == count and len(edges) == len(counts) + 1 and counts[0] > 0 and counts[-1] > 0
        first = int(mined.hist[d].nonzero()[0, 0])
        assert edges == pytest.approx(mined.bin_edges(d)[first:first + len(edges)].tolist(), rel=5e-4)
        assert len(tops) == 5 and len(quantiles) == 5
        assert vocab[top_tokens[0][0]] == TEXTS[(ALPHA, BETA, EVIL)[d]]
        for ex, orig in zip(tops, mined.top_examples(d)):
            value, target, ids, hexacts = ex
            assert vocab[ids[target]] == TEXTS[orig.tokens[orig.target]]
            assert int(hexacts[2 * target:2 * target + 2], 16) == round(255 * orig.value / float(mined.max[d]))
            kept = [(t, a) for t, a in zip(orig.tokens, orig.acts) if t >= 0]
            q = [int(hexacts[j:j + 2], 16) for j in range(0, len(hexacts), 2)]
            assert [vocab[v] for v in ids] == [TEXTS[t] for t, _ in kept]
            for qj, (_, a) in zip(q, kept):  # 0 where silent, within max / 510 where it fires
                assert (qj == 0) if not a > 0 else abs(qj / 255 * top - a) <= top / 510 + 1e-6
    assert feats[A][7] == [[[vocab.index("·alpha"), 2.5], [vocab.index("</script><b>x"), 1.25]],
                           [[vocab.index("·beta"), -1.5]]]
    assert feats[C][7] is None
    assert len(set(vocab)) == len(vocab)  # each text once


def test_bad_input_is_refused_naming_the_argument(mined):
    with pytest.raises(ValueError, match=r"texts has 3 token texts but mined.tokens holds token id 7"):
        dictionary_page(mined, TEXTS[:3], "t")
    with pytest.raises(ValueError, match=r"mined is empty"):
        dictionary_page(dataclasses.replace(mined, count=mined.count[:0]), TEXTS, "t")
    with pytest.raises(ValueError, match=r"logit_lens has an entry for feature 9"):
        dictionary_page(mined, TEXTS, "t", logit_lens={9: ([], [])})
    with pytest.raises(ValueError, match=r"logit_lens\[0\] holds NaN"):
        dictionary_page(mined, TEXTS, "t", logit_lens={0: ([("·alpha", math.nan)], [])})
    with pytest.raises(ValueError, match=r"n_top"):
        dictionary_page(mined, TEXTS, "t", n_top=0)
    with pytest.raises(ValueError, match=r"logit_lens"):
        dictionary_page(mined, TEXTS, "t", logit_lens={"a": 1.0})


def test_lens_tables_known_answer():
    W = torch.tensor([[3.0, -1.0, 0.0, 2.0], [0.0, 0.5, 5.0, -4.0]])
    lens = lens_tables(W, ["a", "b", "c", "d"], k=2)
    assert lens == {0: ([("a", 3.0), ("d", 2.0)], [("b", -1.0), ("c", 0.0)]),
                    1: ([("c", 5.0), ("b", 0.5)], [("d", -4.0), ("a", 0.0)])}
    with pytest.raises(ValueError, match=r"texts has 3 token texts but W_lens has 4"):
        lens_tables(W, ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"W_lens holds NaN"):
        lens_tables(torch.tensor([[1.0, math.nan, 0.0]]), ["a", "b", "c"])


# -------------------------------------------------------------------------------------------------------- size

def _random_mined(n: int, vocab: int = 50257):
    """n directions on random text and random dense activations (~28% of tokens: fuller windows than an SAE's)."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (96, 64), generator=g)
    W = torch.randn(16, n, generator=g)

    def read(toks):
        return {"h": torch.randn(*toks.shape, 16, generator=torch.Generator().manual_seed(int(toks[0, 0])))}
    return mine(read, {"sae": ("h", lambda x: torch.relu(x @ W / 4 - 0.55))}, tokens, progress=False)["sae"]


def test_size_is_linear_and_under_20_mb_for_4096_features():
    texts = [f"tok{i}" for i in range(50257)]
    sizes = {n: len(dictionary_page(_random_mined(n), texts, "size").encode()) for n in (128, 512)}
    per_feature = (sizes[512] - sizes[128]) / (512 - 128)  # the marginal cost; the vocabulary table is paid once
    assert 2000 < per_feature < 4500, sizes
    assert sizes[128] + per_feature * (4096 - 128) < 20e6, sizes
