"""Confidence intervals and paired tests, so that small differences are not over-read.

- `wilson`: 95 % Wilson score interval for a proportion (good at small n and near 0 or 1).
- `paired_bootstrap`: resample examples (seeded) and recompute the difference of means of
  two models scored on the *same* examples; 95 % percentile interval and a two-sided p-value.
- `mcnemar_exact`: exact (binomial) McNemar test on the discordant pairs.
"""

from __future__ import annotations

import math

import numpy as np

Z95 = 1.959963984540054


def wilson(k: float, n: int, z: float = Z95) -> tuple[float, float]:
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def mcnemar_exact(a, b) -> tuple[int, int, float]:
    """(n a-only right, n b-only right, two-sided exact p) for paired 0/1 scores."""
    a, b = np.asarray(a) > 0.5, np.asarray(b) > 0.5
    n10, n01 = int((a & ~b).sum()), int((~a & b).sum())
    n = n10 + n01
    if n == 0:
        return n10, n01, 1.0
    tail = sum(math.comb(n, i) for i in range(min(n10, n01) + 1))  # exact integers: 2.0 ** n overflows past n = 1023
    return n10, n01, min(1.0, 2 * tail / 2 ** n)


def paired_bootstrap(a, b, n_resamples: int = 10_000, seed: int = 0) -> dict:
    """Difference mean(b) - mean(a) over paired scores, with a bootstrap 95 % interval and
    p-value (twice the smaller tail mass of the resampled differences around 0)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    n = len(a)
    if n == 0:
        return {"diff": float("nan"), "ci95": [float("nan")] * 2, "p_bootstrap": float("nan")}
    d = b - a
    rng = np.random.default_rng(seed)
    diffs = np.empty(n_resamples)
    for s in range(0, n_resamples, 1000):  # chunks keep memory at 1000 x n
        idx = rng.integers(0, n, size=(min(1000, n_resamples - s), n))
        diffs[s: s + len(idx)] = d[idx].mean(axis=1)
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    if d.any():
        p = min(1.0, 2 * min((diffs <= 0).mean(), (diffs >= 0).mean()))
    else:
        p = 1.0
    return {"diff": float(d.mean()), "ci95": [float(lo), float(hi)], "p_bootstrap": float(p)}


def compare(a, b, n_resamples: int = 10_000, seed: int = 0) -> dict:
    """Everything the results file records for model b against model a on shared examples."""
    out = paired_bootstrap(a, b, n_resamples, seed)
    n10, n01, p = mcnemar_exact(a, b)
    out.update(n=len(a), only_first_right=n10, only_second_right=n01, p_mcnemar=p)
    return out
