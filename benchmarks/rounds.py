"""What every benchmark reports beside a median ratio: its spread over the interleaved rounds."""

from __future__ import annotations


def spread(ratios: list[float]) -> list[float]:
    """[min, max] of the per-round ratios, rounded to 3 decimals (`<key>_spread` in results.json)."""
    return [round(min(ratios), 3), round(max(ratios), 3)]
