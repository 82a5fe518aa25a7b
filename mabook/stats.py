"""Uncertainty for every experiment in the book: bootstrap confidence intervals, and the two
tests of a trend the emergence interlude needs (a fitted change with its CI, a rank correlation
with its permutation p-value).

One function, so that every chapter's "95 % CI" means the same thing: a percentile bootstrap of the
mean over independent draws, seeded. Units that share a prompt (two seeds of one caption) are not
independent draws: with `groups` (one label per value, e.g. the prompt) whole groups are resampled
-- the cluster bootstrap -- so the interval reflects how many prompts were tested, not how many
images. Without `groups` every value is its own draw (scipy.stats.bootstrap).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.stats import bootstrap, linregress, permutation_test, spearmanr, t


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


def _clustered(sums: Sequence[np.ndarray], groups, confidence: float, n_resamples: int, seed: int, who: str):
    """Percentile interval of sum(sums[0]) / sum(sums[1]) over groups resampled with replacement."""
    labels = list(groups)
    if len(labels) != len(sums[0]):
        raise ValueError(f"{who}: groups has {len(labels)} labels for {len(sums[0])} values; allowed: one label per value")
    order = {g: i for i, g in enumerate(dict.fromkeys(labels))}
    if len(order) < 2:
        raise ValueError(f"{who} needs at least 2 groups to resample, got {len(order)}")
    index = np.array([order[g] for g in labels])
    per_group = [np.bincount(index, weights=v, minlength=len(order)) for v in sums]
    draws = np.random.default_rng(seed).integers(0, len(order), size=(n_resamples, len(order)))
    stat = per_group[0][draws].sum(1) / per_group[1][draws].sum(1)
    alpha = (1 - confidence) / 2
    return float(np.percentile(stat, 100 * alpha)), float(np.percentile(stat, 100 * (1 - alpha)))


def bootstrap_ci(values: Sequence[float], confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0,
                 groups: Sequence | None = None) -> tuple[float, float]:
    """Percentile-bootstrap CI of the mean of `values`; with `groups` (one label per value) whole
    groups are resampled and the mean is over every value of the drawn groups."""
    values = _numbers(values, "bootstrap_ci")
    _check_confidence(confidence, n_resamples)
    if values.size < 2:
        raise ValueError(f"bootstrap_ci needs at least 2 values, got {values.size}")
    if groups is not None:
        return _clustered((values, np.ones_like(values)), groups, confidence, n_resamples, seed, "bootstrap_ci")
    if np.ptp(values) == 0:  # scipy's percentile interval is degenerate on constant data
        return float(values[0]), float(values[0])
    kwargs = dict(confidence_level=confidence, n_resamples=n_resamples, method="percentile")
    try:
        res = bootstrap((values,), np.mean, rng=np.random.default_rng(seed), **kwargs)
    except TypeError:  # scipy < 1.15 calls it random_state
        res = bootstrap((values,), np.mean, random_state=np.random.default_rng(seed), **kwargs)
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def paired_ratio_ci(a: Sequence[float], b: Sequence[float], confidence: float = 0.95, n_resamples: int = 2000,
                    seed: int = 0, groups: Sequence | None = None) -> tuple[float, float]:
    """Percentile-bootstrap CI of mean(a) / mean(b) for paired values (a[i], b[i] measured on the same unit):
    units are resampled together, so what they share cancels (e.g. top-k vs control damage per image);
    with `groups`, whole groups of units (e.g. every seed of one prompt) are resampled together."""
    a, b = _numbers(a, "paired_ratio_ci"), _numbers(b, "paired_ratio_ci")
    _check_confidence(confidence, n_resamples)
    if a.shape != b.shape or a.ndim != 1 or a.size < 2:
        raise ValueError(f"paired_ratio_ci needs two 1-D arrays of the same length >= 2, got {a.shape} and {b.shape}")
    if groups is not None:
        return _clustered((a, b), groups, confidence, n_resamples, seed, "paired_ratio_ci")

    def ratio(x, y, axis=-1):
        return x.mean(axis) / y.mean(axis)

    kwargs = dict(confidence_level=confidence, n_resamples=n_resamples, method="percentile", paired=True, vectorized=True)
    try:
        res = bootstrap((a, b), ratio, rng=np.random.default_rng(seed), **kwargs)
    except TypeError:  # scipy < 1.15 calls it random_state
        res = bootstrap((a, b), ratio, random_state=np.random.default_rng(seed), **kwargs)
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def trend_change(x: Sequence[float], y: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """The relative change of positive `y` from x[0] to x[-1] along a fitted exponential trend
    (least squares of log y on x), with the CI from the slope's standard error (Student t, n - 2
    degrees of freedom): (change, low, high). Endpoints alone ride on one probe's noise; the fit
    uses every point, and the CI says whether a change is told apart from a tolerance."""
    x, y = _numbers(x, "trend_change"), _numbers(y, "trend_change")
    if x.shape != y.shape or x.size < 3 or np.ptp(x) == 0:
        raise ValueError(f"trend_change needs x, y of the same length >= 3 with x not constant, got {x.size} and {y.size}")
    if (y <= 0).any():
        raise ValueError(f"trend_change needs positive y (a ratio), got min {y.min():g}")
    _check_confidence(confidence, 1)
    fit = linregress(x, np.log(y))
    span = x[-1] - x[0]
    half = t.ppf(0.5 + confidence / 2, x.size - 2) * fit.stderr * abs(span)
    centre = fit.slope * span
    return float(np.expm1(centre)), float(np.expm1(centre - half)), float(np.expm1(centre + half))


def rank_correlation(x: Sequence[float], y: Sequence[float], n_resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """Spearman's rank correlation of paired x, y and its one-sided p-value P(r >= observed) under
    random pairing (scipy's permutation test: exact over all n! pairings when n! <= n_resamples)."""
    x, y = _numbers(x, "rank_correlation"), _numbers(y, "rank_correlation")
    if x.shape != y.shape or x.size < 3:
        raise ValueError(f"rank_correlation needs x, y of the same length >= 3, got {x.size} and {y.size}")

    def statistic(a):
        return spearmanr(a, y).statistic

    res = permutation_test((x,), statistic, permutation_type="pairings", alternative="greater", n_resamples=n_resamples,
                           rng=np.random.default_rng(seed))
    return float(res.statistic), float(res.pvalue)
