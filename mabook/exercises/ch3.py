"""Chapter 3's exercises (spatial organisation): a K-means subject mask, scored against the truth."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from sklearn.cluster import KMeans

from mabook import world
from mabook.exercises.answers import close, number_answer
from mabook.exercises.registry import Verdict, cannot_check, chapter, not_answered, right, wrong

exercise = chapter("notebooks/03_spatial_organization.ipynb")


def _inertia(x: np.ndarray, labels: np.ndarray) -> float:
    return float(sum(((x[labels == c] - x[labels == c].mean(0)) ** 2).sum() for c in np.unique(labels)))


@exercise("3.1", "A K-means mask by hand")
def check_kmeans_mask(cap, tap: str, step: int, channels: Sequence[int], unit: int, answer) -> Verdict:
    """A (h, w) bool token mask: the smaller cluster of a 2-means clustering of unit `unit`'s tokens
    at (tap, step) on `channels`. Any 2-means optimum is accepted (its within-cluster sum of
    squares within 1 % of the best of ten K-means starts)."""
    x = np.asarray(cap.features(tap, step, channels)[unit], dtype=np.float64)
    best = KMeans(2, n_init=10, random_state=0).fit(x)
    hint = ("x = cap.features(tap, step, channels)[unit] is (tokens, channels); KMeans(n_clusters=2, n_init=10)"
            ".fit(x).labels_ gives a label per token; the subject is the smaller cluster; reshape to cap.grid.")
    if answer is None:
        return not_answered(hint)
    try:
        mask = np.asarray(answer)
    except (TypeError, ValueError):
        return wrong("the answer should be a boolean array.", hint)
    if mask.shape != tuple(cap.grid):
        return wrong(f"the mask has shape {mask.shape}, the token grid is {tuple(cap.grid)}.",
                     "reshape the per-token labels to cap.grid (tokens are in row-major order).")
    m = mask.astype(bool).ravel()
    if m.all() or not m.any():
        return wrong("one side of the split is empty.", hint)
    within = _inertia(x, m.astype(int))
    if within > best.inertia_ * 1.01 + 1e-9:
        return wrong(f"this split has a within-cluster sum of squares of {within:.4g}; 2-means reaches "
                     f"{best.inertia_:.4g}.", hint)
    if m.sum() > len(m) / 2:
        return wrong("that is the larger cluster.", "the subject is the smaller one: invert the mask.")
    return right(f"{int(m.sum())} of {len(m)} tokens in the subject cluster.")


@exercise("3.2", "Score a mask against the truth")
def check_token_iou(caption: str, grid: Sequence[int], mask, answer) -> Verdict:
    """Token IoU of a (h, w) bool `mask` with the caption's rendered foreground, downsampled to the
    token grid by majority (a token is on the object when at least half of its patch is)."""
    try:
        scene = world.parse_caption(caption)
    except ValueError:
        return cannot_check("this check needs a shapes-world caption (MODEL = 'organism'): there is no ground truth here.")
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
    x = number_answer(answer, "the answer should be one number between 0 and 1.", hint)
    if isinstance(x, Verdict):
        return x
    if close(x, expected, abs_=1e-9):
        return right(f"Token IoU {expected:.2f} ({int((m & truth).sum())} tokens shared, {int((m | truth).sum())} in the union).")
    if close(x, iou(~m, truth), abs_=1e-9):
        return wrong("that scores the other cluster (the background).", "use the mask as given.")
    if close(x, iou(m, fg.reshape(h, H // h, w, W // w).any((1, 3))), abs_=1e-9):
        return wrong("that downsamples with 'any pixel'.", "majority: a token is on the object when >= half its patch is.")
    return wrong(f"{x:.4g} is not the token IoU of this mask.", hint)
