"""Where things live. Notebooks resolve every path through here, so they behave the same whether run from
JupyterLab (cwd = notebooks/), papermill from the repo root, or nbval on an executed copy under build/."""

from __future__ import annotations

import os
from pathlib import Path

_MARKER = "pyproject.toml"


def repo_root() -> Path:
    """The checkout's root: $SPARSE_CODING_ROOT if set, else the first parent of this file holding pyproject.toml."""
    env = os.environ.get("SPARSE_CODING_ROOT")
    if env:
        return Path(env).resolve()
    for parent in Path(__file__).resolve().parents:
        if (parent / _MARKER).exists():
            return parent
    # An installed (non-editable) package has no checkout above it: fall back to the working directory.
    return Path.cwd().resolve()


def resolve(path: str | os.PathLike) -> Path:
    """An absolute path as given, or a relative one taken from the repo root (not the notebook's cwd)."""
    p = Path(path)
    return p if p.is_absolute() else repo_root() / p


def repo_relative(path: str | os.PathLike) -> str:
    """A path under the repo root as a relative string (for files we commit: no machine's absolute paths), any
    other path as given."""
    p = resolve(path).resolve()
    try:
        return str(p.relative_to(repo_root()))
    except ValueError:
        return str(path)
