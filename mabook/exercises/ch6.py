"""Chapter 6's exercises (attention sinks): the sinks per head, the paired ratio, the eta dial."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from mabook.exercises.answers import as_number, close, number_answer
from mabook.exercises.registry import Verdict, cannot_check, chapter, not_answered, right, wrong

exercise = chapter("notebooks/06_attention_sinks.ipynb")


@exercise("6.1", "Find the sinks")
def check_top1_sinks(cap, layer: str, step: int, answer) -> Verdict:
    """Per head, the key with the largest incoming mass at (layer, step): a list, one key index per head."""
    mass = np.asarray(cap.mass(layer, step), dtype=np.float64)  # (heads, keys)
    expected = mass.argmax(-1).tolist()
    hint = f"cap.mass({layer!r}, {step}) is (heads, keys): take the argmax over the keys, one per head."
    if answer is None:
        return not_answered(hint)
    try:
        given = np.asarray(answer).ravel().tolist()
    except (TypeError, ValueError):
        return wrong("the answer should be a list of key indices.", hint)
    if len(given) != mass.shape[0]:
        return wrong(f"{len(given)} keys given; this layer has {mass.shape[0]} heads.", "one key per head.")
    if [int(g) if as_number(g) is not None else g for g in given] == expected:
        return right(f"Top-1 sinks per head at {layer}, step {step}: {expected}.")
    if given == mass.argmin(-1).tolist():
        return wrong("those are the keys with the least mass.", "the sink is the largest.")
    n_right = sum(g == e for g, e in zip(given, expected))
    return wrong(f"{n_right} of {len(expected)} heads right.", hint)


@exercise("6.2", "The paired ratio by hand")
def check_sink_random_ratio(table: Sequence[dict], k: int, window: str, answer, metric: str = "pixel_mse") -> Verdict:
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
        return cannot_check(f"the table has no sink-{k} and random-{k} rows in window {window!r}.")
    a, b = np.array([sink[u] for u in units]), np.array([rand[u] for u in units])
    expected = float(a.mean() / b.mean())
    hint = (f"rows = pd.DataFrame(result.table); keep op == 'score eta=0', k == {k}, window == {window!r}; average "
            f"{metric} per (prompt, seed) for kind 'sink' and for kind 'random' (its seeds together), then divide the "
            "two means over units.")
    x = number_answer(answer, "the answer should be one number (a ratio).", hint)
    if isinstance(x, Verdict):
        return x
    if close(x, expected):
        return right(f"Sink-{k} damage is {expected:.2f}x random-{k} damage on the same {len(units)} units.")
    if close(x, 1 / expected):
        return wrong("that is random / sink.", "sink damage on top.")
    if len(units) > 1 and close(x, float(np.mean(a / b))):
        return wrong("that is the mean of per-unit ratios.", "a ratio of means: average each side first, then divide.")
    low = per_unit("bottom")
    if low and all(u in low for u in units) and close(x, float(a.mean() / np.mean([low[u] for u in units]))):
        return wrong("that divides by the bottom keys' damage.", "the control here is the random keys.")
    return wrong(f"{x:.4g} is not the sink / random ratio.", hint)


@exercise("6.3", "The eta dial by hand")
def check_eta_scaling(fn) -> Verdict:
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
        return not_answered("define scale_keys(probs, keys, eta) and pass it. " + hint)
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
            return wrong(f"your function raised {type(e).__name__}: {e}", hint)
        if out is None:
            return not_answered("your function returns None. " + hint)
        out = np.asarray(out, dtype=np.float64)
        if out.shape != probs.shape:
            return wrong(f"it returned shape {out.shape} for probabilities of shape {probs.shape}.", hint)
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
                return wrong(f"at eta = {eta:g} the rows do not sum to 1.",
                             "the other keys absorb what the listed keys lose. " + hint)
            if np.allclose(out, probs, atol=1e-8):
                return wrong(f"at eta = {eta:g} nothing changed.", "the listed keys keep eta times their probability.")
            w = np.ones(probs.shape[-1])
            w[keys] = eta
            if np.allclose(out, probs * w / (probs * w).sum(-1, keepdims=True), atol=1e-8):
                return wrong(f"at eta = {eta:g} this is the old rule: multiply by eta, then renormalise the row, "
                             "which leaves a listed key eta * p / (1 - P + eta * P), more than eta * p.",
                             "keep the listed keys at exactly eta * p and multiply only the others, by one factor: "
                             "1 + (1 - eta) * P / (the others' own sum), P the listed keys' total.")
            return wrong(f"at eta = {eta:g} the probabilities are not right.", hint)
    return right("the listed keys keep eta * p, the others absorb the rest in proportion, eta = 0 equals the "
                 "paper's -1e4 logit bias and eta = 1 changes nothing.")
