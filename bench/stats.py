"""Percentiles and medians without numpy (linear interpolation, as numpy's default)."""

from __future__ import annotations

import math


def pct(values, q: float) -> float:
    xs = sorted(v for v in values if v is not None and not math.isnan(v))
    if not xs:
        return math.nan
    k = (len(xs) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def median(values) -> float:
    return pct(values, 50)
