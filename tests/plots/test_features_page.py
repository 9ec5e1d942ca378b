"""The case-study page (figures/06_features.html) works offline: opened in headless Chromium with every network
host unreachable, its token area holds coloured tokens; and the page carries no CDN reference."""

import numpy as np
import torch
from PIL import Image

from conftest import screenshot
from sparse_coding.analyses.mining import Example
from sparse_coding.plots import save_features_page


def _study(feature: int) -> dict:
    texts = ["def", "·f", "(", "x", ")", ":", "⏎", "·return", "·x", "<b>", "</script>"]
    tops = [Example(context=j, position=4, value=3.0 - j * 0.1, tokens=list(range(11)),
                    acts=[0, 0, 0.5, 1.0, 3.0 - j * 0.1, 0, 0, 0, 0, 0.2, 0.1], target=4) for j in range(3)]
    quant = [(0.0, 1.5, [Example(7, 2, 0.9, list(range(11)), [0, 0, 0.9] + [0] * 8, 2)]), (1.5, 3.0, [])]
    return {"feature": feature, "frequency": 0.01, "max": 3.0, "skew": 5.0, "kurtosis": 40.0, "top": tops,
            "quantiles": quant, "logit_lens_up": [(")", 1.0)], "texts": texts}


def test_page_renders_coloured_tokens_offline(tmp_path, chromium):
    page = save_features_page({"closing_paren": _study(6), "random": _study(9)}, tmp_path / "06_features.html",
                              "test page")
    text = page.read_text()
    assert "unpkg.com" not in text and "http" not in text.split("<script>")[0]
    assert "</script>" not in text.split("CircuitsVis.render", 1)[1].rsplit("</script>", 1)[0]  # escaped tokens
    shot = screenshot(chromium, page.resolve().as_uri(), tmp_path / "page.png")
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    coloured = (img.max(axis=2) - img.min(axis=2)) > 40  # saturated pixels: token highlights, not text or background
    assert coloured.sum() > 200, f"only {coloured.sum()} coloured pixels: the tokens did not render"
    ys = np.nonzero(coloured)[0]
    assert ys.min() > 100  # below the headings: in the token area
