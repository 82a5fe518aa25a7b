"""What mabook promises about reproducibility, as code that the tests and a reader both use.

- Within one machine and one process: the same seed and the same batch size give bit-identical
  images, statistics and tables (`np.array_equal`, `==`).
- Across machines (another CPU, BLAS build or thread count) and across batch sizes: floating-point
  sums run in another order, so the last bits differ (measured: ~4e-7 in a pixel before rounding,
  ~1e-7 relative in a variance). Promised there, and checked with the functions below:
    floats                  |mine - committed| <= ATOL + RTOL * |committed|
    uint8 images            within MAX_LEVELS level(s) on at most MAX_PIXEL_FRACTION of the values
    ints, strings, booleans identical (channel rankings, counts, verdicts)

What this is not: a promise across library versions (torch, diffusers) or devices (CPU vs CUDA,
float32 vs bfloat16); those are compared in the GPU tests with tolerances of their own.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from mabook.images import to_uint8

RTOL = 1e-5  # ~100x the float32 reordering error measured across thread counts and machines
ATOL = 1e-6  # for values that are ~0 (a damage of 0, a CI bound at 0)
MAX_LEVELS = 1  # an image value rounds to the neighbouring uint8 level when the float sits near x.5
MAX_PIXEL_FRACTION = 1e-3  # of the uint8 values of a set of images (0.1 %)


def differences(mine: Any, committed: Any, rtol: float = RTOL, atol: float = ATOL, where: str = "") -> list[str]:
    """Every place where two JSON-like values (dicts, lists, numbers, strings) break the promise,
    as 'path: mine vs committed' lines; [] when they agree. Floats within the tolerance agree
    (NaN agrees with NaN); ints, strings, booleans and the structure must be identical."""
    if isinstance(committed, dict):
        if not isinstance(mine, dict):
            return [f"{where or '.'}: {type(mine).__name__} vs a dict"]
        out = [f"{where}.{k}: missing" for k in committed if k not in mine]
        out += [f"{where}.{k}: not in the committed value" for k in mine if k not in committed]
        for k in committed:
            if k in mine:
                out += differences(mine[k], committed[k], rtol, atol, f"{where}.{k}")
        return out
    if isinstance(committed, (list, tuple)):
        if not isinstance(mine, (list, tuple)) or len(mine) != len(committed):
            n = len(mine) if isinstance(mine, (list, tuple)) else type(mine).__name__
            return [f"{where or '.'}: {n} items vs {len(committed)}"]
        return [d for i, (a, b) in enumerate(zip(mine, committed)) for d in differences(a, b, rtol, atol, f"{where}[{i}]")]
    if isinstance(committed, float) or isinstance(mine, float):
        if isinstance(mine, bool) or isinstance(committed, bool) or not isinstance(mine, (int, float)) \
                or not isinstance(committed, (int, float)):
            return [f"{where or '.'}: {mine!r} vs {committed!r}"]
        if math.isnan(committed) and math.isnan(mine):
            return []
        if abs(mine - committed) <= atol + rtol * abs(committed):
            return []
        return [f"{where or '.'}: {mine!r} vs {committed!r} (rtol {rtol:g}, atol {atol:g})"]
    if type(mine) is not type(committed) or mine != committed:
        return [f"{where or '.'}: {mine!r} vs {committed!r}"]
    return []


def assert_agrees(mine: Any, committed: Any, what: str, rtol: float = RTOL, atol: float = ATOL) -> None:
    """Raise AssertionError naming `what` and the first differences unless the two agree (see `differences`)."""
    found = differences(mine, committed, rtol, atol)
    if found:
        more = f" (and {len(found) - 5} more)" if len(found) > 5 else ""
        raise AssertionError(f"{what} does not reproduce: " + "; ".join(found[:5]) + more)


def images_agree(mine: np.ndarray, committed: np.ndarray) -> tuple[bool, str]:
    """(agree, how far): uint8 images (any shape, same for both) within MAX_LEVELS on at most
    MAX_PIXEL_FRACTION of their values. Float images in [0, 1] are rounded to uint8 first."""
    a, b = (to_uint8(np.asarray(x)) for x in (mine, committed))
    if a.shape != b.shape:
        return False, f"shapes {a.shape} vs {b.shape}"
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    changed = float((diff > 0).mean())
    report = f"max {int(diff.max())} level(s), {changed:.4%} of values changed"
    return bool(diff.max() <= MAX_LEVELS and changed <= MAX_PIXEL_FRACTION), report
