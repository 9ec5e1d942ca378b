"""What every part of the write-up shares: how a metrics value is looked up and what a missing one reads."""

from __future__ import annotations

from typing import Any, Mapping

Metrics = Mapping[str, Mapping[str, Any]]  # notebook number -> its metrics

MISSING = "not measured in this run"


def get(metrics: Metrics, nn: str, *path: str) -> Any:
    """metrics[nn][path[0]][path[1]]..., None where any step is missing."""
    node: Any = metrics.get(nn, {})
    for p in path:
        if not isinstance(node, Mapping) or p not in node:
            return None
        node = node[p]
    return node
