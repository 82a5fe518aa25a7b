"""Uncertainty for every experiment in the book: bootstrap confidence intervals.

One function, so that every chapter's "95 % CI" means the same thing: a percentile bootstrap
(scipy.stats.bootstrap) of the mean over independent units (images, prompts, objects), seeded.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _numbers(values, who: str) -> np.ndarray:
    """Finite floats, 1-D, or one clear error."""
    try:
        out = np.asarray(values, dtype=float)
    except (TypeError, ValueError):
        raise ValueError(f"{who} needs numbers, got {values!r:.80}") from None
    if out.ndim != 1:
        raise ValueError(f"{who} needs a 1-D sequence of numbers, got shape {out.shape}")
    if not np.isfinite(out).all():
        raise ValueError(f"{who} needs finite numbers, got {int((~np.isfinite(out)).sum())} NaN or infinite value(s); "
                         "drop them first (e.g. units without a judge reading)")
    return out


def _check_confidence(confidence, n_resamples) -> None:
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), e.g. 0.95, got {confidence!r}")
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, (int, np.integer)) or n_resamples < 1:
        raise ValueError(f"n_resamples must be an int >= 1, got {n_resamples!r}")


def bootstrap_ci(values: Sequence[float], confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap CI of the mean of independent values (e.g. a ratio per prompt)."""
    from scipy.stats import bootstrap

    values = _numbers(values, "bootstrap_ci")
    _check_confidence(confidence, n_resamples)
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


def paired_ratio_ci(a: Sequence[float], b: Sequence[float], confidence: float = 0.95, n_resamples: int = 2000,
                    seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap CI of mean(a) / mean(b) for paired values (a[i], b[i] measured on the same unit):
    units are resampled together, so what they share cancels (e.g. top-k vs control damage per image)."""
    a, b = _numbers(a, "paired_ratio_ci"), _numbers(b, "paired_ratio_ci")
    _check_confidence(confidence, n_resamples)
    if a.shape != b.shape or a.ndim != 1 or a.size < 2:
        raise ValueError(f"paired_ratio_ci needs two 1-D arrays of the same length >= 2, got {a.shape} and {b.shape}")
    from scipy.stats import bootstrap

    def ratio(x, y, axis=-1):
        return x.mean(axis) / y.mean(axis)

    kwargs = dict(confidence_level=confidence, n_resamples=n_resamples, method="percentile", paired=True, vectorized=True)
    try:
        res = bootstrap((a, b), ratio, rng=np.random.default_rng(seed), **kwargs)
    except TypeError:  # scipy < 1.15 calls it random_state
        res = bootstrap((a, b), ratio, random_state=np.random.default_rng(seed), **kwargs)
    return float(res.confidence_interval.low), float(res.confidence_interval.high)
