"""mabook.stats.trend_change and rank_correlation against computations written out here."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from mabook.stats import rank_correlation, trend_change


def test_trend_change_is_the_fitted_exponential_change_with_a_student_t_interval():
    x = np.array([4500.0, 4750, 5000, 5250, 5500, 5750, 6000])  # a last-quarter window of the emergence log
    y = np.array([31.2, 32.9, 32.1, 33.8, 33.0, 34.6, 34.3])  # massive-channel ratios, noisy
    lx, ly = x - x.mean(), np.log(y) - np.log(y).mean()
    slope = (lx * ly).sum() / (lx ** 2).sum()
    resid = ly - slope * lx
    se = np.sqrt((resid ** 2).sum() / (len(x) - 2) / (lx ** 2).sum())
    t975_5 = 2.5705818366147395  # Student t, 97.5 % quantile, 5 degrees of freedom (tables)
    span = x[-1] - x[0]
    change, lo, hi = trend_change(x, y)
    assert change == pytest.approx(np.exp(slope * span) - 1, rel=1e-12)
    assert lo == pytest.approx(np.exp((slope - t975_5 * se) * span) - 1, rel=1e-9)
    assert hi == pytest.approx(np.exp((slope + t975_5 * se) * span) - 1, rel=1e-9)
    assert lo < change < hi
    # the endpoints alone say +9.9 %; the fit says what every point says, with its uncertainty
    assert y[-1] / y[0] - 1 == pytest.approx(0.0994, abs=1e-4) and change != pytest.approx(0.0994, abs=1e-3)
    # real-model magnitudes: ratios of 1e3-1e4 give the same relative change as the same curve scaled
    assert trend_change(x, 300 * y) == pytest.approx((change, lo, hi), rel=1e-9)


def test_trend_change_refuses_what_it_cannot_fit():
    with pytest.raises(ValueError, match="positive y"):
        trend_change([1, 2, 3], [1.0, 0.0, 2.0])
    with pytest.raises(ValueError, match="length >= 3"):
        trend_change([1, 2], [1.0, 2.0])


def _ranks(v):
    return np.argsort(np.argsort(v)).astype(float)


def test_rank_correlation_p_value_is_the_exact_permutation_tail():
    x = np.array([0.3, 1.1, 0.9, 2.5, 4.0, 3.1])  # six snapshots: damage ratio
    y = np.array([2.0, 5.0, 9.0, 14.0, 30.0, 31.0])  # magnitude ratio at the same steps
    rho = np.corrcoef(_ranks(x), _ranks(y))[0, 1]
    tail = np.mean([np.corrcoef(_ranks(np.array(p)), _ranks(y))[0, 1] >= rho - 1e-12
                    for p in itertools.permutations(x)])
    r, p = rank_correlation(x, y)
    assert r == pytest.approx(rho, rel=1e-12)
    assert p == pytest.approx(tail, rel=1e-9)
    assert 0 < p < 0.05  # 6 points in this order: unlikely under random pairing
    r_flat, p_flat = rank_correlation(x, y[::-1])
    assert r_flat < 0 and p_flat > 0.5
