"""The one way every benchmark reports repeated measurements: the median and the range."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def summary(values: Sequence[float], unit: str = "s", digits: int = 2) -> str:
    """``"median X s (range A–B, n runs)"`` of ``values`` (one run: ``"X s (1 run)"``)."""
    if not values:
        return "no runs"
    unit = f" {unit}" if unit else ""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}{unit} (1 run)"
    return (f"median {statistics.median(values):.{digits}f}{unit} "
            f"(range {min(values):.{digits}f}–{max(values):.{digits}f}, {len(values)} runs)")
