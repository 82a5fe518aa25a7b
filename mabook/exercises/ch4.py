"""Chapter 4's exercises (text-conditioned transport): the pixel-blend baseline, which attribute moved."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from mabook.exercises.answers import array_answer, close, matches, number_answer
from mabook.exercises.registry import Verdict, cannot_check, chapter, right, wrong

exercise = chapter("notebooks/04_text_transport.ipynb")


@exercise("4.1", "The pixel blend by hand")
def check_pixel_blend(source_images, target_images, alpha: float, answer) -> Verdict:
    """The pixel-blend baseline: lerp(target, source, alpha) = (1 - alpha) * target + alpha * source,
    pixel by pixel, for every pair (an array shaped like the images)."""
    src, tgt = (np.asarray(x, dtype=np.float64) for x in (source_images, target_images))
    expected = (1 - alpha) * tgt + alpha * src
    hint = (f"lerp(target, source, alpha): (1 - alpha) * target_images + alpha * source_images, with alpha = {alpha:g}; "
            "numpy broadcasts over pairs, pixels and colour channels.")
    x = array_answer(answer, expected.shape, "an array of images", "blend every pair: the whole arrays, not one image "
                     "or a mean.", hint)
    if isinstance(x, Verdict):
        return x
    if matches(x, expected):
        return right(f"At alpha = {alpha:g} every pixel is {1 - alpha:g} of the target and {alpha:g} of the source: "
                     "a ghost of both images, whatever they show.")
    if matches(x, alpha * tgt + (1 - alpha) * src):
        return wrong("source and target are swapped.", "alpha = 0 is the target, alpha = 1 the source.")
    if matches(x, tgt + alpha * src) or matches(x, src + alpha * tgt):
        return wrong("the weights do not add up to 1.", hint)
    return wrong("these are not the blended images.", hint)


@exercise("4.2", "Which attribute did it take?")
def check_took_attribute(rows: Sequence[dict], method: str, alpha: float, attribute: str, answer) -> Verdict:
    """The share of outputs of `method` at `alpha` that show the source's value of `attribute`, over
    the pairs where that attribute differs (rows' ``took_<attribute>``, NaN elsewhere); a pair's
    rows (random seeds) are averaged first."""
    column = f"took_{attribute}"
    acc: dict[tuple, list[float]] = {}
    for r in rows:
        if r.get("method") == method and r.get("alpha") == alpha:
            acc.setdefault((r["kind"], r["pair"]), []).append(float(r.get(column, np.nan)))
    per_pair = [float(np.nanmean(v)) for v in acc.values() if not np.all(np.isnan(v))]
    if not per_pair:
        return cannot_check(f"no {method!r} rows at alpha = {alpha:g} where {attribute} differs.")
    expected = float(np.mean(per_pair))
    hint = (f"keep the rows with method == {method!r} and alpha == {alpha:g}; {column!r} is 1 or 0 where {attribute} "
            "differs and NaN where it does not: average it over the rows where it is not NaN (np.nanmean).")
    x = number_answer(answer, "the answer should be one number (a share between 0 and 1).", hint)
    if isinstance(x, Verdict):
        return x
    if close(x, expected, abs_=1e-9):
        return right(f"{method} at alpha = {alpha:g} took the source's {attribute} in {expected:.0%} of the "
                     f"{len(per_pair)} pairs where it differs.")
    all_rows = [v for vs in acc.values() for v in vs]
    if close(x, float(np.mean(np.nan_to_num(all_rows, nan=0.0))), abs_=1e-9):
        return wrong("that counts the pairs where the attribute does not differ as 'not taken'.",
                     f"leave out the NaN rows: only pairs where {attribute} differs can take it.")
    if close(x, 100 * expected):
        return wrong("that looks like a percentage.", "give a share between 0 and 1.")
    if not 0 <= x <= 1:
        return wrong("a share lies between 0 and 1.", hint)
    return wrong(f"{x:.4g} is not that share.", hint)
