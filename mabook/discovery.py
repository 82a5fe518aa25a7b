"""Which channels are massive, how massive, and how stable: computed from `mabook.statistics.Statistics`.

At each layer, channels are ranked by a per-channel statistic (by default the paper's
|mean over image tokens|, `abs_mean`). The top-k are the candidate massive channels; every claim
about them is made against two equal-size controls: the bottom-k (lowest statistic) and a seeded
random k. Magnitude is reported two ways: the paper's ratio (top channel's statistic / median
channel's), and Sun et al.'s (2024) LLM criterion (largest |x| > 100 and about 1000x the median
|x|) as a yes/no. Stability is the Jaccard overlap of top-k sets across prompts, seeds, steps or
layers, with a bootstrap confidence interval.

What this is not: a test that the channels matter -- that needs edits (`mabook.probe.edit`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

from mabook import probe
from mabook.models import Adapter
from mabook.probe import Tap
from mabook.statistics import Statistics
from mabook.stats import bootstrap_ci  # noqa: F401  (re-exported: discovery.bootstrap_ci)

# Sun et al. 2024, "Massive Activations in Large Language Models", sec. 2: "activations with
# magnitudes ... at least 100 and ... roughly 1,000 times larger than the median".
SUN_MIN_MAGNITUDE = 100.0
SUN_MIN_RATIO = 1000.0


# ---------------------------------------------------------------------------------------------
# Collecting: generate and keep only the statistics
# ---------------------------------------------------------------------------------------------


def collect_statistics(
    adapter: Adapter,
    prompts: Sequence[str],
    num_inference_steps: int = 20,
    seed: int = 0,
    batch_size: int = 8,
    cfg: str = "cond",
    **pipe_kwargs,
) -> Statistics:
    """Generate `prompts`, each with its own generator seeded `seed` (the (prompt, seed) units of
    `Adapter.generate`: the noise does not depend on the batch), and return the pooled statistics.

    Images are discarded (`Adapter.denoise`: a diffusers pipeline returns latents, skipping the VAE);
    pass pipe_kwargs for anything else the pipeline needs (height, guidance_scale, ...).
    """
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts) or not prompts:
        raise TypeError(f"prompts must be a non-empty list of str, got {prompts!r:.80}")
    empty = [i for i, p in enumerate(prompts) if not p.strip()]
    if empty:
        raise ValueError(f"prompts must be non-empty, but prompt {empty[0]} is {prompts[empty[0]]!r} (an empty prompt "
                         "generates unconditionally)")
    if adapter.pipe is None:
        raise ValueError("collect_statistics needs a pipeline; this adapter wraps a bare transformer")
    for name, value in (("num_inference_steps", num_inference_steps), ("batch_size", batch_size)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    with probe.collect(adapter, cfg=cfg) as run:
        adapter.denoise([(p, seed) for p in prompts], num_inference_steps, batch_size, what="statistics", **pipe_kwargs)
    return run.stats


# ---------------------------------------------------------------------------------------------
# Channel sets: top-k and its two controls
# ---------------------------------------------------------------------------------------------


def check_k(k, num_channels: int) -> int:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool):
        raise TypeError(f"k must be an int, got {type(k).__name__} {k!r}")
    if not 1 <= k <= num_channels:
        raise ValueError(f"k={k} is out of range; allowed: 1 <= k <= {num_channels} (the number of channels)")
    return int(k)


def top_k(values, k: int) -> np.ndarray:
    """Indices of the k largest values along the last axis, largest first. values: (..., channels)."""
    values = np.asarray(values)
    k = check_k(k, values.shape[-1])
    order = np.argsort(-values, axis=-1, kind="stable")  # ties: lower index first, deterministic
    return order[..., :k]


def bottom_k(values, k: int) -> np.ndarray:
    """Indices of the k smallest values along the last axis, smallest first."""
    values = np.asarray(values)
    k = check_k(k, values.shape[-1])
    return np.argsort(values, axis=-1, kind="stable")[..., :k]


def random_k(num_channels: int, k: int, seed: int = 0, exclude: Sequence[int] = ()) -> np.ndarray:
    """k distinct channels drawn uniformly (seeded), avoiding `exclude` (e.g. the top-k)."""
    k = check_k(k, num_channels)
    allowed = np.setdiff1d(np.arange(num_channels), np.asarray(exclude, dtype=int))
    if k > len(allowed):
        raise ValueError(f"k={k} is out of range: only {len(allowed)} channels remain after excluding {len(exclude)}")
    return np.sort(np.random.default_rng(seed).choice(allowed, size=k, replace=False))


# ---------------------------------------------------------------------------------------------
# Per-layer report
# ---------------------------------------------------------------------------------------------


@dataclass
class LayerReport:
    """Massive-channel candidates at one tap. Ratios are dimensionless; values in activation units."""

    tap: str
    top: list[int]  # top-k channels, largest statistic first
    top_values: list[float]
    bottom: list[int]  # control: the k lowest-statistic channels
    random: list[int]  # control: k seeded random channels, disjoint from `top`
    ratio_to_median: float  # statistic of the top channel / median statistic over channels
    max_abs: float  # largest |x| seen at this tap (any channel, token, sample, step pooled)
    median_abs: float  # median over channels of the per-channel median |x| (per sample, averaged: see statistics.Statistics)
    sun_massive: bool  # max_abs > 100 and max_abs / median_abs >= 1000
    norm_share: float = float("nan")  # the top channel's share of the LayerNorm variance (probe's "norm_share")
    norm_share_top_k: float = float("nan")  # the same summed over the top-k channels

    @property
    def sun_ratio(self) -> float:
        return self.max_abs / self.median_abs if self.median_abs > 0 else float("inf")


def massive_channels(
    stats: Statistics,
    k: int,
    stream: str = "img",
    step: int | None = None,
    statistic: str = "abs_mean",
    seed: int = 0,
) -> list[LayerReport]:
    """One LayerReport per layer of `stream`, in forward order.

    step: a denoising step, or None to pool over all steps (the aggregate). statistic: which
    `Statistics` field ranks channels (default the paper's |mean over image tokens|).
    """
    reports = []
    for i, tap in enumerate(stats.layers(stream)):
        values = stats.get(statistic, tap, step).cpu().numpy()
        max_abs = float(stats.get("max_abs", tap, step).max())
        median_abs = float(np.median(stats.get("median_abs", tap, step).cpu().numpy()))
        top = top_k(values, k)
        median = float(np.median(values))
        share = stats.get("norm_share", tap, step).cpu().numpy()
        reports.append(
            LayerReport(
                tap=str(tap),
                top=top.tolist(),
                top_values=values[top].tolist(),
                bottom=bottom_k(values, k).tolist(),
                random=random_k(len(values), k, seed + i, exclude=top).tolist(),
                ratio_to_median=float(values[top[0]] / median) if median > 0 else float("inf"),
                max_abs=max_abs,
                median_abs=median_abs,
                sun_massive=bool(max_abs > SUN_MIN_MAGNITUDE and max_abs >= SUN_MIN_RATIO * median_abs),
                norm_share=float(share[top[0]]),
                norm_share_top_k=float(share[top].sum()),
            )
        )
    if not reports:
        raise ValueError(f"no {stream!r} taps in these statistics; collected: {[str(t) for t in stats.taps]}")
    return reports


def table(reports: Sequence[LayerReport]) -> list[dict]:
    """Reports as rows (for pandas.DataFrame, CSV or JSON)."""
    return [asdict(r) | {"sun_ratio": r.sun_ratio} for r in reports]


def frequency(sets: Sequence[Sequence[int]], num_channels: int) -> np.ndarray:
    """(num_channels,) fraction of the sets that contain each channel (e.g. top-k over layers)."""
    counts = np.zeros(num_channels)
    for s in sets:
        counts[np.unique(np.asarray(s, dtype=int))] += 1
    return counts / max(len(sets), 1)


# ---------------------------------------------------------------------------------------------
# Stability: Jaccard overlap of top-k sets, with a bootstrap CI
# ---------------------------------------------------------------------------------------------


def jaccard(a: Sequence[int], b: Sequence[int]) -> float:
    """|a ∩ b| / |a ∪ b| of two channel sets (1.0 for two empty sets)."""
    a, b = set(map(int, a)), set(map(int, b))
    return len(a & b) / len(a | b) if a | b else 1.0


def jaccard_matrix(sets: Sequence[Sequence[int]]) -> np.ndarray:
    """(n, n) pairwise Jaccard overlaps."""
    n = len(sets)
    m = np.ones((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            m[i, j] = m[j, i] = jaccard(sets[i], sets[j])
    return m


@dataclass
class Stability:
    """Mean pairwise Jaccard of top-k sets with a percentile-bootstrap CI over the items."""

    mean: float
    low: float
    high: float
    matrix: np.ndarray = field(repr=False)  # (n, n) pairwise Jaccard
    labels: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return f"Jaccard {self.mean:.2f} (95% CI {self.low:.2f}-{self.high:.2f}, n={len(self.matrix)})"


def stability(
    sets: Sequence[Sequence[int]],
    labels: Sequence[str] | None = None,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Stability:
    """How much top-k sets agree across items (prompts, seeds, steps or layers).

    The bootstrap resamples items with replacement and averages the Jaccard of pairs of distinct
    items, so the CI reflects which items happened to be drawn (scipy's `bootstrap` needs
    independent observations; pairs of items are not).
    """
    n = len(sets)
    if n < 2:
        raise ValueError(f"stability needs at least 2 sets, got {n}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    m = jaccard_matrix(sets)
    off_diagonal = ~np.eye(n, dtype=bool)
    mean = float(m[off_diagonal].mean())
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_resamples):
        idx = rng.integers(0, n, n)
        distinct = idx[:, None] != idx[None, :]
        if distinct.any():
            draws.append(m[np.ix_(idx, idx)][distinct].mean())
    alpha = (1 - confidence) / 2
    low, high = np.quantile(draws, [alpha, 1 - alpha])
    return Stability(mean, float(low), float(high), m, list(labels) if labels is not None else [str(i) for i in range(n)])


def stability_across_steps(stats: Statistics, tap: Tap | str, k: int, statistic: str = "abs_mean", **kwargs) -> Stability:
    """Top-k at one tap, compared between denoising steps."""
    sets = [top_k(stats.get(statistic, tap, s).cpu().numpy(), k) for s in stats.steps]
    return stability(sets, [f"step {s}" for s in stats.steps], **kwargs)


def stability_across_layers(stats: Statistics, k: int, stream: str = "img", step: int | None = None,
                            statistic: str = "abs_mean", **kwargs) -> Stability:
    """Top-k compared between the layers of one stream (do the same channels carry it everywhere?)."""
    layers = stats.layers(stream)
    sets = [top_k(stats.get(statistic, t, step).cpu().numpy(), k) for t in layers]
    return stability(sets, [str(t) for t in layers], **kwargs)


def stability_across_runs(runs: Sequence[Statistics], tap: Tap | str, k: int, step: int | None = None,
                          statistic: str = "abs_mean", labels: Sequence[str] | None = None, **kwargs) -> Stability:
    """Top-k at one tap compared between separate runs (one `Statistics` per prompt or per seed)."""
    sets = [top_k(r.get(statistic, tap, step).cpu().numpy(), k) for r in runs]
    return stability(sets, labels, **kwargs)
