"""sparse_coding: the helper package behind the sparse-coding notebooks, organised as stages along the data flow

    corpus -> lm -> activations -> dictionaries -> analyses -> plots (-> the top-level figures/)

with shared utilities (files, paths, checks) below every stage and the notebook glue (studies, runner) above them.
A stage imports only earlier stages and the utilities; nothing imports studies (tests/test_layers.py checks it)."""

import sys as _sys

from .threads import configure as _configure_threads

if "torch" not in _sys.modules:  # OpenMP reads its settings when torch loads (see threads)
    _configure_threads()

__version__ = "0.1.0"
