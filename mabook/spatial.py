"""Spatial organisation: do the massive channels outline the subject? (chapter 3).

The paper's second claim (arXiv 2605.13974): restrict the image tokens to the massive channels,
cluster them (K-means, K = 2) and the clusters outline the subject. On the organism the true masks
are known, so this module measures it:

1. `capture(adapter, prompts, ...)` generates every (prompt, seed) unit once under the probe and
   keeps the conditional samples' image-stream hidden states at the chosen (tap, step) pairs, the
   images and the statistics that rank the channels;
2. `channel_sets(stats, k, ...)` builds the sets to cluster on: top-k massive, bottom-k (by |mean|
   and by RMS), seeded random-k, and all channels;
3. `kmeans` / `threshold` turn one image's token features (image_tokens, channels in the set) into
   a label per token, laid out on the adapter's token grid (`adapter.grid()`) and upsampled to
   pixels by the patch size (`images.upsample`);
4. `truth` gives the ground-truth segments [background, object 1, (object 2)] of a shapes-world
   caption -- the caption's rendering, or the judge's mask of the generated image -- and `score`
   matches clusters to segments (Hungarian assignment on IoU, the extra clusters by majority) and
   returns the foreground IoU and each object's IoU at token and pixel level;
5. `measure` runs 3-4 over units x channel sets x taps x steps into one tidy table, `summary`
   gives means with bootstrap 95 % CIs over generations, `layer_step_map` the layer x step view;
   `foreground_tokens` / `foreground_maps` give the masks themselves (also `transport.kmeans_mask`'s).

What the same token features encode -- linear probes and a UMAP view -- is `mabook.linear_probes`.

Cluster-to-object matching uses the ground truth, so an IoU here is the best any labelling of the
clusters can do: `measure` reports a "chance" row (the same clusters with token positions
shuffled) to say how much of it is free.

What this is not: a segmentation method. It measures whether a channel set carries the layout; on
real models (no ground truth) it gives masks and embeddings only.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from mabook import discovery, disruption, judge, probe, world
from mabook import progress as progress_
from mabook.images import upsample
from mabook.models import Adapter, generators
from mabook.statistics import Statistics
from mabook.stats import bootstrap_ci

KINDS = ("top", "bottom_abs_mean", "bottom_rms", "random", "all")
SOURCES = ("rendered", "judged")  # ground truth: the caption's rendering, or the judge's mask of the generated image
THRESHOLDS = ("otsu", "median")
METRICS = ("token_iou", "pixel_iou", "object_iou")


# ---------------------------------------------------------------------------------------------
# 1. Capture: hidden states of every unit at the chosen (tap, step) pairs
# ---------------------------------------------------------------------------------------------


@dataclass
class Capture:
    """Conditional image-stream hidden states of every unit at the captured (tap, step) pairs.

    hidden[(tap name, step)]: (units, image_tokens, channels) float32, tokens in row-major grid
    order (token i sits at row i // w, column i % w of `grid`).
    """

    units: list[tuple[str, int]]  # (prompt, seed)
    images: np.ndarray  # (units, H, W, 3) float in [0, 1]
    hidden: dict[tuple[str, int], np.ndarray]
    stats: Statistics  # conditional samples, every image tap and step, pooled over units: ranks the channels
    grid: tuple[int, int]  # (h, w) image tokens
    num_inference_steps: int
    adapter: Adapter | None = field(default=None, repr=False)

    @property
    def taps(self) -> list[str]:
        """Captured taps, in forward order."""
        order = [str(t) for t in self.stats.layers("img")]
        names = {t for t, _ in self.hidden}
        return [t for t in order if t in names] + sorted(names - set(order))

    @property
    def steps(self) -> list[int]:
        return sorted({s for _, s in self.hidden})

    @property
    def prompts(self) -> list[str]:
        return [p for p, _ in self.units]

    @property
    def patch(self) -> tuple[int, int]:
        """Pixels per token (rows, columns): 4 x 4 for the organism."""
        (H, W), (h, w) = self.images.shape[1:3], self.grid
        return H // h, W // w

    def features(self, tap: str, step: int, channels: Sequence[int] | None = None) -> np.ndarray:
        """(units, image_tokens, len(channels)) hidden states at (tap, step); channels None: all."""
        key = (str(tap), step)
        if key not in self.hidden:
            known_taps = [str(t) for t in self.stats.taps] or self.taps
            if str(tap) not in known_taps:
                raise ValueError(f"unknown tap {str(tap)!r}; captured: {self.taps}")
            if self.stats.steps and step not in self.stats.steps:
                raise ValueError(f"step {step!r} never ran; the steps that ran were {self.stats.steps[0]}..{self.stats.steps[-1]}")
            raise ValueError(f"capture missing: ({str(tap)!r}, {step!r}) was not captured; captured taps {self.taps} "
                             f"at steps {self.steps} (pass it to spatial.capture(taps=..., steps=...))")
        x = self.hidden[key]
        if channels is None:
            return x
        channels = check_channels(channels, x.shape[-1])
        return x[..., channels]


def check_channels(channels, width: int) -> list[int]:
    """A non-empty list of distinct channel indices in [0, width)."""
    channels = [channels] if isinstance(channels, (int, np.integer)) else list(channels)
    if not channels:
        raise ValueError(f"the channel set is empty; allowed: 1 to {width} distinct channels in [0, {width})")
    for c in channels:
        if not isinstance(c, (int, np.integer)) or isinstance(c, bool) or not 0 <= c < width:
            raise ValueError(f"channel {c!r} is out of range; allowed: ints in [0, {width})")
    if len(set(channels)) != len(channels):
        raise ValueError(f"the channel set {channels} repeats a channel")
    return [int(c) for c in channels]


def _check_image_taps(adapter: Adapter, taps) -> list[str]:
    out = []
    for tap in taps:
        resolved = probe.resolve(adapter, tap)  # unknown tap -> ValueError listing the model's taps
        if resolved.stream != "img":
            raise ValueError(f"tap {str(resolved)!r} is on the {resolved.stream!r} stream; spatial maps need an image tap "
                             f"(stream 'img'), e.g. {str(probe.taps(adapter, ['img'])[0])!r}")
        out.append(str(resolved))
    return out


def image_tap(adapter: Adapter, tap: str | None = None) -> str:
    """The name of an image-stream tap, checked (default: the middle image layer)."""
    if tap is None:
        image_taps = probe.taps(adapter, ["img"])
        return str(image_taps[len(image_taps) // 2])
    return _check_image_taps(adapter, [tap])[0]


def _check_steps(steps) -> list[int]:
    checked = probe.check_steps(steps)
    if not checked:
        raise ValueError("steps must be a non-empty list of non-negative ints (or None for all)")
    return sorted(checked)


def capture(adapter: Adapter, prompts: Sequence[str], seeds: Sequence[int] = (0,), num_inference_steps: int = 20,
            taps: Sequence[str] | None = None, steps: Sequence[int] | None = None, batch_size: int = 16,
            **pipe_kwargs) -> Capture:
    """Generate every (prompt, seed) unit once and keep the hidden states at taps x steps.

    taps: image-stream taps (default: all); steps: denoising steps (default: all). Statistics are
    collected at every image tap and step either way (they rank the channels). pipe_kwargs go to
    the pipeline (height, width, guidance_scale, ...).
    """
    units = disruption.check_generation(adapter, prompts, seeds, num_inference_steps, batch_size, "spatial.capture")
    image_taps = [str(t) for t in probe.taps(adapter, ["img"])]
    taps = image_taps if taps is None else _check_image_taps(adapter, [taps] if isinstance(taps, str) else taps)
    steps = list(range(num_inference_steps)) if steps is None else _check_steps(steps)
    grid = adapter.grid(pipe_kwargs.get("height"), pipe_kwargs.get("width"))
    # 1. generate batch by batch: a probe keeps only its last generation's captures, so one probe per batch
    runs, images, hidden = [], [], {(t, s): [] for t in taps for s in steps}
    with progress_.estimate("spatial capture", len(units), num_inference_steps):
        for start in progress_.bar(range(0, len(units), batch_size), "capture", unit="batch"):
            chunk = units[start:start + batch_size]
            with probe.collect(adapter, taps=image_taps, cfg="cond", capture=list(hidden)) as run, \
                    progress_.timed_step(adapter.transformer, len(chunk)):
                out = adapter.pipe([p for p, _ in chunk], num_inference_steps=num_inference_steps, generator=generators(chunk),
                                   output_type="np", **adapter.call_kwargs(pipe_kwargs)).images
            images.append(out.cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out))
            for key in hidden:
                hidden[key].append(run.captured[key].float().cpu().numpy())
            runs.append(run.stats)
    # 2. check the token grid against what the model produced
    hidden = {key: np.concatenate(parts) for key, parts in hidden.items()}
    tokens = next(iter(hidden.values())).shape[1]
    if tokens != grid[0] * grid[1]:
        raise ValueError(f"{tokens} image tokens do not fill the adapter's {grid[0]}x{grid[1]} grid; pass the "
                         "height and width the pipeline generated at")
    return Capture(units, np.concatenate(images).astype(np.float32), hidden, Statistics.merge(runs), grid,
                   num_inference_steps, adapter)


# ---------------------------------------------------------------------------------------------
# 2. Channel sets
# ---------------------------------------------------------------------------------------------


def channel_sets(stats: Statistics, k: int, kinds: Sequence[str] = KINDS, n_random: int = 3,
                 seed: int = 0) -> dict[str, dict]:
    """{set name: {"kind", "k", "seed", "channels": {tap name: [channels]}}} per image layer.

    top-k by |mean over image tokens| (pooled over steps, as chapter 2), the bottom-k controls, and
    n_random seeded random-k sets (excluding the top-k) that share the name "random-k"'s prefix:
    "random-4#0", "random-4#1", ...; "all" is every channel.
    """
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"unknown channel set kind {kind!r}; allowed: {list(KINDS)}")
    layers = stats.layers("img")
    if not layers:
        raise ValueError("the statistics hold no image-stream tap")
    width = len(stats.get("abs_mean", layers[0]))
    discovery.check_k(k, width)
    if "random" in kinds and (not isinstance(n_random, int) or n_random < 1):
        raise ValueError(f"n_random must be an int >= 1, got {n_random!r}")
    out = {}
    for kind in kinds:
        if kind == "all":
            out["all"] = {"kind": "all", "k": width, "seed": None, "channels": {str(t): list(range(width)) for t in layers}}
        elif kind == "random":
            for i in range(n_random):
                out[f"random-{k}#{seed + i}"] = {"kind": kind, "k": k, "seed": seed + i,
                                                 "channels": disruption.channel_set(stats, k, "random", seed=seed + i)}
        else:
            out[f"{kind}-{k}"] = {"kind": kind, "k": k, "seed": None, "channels": disruption.channel_set(stats, k, kind)}
    return out


def set_label(name: str) -> str:
    """The name a set is summarised under: random sets pooled ("random-4#2" -> "random-4")."""
    return name.split("#")[0]


# ---------------------------------------------------------------------------------------------
# 3. Labels per token: K-means, or a threshold on one channel
# ---------------------------------------------------------------------------------------------


def check_clusters(n_clusters, n_tokens: int) -> int:
    if not isinstance(n_clusters, (int, np.integer)) or isinstance(n_clusters, bool):
        raise ValueError(f"K (n_clusters) must be an int, got {n_clusters!r}")
    if not 2 <= n_clusters < n_tokens:
        raise ValueError(f"K={n_clusters} is out of range; allowed: 2 <= K < {n_tokens} (the number of image tokens)")
    return int(n_clusters)


def kmeans(features: np.ndarray, n_clusters: int = 2, seed: int = 0, n_init: int = 1) -> np.ndarray:
    """(image_tokens, channels) -> (image_tokens,) int cluster labels (scikit-learn KMeans, seeded;
    n_init=1 is scikit-learn's own default for k-means++ starts, and keeps a sweep of thousands of
    clusterings inside the chapter's CPU budget).

    Raw activations, not standardised: the paper clusters the values themselves, so a channel
    counts in proportion to its magnitude (which is what makes all channels behave like the
    massive ones; see the chapter)."""
    from sklearn.cluster import KMeans  # deferred: scikit-learn adds 1-4 s to importing this module; only K-means needs it

    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(f"features must be (image_tokens, channels), got shape {features.shape}")
    if features.shape[1] == 0:
        raise ValueError("the channel set is empty; allowed: 1 or more channels")
    n_clusters = check_clusters(n_clusters, features.shape[0])
    with warnings.catch_warnings():  # fewer distinct points than K (a constant map): KMeans warns, labels stay valid
        warnings.simplefilter("ignore")
        return KMeans(n_clusters, n_init=n_init, random_state=seed).fit(features).labels_.astype(int)


def otsu(values: np.ndarray) -> float:
    """Otsu's threshold of 1-D values: the split maximising between-class variance (= the global
    optimum of 1-D 2-means). Constant values: that value."""
    v = np.sort(np.asarray(values, dtype=np.float64).ravel())
    n = len(v)
    if n < 2 or v[0] == v[-1]:
        return float(v[0])
    csum = np.cumsum(v)
    i = np.arange(1, n)  # split before index i
    mu0, mu1 = csum[:-1] / i, (csum[-1] - csum[:-1]) / (n - i)
    between = (i / n) * (1 - i / n) * (mu0 - mu1) ** 2
    between[v[1:] == v[:-1]] = -1  # a split between equal values is not a threshold
    best = int(np.argmax(between))
    return float((v[best] + v[best + 1]) / 2)


def threshold(values: np.ndarray, rule: str = "otsu") -> np.ndarray:
    """(image_tokens,) one channel's map -> 0/1 labels (above the threshold: 1). No clustering."""
    if rule not in THRESHOLDS:
        raise ValueError(f"unknown threshold rule {rule!r}; allowed: {list(THRESHOLDS)}")
    values = np.asarray(values, dtype=np.float64).ravel()
    t = otsu(values) if rule == "otsu" else float(np.median(values))
    return (values > t).astype(int)


def label_map(labels: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(image_tokens,) -> (h, w): tokens are in row-major grid order."""
    labels = np.asarray(labels)
    h, w = grid
    if labels.size != h * w:
        raise ValueError(f"{labels.size} labels do not fill a {h}x{w} token grid")
    return labels.reshape(h, w)


def downsample(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(H, W) bool pixel mask -> (h, w) bool token mask by majority: a token is on the mask when at
    least half of its patch is."""
    mask = np.asarray(mask, dtype=bool)
    (H, W), (h, w) = mask.shape, grid
    if H % h or W % w:
        raise ValueError(f"a {H}x{W} mask does not split into {h}x{w} equal patches")
    patches = mask.reshape(h, H // h, w, W // w).mean((1, 3))
    return patches >= 0.5


# ---------------------------------------------------------------------------------------------
# 4. Ground truth and scoring
# ---------------------------------------------------------------------------------------------


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks; two empty masks agree perfectly (1.0)."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


@dataclass
class Truth:
    """Ground-truth segments of one image: [background, object 1, (object 2)] as bool masks."""

    pixels: np.ndarray  # (segments, H, W)
    tokens: np.ndarray  # (segments, h, w), by majority over each patch; background = no object token

    @property
    def n_objects(self) -> int:
        return len(self.pixels) - 1


def truth(caption: str, grid: tuple[int, int], image: np.ndarray | None = None, source: str = "rendered") -> Truth:
    """Segments of a shapes-world caption: "rendered" (the caption drawn by the world: one mask per
    object) or "judged" (the judge's foreground mask of the generated `image`: one segment)."""
    if source not in SOURCES:
        raise ValueError(f"unknown ground-truth source {source!r}; allowed: {list(SOURCES)}")
    try:
        scene = world.parse_caption(caption)
    except ValueError:
        raise ValueError(f"ground truth needs a shapes-world caption, got {caption!r}; on other prompts use the masks "
                         "without IoU (spatial.foreground_maps)") from None
    if source == "rendered":
        objects = world.render(scene).masks
    else:
        if image is None:
            raise ValueError("source 'judged' needs the generated image")
        objects = judge.judge(image, caption).foreground[None]
    object_tokens = np.stack([downsample(m, grid) for m in objects])
    pixels = np.concatenate([~objects.any(0)[None], objects])
    tokens = np.concatenate([~object_tokens.any(0)[None], object_tokens])
    return Truth(pixels, tokens)


def assign(labels: np.ndarray, segments: np.ndarray) -> np.ndarray:
    """Which segment each cluster stands for: (clusters,) segment index, -1 for an empty cluster.

    labels: (tokens,) ints in [0, K); segments: (S, tokens) bool. One cluster per segment by the
    Hungarian assignment maximising the summed IoU (scipy linear_sum_assignment); clusters left
    over (K > S) join the segment they overlap most.
    """
    labels = np.asarray(labels).ravel()
    segments = np.asarray(segments, dtype=bool).reshape(len(segments), -1)
    K = int(labels.max()) + 1
    clusters = labels[None, :] == np.arange(K)[:, None]  # (K, tokens)
    inter = (clusters[:, None] & segments[None]).sum(-1)
    union = (clusters[:, None] | segments[None]).sum(-1)
    scores = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    out = np.full(K, -1)
    rows, cols = linear_sum_assignment(-scores)
    out[rows] = cols
    for c in np.flatnonzero(out < 0):
        out[c] = int(np.argmax(inter[c]))
    out[~clusters.any(1)] = -1
    return out


def score(labels: np.ndarray, grid: tuple[int, int], t: Truth) -> dict:
    """IoU of a token labelling with the truth, clusters matched to segments by `assign` at token
    level (the same matching is used for pixels): foreground and per-object, token and pixel."""
    tokens = label_map(labels, grid).ravel()
    mapping = assign(tokens, t.tokens.reshape(len(t.tokens), -1))
    segment_of_token = label_map(mapping[tokens], grid)  # (h, w) segment index per token
    segment_of_pixel = upsample(segment_of_token, t.pixels.shape[1:])
    objects = range(1, len(t.tokens))
    return {
        "token_iou": iou(segment_of_token >= 1, ~t.tokens[0]),
        "pixel_iou": iou(segment_of_pixel >= 1, ~t.pixels[0]),
        "object_ious": [iou(segment_of_token == j, t.tokens[j]) for j in objects],
        "assignment": mapping.tolist(),
    }


# ---------------------------------------------------------------------------------------------
# 5. The table: units x channel sets x taps x steps
# ---------------------------------------------------------------------------------------------


def truths(cap: Capture, sources: Sequence[str] = SOURCES) -> dict[str, list[Truth]]:
    """{source: one Truth per unit}."""
    return {s: [truth(p, cap.grid, cap.images[i], s) for i, (p, _) in enumerate(cap.units)] for s in sources}


def measure(cap: Capture, sets: dict[str, dict], taps: Sequence[str] | None = None, steps: Sequence[int] | None = None,
            n_clusters: Sequence[int] | int = (2,), sources: Sequence[str] = SOURCES, thresholds: Sequence[str] = THRESHOLDS,
            chance: bool = True, seed: int = 0, n_init: int = 1) -> list[dict]:
    """One row per (unit, tap, step, set, K, ground-truth source): token, pixel and object IoU.

    Besides the K-means rows of every set in `sets`: "threshold-<rule>" rows (no clustering: the
    top-1 channel's map cut by `threshold`) and, with chance=True, a "chance" row per K: the first
    set's K-means labels with the tokens shuffled (same cluster sizes, no layout), seeded.
    """
    if not sets:
        raise ValueError("sets must be a non-empty dict of channel sets (spatial.channel_sets)")
    taps = cap.taps if taps is None else [str(t) for t in ([taps] if isinstance(taps, str) else taps)]
    steps = cap.steps if steps is None else ([steps] if isinstance(steps, (int, np.integer)) else list(steps))
    ks = [n_clusters] if isinstance(n_clusters, (int, np.integer)) else list(n_clusters)
    n_tokens = cap.grid[0] * cap.grid[1]
    ks = [check_clusters(k, n_tokens) for k in ks]
    for s in sources:
        if s not in SOURCES:
            raise ValueError(f"unknown ground-truth source {s!r}; allowed: {list(SOURCES)}")
    for r in thresholds:
        if r not in THRESHOLDS:
            raise ValueError(f"unknown threshold rule {r!r}; allowed: {list(THRESHOLDS)}")
    gt = truths(cap, sources)
    top1 = channel_sets(cap.stats, 1, ["top"])["top-1"]["channels"] if thresholds else None
    rng = np.random.default_rng(seed)
    layer_index = {t: i for i, t in enumerate(str(t) for t in cap.stats.layers("img"))}
    rows = []
    for tap, step in progress_.bar([(t, s) for t in taps for s in steps], "K-means, layer x step"):
        x = cap.features(tap, step)  # (units, tokens, C); raises for a tap or step not captured
        for u, (prompt, unit_seed) in enumerate(cap.units):
            base = {"prompt": prompt, "seed": unit_seed, "n_objects": len(world.parse_caption(prompt).objects),
                    "tap": tap, "layer": layer_index.get(tap, -1), "step": step}
            labelings = []  # (set, kind, channels, K, method, labels)
            for name, spec in sets.items():
                channels = check_channels(spec["channels"][tap], x.shape[-1])
                for K in ks:
                    labels = kmeans(x[u][:, channels], K, seed=seed, n_init=n_init)
                    labelings.append((set_label(name), spec["kind"], spec["k"], K, "kmeans", labels))
                    if chance and name == next(iter(sets)):
                        labelings.append(("chance", "chance", spec["k"], K, "chance", rng.permutation(labels)))
            for rule in thresholds:
                labels = threshold(x[u][:, top1[tap][0]], rule)
                labelings.append((f"threshold-{rule}", "threshold", 1, 2, "threshold", labels))
            for name, kind, k, K, method, labels in labelings:
                for source in sources:
                    s = score(labels, cap.grid, gt[source][u])
                    rows.append({**base, "set": name, "kind": kind, "channels": k, "n_clusters": K, "method": method,
                                 "source": source, "token_iou": s["token_iou"], "pixel_iou": s["pixel_iou"],
                                 "object_iou": float(np.mean(s["object_ious"])) if source == "rendered" else float("nan")})
    return rows


def _unit_means(rows: Sequence[dict], metric: str, where: dict) -> dict[tuple, float]:
    """{(prompt, seed): mean of metric over the matching rows of that unit (taps, steps, random sets)}."""
    acc: dict[tuple, list[float]] = {}
    for r in rows:
        if all(r.get(key) == value for key, value in where.items()) and not np.isnan(r[metric]):
            acc.setdefault((r["prompt"], r["seed"]), []).append(r[metric])
    return {u: float(np.mean(v)) for u, v in acc.items()}


def summary(rows: Sequence[dict], by: Sequence[str] = ("set",), metrics: Sequence[str] = METRICS, **where) -> list[dict]:
    """Mean of each metric per group (e.g. per set) with a bootstrap 95 % CI over generations.

    Rows are averaged per (prompt, seed) unit first -- over taps, steps and the random sets -- so
    units stay the independent draws. where: filters, e.g. source="rendered", n_clusters=2."""
    for m in metrics:
        if m not in METRICS:
            raise ValueError(f"unknown metric {m!r}; allowed: {list(METRICS)}")
    if not rows:
        raise ValueError("no rows to summarise")
    for key in (*by, *where):
        if key not in rows[0]:
            raise ValueError(f"unknown column {key!r}; the table has {sorted(rows[0])}")
    groups = []
    for r in rows:
        if all(r.get(key) == value for key, value in where.items()):
            g = tuple(r[key] for key in by)
            if g not in groups:
                groups.append(g)
    out = []
    for g in groups:
        entry = dict(zip(by, g))
        match = {**where, **entry}
        for m in metrics:
            values = list(_unit_means(rows, m, match).values())
            entry[m] = float(np.mean(values)) if values else float("nan")
            entry[f"{m}_ci"] = bootstrap_ci(values) if len(values) > 1 else (float("nan"), float("nan"))
            entry["n_units"] = max(entry.get("n_units", 0), len(values))
        out.append(entry)
    return out


def paired_difference(rows: Sequence[dict], a: dict, b: dict, metric: str = "token_iou") -> dict:
    """Mean over units of metric(a) - metric(b) (rows filtered by the dicts a and b, averaged per
    unit), with a bootstrap 95 % CI over the units both have."""
    va, vb = _unit_means(rows, metric, a), _unit_means(rows, metric, b)
    units = [u for u in va if u in vb]
    if not units:
        raise ValueError(f"no unit has rows for both {a} and {b}")
    d = np.array([va[u] - vb[u] for u in units])
    return {"difference": float(d.mean()), "ci": bootstrap_ci(d) if len(d) > 1 else (float("nan"), float("nan")),
            "n_units": len(units)}


def layer_step_map(rows: Sequence[dict], metric: str = "token_iou", **where) -> tuple[np.ndarray, list[str], list[int]]:
    """(layers, steps) mean of metric over the matching rows, with the layer (tap) and step labels."""
    chosen = [r for r in rows if all(r.get(key) == value for key, value in where.items())]
    if not chosen:
        raise ValueError(f"no rows match {where}")
    taps = sorted({r["tap"] for r in chosen}, key=lambda t: next(r["layer"] for r in chosen if r["tap"] == t))
    steps = sorted({r["step"] for r in chosen})
    acc = np.zeros((len(taps), len(steps)))
    n = np.zeros_like(acc)
    for r in chosen:
        i, j = taps.index(r["tap"]), steps.index(r["step"])
        if not np.isnan(r[metric]):
            acc[i, j] += r[metric]
            n[i, j] += 1
    return np.where(n > 0, acc / np.maximum(n, 1), np.nan), taps, steps


def foreground_tokens(features: np.ndarray, prompts: Sequence[str], grid: tuple[int, int], images: np.ndarray,
                      n_clusters: int = 2, seed: int = 0, source: str | None = "rendered", n_init: int = 1) -> np.ndarray:
    """(units, image_tokens) bool: per unit, the tokens its K-means clusters call foreground.

    features: (units, image_tokens, channels), clustered unit by unit (`kmeans`). With a ground-truth
    source the clusters are matched to the caption's objects as in `score` (images: the generated
    ones, for source "judged"); with source None (real models: no truth) the smallest cluster is
    called foreground -- a display convention, not a measurement (a subject usually covers less of
    the image than its background)."""
    out = []
    for u, prompt in enumerate(prompts):
        labels = kmeans(features[u], n_clusters, seed=seed, n_init=n_init)
        if source is None:
            counts = np.bincount(labels, minlength=n_clusters).astype(float)
            counts[counts == 0] = np.inf  # an empty cluster is not the smallest
            out.append(labels == int(np.argmin(counts)))
        else:
            t = truth(prompt, grid, images[u], source)
            out.append(assign(labels, t.tokens.reshape(len(t.tokens), -1))[labels] >= 1)
    return np.stack(out)


def foreground_maps(cap: Capture, tap: str, step: int, channels: Sequence[int], n_clusters: int = 2, seed: int = 0,
                    source: str | None = "rendered", n_init: int = 1) -> np.ndarray:
    """(units, h, w) bool: the tokens the clusters call foreground, per unit (`foreground_tokens` on
    the captured features at (tap, step), restricted to `channels`)."""
    x = cap.features(tap, step, channels)
    fg = foreground_tokens(x, cap.prompts, cap.grid, cap.images, n_clusters, seed, source, n_init)
    return np.stack([label_map(f, cap.grid) for f in fg])
