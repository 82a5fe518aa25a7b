"""Chapter 1's exercises (finding the massive channels): ranking channels by |mean| and comparing runs."""

from __future__ import annotations

import numpy as np

from mabook.exercises.answers import abs_mean, bottom, channels_answer, close, number_answer, top
from mabook.exercises.registry import Verdict, chapter, right, wrong

exercise = chapter("notebooks/01_channel_discovery.ipynb")


@exercise("1.1", "Rank the channels yourself")
def check_top_channels(stats, tap, k: int, answer) -> Verdict:
    """The k channels with the largest |mean over image tokens| at `tap` (pooled over steps), any order."""
    values = abs_mean(stats, tap)
    expected = top(values, k)
    hint = (f"stats.get('abs_mean', {str(tap)!r}) is a (channels,) tensor of |mean over image tokens|; "
            f"np.argsort(-values)[:{k}] gives the {k} largest.")
    given = channels_answer(answer, k, hint)
    if isinstance(given, Verdict):
        return given
    if given == expected:
        return right(f"Top-{k} at {tap}: {sorted(expected)}.")
    if given == bottom(values, k):
        return wrong("those are the channels with the smallest statistic.", "sort in decreasing order.")
    for other in ("mean", "max_abs", "std"):
        if given == top(stats.get(other, tap).cpu().numpy(), k):
            return wrong(f"that is the top-{k} by {other!r}.", "rank by 'abs_mean', the paper's statistic.")
    return wrong(f"{len(given & expected)} of your {k} channels are in the top-{k}.", hint)


@exercise("1.2", "How massive?")
def check_ratio_to_median(stats, tap, answer) -> Verdict:
    """The top channel's |mean over image tokens| divided by the median channel's, at `tap`."""
    values = abs_mean(stats, tap)
    expected = float(values.max() / np.median(values))
    hint = f"values = stats.get('abs_mean', {str(tap)!r}).numpy(); divide values.max() by np.median(values)."
    x = number_answer(answer, "the answer should be one number.", hint)
    if isinstance(x, Verdict):
        return x
    if close(x, expected):
        return right(f"The top channel is {expected:.1f}x the median channel at {tap}.")
    if close(x, float(values.max() / values.mean())):
        return wrong("that divides by the mean channel.", "the median is robust to the massive channel itself.")
    if close(x, 1 / expected):
        return wrong("that is upside down.", "top channel / median channel.")
    if close(x, float(values.max())):
        return wrong("that is the top channel's value itself.", "divide it by the median channel's value.")
    return wrong(f"{x:.4g} is not the ratio at {tap}.", hint)


@exercise("1.3", "Jaccard by hand")
def check_jaccard(run_a, run_b, tap, k: int, answer) -> Verdict:
    """Jaccard overlap |A ∩ B| / |A ∪ B| of the top-k sets (by abs_mean at `tap`) of two runs."""
    a, b = top(abs_mean(run_a, tap), k), top(abs_mean(run_b, tap), k)
    expected = len(a & b) / len(a | b)
    hint = (f"take each run's top-k set at the tap (as in exercise {check_top_channels.exercise}), then "
            "len(A & B) / len(A | B) on Python sets.")
    x = number_answer(answer, "the answer should be one number between 0 and 1.", hint)
    if isinstance(x, Verdict):
        return x
    if close(x, expected, abs_=1e-9):
        return right(f"The two top-{k} sets share {len(a & b)} of {len(a | b)} channels: Jaccard {expected:.2f}.")
    if close(x, float(len(a & b))):
        return wrong("that is the size of the intersection.", "divide it by the size of the union.")
    if close(x, len(a & b) / k):
        return wrong("that divides by k.", "Jaccard divides by |A ∪ B|, which is larger than k when the sets differ.")
    return wrong(f"{x:.4g} is not the overlap of the two top-{k} sets.", hint)
