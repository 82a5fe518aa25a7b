"""Uncertainty for every experiment in the book: bootstrap confidence intervals.

One function, so that every chapter's "95 % CI" means the same thing: a percentile bootstrap
(scipy.stats.bootstrap) of the mean over independent units (images, prompts, objects), seeded.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def bootstrap_ci(values: Sequence[float], confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap CI of the mean of independent values (e.g. a ratio per prompt)."""
    from scipy.stats import bootstrap

    values = np.asarray(values, dtype=float)
    if values.size < 2:
        raise ValueError(f"bootstrap_ci needs at least 2 values, got {values.size}")
    if np.ptp(values) == 0:  # scipy's percentile interval is degenerate on constant data
        return float(values[0]), float(values[0])
    kwargs = dict(confidence_level=confidence, n_resamples=n_resamples, method="percentile")
    try:
        res = bootstrap((values,), np.mean, rng=np.random.default_rng(seed), **kwargs)
    except TypeError:  # scipy < 1.15 calls it random_state
        res = bootstrap((values,), np.mean, random_state=np.random.default_rng(seed), **kwargs)
    return float(res.confidence_interval.low), float(res.confidence_interval.high)
