"""Disruption: edit a channel set during generation and measure what changes (chapter 2).

The paper's first claim (arXiv 2605.13974): zeroing the few massive channels collapses generation,
zeroing equally many low-statistic channels barely matters. Three steps test it:

1. `baseline(adapter, prompts, seeds)` generates every (prompt, seed) unit once, unedited, and
   keeps the images, the probe's `Statistics` (both guidance halves: the dataset means for
   mean-replacement) and each unit's per-step channel means (for the prompt-vs-timestep split);
2. `conditions(base, ...)` builds the channel sets -- top-k and its controls: bottom-k by |mean|
   (the paper's), bottom-k by RMS (a zero-mean channel can still carry a large signal), seeded
   random-k excluding the top-k, and random-k moved as far as the top-k edit moves the top-k --
   chosen on held-out prompts (`baseline(..., selection_prompts=...)`, else on the units), with an
   op (zero, dataset-mean, per-token-mean, scale) and a window of layers x steps;
3. `run(base, conditions)` regenerates every unit under each condition with `probe.edit` and
   returns a tidy table, one row per (unit, condition): the judge's attributes, cleanliness and
   mask IoU (organism captions), pixel MSE, mean |difference| and SSIM to the same unit's baseline,
   and on real models, when asked, LPIPS to it and CLIP-T to the prompt (`mabook.metrics`).

`summary(table)` gives means with bootstrap 95 % CIs per condition, and `paired_ratios` the paired
effect ratio top-k damage / control damage with its CI. `decomposition(base, channels)` splits a
channel's per-image mean into a prompt-driven and a timestep-driven part: the two readings of the
channels (semantics vs "Detail Guidance") predict opposite answers.

What this is not: a judge of real-model images. On models other than the organism the table has
pixel metrics, and the papers' perceptual ones when their weights load (`baseline(...,
clip_model=..., lpips_net=...)`: CLIP-T, LPIPS), not attributes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from mabook import discovery, images, judge, probe, world
from mabook import progress as progress_
from mabook.metrics import LPIPS, Clip, clip_t, device_of, load_clip, load_lpips, lpips, ssim
from mabook.models import Adapter
from mabook.probe import Edit
from mabook.statistics import Statistics
from mabook.stats import bootstrap_ci, paired_ratio_ci

OPS = ("zero", "mean", "token_mean", "scale")  # mean: the channel's dataset mean at that step (from Statistics)
KINDS = ("top", "bottom_abs_mean", "bottom_rms", "random", "energy")
CONTROLS = KINDS[1:]  # top-k's controls: count-matched (bottom by |mean|, bottom by RMS, random) and energy-matched
ENERGY_OPS = ("zero", "mean", "scale")  # the ops whose expected displacement the energy-matched control matches
DEFAULT_KS = (1, 2, 4, 8, 16)
PARTS = ("early", "mid", "late")  # windows of equal size (n // 3), of the image-stream layers and of the steps
ATTRIBUTES = world.ATTRIBUTES
DISTANCES = ("pixel_mse", "pixel_mae", "lpips")  # columns that are a distance to the unit's baseline (0 there)


# ---------------------------------------------------------------------------------------------
# 1. Baselines: every (prompt, seed) unit generated once
# ---------------------------------------------------------------------------------------------


@dataclass
class Baseline:
    """Unedited generations of every unit, and what the edits and the table need from them."""

    adapter: Adapter
    units: list[tuple[str, int]]  # (prompt, seed)
    images: np.ndarray  # (units, H, W, 3) float in [0, 1]
    stats: Statistics  # both guidance halves, pooled over units
    token_means: np.ndarray  # (units, steps, image layers, channels): each unit's conditional mean over tokens
    num_inference_steps: int
    pipe_kwargs: dict = field(default_factory=dict)
    metrics: list[dict] = field(default_factory=list)  # per unit, as in the table (baseline vs itself)
    clip: Clip | None = field(default=None, repr=False)  # `metrics.Clip` for the CLIP-T column, if asked
    selection: Statistics | None = None  # held-out prompts' statistics (`selection_statistics`); None: these units'
    lpips: LPIPS | None = field(default=None, repr=False)  # `metrics.LPIPS` for the LPIPS column, if asked

    @property
    def metric_models(self) -> dict[str, str]:
        """What the perceptual columns were computed with: {"clip_t": model id, "lpips": net and weights}."""
        return {**({"clip_t": self.clip.id} if self.clip else {}), **({"lpips": self.lpips.id} if self.lpips else {})}

    @property
    def layers(self) -> list[str]:
        return [str(t) for t in self.stats.layers("img")]

    @property
    def selector(self) -> Statistics:
        """The statistics that choose the channel sets and set the edits' values (dataset means,
        energy): the held-out prompts' where there are some, else these units' own (selection on the
        test set, as the results made before 2026-12-02)."""
        return self.stats if self.selection is None else self.selection


def check_units(prompts, seeds) -> list[tuple[str, int]]:
    """(prompt, seed) units, seed-major: every prompt with the first seed, then the next seed."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError(f"prompts must be a non-empty list of str, got {prompts!r:.80}")
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"every prompt must be a non-empty str, got {p!r}")
    if isinstance(seeds, (int, np.integer)):
        seeds = [int(seeds)]
    if not isinstance(seeds, Sequence) or not seeds or not all(isinstance(s, (int, np.integer)) and s >= 0 for s in seeds):
        raise ValueError(f"seeds must be a non-empty list of non-negative ints, got {seeds!r}")
    return [(p, int(s)) for s in seeds for p in prompts]


def check_generation(adapter: Adapter, prompts, seeds, num_inference_steps, batch_size, who: str) -> list[tuple[str, int]]:
    """The checks every experiment that generates (prompt, seed) units makes first; returns the units."""
    units = check_units(prompts, seeds)
    if adapter.pipe is None:
        raise ValueError(f"{who} needs a pipeline; this adapter wraps a bare transformer")
    if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    return units


def selection_statistics(adapter: Adapter, prompts: Sequence[str], seeds: Sequence[int] = (0,),
                         num_inference_steps: int = 20, batch_size: int = 16, **pipe_kwargs) -> Statistics:
    """The image-stream statistics (both guidance halves) of generating `prompts` x `seeds`: what
    chooses the channel sets when it comes from prompts held out from the evaluated ones."""
    units = check_generation(adapter, prompts, seeds, num_inference_steps, batch_size, "selection")
    return unit_statistics(adapter, units, num_inference_steps, batch_size, **pipe_kwargs)


def unit_statistics(adapter: Adapter, units: Sequence[tuple[str, int]], num_inference_steps: int, batch_size: int,
                    **pipe_kwargs) -> Statistics:
    """The image-stream statistics (both guidance halves) of generating these (prompt, seed) units."""
    with probe.collect(adapter, taps=probe.taps(adapter, ["img"]), cfg="both") as run:
        adapter.generate(list(units), num_inference_steps, batch_size, **pipe_kwargs)
    return run.stats


def check_selection(prompts: Sequence[str], selection_prompts: Sequence[str]) -> None:
    """Refuse a selection set that shares a prompt with the evaluated ones (selection on the test set)."""
    shared = sorted(set(prompts) & set(selection_prompts))
    if shared:
        raise ValueError(f"the selection prompts share {len(shared)} prompt(s) with the evaluated ones (e.g. {shared[0]!r}); "
                         "allowed: disjoint prompts, or no selection set (choose on the evaluated units)")


def baseline(adapter: Adapter, prompts: Sequence[str], seeds: Sequence[int] = (0,), num_inference_steps: int = 20,
             batch_size: int = 16, clip_model=None, selection_prompts: Sequence[str] | None = None,
             lpips_net=None, **pipe_kwargs) -> Baseline:
    """Generate every (prompt, seed) unit once, unedited, under the probe.

    clip_model: a CLIP hub id or directory (e.g. `metrics.CLIP_MODEL`) or a loaded `metrics.Clip`:
    the table then also has clip_t (the image's CLIP score with its prompt, `metrics.clip_t`).
    lpips_net: "alex" (the papers'), "vgg", a torchvision weights file or a loaded `metrics.LPIPS`:
    the table then also has lpips (to the unit's baseline, `metrics.lpips`). Both are loaded before
    anything is generated; `metrics.MissingWeights` (one line) when their weights cannot be.
    selection_prompts: prompts held out from `prompts` (same seeds) whose statistics choose the
    channel sets and the edits' values (`Baseline.selector`); None: these units' own."""
    units = check_generation(adapter, prompts, seeds, num_inference_steps, batch_size, "disruption")
    if selection_prompts is not None:
        check_selection(prompts, selection_prompts)
    device = device_of(adapter)
    clip = load_clip(clip_model) if clip_model is not None else None
    lpips_model = load_lpips(lpips_net, device) if lpips_net is not None else None
    image_taps = probe.taps(adapter, ["img"])
    means: dict[tuple[int, str], list[torch.Tensor]] = {}

    def record(tap, step, hidden_states):  # each unit's mean over tokens, per step and layer
        means.setdefault((step, str(tap)), []).append(hidden_states.detach().float().mean(1).cpu())

    with probe.collect(adapter, taps=image_taps, cfg="both") as run, probe.hooks(adapter, record, taps=image_taps):
        images = adapter.generate(units, num_inference_steps, batch_size, **pipe_kwargs)
    steps = sorted({s for s, _ in means})
    token_means = np.stack([np.stack([torch.cat(means[(s, str(t))]).numpy() for t in image_taps], 1) for s in steps], 1)
    selection = None if selection_prompts is None else selection_statistics(
        adapter, selection_prompts, seeds, num_inference_steps, batch_size, **pipe_kwargs)
    base = Baseline(adapter, units, images, run.stats, token_means, num_inference_steps, dict(pipe_kwargs),
                    clip=clip, selection=selection, lpips=lpips_model)
    base.metrics = unit_metrics(base, images)
    return base


# ---------------------------------------------------------------------------------------------
# 2. Conditions: channel sets x op x window
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Condition:
    """One intervention: `op` on `channels[layer]` at each listed image-stream layer, at `steps`."""

    name: str
    kind: str  # one of KINDS, or "all" for a user-made set
    k: int
    op: str = "zero"
    channels: tuple[tuple[str, tuple[int, ...]], ...] = ()  # ((tap name, channels), ...)
    steps: tuple[int, ...] | None = None  # None: every step
    value: float | None = None  # the factor of "scale"
    window: str = "all layers, all steps"
    seed: int | None = None  # the random set's seed
    matched: tuple[tuple[str, tuple[int, ...]], ...] = ()  # kind "energy": the top-k set whose edit size it matches

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"unknown op {self.op!r}; allowed: {list(OPS)}")
        if self.op == "scale" and not isinstance(self.value, (int, float)):
            raise ValueError(f"op 'scale' needs a numeric value (the factor), got {self.value!r}")
        if not self.channels:
            raise ValueError(f"condition {self.name!r} has no channels")
        for tap, channels in self.channels:
            if len(channels) != self.k:
                raise ValueError(f"condition {self.name!r} has {len(channels)} channels at {tap}, expected k={self.k}")
        if self.kind == "energy" and (self.op not in ENERGY_OPS or len(self.matched) != len(self.channels)):
            raise ValueError(f"an energy-matched control needs op in {list(ENERGY_OPS)} (got {self.op!r}) and the matched "
                             "top-k set at each of its layers")

    def edits(self, stats: Statistics) -> list[Edit]:
        """The `probe.Edit`s that carry this condition out."""
        if self.kind == "energy":
            return self._energy_edits(stats)
        out = []
        for tap, channels in self.channels:
            if self.op == "zero":
                out.append(Edit(tap, list(channels), "zero", steps=self.steps))
            elif self.op == "token_mean":
                out.append(Edit(tap, list(channels), "mean", steps=self.steps))
            elif self.op == "scale":
                out.append(Edit(tap, list(channels), "scale", value=self.value, steps=self.steps))
            else:  # "mean": the channel's mean over the baseline units at the same step (it moves with the timestep)
                for step in self.steps if self.steps is not None else stats.steps:
                    value = stats.get("mean", tap, step)[list(channels)].float()
                    out.append(Edit(tap, list(channels), "set", value=value, steps=[step]))
        return out

    def _energy_edits(self, stats: Statistics) -> list[Edit]:
        """Shift this set's channels by one constant vector per (layer, step) whose length is the
        top-k edit's root-mean-square displacement per token there (from the baselines' per-step mean
        and std: zeroing moves a token by sqrt(sum mean^2 + std^2), mean-replacement by sqrt(sum std^2),
        scaling by |1 - value| sqrt(sum mean^2 + std^2)), in a seeded random direction: a perturbation
        as large as the top-k edit, on channels that are not massive."""
        generator = torch.Generator().manual_seed(self.seed or 0)
        out = []
        for (tap, channels), (_, top) in zip(self.channels, self.matched):
            direction = torch.randn(self.k, generator=generator, dtype=torch.float64)
            direction /= direction.norm()
            for step in self.steps if self.steps is not None else stats.steps:
                mean = stats.get("mean", tap, step)[list(top)].double()
                var = stats.get("std", tap, step)[list(top)].double() ** 2
                energy = {"zero": mean**2 + var, "mean": var, "scale": (1 - (self.value or 0)) ** 2 * (mean**2 + var)}[self.op]
                shift = (direction * energy.sum().sqrt()).float()
                out.append(Edit(tap, list(channels), lambda x, shift=shift: x + shift.to(x.device, x.dtype), steps=[step]))
        return out


def channel_set(stats: Statistics, k: int, kind: str, stream: str = "img", seed: int = 0) -> dict[str, list[int]]:
    """{tap name: channels} per layer of `stream`: top-k by |mean over tokens|, or a control."""
    if kind not in KINDS:
        raise ValueError(f"unknown channel set kind {kind!r}; allowed: {list(KINDS)}")
    out = {}
    for tap in stats.layers(stream):
        abs_mean = stats.get("abs_mean", tap).cpu().numpy()
        k = discovery.check_k(k, len(abs_mean))
        top = discovery.top_k(abs_mean, k)
        if kind == "top":
            chosen = top
        elif kind == "bottom_abs_mean":
            chosen = discovery.bottom_k(abs_mean, k)
        elif kind == "bottom_rms":  # RMS over tokens = sqrt(mean^2 + std^2): small only if the channel is quiet
            rms = np.sqrt(stats.get("mean", tap).cpu().numpy() ** 2 + stats.get("std", tap).cpu().numpy() ** 2)
            chosen = discovery.bottom_k(rms, k)
        else:  # random, and energy (random channels, moved as far as the top-k edit moves the top-k)
            chosen = discovery.random_k(len(abs_mean), k, seed=seed, exclude=top)
        out[str(tap)] = [int(c) for c in chosen]
    return out


def window(layers: Sequence[str], num_inference_steps: int, layer_part: str = "all", step_part: str = "all"):
    """(layers, steps, label) of one window: "early", "mid", "late", or "all".

    The three parts have equal size, n // 3 of n items (the first, the centred and the last n // 3),
    so every window edits the same number of (tap, step) pairs and a window's damage is not its size:
    8 layers x 20 steps give 2 x 6 = 12 pairs per window (a layer or a step between two parts is
    in none of them)."""
    for part in (layer_part, step_part):
        if part not in (*PARTS, "all"):
            raise ValueError(f"unknown window part {part!r}; allowed: {[*PARTS, 'all']}")

    def third(items, part):
        if part == "all":
            return list(items)
        size = len(items) // 3
        start = {"early": 0, "mid": (len(items) - size) // 2, "late": len(items) - size}[part]
        return list(items)[start:start + size]

    chosen_layers = third(list(layers), layer_part)
    chosen_steps = third(list(range(num_inference_steps)), step_part)
    if not chosen_layers or not chosen_steps:
        raise ValueError(f"window ({layer_part} layers, {step_part} steps) is empty for {len(layers)} layers x "
                         f"{num_inference_steps} steps")
    return chosen_layers, (None if step_part == "all" else tuple(chosen_steps)), f"{layer_part} layers, {step_part} steps"


def conditions(base: Baseline, ks: Sequence[int] = DEFAULT_KS, kinds: Sequence[str] = KINDS, n_random: int = 5,
               op: str = "zero", value: float | None = None, layer_part: str = "all", step_part: str = "all",
               random_seed: int = 0) -> list[Condition]:
    """Top-k and its controls for each k, with one op in one window (n_random seeded random sets per k)."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; allowed: {list(OPS)}")
    if op == "scale" and not isinstance(value, (int, float)):
        raise ValueError(f"op 'scale' needs a numeric value (the factor), got {value!r}")
    if isinstance(ks, (int, np.integer)):
        ks = [ks]
    if not ks:
        raise ValueError("ks must be a non-empty list of ints")
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"unknown channel set kind {kind!r}; allowed: {list(KINDS)}")
    if "energy" in kinds and op not in ENERGY_OPS:
        kinds = [kind for kind in kinds if kind != "energy"]  # no displacement to match for a per-token mean
    if {"random", "energy"} & set(kinds) and (not isinstance(n_random, int) or n_random < 1):
        raise ValueError(f"n_random must be an int >= 1, got {n_random!r}")
    layers, steps, label = window(base.layers, base.num_inference_steps, layer_part, step_part)
    out = []
    for k in ks:
        discovery.check_k(k, base.adapter.width)
        for kind in kinds:
            seeds = [random_seed + i for i in range(n_random)] if kind in ("random", "energy") else [None]
            top = channel_set(base.selector, k, "top")
            for seed in seeds:
                sets = channel_set(base.selector, k, kind, seed=seed or 0)
                channels = tuple((tap, tuple(sets[tap])) for tap in layers)
                matched = tuple((tap, tuple(top[tap])) for tap in layers) if kind == "energy" else ()
                name = f"{kind}-{k}" + (f"#{seed}" if seed is not None else "")
                out.append(Condition(name, kind, int(k), op, channels, steps, value, label, seed, matched))
    return out


def window_conditions(base: Baseline, k: int = 4, kinds: Sequence[str] = ("top", "random"), op: str = "zero",
                      random_seed: int = 0) -> list[Condition]:
    """The k-sets zeroed in one window at a time: layers early/mid/late x steps early/mid/late."""
    return [c for lp in PARTS for sp in PARTS
            for c in conditions(base, [k], kinds, 1, op, layer_part=lp, step_part=sp, random_seed=random_seed)]


# ---------------------------------------------------------------------------------------------
# 3. Running the conditions, and the table
# ---------------------------------------------------------------------------------------------


def unit_metrics(base: Baseline, images: np.ndarray) -> list[dict]:
    """Per unit: distances to the unit's baseline (pixel MSE, mean |difference|, SSIM; LPIPS if the
    baseline has one), CLIP-T to the prompt if it has a CLIP, and the judge's reading where it applies.
    base: a `Baseline`, or anything with its adapter, units and images (clip and lpips optional)."""
    # per image, in one memory layout: a unit's row depends neither on the units computed beside it
    # nor on how the pipeline laid out its array (numpy's float32 sums follow the memory order), so
    # a sweep's batches (mabook.sweep) give one run's numbers bit for bit
    diff = np.ascontiguousarray(images - base.images)
    mse = np.array([np.square(d).mean() for d in diff])
    mae = np.array([np.abs(d).mean() for d in diff])  # linear in the change, like LPIPS; MSE squares it
    device = device_of(base.adapter)  # where the images were made
    ssim_values = ssim(images, base.images, device)
    lpips_model, clip = getattr(base, "lpips", None), getattr(base, "clip", None)  # optional on a stand-in (transport's)
    lpips_values = lpips(images, base.images, lpips_model, device) if lpips_model is not None else None
    clip_values = clip_t(images, [p for p, _ in base.units], clip, device) if clip is not None else None
    rows = []
    judged = judge.applies(base.adapter, [p for p, _ in base.units])
    for i, (prompt, seed) in enumerate(base.units):
        row = {"prompt": prompt, "seed": seed, "pixel_mse": float(mse[i]), "pixel_mae": float(mae[i]), "ssim": float(ssim_values[i])}
        if lpips_values is not None:
            row["lpips"] = float(lpips_values[i])
        if clip_values is not None:
            row["clip_t"] = float(clip_values[i])
        if judged:
            j = judge.judge(images[i], prompt)
            for a in ATTRIBUTES:
                row[a] = float(np.mean([c[a] for c in j.correct]))
            row["background"] = float(j.background_correct)
            row["all_correct"] = float(j.all_correct)
            row["cleanliness"] = float(j.cleanliness)
            row["mask_iou"] = float(j.mask_iou)
        rows.append(row)
    return rows


@dataclass
class Result:
    table: list[dict]  # one row per (unit, condition), baseline rows included (condition "baseline")
    images: dict[str, np.ndarray]  # condition name -> (units kept, H, W, 3) for grids
    conditions: list[Condition]


def run(base: Baseline, conds: Sequence[Condition], batch_size: int = 16, keep_images: int = 4,
        progress: bool | None = None) -> Result:
    """Regenerate every unit of `base` under each condition; the tidy table of what changed.
    progress: a bar over the conditions and the time estimate (`mabook.progress`)."""
    if not conds:
        raise ValueError("conds must be a non-empty list of Condition")
    for c in conds:
        if not isinstance(c, Condition):
            raise TypeError(f"conditions must be Condition objects (from disruption.conditions), got {type(c).__name__} {c!r:.60}")
    names = [c.name + " | " + c.op + " | " + c.window for c in conds]
    if len(set(names)) != len(names):
        raise ValueError("conditions must be distinct (name, op, window); got duplicates")
    table = [{**m, "condition": "baseline", "kind": "baseline", "k": 0, "op": "none", "window": "none"}
             for m in base.metrics]
    kept = {"baseline": base.images[:keep_images]}
    what = f"disruption, {len(conds)} condition(s) x {len(base.units)} unit(s)"
    with progress_.estimate(what, len(conds) * len(base.units), base.num_inference_steps, progress):
        for c in progress_.bar(conds, "conditions", progress=progress):
            with probe.edit(base.adapter, c.edits(base.selector)):
                images = base.adapter.generate(base.units, base.num_inference_steps, batch_size, progress, **base.pipe_kwargs)
            for m in unit_metrics(base, images):
                table.append({**m, "condition": c.name, "kind": c.kind, "k": c.k, "op": c.op, "window": c.window})
            kept[f"{c.name} | {c.op} | {c.window}"] = images[:keep_images]
    return Result(table, kept, list(conds))


# ---------------------------------------------------------------------------------------------
# 4. Summaries: means with bootstrap CIs, paired ratios, semantics vs detail
# ---------------------------------------------------------------------------------------------

def _unit_key(row):
    return row["prompt"], row["seed"]


def unit_values(table: Sequence[dict], metric: str, **where) -> dict[tuple, float]:
    """{(prompt, seed): value} of `metric` over the rows matching `where` (e.g. kind="random", k=4),
    averaged over several matching rows of one unit (the random sets)."""
    acc: dict[tuple, list[float]] = {}
    for row in table:
        if all(row.get(key) == value for key, value in where.items()):
            if metric not in row:
                raise ValueError(f"no metric {metric!r} in the table; it has {sorted(k for k in row if k not in where)}")
            acc.setdefault(_unit_key(row), []).append(row[metric])
    return {unit: float(np.mean(v)) for unit, v in acc.items()}


def damage(table: Sequence[dict], metric: str, **where) -> dict[tuple, float]:
    """Per unit damage: a distance to the baseline (pixel_mse, pixel_mae, lpips) itself, 1 - ssim, or
    the drop of a higher-is-better metric (attributes, cleanliness, mask_iou, all_correct, clip_t)
    below the same unit's baseline."""
    values = unit_values(table, metric, **where)
    if metric in DISTANCES:
        return values
    if metric == "ssim":
        return {u: 1 - v for u, v in values.items()}
    base = unit_values(table, metric, condition="baseline")
    return {u: base[u] - v for u, v in values.items()}


CLUSTER = "prompt"  # the CIs resample prompts: the seeds of one prompt are not independent draws (stats.bootstrap_ci)


def summary(table: Sequence[dict], metrics: Sequence[str] | None = None, cluster: str | None = CLUSTER) -> list[dict]:
    """One row per (kind, k, op, window): mean of each metric over units with a bootstrap 95 % CI.
    Random sets are averaged per unit first; the bootstrap resamples whole prompts (`cluster`
    "prompt"; None: every (prompt, seed) unit as an independent draw, as results made before
    2026-12-02 were computed)."""
    if not table:
        raise ValueError("the table is empty: nothing to summarise (pass disruption.run(...).table)")
    if metrics is None:
        metrics = [m for m in ("pixel_mse", "pixel_mae", "ssim", "lpips", "clip_t", *ATTRIBUTES, "all_correct", "cleanliness", "mask_iou")
                   if m in table[0]]
    groups = []
    for row in table:
        g = (row["kind"], row["k"], row["op"], row["window"])
        if g not in groups:
            groups.append(g)
    out = []
    for kind, k, op, win in groups:
        entry = {"kind": kind, "k": k, "op": op, "window": win}
        for m in metrics:
            per_unit = unit_values(table, m, kind=kind, k=k, op=op, window=win)
            vals = list(per_unit.values())
            entry[m] = float(np.mean(vals))
            entry[f"{m}_ci"] = _ci(per_unit, cluster)
        entry["n_units"] = len(vals)
        if cluster:
            entry["n_prompts"] = len({p for p, _ in per_unit})
        out.append(entry)
    return out


def _groups(units: Sequence[tuple], cluster: str | None) -> list | None:
    return [p for p, _ in units] if cluster == "prompt" and len({p for p, _ in units}) > 1 else None


def _ci(per_unit: dict[tuple, float], cluster: str | None) -> tuple[float, float]:
    """95 % CI of the mean over units, resampling prompts (`cluster`="prompt") or units; NaN for one unit."""
    if len(per_unit) < 2:
        return float("nan"), float("nan")
    if cluster not in (None, "prompt"):
        raise ValueError(f"unknown cluster {cluster!r}; allowed: 'prompt' or None")
    return bootstrap_ci(list(per_unit.values()), groups=_groups(list(per_unit), cluster))


def paired_ratios(table: Sequence[dict], metric: str = "pixel_mse", controls: Sequence[str] = CONTROLS,
                  op: str = "zero", window: str = "all layers, all steps", treated: str = "top",
                  cluster: str | None = CLUSTER) -> list[dict]:
    """Per k: mean damage of the `treated` kind (top-k here; sink keys in chapter 6) / mean control
    damage over the same units, with a paired bootstrap CI (resampling prompts; `cluster` as in
    `summary`). Rows: k, control, metric, f"{treated}_damage", control_damage, ratio, ci, n_units."""
    out = []
    for k in sorted({r["k"] for r in table if r["kind"] == treated and r["op"] == op and r["window"] == window}):
        top = damage(table, metric, kind=treated, k=k, op=op, window=window)
        for control in controls:
            ctrl = damage(table, metric, kind=control, k=k, op=op, window=window)
            units = [u for u in top if u in ctrl]
            if not units:
                continue
            a, b = np.array([top[u] for u in units]), np.array([ctrl[u] for u in units])
            ratio = float(a.mean() / b.mean()) if b.mean() != 0 else float("inf") if a.mean() > 0 else float("nan")  # 0/0: no ratio
            low, high = paired_ratio_ci(a, b, groups=_groups(units, cluster)) if len(units) > 1 else (float("nan"),
                                                                                                       float("nan"))
            out.append({"k": k, "control": control, "metric": metric, f"{treated}_damage": float(a.mean()),
                        "control_damage": float(b.mean()), "ratio": ratio, "ci": (low, high), "n_units": len(units)})
    return out


def decomposition(base: Baseline, channels: dict[str, Sequence[int]]) -> list[dict]:
    """Per layer: how much of the chosen channels' per-image mean varies with the prompt, with the
    seed (the initial noise) and with the timestep.

    From each unit's conditional mean over tokens m[unit, step] (per channel): at a fixed step, the
    variance across units splits exactly (law of total variance, population variances) into the
    variance of the prompts' means over their seeds (prompt_var) and the mean variance across the
    seeds of one prompt (seed_var), each averaged over steps and channels; timestep_var = variance
    across steps for a fixed unit, averaged over units. prompt_share = prompt / (prompt + seed +
    timestep): near 1, the prompt drives the value (the semantic reading); near 0, the timestep or
    the noise does ("Detail Guidance" reads the timestep; the timestep embedding and the latent's
    noise level move together here -- `mabook.origins` swaps one without the other). With one seed
    per prompt, seed_var is 0 and prompt_var is the across-unit variance (the decomposition before
    2026-12-02 pooled the seeds into it).
    """
    prompts = [prompt for prompt, _ in base.units]
    groups = [np.array([u for u, p in enumerate(prompts) if p == q]) for q in dict.fromkeys(prompts)]
    sizes = {len(g) for g in groups}
    if len(sizes) != 1:
        raise ValueError(f"decomposition needs as many seeds for every prompt, got {sorted(sizes)} seeds")
    out = []
    for i, layer in enumerate(base.layers):
        if layer not in channels:
            continue
        m = base.token_means[:, :, i, :][..., list(channels[layer])]  # (units, steps, k)
        by_prompt = np.stack([m[g] for g in groups])  # (prompts, seeds, steps, k)
        prompt_var = float(by_prompt.mean(1).var(0).mean())
        seed_var = float(by_prompt.var(1).mean())
        step_var = float(m.var(1).mean())
        total = prompt_var + seed_var + step_var
        out.append({"layer": layer, "prompt_var": prompt_var, "seed_var": seed_var, "timestep_var": step_var,
                    "prompt_share": prompt_var / total if total > 0 else float("nan"),
                    "seed_share": seed_var / total if total > 0 else float("nan")})
    return out


def grid(result: Result, names: Sequence[str] | None = None, pad: int = 2) -> tuple[np.ndarray, list[str]]:
    """A uint8 mosaic (rows = conditions, columns = the kept units) and the row labels.

    names: keys of `result.images` (default: baseline, then every condition in run order)."""
    names = list(result.images) if names is None else list(names)
    missing = [n for n in names if n not in result.images]
    if missing:
        raise ValueError(f"no images kept for {missing}; kept: {list(result.images)}")
    return images.mosaic([result.images[n] for n in names], pad), names
