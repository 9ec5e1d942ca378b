"""Every feature of one dictionary as a standalone offline HTML page (the default run writes
figures/06_dictionary.html): a feature browser in the manner of Neuronpedia and SAEDashboard, built from the mined
results alone (`analyses.mine`; no model at page time).

The page lists the live features (index, firing frequency, max activation, top tokens: the tokens its top examples
are most often about), with a search box (a token text, substring and case-insensitive, or a feature index) and
columns sortable by index, frequency or max; the header counts the dead ones. Clicking a feature opens its card: the
activation histogram, the top examples and a few quantile examples per activation bin, tokens coloured by activation
(colour intensity = activation / the feature's max, the example's token boxed, the activation on hover), and the
logit lens when given. The URL fragment drives it for scripted checks: `page.html#q=foo` fills the search box,
`#f=12` opens feature 12's card (`#q=foo&f=12` both).

The data is one JSON blob inlined in a <script type="application/json"> (every '<' written as \\u003c, so nothing in
a token text can end the element) and rendered by vanilla inlined JavaScript with textContent only: no network
access, it works from file://. The blob (`page_data`):

    {"version": 1, "n_tokens": tokens mined, "n_directions": n, "n_dead": features that never fired,
     "vocab": [token text, ...]  (each text once; the most used first, so the common ids are short),
     "features": [[index, count, max, top_tokens, hist, top, quantiles, lens], ...]  (live features, by index)}

count: tokens where the feature fires (frequency = count / n_tokens, exact); max: `Mined.max`, 6 significant digits;
top_tokens: [[vocab id, examples], ...]; hist: [edges, counts], the histogram's bins from the first to the last
occupied one (`Mined.hist`, `Mined.bin_edges`; edges to 4 significant digits; the first and last bins of the mined
grid also hold everything below and above it); top: [example, ...]; quantiles: [[lo, hi, [example, ...]], ...];
example: [value (4 significant digits), index of its token in the window, [vocab id, ...], activations as a hex
string, two digits a token: round(255 · act / max), at least 1 where the feature fires, so the display is within
max / 510 of the mined value]; lens: [[[vocab id, value], ...] promoted, [...] suppressed] or null."""

from __future__ import annotations

import html
import json
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Mapping, Sequence

import torch

from ..analyses.mining import Mined
from ..arguments import checked
from ..checks import check_int, check_seed, check_tensor
from ..files import atomic_write_text
from .dictionary_template import TEMPLATE

N_TOP_TOKENS = 5          # top tokens listed per feature
MAX_WINDOW = (24, 8)      # tokens kept before and after an example's token (bounds the page when mined whole contexts)
LensTable = Mapping[int, tuple[list[tuple[str, float]], list[tuple[str, float]]]]


def _sig(x: float, digits: int) -> float:
    return float(f"{float(x):.{digits}g}")


class _Vocab:
    """Token texts -> page ids, by first use; `order` then renumbers them most used first (shorter JSON)."""

    def __init__(self):
        self.ids: dict[str, int] = {}
        self.uses: Counter = Counter()

    def __call__(self, text: str) -> int:
        i = self.ids.setdefault(text, len(self.ids))
        self.uses[i] += 1
        return i

    def order(self) -> tuple[list[str], list[int]]:
        """(texts in their final order, provisional id -> final id)."""
        texts = list(self.ids)
        ranked = sorted(range(len(texts)), key=lambda i: (-self.uses[i], i))
        remap = [0] * len(texts)
        for final, i in enumerate(ranked):
            remap[i] = final
        return [texts[i] for i in ranked], remap


def _example(e, top: float, texts: Sequence[str], vocab: _Vocab) -> list:
    """One Example as [value, target, token ids, hex activations], cut to MAX_WINDOW and to the context (the window's
    -1 tokens, past its edges, are dropped)."""
    lo, hi = max(0, e.target - MAX_WINDOW[0]), min(len(e.tokens), e.target + MAX_WINDOW[1] + 1)
    while e.tokens[lo] < 0:
        lo += 1
    while e.tokens[hi - 1] < 0:
        hi -= 1
    q = []
    for a in e.acts[lo:hi]:
        # NaN (no activation kept) and 0 show uncoloured; a firing token keeps at least 1 so it never looks silent
        q.append(0 if not a > 0 else min(255, max(1, round(255 * a / top))))
    return [_sig(e.value, 4), e.target - lo, [vocab(texts[t]) for t in e.tokens[lo:hi]], bytes(q).hex()]


def _histogram(mined: Mined, d: int) -> list:
    counts = mined.hist[d].tolist()
    edges = mined.bin_edges(d).tolist()
    occupied = [i for i, c in enumerate(counts) if c > 0]
    if not occupied:  # a grid that missed the feature's tokens: the card says so rather than breaking
        return [[], []]
    a, b = occupied[0], occupied[-1] + 1
    return [[_sig(x, 4) for x in edges[a:b + 1]], counts[a:b]]


def _lens(entries, vocab: _Vocab) -> list:
    up, down = entries
    return [[[vocab(str(t)), _sig(v, 4)] for t, v in up], [[vocab(str(t)), _sig(v, 4)] for t, v in down]]


def _check(mined: Mined, texts: Sequence[str], logit_lens: LensTable | None) -> None:
    if mined.n_directions == 0 or mined.tokens.numel() == 0 or mined.n_tokens == 0:
        raise ValueError(f"mined is empty ({mined.n_directions} directions mined over {mined.n_tokens} tokens): mine "
                         f"a dictionary over some text first (analyses.mine)")
    if not texts:
        raise ValueError("texts is empty: pass every token id's text (corpus.token_texts(tokenizer))")
    if int(mined.tokens.min()) < 0:
        raise ValueError(f"mined.tokens holds token id {int(mined.tokens.min())}: token ids must be >= 0")
    top_id = int(mined.tokens.max())
    if top_id >= len(texts):
        raise ValueError(f"texts has {len(texts)} token texts but mined.tokens holds token id {top_id}: pass the "
                         f"texts of the tokenizer the text was mined with (corpus.token_texts(tokenizer, n_vocab=...))")
    for f, sides in (logit_lens or {}).items():
        if not 0 <= f < mined.n_directions:
            raise ValueError(f"logit_lens has an entry for feature {f}, but mined has {mined.n_directions} "
                             f"directions: key it by feature index (e.g. lens_tables(W_lens, texts))")
        if not all(math.isfinite(v) for side in sides for _, v in side):
            raise ValueError(f"logit_lens[{f}] holds NaN or inf: give finite logit values")


@checked
def page_data(mined: Mined, texts: Sequence[str], *, logit_lens: LensTable | None = None, n_top: int = 10,
              n_quantile_bins: int = 5, per_bin: int = 2, seed: int = 0) -> dict:
    """The page's data (the blob of the module docstring) from `mined` and `texts` (each token id's text, e.g.
    corpus.token_texts(tokenizer)). n_top: top examples shown per feature (the top tokens count all the mined ones);
    n_quantile_bins equal-width activation bins of (0, max] with up to per_bin examples each (0 bins: none), drawn
    with `seed` (`Mined.quantile_examples`). logit_lens: {feature: (promoted, suppressed)} as [(text, value)] (e.g.
    `lens_tables`), features without an entry show none. Raises ValueError when mined is empty, a token id of
    mined.tokens has no text, or logit_lens names a feature mined does not have."""
    check_int(n_top, "n_top", 1)
    check_int(n_quantile_bins, "n_quantile_bins", 0)
    check_int(per_bin, "per_bin", 1)
    check_seed(seed)
    _check(mined, texts, logit_lens)
    vocab = _Vocab()
    counts, maxes = mined.count.tolist(), mined.max.tolist()
    features = []
    for d in range(mined.n_directions):
        if counts[d] == 0:
            continue
        top = maxes[d]
        tops = mined.top_examples(d)
        about = Counter(e.tokens[e.target] for e in tops).most_common(N_TOP_TOKENS)
        quantiles = [] if n_quantile_bins == 0 else [
            [_sig(lo, 4), _sig(hi, 4), [_example(e, top, texts, vocab) for e in exs]]
            for lo, hi, exs in mined.quantile_examples(d, n_quantile_bins, per_bin, seed)]
        lens = (logit_lens or {}).get(d)
        features.append([d, counts[d], _sig(top, 6), [[vocab(texts[t]), n] for t, n in about], _histogram(mined, d),
                         [_example(e, top, texts, vocab) for e in tops[:n_top]], quantiles,
                         None if lens is None else _lens(lens, vocab)])
    words, remap = vocab.order()
    for f in features:  # provisional ids -> final ones (the most used text gets 0)
        f[3] = [[remap[v], n] for v, n in f[3]]
        for ex in f[5] + [ex for _, _, exs in f[6] for ex in exs]:
            ex[2] = [remap[v] for v in ex[2]]
        if f[7] is not None:
            f[7] = [[[remap[v], x] for v, x in side] for side in f[7]]
    return {"version": 1, "n_tokens": mined.n_tokens, "n_directions": mined.n_directions,
            "n_dead": mined.n_directions - len(features), "vocab": words, "features": features}


@checked
def dictionary_page(mined: Mined, texts: Sequence[str], title: str, *, logit_lens: LensTable | None = None,
                    n_top: int = 10, n_quantile_bins: int = 5, per_bin: int = 2, seed: int = 0) -> str:
    """The whole page as HTML text (see the module docstring; the arguments and errors are `page_data`'s). About
    3 kB a feature with the defaults on a 17-token mining window (12 before, 4 after)."""
    data = page_data(mined, texts, logit_lens=logit_lens, n_top=n_top, n_quantile_bins=n_quantile_bins,
                     per_bin=per_bin, seed=seed)
    blob = json.dumps(data, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    live = len(data["features"])
    summary = (f"{live} live features of {data['n_directions']} ({data['n_dead']} dead: never fired) · "
               f"{data['n_tokens']:,} tokens mined")
    # ASCII JSON: a lone surrogate in a token text still writes as UTF-8; "<" escaped below: no token text can end
    # the script element or open a comment in it
    fill = {"TITLE": html.escape(title), "SUMMARY": html.escape(summary), "DATA": blob.replace("<", "\\u003c")}
    # one pass, so a title holding "%DATA%" stays text
    return re.sub(r"%(TITLE|SUMMARY|DATA)%", lambda m: fill[m.group(1)], TEMPLATE)


@checked
def save_dictionary_page(mined: Mined, texts: Sequence[str], path: str | os.PathLike, title: str, *,
                         logit_lens: LensTable | None = None, n_top: int = 10, n_quantile_bins: int = 5,
                         per_bin: int = 2, seed: int = 0) -> Path:
    """Write `dictionary_page` atomically (temporary file renamed into place) to path, e.g.
    figures/06_dictionary.html, replacing the page a previous run wrote; returns the path."""
    return atomic_write_text(path, dictionary_page(mined, texts, title, logit_lens=logit_lens, n_top=n_top,
                                                   n_quantile_bins=n_quantile_bins, per_bin=per_bin, seed=seed))


@checked
@torch.no_grad()
def lens_tables(W_lens: torch.Tensor, texts: Sequence[str], k: int = 5
                ) -> dict[int, tuple[list[tuple[str, float]], list[tuple[str, float]]]]:
    """The logit lens of every feature at once from W_lens [d_sae, vocab] (row f: the logits feature f's decoder
    direction writes, computed by the caller, e.g. (W_dec ⊙ γ) @ W_U): {f: (the k tokens it promotes most, the k it
    suppresses most)} as [(text, logit)], strongest first. One topk over the matrix (on its device). Raises
    ValueError when texts does not have one text per column or W_lens holds NaN or inf."""
    check_tensor(W_lens, "W_lens", 2, shape_hint="[d_sae, vocab]")
    check_int(k, "k", 1)
    if W_lens.shape[1] != len(texts):
        raise ValueError(f"texts has {len(texts)} token texts but W_lens has {W_lens.shape[1]} vocabulary columns: "
                         f"pass one text per column (corpus.token_texts(tokenizer, n_vocab={W_lens.shape[1]}))")
    k = min(k, W_lens.shape[1])
    up_v, up_i = W_lens.topk(k, dim=1)
    down_v, down_i = W_lens.topk(k, dim=1, largest=False)
    # topk ranks NaN above everything and ±inf at the ends, so a non-finite entry anywhere in a row shows up here
    if not (bool(torch.isfinite(up_v).all()) and bool(torch.isfinite(down_v).all())):
        raise ValueError("W_lens holds NaN or inf: compute it from finite weights")
    out = {}
    for f, (uv, ui, dv, di) in enumerate(zip(up_v.tolist(), up_i.tolist(), down_v.tolist(), down_i.tolist())):
        out[f] = ([(texts[i], v) for i, v in zip(ui, uv)], [(texts[i], v) for i, v in zip(di, dv)])
    return out
