"""CPU threads that share a machine fairly.

With OpenMP's default wait policy a torch thread that finishes its share of an operation spins, waiting for its
partner; when another process holds the partner's core, every parallel region waits out a whole scheduler slice,
and a 2-thread run on a busy 2-core machine became about ten times slower (benchmarks/bench_loaded.py measures it).
With the passive policy a waiting thread sleeps instead, so a run slows in proportion to the CPU share it gets.

OpenMP reads these variables once, when torch loads it: `configure` must run before `import torch`. The package
calls it on import when torch is not loaded yet; the runner sets it for every notebook kernel, and
`python -m sparse_coding.threads CMD...` runs a command (`make lab` runs JupyterLab so) with it set."""

from __future__ import annotations

import os
import sys
from typing import MutableMapping

# Only variables the user has not set are changed.
SETTINGS = {"OMP_WAIT_POLICY": "PASSIVE"}


def configure(env: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Put SETTINGS into env where unset; returns what was set."""
    done = {}
    for key, value in SETTINGS.items():
        if key not in env:
            env[key] = value
            done[key] = value
    return done


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m sparse_coding.threads COMMAND [ARGS...]", file=sys.stderr)
        return 2
    configure(os.environ)
    os.execvp(argv[0], argv)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
