"""What the token features encode: linear probes and a UMAP view (chapter 3).

Chapter 3 clusters the image tokens of a `spatial.Capture` on a channel set (`mabook.spatial`);
this module asks what the same features say about the shapes world's scene:

1. `probes` fits linear probes (logistic regression, split by prompt: `split_prompts`) on the token
   features restricted to each channel set: is the token on an object (`token_labels`), and that
   object's colour, shape, size and position -- held-out balanced accuracy per tap, step, set and
   target, with a position-only reference (the token's place on the grid, no hidden state);
2. `embed` is a small UMAP of token features for the chapter's scatter plots.

What this is not: a claim that the channels *use* what a probe reads off them; a probe measures what
is linearly decodable, nothing more.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np

from mabook import world
from mabook.spatial import Capture, check_channels, set_label, truth

TARGETS = ("on_object", "color", "shape", "size", "position")


# ---------------------------------------------------------------------------------------------
# 1. Linear probes
# ---------------------------------------------------------------------------------------------


def token_labels(cap: Capture) -> dict[str, np.ndarray]:
    """Per-token targets, (units, image_tokens) each, from the rendered captions.

    "on_object": 0/1. Attributes ("color", ...): the attribute of the object the token lies on
    (majority of its patch), "" for background tokens -- attribute probes use object tokens only.
    """
    n_tokens = cap.grid[0] * cap.grid[1]
    out = {"on_object": np.zeros((len(cap.units), n_tokens), dtype=object)}
    for a in world.ATTRIBUTES:
        out[a] = np.full((len(cap.units), n_tokens), "", dtype=object)
    for u, (prompt, _) in enumerate(cap.units):
        t = truth(prompt, cap.grid, source="rendered")
        scene = world.parse_caption(prompt)
        out["on_object"][u] = (~t.tokens[0]).ravel().astype(int)
        for j, obj in enumerate(scene.objects):
            on = t.tokens[j + 1].ravel()
            for a in world.ATTRIBUTES:
                out[a][u, on] = getattr(obj, a)
    return out


def split_prompts(prompts: Sequence[str], test_fraction: float = 1 / 3, seed: int = 0) -> tuple[set[str], set[str]]:
    """(train, held-out) prompt sets, seeded: every unit of a prompt falls on one side."""
    distinct = list(dict.fromkeys(prompts))
    if len(distinct) < 2:
        raise ValueError(f"a probe needs at least 2 distinct prompts to hold one out, got {len(distinct)}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    order = np.random.default_rng(seed).permutation(len(distinct))
    n_test = min(max(1, round(test_fraction * len(distinct))), len(distinct) - 1)
    test = {distinct[i] for i in order[:n_test]}
    return set(distinct) - test, test


def linear_probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, seed: int = 0) -> float:
    """Balanced accuracy on the held-out samples of a standardised logistic regression (chance:
    1 / number of classes). NaN when training has a single class."""
    # deferred: scikit-learn adds 1-4 s to importing this module; only the linear probe needs it
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(set(y_train)) < 2 or len(y_test) == 0:
        return float("nan")
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500, random_state=seed))
    with warnings.catch_warnings():  # held-out classes unseen in training, slow convergence on tiny sets
        warnings.simplefilter("ignore")
        model.fit(x_train, y_train)
        return float(balanced_accuracy_score(y_test, model.predict(x_test)))


def probes(cap: Capture, sets: dict[str, dict], taps: Sequence[str] | None = None, steps: Sequence[int] | None = None,
           targets: Sequence[str] = TARGETS, test_fraction: float = 1 / 3, seed: int = 0, position_only: bool = True) -> list[dict]:
    """One row per (tap, step, set, target): held-out balanced accuracy of a linear probe on token
    features restricted to the set. Samples are tokens: all of them for "on_object", the tokens on
    an object (labelled with that object's attribute) for the attributes. Train and test are split
    by prompt (`split_prompts`). position_only adds a reference "token (row, col)" set: the
    token's grid position one-hot, no hidden state -- what where-the-token-is alone predicts."""
    for t in targets:
        if t not in TARGETS:
            raise ValueError(f"unknown probe target {t!r}; allowed: {list(TARGETS)}")
    taps = cap.taps if taps is None else [str(t) for t in ([taps] if isinstance(taps, str) else taps)]
    steps = cap.steps if steps is None else ([steps] if isinstance(steps, (int, np.integer)) else list(steps))
    labels = token_labels(cap)
    train_prompts, _ = split_prompts(cap.prompts, test_fraction, seed)
    is_train = np.array([p in train_prompts for p in cap.prompts])
    n_tokens = cap.grid[0] * cap.grid[1]
    layer_index = {t: i for i, t in enumerate(str(t) for t in cap.stats.layers("img"))}
    rows = []

    def fit(x, target):  # x: (units, tokens, d)
        y = labels[target]
        keep = np.ones_like(y, dtype=bool) if target == "on_object" else (y != "")
        train, test = keep & is_train[:, None], keep & ~is_train[:, None]
        acc = linear_probe(x[train], y[train].astype(str), x[test], y[test].astype(str), seed)
        return acc, int(train.sum()), int(test.sum()), len(set(y[keep]))

    for tap in taps:
        for step in steps:
            x = cap.features(tap, step)
            feature_sets = [(set_label(n), s["kind"], s["k"], x[..., check_channels(s["channels"][tap], x.shape[-1])])
                            for n, s in sets.items()]
            if position_only:
                onehot = np.broadcast_to(np.eye(n_tokens)[None], (len(cap.units), n_tokens, n_tokens))
                feature_sets.append(("token (row, col)", "position_only", n_tokens, onehot))
            for name, kind, k, features in feature_sets:
                for target in targets:
                    acc, n_train, n_test, n_classes = fit(features, target)
                    rows.append({"tap": tap, "layer": layer_index.get(tap, -1), "step": step, "set": name, "kind": kind,
                                 "channels": k, "target": target, "balanced_accuracy": acc, "chance": 1 / max(n_classes, 1),
                                 "n_train": n_train, "n_test": n_test})
    return rows


# ---------------------------------------------------------------------------------------------
# 2. UMAP
# ---------------------------------------------------------------------------------------------


def embed(features: np.ndarray, n_neighbors: int = 10, n_epochs: int = 100, seed: int = 0) -> np.ndarray:
    """(samples, channels) -> (samples, 2) UMAP embedding (umap-learn, seeded; its first call in a
    process compiles numba kernels: ~10 s on a CPU). Raw features, as for K-means."""
    import umap  # deferred: umap-learn (numba) takes 2 s to import, over a minute on a cold cache; only this plot needs it

    features = np.asarray(features, dtype=np.float32)
    if features.ndim != 2 or features.shape[1] == 0:
        raise ValueError(f"features must be (samples, channels >= 1), got shape {features.shape}")
    if not 2 <= n_neighbors < len(features):
        raise ValueError(f"n_neighbors={n_neighbors} is out of range; allowed: 2 <= n_neighbors < {len(features)} (samples)")
    with warnings.catch_warnings():  # "n_jobs overridden by random_state": seeded runs are single-threaded
        warnings.simplefilter("ignore")
        return umap.UMAP(n_neighbors=n_neighbors, n_epochs=n_epochs, random_state=seed, n_components=2).fit_transform(features)
