"""The origins interlude's exercises: reading the counterfactual organisms' results file
(``mabook/results/origins.json``): the LayerNorm share across widths, a prediction's margin, and
the emergence logs side by side.

Every check takes the file's organisms (``data["organisms"]``, or one organism's entry) and
recomputes the answer from them.
"""

from __future__ import annotations

import math

import numpy as np

from mabook.exercises.answers import as_array, close, number_answer
from mabook.exercises.registry import Verdict, cannot_check, chapter, not_answered, right, wrong

exercise = chapter("notebooks/02c_origins.ipynb")


def _width(organism: dict) -> int:
    cfg = organism["organism_config"]
    return int(cfg["attention_head_dim"] * cfg["num_attention_heads"])


def _shares(organism: dict, key: str = "norm_share") -> np.ndarray:
    return np.array([float(row[key]) for row in organism["layers"]])


def _share_from_ratio(r2: float, width: int) -> float:
    """The LayerNorm share of a channel whose squared deviation is r2 times the others' mean square."""
    return r2 / (r2 + width - 1)


def _ratio2_from_share(share: float, width: int) -> float:
    """The inverse: r^2 = share * (width - 1) / (1 - share)."""
    return share * (width - 1) / (1 - share)


@exercise("2c.1", "The same channel at FLUX's width")
def check_share_at_width(organism: dict, width: int, answer) -> Verdict:
    """The LayerNorm share that a channel would hold in a `width`-wide layer if it were as many times
    the RMS of the other channels as `organism`'s top channel is at its largest share over layers:
    r^2 = s (d - 1) / (1 - s) at the organism's width d, then r^2 / (r^2 + width - 1)."""
    d, s = _width(organism), float(_shares(organism).max())
    r2 = _ratio2_from_share(s, d)
    expected = _share_from_ratio(r2, width)
    hint = (f"s = max over layers of layer['norm_share'], d = attention_head_dim * num_attention_heads; "
            f"r**2 = s * (d - 1) / (1 - s); answer r**2 / (r**2 + {width} - 1).")
    x = number_answer(answer, "the answer should be one number (a share, between 0 and 1).", hint)
    if isinstance(x, Verdict):
        return x
    if close(x, expected, rel=1e-2):  # 1 %: d or d - 1 in both places is the same reading
        need = {w: math.sqrt(_ratio2_from_share(0.9, w)) for w in (d, width)}
        return right(f"r = {math.sqrt(r2):.1f}: a channel holding {s:.3f} of a {d}-wide layer's LayerNorm variance holds "
                     f"only {expected:.3f} of a {width}-wide one. To hold 0.9 it would have to be {need[d]:.0f}x the others' "
                     f"RMS at width {d} and {need[width]:.0f}x at width {width}: the same ratio means different things at "
                     "different widths; the share means the same thing.")
    if close(x, s):
        return wrong(f"{x:.3f} is the share at the organism's own width ({d}).",
                     f"keep r, the channel's size relative to the others, and put it in a {width}-wide layer.")
    if close(x, 100 * expected, rel=1e-2):
        return wrong("that looks like a percentage.", "give the share as a fraction (0.05 for 5 %).")
    if close(x, math.sqrt(r2), rel=1e-2) or close(x, r2, rel=1e-2):
        return wrong("that is the channel's size relative to the others (r or r**2), not a share.",
                     f"put r**2 into r**2 / (r**2 + {width} - 1).")
    if close(x, math.sqrt(r2) / (math.sqrt(r2) + width - 1), rel=1e-2):
        return wrong("that uses r where the share takes r**2.",
                     "the share is a share of variance: squared deviations, r**2 / (r**2 + width - 1).")
    if close(x, _share_from_ratio(_ratio2_from_share(float(_shares(organism).mean()), d), width), rel=1e-2):
        return wrong("that starts from the mean share over layers.", "start from the largest share over layers (max).")
    for key, what in (("ratio", "|mean| ratio to the median channel"), ("max_abs", "largest |x|")):
        values = _shares(organism, key)
        if any(close(x, _share_from_ratio(v ** 2, width), rel=1e-2) for v in (values.max(), float(np.median(values)))):
            return wrong(f"that takes r from the {what}, another quantity (a ratio of means over tokens, not of "
                         "deviations from each token's mean).", "derive r from the share itself: r**2 = s * (d - 1) / (1 - s).")
    return wrong(f"{x:.4g} is not the share at width {width}.", hint)


def _versus(mx: float, mn: float, margin: float) -> str:
    """The chapter's word for an organism against the control (2.5's `versus`)."""
    if mx < 1 - margin and mn < 1 - margin:
        return "below"
    if mx > 1 + margin and mn > 1 + margin:
        return "above"
    return "about the same as" if abs(mx - 1) <= margin and abs(mn - 1) <= margin else "mixed against"


def _ratios(orgs: dict, name: str, reference: str, reduce) -> tuple[float, float]:
    return (float(_shares(orgs[name]).max() / _shares(orgs[reference]).max()),
            float(reduce(_shares(orgs[name])) / reduce(_shares(orgs[reference]))))


@exercise("2c.2", "Above the control's, or about the same?")
def check_share_versus(orgs: dict, name: str, reference: str, margin: float, answer) -> Verdict:
    """The pair (max share over layers of `name` / the same of `reference`, mean share over layers of
    `name` / the same of `reference`), from each organism's ``layers[i]["norm_share"]``."""
    if name not in orgs or reference not in orgs:
        return cannot_check(f"the results file holds no {name if name not in orgs else reference!r} organism.")
    mx, mn = _ratios(orgs, name, reference, np.mean)
    hint = (f"s = [layer['norm_share'] for layer in orgs[{name!r}]['layers']], and the same for {reference!r}; "
            "answer (max(s) / max(s_ref), mean(s) / mean(s_ref)).")
    if answer is None:
        return not_answered(hint)
    x = as_array(answer)
    if x is None or x.shape != (2,):
        return wrong("the answer should be two numbers: (max ratio, mean ratio).", hint)
    a, b = float(x[0]), float(x[1])
    if close(a, mx) and close(b, mn):
        word = _versus(mx, mn, margin)
        return right(f"Max {mx:.3f}, mean {mn:.3f}: against the ±{margin:.0%} margin, {name}'s share is {word} the "
                     f"{reference}'s (section 2.5's word).")
    if close(a, mn) and close(b, mx):
        return wrong("the two numbers are swapped.", "the max ratio first, then the mean ratio.")
    if close(a, 1 / mx) and close(b, 1 / mn):
        return wrong(f"those are {reference} over {name}.", f"divide {name}'s share by {reference}'s.")
    if close(a, mx - 1) and close(b, mn - 1):
        return wrong("those are the changes (ratio - 1).", "give the ratios themselves; the margin is applied to them.")
    if close(a, 100 * mx) and close(b, 100 * mn):
        return wrong("those look like percentages.", "give plain ratios (1.1, not 110).")
    if close(a, mx) and close(b, _ratios(orgs, name, reference, np.median)[1]):
        return wrong("the second number is a ratio of medians.", "use the mean over layers, as section 2.5 does.")
    if close(b, mn) and not close(a, mx):
        return wrong("the mean ratio is right, the max ratio is not.", "the first number compares max(s) over layers.")
    if close(a, mx):
        return wrong("the max ratio is right, the mean ratio is not.", "the second number compares mean(s) over layers.")
    for key, what in (("ratio", "|mean| ratio to the median"), ("norm_share_top_k", "top-k share")):
        if close(a, float(_shares(orgs[name], key).max() / _shares(orgs[reference], key).max())):
            return wrong(f"that compares the layers' {what} (layer[{key!r}]).", "compare layer['norm_share'].")
    for other in orgs:
        if other not in (name, reference) and close(a, _ratios(orgs, other, reference, np.mean)[0]):
            return wrong(f"that is {other}'s ratio.", f"read orgs[{name!r}].")
    return wrong(f"({a:.4g}, {b:.4g}) is not the pair of ratios.", hint)


def _curve(organism: dict, key: str) -> dict[int, float]:
    return {int(e["step"]): float(e[key]) for e in organism["emergence"] if e.get(key) is not None}


def _catch_up(orgs: dict, name: str, reference: str, key: str) -> tuple[int | None, float]:
    ref = _curve(orgs[reference], key)
    level = ref[max(ref)] if ref else math.nan
    c = _curve(orgs[name], key)
    return next((s for s in sorted(c) if c[s] >= level), None), level


@exercise("2c.3", "How much sooner?")
def check_catch_up_step(orgs: dict, name: str, reference: str, key: str, answer) -> Verdict:
    """The first training step in `name`'s emergence log at which its `key` (median over image layers,
    EMA weights) reaches `reference`'s value at the last step of `reference`'s log."""
    hint = (f"level = orgs[{reference!r}]['emergence'][-1][{key!r}]; answer the first e['step'] in "
            f"orgs[{name!r}]['emergence'] whose e[{key!r}] >= level.")
    if name not in orgs or reference not in orgs:
        return cannot_check(f"the results file holds no {name if name not in orgs else reference!r} organism.")
    ref, c = _curve(orgs[reference], key), _curve(orgs[name], key)
    if not ref or not c:
        return cannot_check(f"{reference if not ref else name}'s emergence log holds no {key!r}: pick a key both logs hold.")
    expected, level = _catch_up(orgs, name, reference, key)
    if expected is None:
        return cannot_check(f"{name}'s {key} never reaches {reference}'s final {level:.3g}: there is no step to find.")
    x = number_answer(answer, "the answer should be one training step (an int).", hint)
    if isinstance(x, Verdict):
        return x
    steps = [int(e["step"]) for e in orgs[name]["emergence"]]
    last = max(ref)
    if x == expected:
        return right(f"{name} reaches {reference}'s final {key} ({level:.3g} at step {last}) at step {expected}, "
                     f"{last - expected} steps sooner ({expected / last:.0%} of the way).")
    if x == steps.index(expected):
        return wrong("that is the row's index in the log.", "answer the training step, e['step'].")
    if x == last - expected:
        return wrong("that is how many steps sooner.", "answer the step itself.")
    below = max((s for s in c if s < expected), default=None)
    if x == below:
        return wrong(f"at step {x:g} {name}'s {key} is {c[below]:.3g}, still below {level:.3g}.",
                     "the first step at or above the level.")
    if x == last:
        return wrong(f"that is the last step of {reference}'s log.", f"find where {name}'s curve reaches that level.")
    for other in orgs:
        if other != name and _curve(orgs[other], key) and x == _catch_up(orgs, other, reference, key)[0]:
            return wrong(f"that is the step for {other}.", f"read orgs[{name!r}]['emergence'].")
    return wrong(f"step {x:g} is not the first at which {name} reaches {reference}'s final {key}.", hint)
