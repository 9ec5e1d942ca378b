"""Plot helpers shared by the notebooks: one style, atomic PNG writes into the figures folder."""

from __future__ import annotations

import io as _io
import os
from pathlib import Path

import matplotlib

matplotlib.use(os.environ.get("MPLBACKEND", "Agg") if not os.environ.get("JPY_PARENT_PID") else matplotlib.get_backend())
import matplotlib.pyplot as plt  # noqa: E402
import seaborn as sns  # noqa: E402

from .io import atomic_write_bytes  # noqa: E402
from .paths import resolve  # noqa: E402

sns.set_theme(context="notebook", style="whitegrid")


def savefig(fig: "plt.Figure", figures_dir: str | os.PathLike, name: str, dpi: int = 120) -> Path:
    """Write `fig` as figures_dir/name (PNG) atomically and return the path. The figure stays open for display."""
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return atomic_write_bytes(resolve(figures_dir) / name, buf.getvalue())
