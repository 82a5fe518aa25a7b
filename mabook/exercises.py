"""Workshop exercises: one check function per exercise in the chapters.

Every check function takes the chapter's own objects (a caption, ``stats``, ``base``, ``cap``, a
table, ...) and the learner's ``answer``; it recomputes the right answer from those objects (never a
number written down here), prints one line that says whether the answer is right and, when it is
not, a hint aimed at the likely mistake, and returns True or False. It never raises on a wrong
answer, and an unanswered exercise (``answer = None``) prints "not answered yet" and a hint, so the
chapter runs from top to bottom as committed.

How to add an exercise to a chapter (the pattern every chapter follows)
-----------------------------------------------------------------------

1. Here: a check function decorated with ``@exercise("N.M", "notebooks/<chapter>.ipynb", "title")``
   (N: the chapter's number as in its title, e.g. ``"2b"``; M: the exercise's order in the chapter).
   It recomputes the answer from the objects it is given, compares, and ends with
   ``return _result(...)`` (or `_not_answered` / `_wrong` / `_right`). Checks must be cheap
   (well under a second on a CPU, apart from a single small generation) and must work on small
   inputs: ``tests/test_exercises.py`` gives every check in `CHECKS` a right and a wrong answer
   (a test fails if a check has no case there).
2. In the chapter, at the end of the section the exercise practises, three cells:

   - markdown: ``### Exercise N.M — <title>`` and the task;
   - code, the learner's cell, which must run as committed::

         answer = None  # TODO: <what to compute, and its type>
         exercises.check_xxx(<chapter objects>, answer);

     (the ``;`` keeps Jupyter from echoing the returned bool; for a "write a function" exercise
     the cell defines the function with ``return None  # TODO`` and passes the function);
   - code, the solution: the same call with the answer computed, tagged ``hide-cell`` with cell
     metadata ``{"mystnb": {"code_prompt_show": "Show solution", "code_prompt_hide": "Hide
     solution"}}``, so the page shows it collapsed behind a "Show solution" toggle. nbmake executes
     it with the chapter, so a solution that stops being right fails the tests. Solution cells name
     their variables with an ``ex`` prefix (``ex_values``) so they never overwrite the chapter's.

   ``tests/test_exercises.py`` checks this layout in every chapter (2-3 exercises each), and
   ``book/workshop.md`` lists the exercises for the half-day plan.

The chapter imports the module with ``from mabook import exercises``.
"""

from __future__ import annotations

import math
import textwrap
from typing import Any, Callable, Sequence

import numpy as np

# exercise number -> check function; exercise number -> (notebook, title). Filled by @exercise.
CHECKS: dict[str, Callable[..., bool]] = {}
WHERE: dict[str, tuple[str, str]] = {}

ATTRIBUTE_NAMES = ("color", "shape", "size", "position")


def exercise(number: str, notebook: str, title: str):
    """Register a check function as the check of exercise `number` in `notebook`."""

    def register(fn):
        if number in CHECKS:
            raise ValueError(f"exercise {number} is registered twice")
        fn.exercise = number
        CHECKS[number] = fn
        WHERE[number] = (notebook, title)
        return fn

    return register


# ---------------------------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------------------------


def _right(number: str, detail: str = "") -> bool:
    print(f"✅ Exercise {number}: correct." + (f" {detail}" if detail else ""))
    return True


def _hint(hint: str) -> str:
    return textwrap.fill(f"Hint: {hint}", width=100, initial_indent="   ", subsequent_indent="         ",
                         break_long_words=False, break_on_hyphens=False)


def _wrong(number: str, problem: str, hint: str) -> bool:
    print(f"❌ Exercise {number}: not yet. {problem}\n{_hint(hint)}")
    return False


def _not_answered(number: str, hint: str) -> bool:
    print(f"✏️ Exercise {number}: not answered yet (replace the None in the TODO line).\n{_hint(hint)}")
    return False


def _number(value: Any) -> float | None:
    """The answer as a float, or None if it is not one number."""
    if isinstance(value, bool):
        return None
    try:
        x = float(np.asarray(value, dtype=float).item())
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _int_set(value: Any) -> set[int] | None:
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


def _close(a: float | None, b: float, rel: float = 1e-3, abs_: float = 1e-9) -> bool:
    return a is not None and math.isclose(a, b, rel_tol=rel, abs_tol=abs_)


def _abs_mean(stats, tap) -> np.ndarray:
    return stats.get("abs_mean", tap).cpu().numpy().astype(np.float64)


def _top(values: np.ndarray, k: int) -> set[int]:
    return {int(i) for i in np.argsort(-values, kind="stable")[:k]}


def _bottom(values: np.ndarray, k: int) -> set[int]:
    return {int(i) for i in np.argsort(values, kind="stable")[:k]}


# ---------------------------------------------------------------------------------------------
# Chapter 0: the model organism
# ---------------------------------------------------------------------------------------------


@exercise("0.1", "notebooks/00_model_organism.ipynb", "How much of the image is the object?")
def check_object_fraction(caption: str, answer) -> bool:
    """The fraction of the image's pixels that belong to the caption's object(s)."""
    from mabook import world

    sample = world.render(world.parse_caption(caption))
    fg = sample.masks.any(0)
    expected = float(fg.mean())
    hint = ("sample = world.render(world.parse_caption(caption)); sample.masks holds one boolean (32, 32) mask per "
            "object: average sample.masks.any(0) over the pixels.")
    if answer is None:
        return _not_answered("0.1", hint)
    x = _number(answer)
    if x is None:
        return _wrong("0.1", f"the answer should be one number (a fraction), got {type(answer).__name__}.", hint)
    if _close(x, expected, abs_=1e-6):
        return _right("0.1", f"The object covers {expected:.1%} of the image ({int(fg.sum())} of {fg.size} pixels).")
    if _close(x, float(fg.sum())):
        return _wrong("0.1", "that is a number of pixels, not a fraction.", f"divide by the image's {fg.size} pixels.")
    if _close(x, 1 - expected, abs_=1e-6):
        return _wrong("0.1", "that is the background's share.", "the masks are True on the object.")
    if _close(x, 100 * expected):
        return _wrong("0.1", "that looks like a percentage.", "give a fraction between 0 and 1.")
    if not 0 <= x <= 1:
        return _wrong("0.1", "a fraction lies between 0 and 1.", hint)
    return _wrong("0.1", f"{x:.4f} is not the object's share of the pixels.", hint)


def _attribute_set(answer) -> set[str] | None:
    if isinstance(answer, str):
        answer = [answer]
    try:
        words = {str(a).strip().lower() for a in answer}
    except TypeError:
        return None
    return {"color" if w == "colour" else w for w in words}


@exercise("0.2", "notebooks/00_model_organism.ipynb", "What does the judge say is wrong?")
def check_wrong_attributes(image, caption: str, answer) -> bool:
    """The set of attributes the judge marks wrong when `image` is judged against `caption`."""
    from mabook import judge

    verdict = judge.judge(image, caption)
    expected = {a for c in verdict.correct for a, ok in c.items() if not ok}
    hint = ("judge.judge(image, caption).correct is a list with one dict per object of the caption, "
            "{attribute: True/False}: collect the attributes that are False.")
    if answer is None:
        return _not_answered("0.2", hint)
    given = _attribute_set(answer)
    if given is None:
        return _wrong("0.2", "the answer should be a set of attribute names, e.g. {\"shape\"}.", hint)
    unknown = given - set(ATTRIBUTE_NAMES)
    if unknown:
        return _wrong("0.2", f"{sorted(unknown)} are not attributes.", f"the attributes are {list(ATTRIBUTE_NAMES)}.")
    if given == expected:
        return _right("0.2", f"The judge marks {sorted(expected) or 'nothing'} wrong: it reads the image, not the caption.")
    missing, extra = expected - given, given - expected
    problems = []
    if missing:
        problems.append(f"the judge flags {len(missing)} more attribute(s)")
    if extra:
        problems.append(f"the judge reads {sorted(extra)} correctly")
    return _wrong("0.2", "; ".join(problems) + ".", hint)


@exercise("0.3", "notebooks/00_model_organism.ipynb", "Score the gallery yourself")
def check_attribute_accuracy(images, captions: Sequence[str], attribute: str, answer) -> bool:
    """The fraction of all caption objects (over every image) whose `attribute` the judge finds right."""
    from mabook import judge

    verdicts = [judge.judge(im, c) for im, c in zip(images, captions)]
    per_object = [c[attribute] for v in verdicts for c in v.correct]
    expected = float(np.mean(per_object))
    hint = (f"judge every (image, caption) pair with judge.judge; each verdict's .correct has one dict per caption "
            f"object: average c[{attribute!r}] over all objects of all images.")
    if answer is None:
        return _not_answered("0.3", hint)
    x = _number(answer)
    if x is None:
        return _wrong("0.3", "the answer should be one number (a fraction).", hint)
    if _close(x, expected, abs_=1e-6):
        return _right("0.3", f"{expected:.1%} of the {len(per_object)} objects have the right {attribute}.")
    if _close(x, 100 * expected):
        return _wrong("0.3", "that looks like a percentage.", "give a fraction between 0 and 1.")
    per_image = float(np.mean([all(c[attribute] for c in v.correct) for v in verdicts]))
    if _close(x, per_image, abs_=1e-6):
        return _wrong("0.3", "that is a share of images.", "count objects: a two-object caption counts twice.")
    if _close(x, float(np.mean([v.all_correct for v in verdicts])), abs_=1e-6):
        return _wrong("0.3", "that is the share of fully correct images.", f"score only the {attribute}.")
    return _wrong("0.3", f"{x:.4f} is not the share of objects with the right {attribute}.", hint)


# ---------------------------------------------------------------------------------------------
# Chapter 1: finding the massive channels
# ---------------------------------------------------------------------------------------------


@exercise("1.1", "notebooks/01_channel_discovery.ipynb", "Rank the channels yourself")
def check_top_channels(stats, tap, k: int, answer) -> bool:
    """The k channels with the largest |mean over image tokens| at `tap` (pooled over steps), any order."""
    values = _abs_mean(stats, tap)
    expected = _top(values, k)
    hint = (f"stats.get('abs_mean', {str(tap)!r}) is a (channels,) tensor of |mean over image tokens|; "
            f"np.argsort(-values)[:{k}] gives the {k} largest.")
    if answer is None:
        return _not_answered("1.1", hint)
    given = _int_set(answer)
    if given is None:
        return _wrong("1.1", "the answer should be a list of channel indices (ints).", hint)
    if len(given) != k:
        return _wrong("1.1", f"{len(given)} distinct channels given, {k} wanted.", hint)
    if given == expected:
        return _right("1.1", f"Top-{k} at {tap}: {sorted(expected)}.")
    if given == _bottom(values, k):
        return _wrong("1.1", "those are the channels with the smallest statistic.", "sort in decreasing order.")
    for other in ("mean", "max_abs", "std"):
        if given == _top(stats.get(other, tap).cpu().numpy(), k):
            return _wrong("1.1", f"that is the top-{k} by {other!r}.", "rank by 'abs_mean', the paper's statistic.")
    return _wrong("1.1", f"{len(given & expected)} of your {k} channels are in the top-{k}.", hint)


@exercise("1.2", "notebooks/01_channel_discovery.ipynb", "How massive?")
def check_ratio_to_median(stats, tap, answer) -> bool:
    """The top channel's |mean over image tokens| divided by the median channel's, at `tap`."""
    values = _abs_mean(stats, tap)
    expected = float(values.max() / np.median(values))
    hint = f"values = stats.get('abs_mean', {str(tap)!r}).numpy(); divide values.max() by np.median(values)."
    if answer is None:
        return _not_answered("1.2", hint)
    x = _number(answer)
    if x is None:
        return _wrong("1.2", "the answer should be one number.", hint)
    if _close(x, expected):
        return _right("1.2", f"The top channel is {expected:.1f}x the median channel at {tap}.")
    if _close(x, float(values.max() / values.mean())):
        return _wrong("1.2", "that divides by the mean channel.", "the median is robust to the massive channel itself.")
    if _close(x, 1 / expected):
        return _wrong("1.2", "that is upside down.", "top channel / median channel.")
    if _close(x, float(values.max())):
        return _wrong("1.2", "that is the top channel's value itself.", "divide it by the median channel's value.")
    return _wrong("1.2", f"{x:.4g} is not the ratio at {tap}.", hint)


@exercise("1.3", "notebooks/01_channel_discovery.ipynb", "Jaccard by hand")
def check_jaccard(run_a, run_b, tap, k: int, answer) -> bool:
    """Jaccard overlap |A ∩ B| / |A ∪ B| of the top-k sets (by abs_mean at `tap`) of two runs."""
    a, b = _top(_abs_mean(run_a, tap), k), _top(_abs_mean(run_b, tap), k)
    expected = len(a & b) / len(a | b)
    hint = "take each run's top-k set at the tap (as in exercise 1.1), then len(A & B) / len(A | B) on Python sets."
    if answer is None:
        return _not_answered("1.3", hint)
    x = _number(answer)
    if x is None:
        return _wrong("1.3", "the answer should be one number between 0 and 1.", hint)
    if _close(x, expected, abs_=1e-9):
        return _right("1.3", f"The two top-{k} sets share {len(a & b)} of {len(a | b)} channels: Jaccard {expected:.2f}.")
    if _close(x, float(len(a & b))):
        return _wrong("1.3", "that is the size of the intersection.", "divide it by the size of the union.")
    if _close(x, len(a & b) / k):
        return _wrong("1.3", "that divides by k.", "Jaccard divides by |A ∪ B|, which is larger than k when the sets differ.")
    return _wrong("1.3", f"{x:.4g} is not the overlap of the two top-{k} sets.", hint)


# ---------------------------------------------------------------------------------------------
# Chapter 2: disruption
# ---------------------------------------------------------------------------------------------


@exercise("2.1", "notebooks/02_disruption.ipynb", "Zero the massive channel yourself")
def check_zeroed_top1_mse(base, answer) -> bool:
    """Pixel MSE between the first unit generated with its top-1 channel (by abs_mean, per image layer,
    from ``base.stats``) zeroed at every image layer and step, and its baseline image."""
    import torch

    from mabook import probe

    edits = [probe.Edit(tap, [int(np.argmax(_abs_mean(base.stats, tap)))], "zero") for tap in base.stats.layers("img")]
    with torch.no_grad(), probe.edit(base.adapter, edits):
        image = base.adapter.generate(base.units[:1], base.num_inference_steps, 1, **base.pipe_kwargs)[0]
    expected = float(((image - base.images[0]) ** 2).mean())
    hint = ("build one probe.Edit(tap, [channel], 'zero') per image layer (disruption.channel_set(base.stats, 1, 'top') "
            "gives {tap: [channel]}), then inside `with probe.edit(adapter, edits):` generate base.units[0] with "
            "generator=torch.Generator('cpu').manual_seed(seed), num_inference_steps=base.num_inference_steps, "
            "output_type='np', and average (image - base.images[0]) ** 2.")
    if answer is None:
        return _not_answered("2.1", hint)
    x = _number(answer)
    if x is None:
        return _wrong("2.1", "the answer should be one number (a mean squared error).", hint)
    if _close(x, expected, rel=0.05, abs_=1e-7):
        return _right("2.1", f"Zeroing one channel per layer moves the first image's pixels by an MSE of {expected:.4f}.")
    if x == 0:
        return _wrong("2.1", "the image did not change.", "generate inside the `with probe.edit(...)` block.")
    if x < 0:
        return _wrong("2.1", "a mean squared error is never negative.", hint)
    return _wrong("2.1", f"{x:.4g} is not the MSE of the first unit under the top-1 zeroing.", hint)


@exercise("2.2", "notebooks/02_disruption.ipynb", "The quiet channels")
def check_bottom_rms(stats, tap, k: int, answer) -> bool:
    """The k channels with the smallest RMS over tokens, sqrt(mean² + std²), at `tap`."""
    mean = stats.get("mean", tap).cpu().numpy().astype(np.float64)
    std = stats.get("std", tap).cpu().numpy().astype(np.float64)
    rms = np.sqrt(mean ** 2 + std ** 2)
    expected = _bottom(rms, k)
    hint = (f"rms = np.sqrt(stats.get('mean', tap).numpy() ** 2 + stats.get('std', tap).numpy() ** 2); "
            f"np.argsort(rms)[:{k}].")
    if answer is None:
        return _not_answered("2.2", hint)
    given = _int_set(answer)
    if given is None:
        return _wrong("2.2", "the answer should be a list of channel indices (ints).", hint)
    if len(given) != k:
        return _wrong("2.2", f"{len(given)} distinct channels given, {k} wanted.", hint)
    if given == expected:
        return _right("2.2", f"Bottom-{k} by RMS at {tap}: {sorted(expected)}.")
    if given == _bottom(_abs_mean(stats, tap), k):
        return _wrong("2.2", "that is the paper's control, the bottom-k by |mean|.",
                      "RMS also counts how much the channel swings from token to token (its std).")
    if given == _top(rms, k):
        return _wrong("2.2", "those are the loudest channels.", "take the smallest RMS.")
    return _wrong("2.2", f"{len(given & expected)} of your {k} channels are in the bottom-{k} by RMS.", hint)


@exercise("2.3", "notebooks/02_disruption.ipynb", "Write the token-mean op")
def check_token_mean_op(fn) -> bool:
    """`fn(selected)` maps (batch, tokens, channels) to the same shape with every channel replaced by its
    mean over the tokens of its sample (what op="mean" does; usable as ``probe.Edit(tap, ch, op=fn)``)."""
    import torch

    hint = "selected.mean(dim=1, keepdim=True) averages over the tokens; .expand_as(selected) restores the shape."
    if fn is None or not callable(fn):
        return _not_answered("2.3", "define a function token_mean_op(selected) and pass it. " + hint)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 4, generator=g) * 2 + torch.arange(4.0)
    try:
        out = fn(x.clone())
    except Exception as e:  # the learner's code: report, do not raise
        return _wrong("2.3", f"your function raised {type(e).__name__}: {e}", hint)
    if out is None:
        return _not_answered("2.3", "your function returns None. " + hint)
    if not isinstance(out, torch.Tensor):
        return _wrong("2.3", f"it returned a {type(out).__name__}; probe.Edit needs a torch.Tensor.", hint)
    if tuple(out.shape) != tuple(x.shape):
        return _wrong("2.3", f"it returned shape {tuple(out.shape)} for an input of shape {tuple(x.shape)}.",
                      "keep the shape: keepdim=True and .expand_as(selected).")
    expected = x.mean(1, keepdim=True).expand_as(x)
    if torch.allclose(out, expected, atol=1e-5):
        return _right("2.3", "Every channel keeps its level and loses its spatial pattern.")
    for dim, what in ((0, "the batch (samples)"), (2, "the channels")):
        if torch.allclose(out, x.mean(dim, keepdim=True).expand_as(x), atol=1e-5):
            return _wrong("2.3", f"that averages over {what}.", "average over dim 1, the tokens.")
    if torch.allclose(out, x, atol=1e-6):
        return _wrong("2.3", "it returns its input unchanged.", hint)
    return _wrong("2.3", "the values are not the per-sample token means.", hint)


# ---------------------------------------------------------------------------------------------
# Chapter 2b: emergence
# ---------------------------------------------------------------------------------------------


def _median_ratio(card: dict, weights: str) -> tuple[list[int], np.ndarray]:
    log = card["emergence"]
    steps = [int(row["step"]) for row in log]
    return steps, np.array([np.median([layer["ratio"] for layer in row[weights]]) for row in log])


@exercise("2b.1", "notebooks/02b_emergence.ipynb", "When does it appear?")
def check_half_final_step(card: dict, answer) -> bool:
    """The first logged training step at which the median-over-layers ratio (EMA weights) reaches
    half of its final value."""
    steps, series = _median_ratio(card, "ema")
    i = int(np.argmax(series >= series[-1] / 2))
    expected = steps[i]
    hint = ("series = [np.median([l['ratio'] for l in row['ema']]) for row in card['emergence']]; find the first row "
            "whose value is >= series[-1] / 2 and answer its row['step'].")
    if answer is None:
        return _not_answered("2b.1", hint)
    x = _number(answer)
    if x is None:
        return _wrong("2b.1", "the answer should be one training step (an int).", hint)
    if x == expected:
        return _right("2b.1", f"At step {expected} the ratio is {series[i]:.1f}x, half of the final {series[-1]:.1f}x "
                              f"is {series[-1] / 2:.1f}x.")
    if x == i:
        return _wrong("2b.1", "that is the row's index in the log.", "answer the training step, row['step'].")
    raw_steps, raw = _median_ratio(card, "raw")
    if x == raw_steps[int(np.argmax(raw >= raw[-1] / 2))]:
        return _wrong("2b.1", "that is the answer for the raw weights.", "read row['ema'], the weights the organism ships.")
    return _wrong("2b.1", f"step {x:g} is not the first to reach half the final ratio.", hint)


@exercise("2b.2", "notebooks/02b_emergence.ipynb", "The plateau criterion on the raw weights")
def check_plateau_change(card: dict, weights: str, window: float, answer) -> bool:
    """The relative change series[-1] / series[start] - 1 of the median-over-layers ratio of `weights`
    ("ema" or "raw") from the first logged step in the last `window` of training to the end."""
    steps, series = _median_ratio(card, weights)
    cut = steps[-1] * (1 - window)
    start = next(i for i, s in enumerate(steps) if s >= cut)
    expected = float(series[-1] / series[start] - 1)
    hint = (f"series = [np.median([l['ratio'] for l in row[{weights!r}]]) for row in card['emergence']]; start at the first "
            f"row whose step >= steps[-1] * (1 - {window}); answer series[-1] / series[start] - 1.")
    if answer is None:
        return _not_answered("2b.2", hint)
    x = _number(answer)
    if x is None:
        return _wrong("2b.2", "the answer should be one number (a relative change, e.g. -0.03).", hint)
    if _close(x, expected, abs_=1e-6):
        verdict = "plateaued" if abs(expected) < 0.10 else "not plateaued"
        return _right("2b.2", f"The {weights} weights' ratio changed by {expected:+.1%} ({verdict} at a 10% tolerance).")
    other = "ema" if weights == "raw" else "raw"
    _, other_series = _median_ratio(card, other)
    if _close(x, float(other_series[-1] / other_series[start] - 1), abs_=1e-6):
        return _wrong("2b.2", f"that is the {other} weights' change.", f"read row[{weights!r}].")
    if _close(x, 100 * expected):
        return _wrong("2b.2", "that looks like a percentage.", "give a fraction (0.05 for 5 %).")
    if _close(x, float(series[-1] - series[start])):
        return _wrong("2b.2", "that is an absolute change.", "divide by the value at the start of the window.")
    return _wrong("2b.2", f"{x:.4g} is not the change over the last {window:.0%} of training.", hint)


# ---------------------------------------------------------------------------------------------
# Chapter 3: spatial organisation
# ---------------------------------------------------------------------------------------------


def _inertia(x: np.ndarray, labels: np.ndarray) -> float:
    return float(sum(((x[labels == c] - x[labels == c].mean(0)) ** 2).sum() for c in np.unique(labels)))


@exercise("3.1", "notebooks/03_spatial_organization.ipynb", "A K-means mask by hand")
def check_kmeans_mask(cap, tap: str, step: int, channels: Sequence[int], unit: int, answer) -> bool:
    """A (h, w) bool token mask: the smaller cluster of a 2-means clustering of unit `unit`'s tokens
    at (tap, step) on `channels`. Any 2-means optimum is accepted (its within-cluster sum of
    squares within 1 % of the best of ten K-means starts)."""
    from sklearn.cluster import KMeans

    x = np.asarray(cap.features(tap, step, channels)[unit], dtype=np.float64)
    best = KMeans(2, n_init=10, random_state=0).fit(x)
    hint = ("x = cap.features(tap, step, channels)[unit] is (tokens, channels); KMeans(n_clusters=2, n_init=10)"
            ".fit(x).labels_ gives a label per token; the subject is the smaller cluster; reshape to cap.grid.")
    if answer is None:
        return _not_answered("3.1", hint)
    try:
        mask = np.asarray(answer)
    except (TypeError, ValueError):
        return _wrong("3.1", "the answer should be a boolean array.", hint)
    if mask.shape != tuple(cap.grid):
        return _wrong("3.1", f"the mask has shape {mask.shape}, the token grid is {tuple(cap.grid)}.",
                      "reshape the per-token labels to cap.grid (tokens are in row-major order).")
    m = mask.astype(bool).ravel()
    if m.all() or not m.any():
        return _wrong("3.1", "one side of the split is empty.", hint)
    within = _inertia(x, m.astype(int))
    if within > best.inertia_ * 1.01 + 1e-9:
        return _wrong("3.1", f"this split has a within-cluster sum of squares of {within:.4g}; 2-means reaches "
                             f"{best.inertia_:.4g}.", hint)
    if m.sum() > len(m) / 2:
        return _wrong("3.1", "that is the larger cluster.", "the subject is the smaller one: invert the mask.")
    return _right("3.1", f"{int(m.sum())} of {len(m)} tokens in the subject cluster.")


@exercise("3.2", "notebooks/03_spatial_organization.ipynb", "Score a mask against the truth")
def check_token_iou(caption: str, grid: Sequence[int], mask, answer) -> bool:
    """Token IoU of a (h, w) bool `mask` with the caption's rendered foreground, downsampled to the
    token grid by majority (a token is on the object when at least half of its patch is)."""
    from mabook import world

    try:
        scene = world.parse_caption(caption)
    except ValueError:
        print("ℹ️ Exercise 3.2 needs a shapes-world caption (MODEL = 'organism'): there is no ground truth here.")
        return False
    fg = world.render(scene).foreground
    h, w = grid
    H, W = fg.shape
    truth = fg.reshape(h, H // h, w, W // w).mean((1, 3)) >= 0.5
    m = np.asarray(mask, dtype=bool).reshape(h, w)

    def iou(a, b):
        union = (a | b).sum()
        return float((a & b).sum() / union) if union else 1.0

    expected = iou(m, truth)
    hint = ("truth = world.render(world.parse_caption(caption)).foreground is (32, 32); downsample it to the token grid "
            "by majority (reshape to (h, 4, w, 4), mean over the patch axes, >= 0.5), then |mask & truth| / |mask | truth|.")
    if answer is None:
        return _not_answered("3.2", hint)
    x = _number(answer)
    if x is None:
        return _wrong("3.2", "the answer should be one number between 0 and 1.", hint)
    if _close(x, expected, abs_=1e-9):
        return _right("3.2", f"Token IoU {expected:.2f} ({int((m & truth).sum())} tokens shared, {int((m | truth).sum())} in the union).")
    if _close(x, iou(~m, truth), abs_=1e-9):
        return _wrong("3.2", "that scores the other cluster (the background).", "use the mask as given.")
    if _close(x, iou(m, fg.reshape(h, H // h, w, W // w).any((1, 3))), abs_=1e-9):
        return _wrong("3.2", "that downsamples with 'any pixel'.", "majority: a token is on the object when >= half its patch is.")
    return _wrong("3.2", f"{x:.4g} is not the token IoU of this mask.", hint)


# ---------------------------------------------------------------------------------------------
# Chapter 4: text-conditioned transport
# ---------------------------------------------------------------------------------------------


def _array(value: Any) -> np.ndarray | None:
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


def _matches(a: np.ndarray, b: np.ndarray, atol: float = 1e-5) -> bool:
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=1e-4, atol=atol))


@exercise("4.1", "notebooks/04_text_transport.ipynb", "The pixel blend by hand")
def check_pixel_blend(source_images, target_images, alpha: float, answer) -> bool:
    """The pixel-blend baseline: lerp(target, source, alpha) = (1 - alpha) * target + alpha * source,
    pixel by pixel, for every pair (an array shaped like the images)."""
    src, tgt = (np.asarray(x, dtype=np.float64) for x in (source_images, target_images))
    expected = (1 - alpha) * tgt + alpha * src
    hint = (f"lerp(target, source, alpha): (1 - alpha) * target_images + alpha * source_images, with alpha = {alpha:g}; "
            "numpy broadcasts over pairs, pixels and colour channels.")
    if answer is None:
        return _not_answered("4.1", hint)
    x = _array(answer)
    if x is None:
        return _wrong("4.1", "the answer should be an array of images.", hint)
    if x.shape != expected.shape:
        return _wrong("4.1", f"the answer has shape {x.shape}; the images are {expected.shape}.",
                      "blend every pair: the whole arrays, not one image or a mean.")
    if _matches(x, expected):
        return _right("4.1", f"At alpha = {alpha:g} every pixel is {1 - alpha:g} of the target and {alpha:g} of the source: "
                             "a ghost of both images, whatever they show.")
    if _matches(x, alpha * tgt + (1 - alpha) * src):
        return _wrong("4.1", "source and target are swapped.", "alpha = 0 is the target, alpha = 1 the source.")
    if _matches(x, tgt + alpha * src) or _matches(x, src + alpha * tgt):
        return _wrong("4.1", "the weights do not add up to 1.", hint)
    return _wrong("4.1", "these are not the blended images.", hint)


@exercise("4.2", "notebooks/04_text_transport.ipynb", "Which attribute did it take?")
def check_took_attribute(rows: Sequence[dict], method: str, alpha: float, attribute: str, answer) -> bool:
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
        print(f"ℹ️ Exercise 4.2: no {method!r} rows at alpha = {alpha:g} where {attribute} differs.")
        return False
    expected = float(np.mean(per_pair))
    hint = (f"keep the rows with method == {method!r} and alpha == {alpha:g}; {column!r} is 1 or 0 where {attribute} "
            "differs and NaN where it does not: average it over the rows where it is not NaN (np.nanmean).")
    if answer is None:
        return _not_answered("4.2", hint)
    x = _number(answer)
    if x is None:
        return _wrong("4.2", "the answer should be one number (a share between 0 and 1).", hint)
    if _close(x, expected, abs_=1e-9):
        return _right("4.2", f"{method} at alpha = {alpha:g} took the source's {attribute} in {expected:.0%} of the "
                             f"{len(per_pair)} pairs where it differs.")
    all_rows = [v for vs in acc.values() for v in vs]
    if _close(x, float(np.mean(np.nan_to_num(all_rows, nan=0.0))), abs_=1e-9):
        return _wrong("4.2", "that counts the pairs where the attribute does not differ as 'not taken'.",
                      f"leave out the NaN rows: only pairs where {attribute} differs can take it.")
    if _close(x, 100 * expected):
        return _wrong("4.2", "that looks like a percentage.", "give a share between 0 and 1.")
    if not 0 <= x <= 1:
        return _wrong("4.2", "a share lies between 0 and 1.", hint)
    return _wrong("4.2", f"{x:.4g} is not that share.", hint)


# ---------------------------------------------------------------------------------------------
# Chapter 5: image-conditioned transport
# ---------------------------------------------------------------------------------------------


@exercise("5.1", "notebooks/05_image_transport.ipynb", "Noise a reference by hand")
def check_noised_latents(traj, step: int, answer) -> bool:
    """The noising trajectory at `step`: (1 - sigma_step) * clean + sigma_step * eps, with the
    trajectory's clean latents (``traj.clean``), its eps (``traj.noise``) and schedule (``traj.sigmas``)."""
    clean, eps, sigmas = _array(traj.clean), _array(traj.noise), _array(traj.sigmas)
    sigma = float(sigmas[step])
    expected = (1 - sigma) * clean + sigma * eps
    hint = (f"sigma = traj.sigmas[{step}] (step 0 is pure noise, sigma = 1); x = (1 - sigma) * traj.clean + "
            "sigma * traj.noise, for every reference at once.")
    if answer is None:
        return _not_answered("5.1", hint)
    x = _array(answer)
    if x is None:
        return _wrong("5.1", "the answer should be a tensor or array of latents.", hint)
    if x.shape != expected.shape:
        return _wrong("5.1", f"the answer has shape {x.shape}; the latents are {expected.shape}.",
                      "noise every reference: traj.clean and traj.noise, whole.")
    if _matches(x, expected):
        return _right("5.1", f"At step {step} (sigma = {sigma:.3f}) the latents are {1 - sigma:.0%} reference and "
                             f"{sigma:.0%} noise.")
    if _matches(x, sigma * clean + (1 - sigma) * eps):
        return _wrong("5.1", "clean latents and noise are swapped.", "sigma weighs the noise: sigma = 1 is pure noise.")
    for off in (step - 1, step + 1):
        if 0 <= off < len(sigmas) and _matches(x, (1 - sigmas[off]) * clean + sigmas[off] * eps):
            return _wrong("5.1", f"that is step {off}'s noise level.", f"use traj.sigmas[{step}].")
    return _wrong("5.1", "these are not the noised latents.", hint)


@exercise("5.2", "notebooks/05_image_transport.ipynb", "The reconstruction error by hand")
def check_reconstruction_error(images, references, answer) -> bool:
    """Mean |image - reference| over pixels, colour channels and references (images in [0, 1])."""
    imgs, refs = _array(images), _array(references)
    d = imgs - refs
    expected = float(np.abs(d).mean())
    hint = "np.abs(images - references).mean(): the absolute difference, averaged over everything."
    if answer is None:
        return _not_answered("5.2", hint)
    x = _number(answer)
    if x is None:
        return _wrong("5.2", "the answer should be one number (a mean over all references).", hint)
    if _close(x, expected, abs_=1e-9):
        return _right("5.2", f"Mean |error| {expected:.4f} over {len(imgs)} references, "
                             f"{expected * 255:.1f} of 255 grey levels per pixel and channel.")
    if _close(x, float(d.mean()), abs_=1e-12):
        return _wrong("5.2", "that is the signed mean: errors of opposite sign cancel.", "take the absolute value first.")
    if _close(x, float((d ** 2).mean()), abs_=1e-12):
        return _wrong("5.2", "that is the mean squared error.", "the absolute difference, not its square.")
    if _close(x, float(np.abs(d).max())):
        return _wrong("5.2", "that is the largest error.", "average, not maximum.")
    if _close(x, 255 * expected):
        return _wrong("5.2", "that is in grey levels (0-255).", "the images are in [0, 1]: do not scale.")
    return _wrong("5.2", f"{x:.4g} is not the mean |error|.", hint)


# ---------------------------------------------------------------------------------------------
# Chapter 6: attention sinks
# ---------------------------------------------------------------------------------------------


@exercise("6.1", "notebooks/06_attention_sinks.ipynb", "Find the sinks")
def check_top1_sinks(cap, layer: str, step: int, answer) -> bool:
    """Per head, the key with the largest incoming mass at (layer, step): a list, one key index per head."""
    mass = np.asarray(cap.mass(layer, step), dtype=np.float64)  # (heads, keys)
    expected = mass.argmax(-1).tolist()
    hint = f"cap.mass({layer!r}, {step}) is (heads, keys): take the argmax over the keys, one per head."
    if answer is None:
        return _not_answered("6.1", hint)
    try:
        given = np.asarray(answer).ravel().tolist()
    except (TypeError, ValueError):
        return _wrong("6.1", "the answer should be a list of key indices.", hint)
    if len(given) != mass.shape[0]:
        return _wrong("6.1", f"{len(given)} keys given; this layer has {mass.shape[0]} heads.", "one key per head.")
    if [int(g) if _number(g) is not None else g for g in given] == expected:
        return _right("6.1", f"Top-1 sinks per head at {layer}, step {step}: {expected}.")
    if given == mass.argmin(-1).tolist():
        return _wrong("6.1", "those are the keys with the least mass.", "the sink is the largest.")
    right = sum(g == e for g, e in zip(given, expected))
    return _wrong("6.1", f"{right} of {len(expected)} heads right.", hint)


@exercise("6.2", "notebooks/06_attention_sinks.ipynb", "The paired ratio by hand")
def check_sink_random_ratio(table: Sequence[dict], k: int, window: str, answer, metric: str = "pixel_mse") -> bool:
    """Mean over units of the sink-k damage / mean over the same units of the random-k damage (random
    key sets averaged per unit first), score path with eta = 0, in `window`."""
    def per_unit(kind):
        acc: dict[tuple, list[float]] = {}
        for r in table:
            if r["kind"] == kind and r["k"] == k and r["op"] == "score eta=0" and r["window"] == window:
                acc.setdefault((r["prompt"], r["seed"]), []).append(r[metric])
        return {u: float(np.mean(v)) for u, v in acc.items()}

    sink, rand = per_unit("sink"), per_unit("random")
    units = [u for u in sink if u in rand]
    if not units:
        print(f"ℹ️ Exercise 6.2: the table has no sink-{k} and random-{k} rows in window {window!r}.")
        return False
    a, b = np.array([sink[u] for u in units]), np.array([rand[u] for u in units])
    expected = float(a.mean() / b.mean())
    hint = (f"rows = pd.DataFrame(result.table); keep op == 'score eta=0', k == {k}, window == {window!r}; average "
            f"{metric} per (prompt, seed) for kind 'sink' and for kind 'random' (its seeds together), then divide the "
            "two means over units.")
    if answer is None:
        return _not_answered("6.2", hint)
    x = _number(answer)
    if x is None:
        return _wrong("6.2", "the answer should be one number (a ratio).", hint)
    if _close(x, expected):
        return _right("6.2", f"Sink-{k} damage is {expected:.2f}x random-{k} damage on the same {len(units)} units.")
    if _close(x, 1 / expected):
        return _wrong("6.2", "that is random / sink.", "sink damage on top.")
    if len(units) > 1 and _close(x, float(np.mean(a / b))):
        return _wrong("6.2", "that is the mean of per-unit ratios.", "a ratio of means: average each side first, then divide.")
    bottom = per_unit("bottom")
    if bottom and all(u in bottom for u in units) and _close(x, float(a.mean() / np.mean([bottom[u] for u in units]))):
        return _wrong("6.2", "that divides by the bottom keys' damage.", "the control here is the random keys.")
    return _wrong("6.2", f"{x:.4g} is not the sink / random ratio.", hint)


@exercise("6.3", "notebooks/06_attention_sinks.ipynb", "The eta dial by hand")
def check_eta_scaling(fn) -> bool:
    """`fn(probs, keys, eta)`: probability rows (..., keys) under the score path's default dose (the
    paper's, `attention.KeyIntervention` dose "redistribute"): each listed key keeps exactly eta * p,
    every other key is multiplied by one factor so that the row still sums to 1, i.e. the others
    absorb the removed (1 - eta) * P_listed in proportion to their probabilities (eta = 0 is the
    −10⁴ logit bias, eta = 1 changes nothing). The old rule -- multiply by eta, then renormalise the
    row -- is refused with its own hint."""
    hint = ("q = probs.copy(); others = np.ones(probs.shape[-1], bool); others[keys] = False; "
            "removed = (1 - eta) * probs[..., keys].sum(-1, keepdims=True); "
            "q[..., others] *= 1 + removed / probs[..., others].sum(-1, keepdims=True); q[..., keys] *= eta; return q.")
    if fn is None or not callable(fn):
        return _not_answered("6.3", "define scale_keys(probs, keys, eta) and pass it. " + hint)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 9)) * 2
    logits[..., 1] += 2  # key 1 is a sink: the listed keys hold much of each row, where the two rules differ most
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    keys = [1, 4]
    others = np.ones(probs.shape[-1], bool)
    others[keys] = False
    for eta in (0.0, 0.25, 0.5, 1.0):
        try:
            out = fn(probs.copy(), list(keys), eta)
        except Exception as e:  # the learner's code: report, do not raise
            return _wrong("6.3", f"your function raised {type(e).__name__}: {e}", hint)
        if out is None:
            return _not_answered("6.3", "your function returns None. " + hint)
        out = np.asarray(out, dtype=np.float64)
        if out.shape != probs.shape:
            return _wrong("6.3", f"it returned shape {out.shape} for probabilities of shape {probs.shape}.", hint)
        expected = probs.copy()
        removed = (1 - eta) * probs[..., keys].sum(-1, keepdims=True)
        expected[..., others] *= 1 + removed / probs[..., others].sum(-1, keepdims=True)
        expected[..., keys] *= eta
        if eta == 0:  # the paper's form: a -1e4 bias on the keys' logits, then softmax
            biased = logits.copy()
            biased[..., keys] -= 1e4
            expected = np.exp(biased - biased.max(-1, keepdims=True))
            expected /= expected.sum(-1, keepdims=True)
        if not np.allclose(out, expected, atol=1e-8):
            if not np.allclose(out.sum(-1), 1, atol=1e-6):
                return _wrong("6.3", f"at eta = {eta:g} the rows do not sum to 1.",
                              "the other keys absorb what the listed keys lose. " + hint)
            if np.allclose(out, probs, atol=1e-8):
                return _wrong("6.3", f"at eta = {eta:g} nothing changed.", "the listed keys keep eta times their probability.")
            w = np.ones(probs.shape[-1])
            w[keys] = eta
            if np.allclose(out, probs * w / (probs * w).sum(-1, keepdims=True), atol=1e-8):
                return _wrong("6.3", f"at eta = {eta:g} this is the old rule: multiply by eta, then renormalise the row, "
                              "which leaves a listed key eta * p / (1 - P + eta * P), more than eta * p.",
                              "keep the listed keys at exactly eta * p and multiply only the others, by one factor: "
                              "1 + (1 - eta) * P / (the others' own sum), P the listed keys' total.")
            return _wrong("6.3", f"at eta = {eta:g} the probabilities are not right.", hint)
    return _right("6.3", "the listed keys keep eta * p, the others absorb the rest in proportion, eta = 0 equals the "
                  "paper's -1e4 logit bias and eta = 1 changes nothing.")
