"""Chapter 2's exercises (disruption): an edit by hand, the quiet channels, an op of one's own."""

from __future__ import annotations

import numpy as np
import torch

from mabook import probe
from mabook.exercises.answers import abs_mean, bottom, channels_answer, close, number_answer, top
from mabook.exercises.registry import Verdict, chapter, not_answered, right, wrong

exercise = chapter("notebooks/02_disruption.ipynb")


@exercise("2.1", "Zero the massive channel yourself")
def check_zeroed_top1_mse(base, answer) -> Verdict:
    """Pixel MSE between the first unit generated with its top-1 channel (by abs_mean, per image layer,
    from ``base.stats``) zeroed at every image layer and step, and its baseline image."""
    edits = [probe.Edit(tap, [int(np.argmax(abs_mean(base.stats, tap)))], "zero") for tap in base.stats.layers("img")]
    with torch.no_grad(), probe.edit(base.adapter, edits):
        image = base.adapter.generate(base.units[:1], base.num_inference_steps, 1, **base.pipe_kwargs)[0]
    expected = float(((image - base.images[0]) ** 2).mean())
    hint = ("build one probe.Edit(tap, [channel], 'zero') per image layer (disruption.channel_set(base.stats, 1, 'top') "
            "gives {tap: [channel]}), then inside `with probe.edit(adapter, edits):` generate the unit again with "
            "adapter.generate(base.units[:1], base.num_inference_steps, **base.pipe_kwargs) (its own seed's noise), "
            "and average (image - base.images[0]) ** 2.")
    x = number_answer(answer, "the answer should be one number (a mean squared error).", hint)
    if isinstance(x, Verdict):
        return x
    if close(x, expected, rel=0.05, abs_=1e-7):
        return right(f"Zeroing one channel per layer moves the first image's pixels by an MSE of {expected:.4f}.")
    if x == 0:
        return wrong("the image did not change.", "generate inside the `with probe.edit(...)` block.")
    if x < 0:
        return wrong("a mean squared error is never negative.", hint)
    return wrong(f"{x:.4g} is not the MSE of the first unit under the top-1 zeroing.", hint)


@exercise("2.2", "The quiet channels")
def check_bottom_rms(stats, tap, k: int, answer) -> Verdict:
    """The k channels with the smallest RMS over tokens, sqrt(mean² + std²), at `tap`."""
    mean = stats.get("mean", tap).cpu().numpy().astype(np.float64)
    std = stats.get("std", tap).cpu().numpy().astype(np.float64)
    rms = np.sqrt(mean ** 2 + std ** 2)
    expected = bottom(rms, k)
    hint = (f"rms = np.sqrt(stats.get('mean', tap).numpy() ** 2 + stats.get('std', tap).numpy() ** 2); "
            f"np.argsort(rms)[:{k}].")
    given = channels_answer(answer, k, hint)
    if isinstance(given, Verdict):
        return given
    if given == expected:
        return right(f"Bottom-{k} by RMS at {tap}: {sorted(expected)}.")
    if given == bottom(abs_mean(stats, tap), k):
        return wrong("that is the paper's control, the bottom-k by |mean|.",
                     "RMS also counts how much the channel swings from token to token (its std).")
    if given == top(rms, k):
        return wrong("those are the loudest channels.", "take the smallest RMS.")
    return wrong(f"{len(given & expected)} of your {k} channels are in the bottom-{k} by RMS.", hint)


@exercise("2.3", "Write the token-mean op")
def check_token_mean_op(fn) -> Verdict:
    """`fn(selected)` maps (batch, tokens, channels) to the same shape with every channel replaced by its
    mean over the tokens of its sample (what op="mean" does; usable as ``probe.Edit(tap, ch, op=fn)``)."""
    hint = "selected.mean(dim=1, keepdim=True) averages over the tokens; .expand_as(selected) restores the shape."
    if fn is None or not callable(fn):
        return not_answered("define a function token_mean_op(selected) and pass it. " + hint)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 4, generator=g) * 2 + torch.arange(4.0)
    try:
        out = fn(x.clone())
    except Exception as e:  # the learner's code: report, do not raise
        return wrong(f"your function raised {type(e).__name__}: {e}", hint)
    if out is None:
        return not_answered("your function returns None. " + hint)
    if not isinstance(out, torch.Tensor):
        return wrong(f"it returned a {type(out).__name__}; probe.Edit needs a torch.Tensor.", hint)
    if tuple(out.shape) != tuple(x.shape):
        return wrong(f"it returned shape {tuple(out.shape)} for an input of shape {tuple(x.shape)}.",
                     "keep the shape: keepdim=True and .expand_as(selected).")
    expected = x.mean(1, keepdim=True).expand_as(x)
    if torch.allclose(out, expected, atol=1e-5):
        return right("Every channel keeps its level and loses its spatial pattern.")
    for dim, what in ((0, "the batch (samples)"), (2, "the channels")):
        if torch.allclose(out, x.mean(dim, keepdim=True).expand_as(x), atol=1e-5):
            return wrong(f"that averages over {what}.", "average over dim 1, the tokens.")
    if torch.allclose(out, x, atol=1e-6):
        return wrong("it returns its input unchanged.", hint)
    return wrong("the values are not the per-sample token means.", hint)
