"""The interlude's exercises (emergence): reading the organism's training log of the massive ratio."""

from __future__ import annotations

import numpy as np

from mabook.exercises.answers import close, number_answer
from mabook.exercises.registry import Verdict, chapter, right, wrong

exercise = chapter("notebooks/02b_emergence.ipynb")


def _median_ratio(card: dict, weights: str) -> tuple[list[int], np.ndarray]:
    log = card["emergence"]
    steps = [int(row["step"]) for row in log]
    return steps, np.array([np.median([layer["ratio"] for layer in row[weights]]) for row in log])


@exercise("2b.1", "When does it appear?")
def check_half_final_step(card: dict, answer) -> Verdict:
    """The first logged training step at which the median-over-layers ratio (EMA weights) reaches
    half of its final value."""
    steps, series = _median_ratio(card, "ema")
    i = int(np.argmax(series >= series[-1] / 2))
    expected = steps[i]
    hint = ("series = [np.median([l['ratio'] for l in row['ema']]) for row in card['emergence']]; find the first row "
            "whose value is >= series[-1] / 2 and answer its row['step'].")
    x = number_answer(answer, "the answer should be one training step (an int).", hint)
    if isinstance(x, Verdict):
        return x
    if x == expected:
        return right(f"At step {expected} the ratio is {series[i]:.1f}x, half of the final {series[-1]:.1f}x "
                     f"is {series[-1] / 2:.1f}x.")
    if x == i:
        return wrong("that is the row's index in the log.", "answer the training step, row['step'].")
    raw_steps, raw = _median_ratio(card, "raw")
    if x == raw_steps[int(np.argmax(raw >= raw[-1] / 2))]:
        return wrong("that is the answer for the raw weights.", "read row['ema'], the weights the organism ships.")
    return wrong(f"step {x:g} is not the first to reach half the final ratio.", hint)


@exercise("2b.2", "The plateau criterion on the raw weights")
def check_plateau_change(card: dict, weights: str, window: float, answer) -> Verdict:
    """The relative change series[-1] / series[start] - 1 of the median-over-layers ratio of `weights`
    ("ema" or "raw") from the first logged step in the last `window` of training to the end."""
    steps, series = _median_ratio(card, weights)
    cut = steps[-1] * (1 - window)
    start = next(i for i, s in enumerate(steps) if s >= cut)
    expected = float(series[-1] / series[start] - 1)
    hint = (f"series = [np.median([l['ratio'] for l in row[{weights!r}]]) for row in card['emergence']]; start at the first "
            f"row whose step >= steps[-1] * (1 - {window}); answer series[-1] / series[start] - 1.")
    x = number_answer(answer, "the answer should be one number (a relative change, e.g. -0.03).", hint)
    if isinstance(x, Verdict):
        return x
    if close(x, expected, abs_=1e-6):
        verdict = "plateaued" if abs(expected) < 0.10 else "not plateaued"
        return right(f"The {weights} weights' ratio changed by {expected:+.1%} ({verdict} at a 10% tolerance).")
    other = "ema" if weights == "raw" else "raw"
    _, other_series = _median_ratio(card, other)
    if close(x, float(other_series[-1] / other_series[start] - 1), abs_=1e-6):
        return wrong(f"that is the {other} weights' change.", f"read row[{weights!r}].")
    if close(x, 100 * expected):
        return wrong("that looks like a percentage.", "give a fraction (0.05 for 5 %).")
    if close(x, float(series[-1] - series[start])):
        return wrong("that is an absolute change.", "divide by the value at the start of the window.")
    return wrong(f"{x:.4g} is not the change over the last {window:.0%} of training.", hint)
