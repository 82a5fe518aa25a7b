"""Reading learners' answers and the chapters' statistics, for the checks of several chapters.

The ``as_*`` readers turn an answer into a number, a set of ints or an array, or None when it is
not one (a check then says what type it wanted); `number_answer`, `channels_answer` and `array_answer` read one and
return the Verdict when it is missing or of the wrong type or size; `close` and `matches` compare with tolerances;
`abs_mean`, `top` and `bottom` rank the channels of a `mabook.statistics.Statistics` as chapters 1 and 2 do.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from mabook.exercises.registry import Verdict, not_answered, wrong


def as_number(value: Any) -> float | None:
    """The answer as a float, or None if it is not one finite number."""
    if isinstance(value, bool):
        return None
    try:
        x = float(np.asarray(value, dtype=float).item())
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def as_int_set(value: Any) -> set[int] | None:
    """The answer as a set of ints (any order), or None if it is not a collection of integers."""
    if value is None or isinstance(value, (str, bytes, dict)):
        return None
    try:
        arr = np.asarray(value).ravel()
    except (TypeError, ValueError):
        return None
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.issubdtype(arr.dtype, np.floating) or not np.all(arr == np.round(arr)):
            return None
    return {int(v) for v in arr}


def as_array(value: Any) -> np.ndarray | None:
    """The answer as a float64 array (numpy, torch or nested lists), or None if it is not numeric."""
    if value is None or isinstance(value, (str, bytes, dict, bool)):
        return None
    try:
        if hasattr(value, "detach"):  # a torch tensor
            value = value.detach().cpu().numpy()
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError, RuntimeError):
        return None
    return arr if arr.ndim else None


def number_answer(answer: Any, problem: str, hint: str) -> float | Verdict:
    """The answer as one finite number, or the Verdict that says it is missing or not one (`problem`)."""
    if answer is None:
        return not_answered(hint)
    x = as_number(answer)
    return wrong(problem, hint) if x is None else x


def channels_answer(answer: Any, k: int, hint: str) -> set[int] | Verdict:
    """The answer as a set of k channel indices, or the Verdict that says why it is not one."""
    if answer is None:
        return not_answered(hint)
    given = as_int_set(answer)
    if given is None:
        return wrong("the answer should be a list of channel indices (ints).", hint)
    if len(given) != k:
        return wrong(f"{len(given)} distinct channels given, {k} wanted.", hint)
    return given


def array_answer(answer: Any, shape: tuple, what: str, whole: str, hint: str) -> np.ndarray | Verdict:
    """The answer as an array shaped `shape` ("the answer should be an array of `what`"; `whole`: the
    hint when the shape is wrong), or the Verdict that says why it is not one."""
    if answer is None:
        return not_answered(hint)
    x = as_array(answer)
    if x is None:
        return wrong(f"the answer should be {what}.", hint)
    if x.shape != shape:
        return wrong(f"the answer has shape {x.shape}; expected {shape}.", whole)
    return x


def close(a: float | None, b: float, rel: float = 1e-3, abs_: float = 1e-9) -> bool:
    """`a` is a number within the tolerances of `b`."""
    return a is not None and math.isclose(a, b, rel_tol=rel, abs_tol=abs_)


def matches(a: np.ndarray, b: np.ndarray, atol: float = 1e-5) -> bool:
    """Two arrays of the same shape, equal within the tolerances."""
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=1e-4, atol=atol))


def abs_mean(stats, tap) -> np.ndarray:
    """The (channels,) |mean over image tokens| at `tap`, pooled over steps, as float64."""
    return stats.get("abs_mean", tap).cpu().numpy().astype(np.float64)


def top(values: np.ndarray, k: int) -> set[int]:
    """The indices of the k largest values (ties in index order)."""
    return {int(i) for i in np.argsort(-values, kind="stable")[:k]}


def bottom(values: np.ndarray, k: int) -> set[int]:
    """The indices of the k smallest values (ties in index order)."""
    return {int(i) for i in np.argsort(values, kind="stable")[:k]}
