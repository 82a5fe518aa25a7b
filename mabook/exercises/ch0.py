"""Chapter 0's exercises (the model organism): the shapes world's masks and the judge's verdicts."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from mabook import judge, world
from mabook.exercises.answers import as_number, close, number_answer
from mabook.exercises.registry import Verdict, chapter, not_answered, right, wrong

exercise = chapter("notebooks/00_model_organism.ipynb")


@exercise("0.1", "How much of the image is the object?")
def check_object_fraction(caption: str, answer) -> Verdict:
    """The fraction of the image's pixels that belong to the caption's object(s)."""
    sample = world.render(world.parse_caption(caption))
    fg = sample.masks.any(0)
    expected = float(fg.mean())
    hint = ("sample = world.render(world.parse_caption(caption)); sample.masks holds one boolean (32, 32) mask per "
            "object: average sample.masks.any(0) over the pixels.")
    if answer is None:
        return not_answered(hint)
    x = as_number(answer)
    if x is None:
        return wrong(f"the answer should be one number (a fraction), got {type(answer).__name__}.", hint)
    if close(x, expected, abs_=1e-6):
        return right(f"The object covers {expected:.1%} of the image ({int(fg.sum())} of {fg.size} pixels).")
    if close(x, float(fg.sum())):
        return wrong("that is a number of pixels, not a fraction.", f"divide by the image's {fg.size} pixels.")
    if close(x, 1 - expected, abs_=1e-6):
        return wrong("that is the background's share.", "the masks are True on the object.")
    if close(x, 100 * expected):
        return wrong("that looks like a percentage.", "give a fraction between 0 and 1.")
    if not 0 <= x <= 1:
        return wrong("a fraction lies between 0 and 1.", hint)
    return wrong(f"{x:.4f} is not the object's share of the pixels.", hint)


def _attribute_set(answer) -> set[str] | None:
    if isinstance(answer, str):
        answer = [answer]
    try:
        words = {str(a).strip().lower() for a in answer}
    except TypeError:
        return None
    return {"color" if w == "colour" else w for w in words}


@exercise("0.2", "What does the judge say is wrong?")
def check_wrong_attributes(image, caption: str, answer) -> Verdict:
    """The set of attributes the judge marks wrong when `image` is judged against `caption`."""
    verdict = judge.judge(image, caption)
    expected = {a for c in verdict.correct for a, ok in c.items() if not ok}
    hint = ("judge.judge(image, caption).correct is a list with one dict per object of the caption, "
            "{attribute: True/False}: collect the attributes that are False.")
    if answer is None:
        return not_answered(hint)
    given = _attribute_set(answer)
    if given is None:
        return wrong("the answer should be a set of attribute names, e.g. {\"shape\"}.", hint)
    unknown = given - set(world.ATTRIBUTES)
    if unknown:
        return wrong(f"{sorted(unknown)} are not attributes.", f"the attributes are {list(world.ATTRIBUTES)}.")
    if given == expected:
        return right(f"The judge marks {sorted(expected) or 'nothing'} wrong: it reads the image, not the caption.")
    missing, extra = expected - given, given - expected
    problems = []
    if missing:
        problems.append(f"the judge flags {len(missing)} more attribute(s)")
    if extra:
        problems.append(f"the judge reads {sorted(extra)} correctly")
    return wrong("; ".join(problems) + ".", hint)


@exercise("0.3", "Score the gallery yourself")
def check_attribute_accuracy(images, captions: Sequence[str], attribute: str, answer) -> Verdict:
    """The fraction of all caption objects (over every image) whose `attribute` the judge finds right."""
    verdicts = [judge.judge(im, c) for im, c in zip(images, captions)]
    per_object = [c[attribute] for v in verdicts for c in v.correct]
    expected = float(np.mean(per_object))
    hint = (f"judge every (image, caption) pair with judge.judge; each verdict's .correct has one dict per caption "
            f"object: average c[{attribute!r}] over all objects of all images.")
    x = number_answer(answer, "the answer should be one number (a fraction).", hint)
    if isinstance(x, Verdict):
        return x
    if close(x, expected, abs_=1e-6):
        return right(f"{expected:.1%} of the {len(per_object)} objects have the right {attribute}.")
    if close(x, 100 * expected):
        return wrong("that looks like a percentage.", "give a fraction between 0 and 1.")
    per_image = float(np.mean([all(c[attribute] for c in v.correct) for v in verdicts]))
    if close(x, per_image, abs_=1e-6):
        return wrong("that is a share of images.", "count objects: a two-object caption counts twice.")
    if close(x, float(np.mean([v.all_correct for v in verdicts])), abs_=1e-6):
        return wrong("that is the share of fully correct images.", f"score only the {attribute}.")
    return wrong(f"{x:.4f} is not the share of objects with the right {attribute}.", hint)
