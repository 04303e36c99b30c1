"""How the profiler summarises repeated steps: the representative step, spreads, and the one rule
that says when a ratio to the baseline is not resolved by its rounds."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any, Optional

MIN_ROUNDS = 3
RATIO_RULE = (
    f"a ratio to the baseline is flagged as unresolved when it rests on fewer than {MIN_ROUNDS} "
    "rounds, when the interquartile range [q1, q3] of its per-round ratios includes 1.0 (the rounds "
    "do not agree on the sign of the difference), or when the relative spread (q3 - q1) / ratio "
    "exceeds the difference claimed, |ratio - 1|"
)


def representative_index(step_times: Sequence[float]) -> int:
    """Index of the median step (the lower of the two middle ones for an even count; first on ties)."""
    order = sorted(range(len(step_times)), key=lambda index: (step_times[index], index))
    return order[(len(order) - 1) // 2]


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Quartiles (inclusive method, i.e. linear interpolation), minimum, maximum and count."""
    values = [float(value) for value in values]
    if len(values) == 1:
        q1 = q3 = values[0]
    else:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return {"q1": q1, "q3": q3, "min": min(values), "max": max(values), "count": len(values)}


def paired_ratios(values: Sequence[float], baseline: Sequence[float]) -> Optional[list[float]]:
    """Per-round ratios value / baseline (round i against round i); None if a baseline value is 0."""
    if len(values) != len(baseline):
        raise ValueError(f"{len(values)} rounds against {len(baseline)} rounds of the baseline")
    if not all(baseline):
        return None
    return [value / base for value, base in zip(values, baseline)]


def ratio_warning(ratio: float, ratio_spread: dict[str, Any]) -> Optional[str]:
    """Why ``ratio`` (with the spread of its per-round ratios) is unresolved, or None (RATIO_RULE)."""
    q1, q3, count = ratio_spread["q1"], ratio_spread["q3"], ratio_spread["count"]
    if count < MIN_ROUNDS:
        return f"{count} round{'s' if count != 1 else ''}: too few to measure a spread"
    if q1 <= 1.0 <= q3:
        return f"the interquartile range [{q1:.3f}, {q3:.3f}] of the per-round ratios includes 1.0"
    relative = (q3 - q1) / ratio
    if relative > abs(ratio - 1.0):
        return f"the relative spread {relative:.1%} exceeds the difference claimed ({ratio - 1.0:+.1%})"
    return None
