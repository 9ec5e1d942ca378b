"""One style for every figure, and atomic PNG writes into the figures folder. The backend is matplotlib's own
choice (Agg without a display, the inline backend in Jupyter); set MPLBACKEND to change it."""

from __future__ import annotations

import io
import os
from pathlib import Path

import matplotlib.pyplot as plt
import seaborn as sns

from ..arguments import checked
from ..files import atomic_write_bytes
from ..paths import resolve

sns.set_theme(context="notebook", style="whitegrid")


@checked
def savefig(fig: "plt.Figure", figures_dir: str | os.PathLike, name: str, dpi: int = 120) -> Path:
    """Write `fig` as figures_dir/name (PNG) atomically and return the path. The figure stays open for display."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return atomic_write_bytes(resolve(figures_dir) / name, buf.getvalue())
