"""The feature case studies as one standalone HTML page that works offline: circuitsvis token colouring of each
feature's top and quantile examples.

circuitsvis's default HTML (`str(rendered)`) loads its JavaScript from a CDN and shows nothing without a network;
its `local_src` inlines the ~1.3 MB bundle, once per block. This page inlines the bundle circuitsvis ships
(`circuitsvis/dist/cdn/iife.js`, the file `local_src` reads) once, then renders every block with the same
`CircuitsVis.render(id, CircuitsVis.ColoredTokens, props)` call `local_src` makes, so the page stays ~1.5 MB."""

from __future__ import annotations

import html
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..arguments import checked
from ..files import atomic_write_text


def _bundle() -> str:
    src = resources.files("circuitsvis").joinpath("dist", "cdn", "iife.js")
    if not src.is_file():
        raise FileNotFoundError("circuitsvis ships no dist/cdn/iife.js here; reinstall circuitsvis (pip install "
                                "--force-reinstall circuitsvis) to build an offline page")
    return src.read_text(encoding="utf-8").replace("</script>", "")


def _props(tokens: Sequence[str], values: Sequence[float], vmax: float) -> str:
    vals = [0.0 if v is None or v != v else float(v) for v in values]
    # circuitsvis inserts tokens as HTML, so they are escaped; '<' in the JSON is escaped again so that nothing in
    # it can end the script element.
    return json.dumps({"tokens": [html.escape(t) for t in tokens], "values": vals, "minValue": 0.0,
                       "maxValue": float(vmax)}).replace("<", "\\u003c")


def feature_blocks(study: Mapping[str, Any], prefix: str) -> list[tuple[str, str, list[str], list[float]]]:
    """(block id, caption, token texts, values) for a study's top examples then one example per quantile bin."""
    texts = study["texts"]
    out = []
    for j, e in enumerate(study["top"]):
        toks = [texts[t] if t >= 0 else "" for t in e.tokens]
        out.append((f"{prefix}-top{j}", f"top {j + 1}: {e.value:.3f} (context {e.context}, token {e.position})",
                    toks, e.acts))
    for j, (lo, hi, exs) in enumerate(study["quantiles"]):
        for k, e in enumerate(exs):
            toks = [texts[t] if t >= 0 else "" for t in e.tokens]
            out.append((f"{prefix}-q{j}-{k}", f"bin {lo:.3g}–{hi:.3g}: {e.value:.3f}", toks, e.acts))
    return out


def features_page(studies: Mapping[str, Mapping[str, Any]], title: str) -> str:
    """The whole page: per study ({role: study}) a heading with its numbers and its coloured examples."""
    parts = [f"<h1>{html.escape(title)}</h1>",
             "<p>Token colour: the feature's activation (darker = stronger, scale 0 to the feature's max). Each row "
             "is a window around the token the example is about.</p>"]
    calls = []
    for role, s in studies.items():
        lens = ", ".join(html.escape(t) for t, _ in s["logit_lens_up"][:8])
        parts.append(f"<h2>{html.escape(role)}: feature {s['feature']}</h2>"
                     f"<p>fires on {s['frequency']:.3%} of tokens · max {s['max']:.3f} · skew {s['skew']:.2f} · "
                     f"kurtosis {s['kurtosis']:.1f} · logit lens promotes: <code>{lens}</code></p>")
        for bid, caption, toks, vals in feature_blocks(s, f"f{s['feature']}"):
            parts.append(f"<div class='cap'>{html.escape(caption)}</div><div id='{bid}' class='cv'></div>")
            calls.append(f"CircuitsVis.render('{bid}', CircuitsVis.ColoredTokens, {_props(toks, vals, s['max'])});")
    style = ("<style>body{font-family:sans-serif;margin:2em} .cap{font-size:12px;color:#555} "
             ".cv{margin:2px 0 10px}</style>")
    return ("<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>" + html.escape(title) + "</title>" + style +
            "</head><body>\n" + "\n".join(parts) + "\n<script>" + _bundle() + "</script>\n<script>\n" +
            "\n".join(calls) + "\n</script>\n</body></html>\n")


@checked
def save_features_page(studies: Mapping[str, Mapping[str, Any]], path: str | os.PathLike, title: str) -> Path:
    """Write `features_page` atomically to path (e.g. figures/06_features.html)."""
    return atomic_write_text(path, features_page(studies, title))


@checked
def inline_view(study: Mapping[str, Any], n: int = 5):
    """The first n top examples of one study as a circuitsvis object for inline display in JupyterLab (it picks the
    CDN or the inlined bundle itself)."""
    from circuitsvis.tokens import colored_tokens

    texts = study["texts"]
    toks, vals = [], []
    for e in study["top"][:n]:
        toks += [texts[t] if t >= 0 else "" for t in e.tokens] + ["  ⏎⏎  "]
        vals += [0.0 if v != v else float(v) for v in e.acts] + [0.0]
    return colored_tokens(toks, vals, min_value=0.0, max_value=float(study["max"]))
