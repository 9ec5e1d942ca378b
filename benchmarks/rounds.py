"""What every benchmark reports beside a median ratio: its spread over the interleaved rounds."""

from __future__ import annotations

import statistics


def spread(ratios: list[float]) -> list[float]:
    """[min, max] of the per-round ratios, rounded to 3 decimals (`<key>_spread` in results.json)."""
    return [round(min(ratios), 3), round(max(ratios), 3)]


def median_and_spread(num: list[float], den: list[float]) -> tuple[float, list[float]]:
    """The per-round ratios num[r] / den[r]: their median (the reported ratio) and `spread`."""
    ratios = [a / b for a, b in zip(num, den)]
    return statistics.median(ratios), spread(ratios)


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo; the platform's processor string elsewhere): the ratios move with it,
    since the matmul rate and the memory-bound rest of a step scale differently from one machine to the next."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
