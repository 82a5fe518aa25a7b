"""Chapter 4's experiment on the shapes world: caption pairs, methods, scores, the comparison.

Text-conditioned transport (`mabook.transport`) measured where the truth is known. A *pair* is a
source and a target caption that differ in named attributes of one object (`pairs`: one attribute,
two, or one object of a two-object scene); a *method* (`Method`) is one way of moving the target's
generation toward the source's at strength alpha -- a channel set through `transport.transport`
(optionally inside a K-means mask chosen by a truth-free rule or, as a labelled upper bound, by the
truth; in a step window; on the image stream, the text stream or both; with or without the AdaLN
conditioning, which no method moves unless told), the pixel blend or the text-embedding blend.
`compare` runs every method at several alphas on the same pairs (same noise per pair), `score`
judges one output against both captions (took the source's attributes? kept the target's others?
changed pixels outside the region the captions disagree on?) and `summary` / `paired_difference`
give means with bootstrap 95 % CIs over pairs.

Flip baselines. "Took the source's value" of an attribute is evidence only against what the output
would show anyway. Two nulls, per attribute a, both carried by the rows and `summary`:
- no transport (`FLIP_BASELINE`, the "target image" rows): the share of pairs whose unedited
  target -- the same target prompt from the same noise, i.e. every method at alpha = 0 -- already
  shows the source's value of a. `summary(..., baseline=FLIP_BASELINE)` puts it beside every
  method's took_<a>, over the same pairs, with the paired difference and its bootstrap CI;
- chance given a flip (`chance_<a>` in `score`): the output's own rate of leaving the target's
  value of a (`flipped_<a>`) divided by the other values a could take (`VALUES[a] - 1`) -- the
  took_<a> a flip landing on any other value uniformly would give. Size has two values, so there
  took_size is flipped_size and `over_chance_size` is never above 0: taking the source's size
  cannot be told from flipping it.

Chapter 5's comparison (`mabook.image_transport`) runs on the same pairs, methods and scores, and
through the same method x alpha loop (`method_outputs`) and rows (`score_rows`).

What this is not: the mechanism (`mabook.transport`: record, transport, masks, baselines).
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch
from scipy import ndimage

from mabook import judge, probe, transport, world
from mabook import progress as progress_
from mabook.models import Adapter
from mabook.stats import bootstrap_ci

ATTRIBUTES = world.ATTRIBUTES

PAIR_KINDS = ("one_attribute", "two_attributes", "one_object_of_two")
_VOCABULARY = {"color": list(world.COLORS), "shape": list(world.SHAPES), "size": list(world.SIZES),
               "position": list(world.POSITIONS)}
VALUES = {a: len(v) for a, v in _VOCABULARY.items()}  # how many values each attribute takes (size: 2)
FLIP_BASELINE = "target image"  # the no-transport null of took_<a>: the unedited target, same prompt, same noise


class Pair(NamedTuple):
    """A source and a target caption that differ only in `differs` (attributes of one object)."""

    source: str
    target: str
    differs: tuple[str, ...]


def pairs(kind: str, n: int, seed: int = 0, split: str = "any") -> list[Pair]:
    """n distinct caption pairs of one kind, seeded. The target is a random scene (`world.sample_scene`);
    the source is the same scene with the `differs` attributes of one object redrawn:

    one_attribute      one object; one attribute differs, the attributes in turn (color, shape, size, position, color, ...)
    two_attributes     one object; two differ, the six attribute pairs in turn
    one_object_of_two  two objects; one attribute of one of them differs (attributes in turn), the other is identical

    The background is shared; two-object scenes keep the world's rules (apart, different colours).
    split: "any", "train" or "heldout" (both captions on that side of the held-out split).
    """
    if kind not in PAIR_KINDS:
        raise ValueError(f"unknown pair kind {kind!r}; allowed: {list(PAIR_KINDS)}")
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    combos = list(itertools.combinations(ATTRIBUTES, 2)) if kind == "two_attributes" else [(a,) for a in ATTRIBUTES]
    rng = np.random.default_rng(seed)
    out: list[Pair] = []
    seen: set[tuple[str, str]] = set()
    for _ in range(1000 * n):
        if len(out) == n:
            break
        differs = combos[len(out) % len(combos)]
        target = world.sample_scene(rng, 2 if kind == "one_object_of_two" else 1, split)
        i = int(rng.integers(len(target.objects)))
        obj = target.objects[i]
        new = dataclasses.replace(obj, **{a: str(rng.choice([v for v in _VOCABULARY[a] if v != getattr(obj, a)]))
                                          for a in differs})
        objects = list(target.objects)
        objects[i] = new
        if len(objects) == 2 and (world.overlaps(*objects) or objects[0].color == objects[1].color):
            continue
        source = world.Scene(tuple(objects), target.background)
        if split != "any" and world.is_heldout(source.caption) != (split == "heldout"):
            continue
        if (source.caption, target.caption) not in seen:
            seen.add((source.caption, target.caption))
            out.append(Pair(source.caption, target.caption, tuple(differs)))
    if len(out) < n:
        raise ValueError(f"found only {len(out)} distinct {kind} pairs in split {split!r}; ask for fewer")
    return out


def changed_objects(pair: Pair) -> list[int]:
    """Indices (caption order) of the objects whose attributes differ between source and target."""
    s, t = world.parse_caption(pair.source), world.parse_caption(pair.target)
    if len(s.objects) != len(t.objects) or s.background != t.background:
        raise ValueError(f"source and target must describe the same objects on the same background: {pair}")
    return [i for i, (a, b) in enumerate(zip(s.objects, t.objects)) if a != b]


SCORES = ("took_source", "kept_target", "outside_change", "other_kept", "other_change", "cleanliness", "pixel_mae")


def score(pair: Pair, image: np.ndarray, target_image: np.ndarray) -> dict:
    """What one output image (H, W, 3) in [0, 1] took from each side of a pair, judged exactly
    (`mabook.judge`) against both captions, and how far it moved from the unedited target image:

    took_source     share of the differing attributes (of the changed object) at the source's value
    kept_target     share of the other attributes (of every object) still at the target's value
    took_<a>, kept_<a>  the same per attribute (NaN where the attribute is not in that group)
    flipped_<a>     differing attributes: the changed object no longer shows the target's value of a
    chance_<a>      flipped_<a> / (VALUES[a] - 1): took_<a> if a flip landed on any other value at random
    over_chance_<a> took_<a> - chance_<a> (size: never above 0, two values)
    outside_change  mean |image - target_image| over the pixels outside the region the captions
                    disagree on (the changed object's rendered masks in source and target, grown
                    by one pixel for edges): a local edit leaves it near 0
    other_kept      two-object pairs: the unchanged object still has all four of its attributes
    other_change    two-object pairs: mean |image - target_image| over the unchanged object's mask
    cleanliness     the judge's share of pixels near a palette colour: a ghosted, half-and-half image is
                    not clean, whatever it resembles
    pixel_mae       mean |image - target_image| over the whole image
    """
    image, target_image = np.asarray(image, np.float32), np.asarray(target_image, np.float32)
    if image.shape != target_image.shape:
        raise ValueError(f"image {image.shape} and target image {target_image.shape} differ in shape")
    changed = changed_objects(pair)
    js, jt = judge.judge(image, pair.source), judge.judge(image, pair.target)
    s_masks, t_masks = world.render(world.parse_caption(pair.source)).masks, world.render(world.parse_caption(pair.target)).masks
    row = {"took_source": float(np.mean([js.correct[i][a] for i in changed for a in pair.differs])),
           "kept_target": float(np.mean([jt.correct[j][a] for j in range(len(jt.correct)) for a in ATTRIBUTES
                                         if not (j in changed and a in pair.differs)]))}
    for a in ATTRIBUTES:
        row[f"took_{a}"] = float(np.mean([js.correct[i][a] for i in changed])) if a in pair.differs else float("nan")
        row[f"flipped_{a}"] = float(np.mean([not jt.correct[i][a] for i in changed])) if a in pair.differs else float("nan")
        row[f"chance_{a}"] = row[f"flipped_{a}"] / (VALUES[a] - 1)
        row[f"over_chance_{a}"] = row[f"took_{a}"] - row[f"chance_{a}"]
        others = [jt.correct[j][a] for j in range(len(jt.correct)) if not (j in changed and a in pair.differs)]
        row[f"kept_{a}"] = float(np.mean(others)) if others else float("nan")
    change = np.abs(image - target_image).mean(-1)  # (H, W)
    region = ndimage.binary_dilation(s_masks[changed].any(0) | t_masks[changed].any(0))
    row["outside_change"] = float(change[~region].mean()) if (~region).any() else float("nan")
    unchanged = [j for j in range(len(t_masks)) if j not in changed]
    if unchanged:
        row["other_kept"] = float(all(all(jt.correct[j].values()) for j in unchanged))
        other = t_masks[unchanged].any(0)
        row["other_change"] = float(change[other].mean()) if other.any() else float("nan")
    else:
        row["other_kept"] = row["other_change"] = float("nan")
    row["cleanliness"] = float(jt.cleanliness)
    row["pixel_mae"] = float(change.mean())
    return row


def _per_pair(rs_by_pair: dict[tuple, list[dict]], metric: str) -> dict[tuple, float]:
    """{(kind, pair): the mean of `metric` over that pair's rows}, pairs where it is all NaN left out."""
    out = {}
    for key, rs in rs_by_pair.items():
        v = [r.get(metric, np.nan) for r in rs]
        if not np.all(np.isnan(v)):
            out[key] = float(np.nanmean(v))
    return out


def _mean_ci(values) -> tuple[float, tuple[float, float]]:
    values = list(values)
    mean = float(np.mean(values)) if values else float("nan")
    return mean, (bootstrap_ci(values) if len(values) > 1 else (float("nan"), float("nan")))


def summary(rows: Sequence[dict], by: Sequence[str] = ("kind", "method", "alpha"),
            metrics: Sequence[str] = SCORES, baseline: str | None = None) -> list[dict]:
    """One row per group of `by`: each metric's mean over pairs with a bootstrap 95 % CI.

    Rows of one pair within a group (a random set's seeds) are averaged first, so pairs stay the
    independent draws; NaN values (a metric that does not apply) are left out, `n_<metric>` says
    how many pairs remain.

    baseline: None, or the method whose rows are the null of every "took" metric (`FLIP_BASELINE`,
    the unedited target: no transport). Each entry then also carries, for every metric m starting
    with "took", `m_baseline` (the baseline's mean over the same pairs) and `m_over_baseline` (the
    mean over pairs of m minus the baseline's m), each with its `_ci` and `n_m_over_baseline`, and
    `baseline` (its name). Baseline rows are matched to a group by (kind, pair) and every `by`
    column but method and alpha (the unedited images have no alpha)."""
    if not rows:
        raise ValueError("summary needs at least one row")
    missing = [b for b in by if b not in rows[0]]
    if missing:
        raise ValueError(f"rows have no column(s) {missing}; they have {sorted(rows[0])}")
    groups: dict[tuple, dict[tuple, list[dict]]] = {}
    for r in rows:
        groups.setdefault(tuple(r[b] for b in by), {}).setdefault((r["kind"], r["pair"]), []).append(r)
    match = [b for b in by if b not in ("method", "alpha")]
    base: dict[tuple, dict[tuple, list[dict]]] = {}
    if baseline is not None:
        for r in rows:
            if r.get("method") == baseline:
                base.setdefault(tuple(r[b] for b in match), {}).setdefault((r["kind"], r["pair"]), []).append(r)
        if not base:
            raise ValueError(f"baseline {baseline!r} has no rows; allowed: None or one of the methods "
                             f"{sorted({str(r.get('method')) for r in rows})}")
    out = []
    for key, by_pair in groups.items():
        entry = dict(zip(by, key))
        for m in metrics:
            mine = _per_pair(by_pair, m)
            entry[m], entry[f"{m}_ci"] = _mean_ci(mine.values())
            entry[f"n_{m}"] = len(mine)
            if baseline is not None and m.startswith("took"):
                theirs = _per_pair(base.get(tuple(entry[b] for b in match), {}), m)
                common = [p for p in mine if p in theirs]
                entry[f"{m}_baseline"], entry[f"{m}_baseline_ci"] = _mean_ci(theirs[p] for p in common)
                entry[f"{m}_over_baseline"], entry[f"{m}_over_baseline_ci"] = _mean_ci(mine[p] - theirs[p] for p in common)
                entry[f"n_{m}_over_baseline"] = len(common)
        if baseline is not None:
            entry["baseline"] = baseline
        entry["n_pairs"] = len(by_pair)
        out.append(entry)
    return out


def paired_difference(rows: Sequence[dict], a: dict, b: dict, metric: str = "took_source") -> dict:
    """Mean over pairs of metric(rows matching a) - metric(rows matching b), pairs matched by (kind,
    pair), with a bootstrap 95 % CI; e.g. a={"method": "top-16", "alpha": 1.0}, b={"method":
    "random-16", "alpha": 1.0}. Rows of one pair on a side (random seeds) are averaged first; pairs
    where the metric is NaN on either side are left out."""

    def per_pair(where):
        acc: dict[tuple, list[float]] = {}
        for r in rows:
            if all(r.get(k) == v for k, v in where.items()):
                acc.setdefault((r["kind"], r["pair"]), []).append(r.get(metric, np.nan))
        return {key: float(np.nanmean(v)) for key, v in acc.items() if not np.all(np.isnan(v))}

    pa, pb = per_pair(a), per_pair(b)
    common = [key for key in pa if key in pb]
    if not common:
        raise ValueError(f"no pair has {metric!r} under both {a} and {b}")
    d = np.array([pa[key] - pb[key] for key in common])
    ci = bootstrap_ci(d) if len(d) > 1 else (float("nan"), float("nan"))
    return {"metric": metric, "a": a, "b": b, "difference": float(d.mean()), "ci": ci, "n_pairs": len(d)}


METHOD_KINDS = ("channels", "pixel", "embedding")


@dataclass(frozen=True)
class Method:
    """One way of moving a target toward its source at strength alpha (a row label of chapter 4).

    kind "channels": `transport.transport` of `channels` ({tap: ints}, or "all"; a dict may hold the
    taps of both streams, `stream` picks) -- optionally inside a K-means `mask` ("source", "target"
    or their "union") whose foreground is chosen by `mask_rule` ("border", truth-free, the default;
    "oracle", matched to the truth: an upper bound, label it so), in a step window `steps`, on
    `stream` ("img", "txt" or "both"; None: `compare`'s), with or without the AdaLN `conditioning`
    (None: `compare`'s, which is False -- the same for every method, "all" included); "pixel":
    `transport.pixel_blend`; "embedding": `transport.embedding_blend` (stream, conditioning and
    masks are the channel methods' options). Methods sharing a `name` (random sets, `seed`) are
    pooled per pair. alphas: this method's own alphas (e.g. a sweep at alpha = 1 only); None:
    `compare`'s."""

    name: str
    kind: str = "channels"
    channels: dict | str | None = None
    seed: int | None = None
    mask: str | None = None
    steps: tuple[int, ...] | None = None
    conditioning: bool | None = None
    alphas: tuple[float, ...] | None = None
    stream: str | None = None
    mask_rule: str = "border"

    def __post_init__(self):
        if self.kind not in METHOD_KINDS:
            raise ValueError(f"unknown method kind {self.kind!r}; allowed: {list(METHOD_KINDS)}")
        if self.alphas is not None:
            object.__setattr__(self, "alphas", tuple(transport.check_alpha(a) for a in self.alphas))
        if self.kind == "channels" and self.channels is None:
            raise ValueError(f"method {self.name!r} transports channels: give channels ({{tap: ints}} or 'all')")
        if self.mask is not None and self.mask not in transport.MASKS:
            raise ValueError(f"unknown mask {self.mask!r}; allowed: None (whole image) or {list(transport.MASKS)}")
        if self.mask_rule not in transport.MASK_RULES:
            raise ValueError(f"unknown mask rule {self.mask_rule!r}; allowed: {list(transport.MASK_RULES)}")
        if self.stream is not None:
            transport.check_stream(self.stream)
        if self.conditioning is not None and not isinstance(self.conditioning, bool):
            raise ValueError(f"method {self.name!r}: conditioning must be True, False or None (compare's), got {self.conditioning!r}")
        if self.kind != "channels" and (self.stream, self.conditioning, self.mask) != (None, None, None):
            raise ValueError(f"method {self.name!r} of kind {self.kind!r} moves no channels; allowed: stream, conditioning "
                             "and mask None (they are options of kind 'channels')")
        if self.mask is not None and self.stream == "txt":
            raise ValueError(f"method {self.name!r}: mask {self.mask!r} selects image tokens; allowed with stream 'img' or "
                             "'both', not 'txt'")

    def settings(self, stream: str = "img", conditioning: bool = False) -> dict:
        """The row labels of this method under `compare`'s defaults: stream, conditioning (both None for
        the blends: they move no channels) and mask_rule (None without a mask)."""
        if self.kind != "channels":
            return {"stream": None, "conditioning": None, "mask_rule": None}
        return {"stream": self.stream or stream, "conditioning": conditioning if self.conditioning is None else self.conditioning,
                "mask_rule": self.mask_rule if self.mask is not None else None}


@dataclass
class Comparison:
    """`compare`'s result: `rows` (one per pair x method x alpha, plus the unedited source and target
    as methods "source image" / "target image"), `images[(method name, seed, alpha)]` (pairs, H, W, 3),
    the unedited `sources` and `targets`, the K-means `masks[rule][side]` (rule in
    `transport.MASK_RULES`, side "source", "target" or "union"; (pairs, image tokens)) for the
    rules the methods used, and the flat `pairs` [(kind, index, Pair)]."""

    rows: list[dict]
    images: dict[tuple, np.ndarray]
    sources: np.ndarray
    targets: np.ndarray
    masks: dict[str, dict[str, torch.Tensor]]
    pairs: list[tuple[str, int, Pair]]
    seconds: float = 0.0


def flatten(pairs_by_kind: dict[str, Sequence[Pair]]) -> list[tuple[str, int, Pair]]:
    """[(kind, index within the kind, Pair)] of every pair, kinds in order; refused when there is none."""
    flat = [(kind, i, p) for kind, ps in pairs_by_kind.items() for i, p in enumerate(ps)]
    if not flat:
        raise ValueError("pairs_by_kind holds no pair")
    return flat


def score_rows(part: Sequence[tuple[str, int, Pair]], images: np.ndarray, target_images: np.ndarray, **labels) -> list[dict]:
    """One row per pair of `part` ([(kind, index, Pair)]): its kind and index, the labels, and
    `score` of its output image against its unedited target image."""
    return [{"kind": kind, "pair": i, **labels, **score(pair, images[j], target_images[j])}
            for j, (kind, i, pair) in enumerate(part)]


def method_outputs(methods: Sequence[Method], alphas: Sequence[float], rec: transport.Record, targets: Sequence[str],
                   target_images: np.ndarray, blend_sources: np.ndarray, masks: dict[str, dict[str, torch.Tensor]] | None = None,
                   stream: str = "img", batch_size: int = 16, conditioning: bool = False,
                   **pipe_kwargs) -> Iterator[tuple[Method, float, np.ndarray]]:
    """Every method at each of its alphas (its own `alphas`, else these) on one chunk of pairs:
    yields (method, alpha, outputs (pairs, H, W, 3)), methods in order.

    rec: the sources, recorded with every channel (a record of all channels serves every channel
    set, as a subset) and the conditioning; targets: the target prompts, one per recorded unit;
    target_images: their unedited generations -- the output of every method at alpha = 0
    (`transport.transport` and `transport.embedding_blend` are bitwise exact there; tested), so it
    is not regenerated; blend_sources: what the pixel blend mixes in (the source images, or
    chapter 5's references); masks: the K-means masks, masks[rule][side], when a method uses one;
    stream, conditioning: the defaults of methods that leave them None (`Method.settings`)."""
    todo = [(m, alpha) for m in methods for alpha in (alphas if m.alphas is None else m.alphas)]
    for m, alpha in progress_.bar(todo, "methods x alphas"):
        if alpha == 0:
            out = target_images
        elif m.kind == "pixel":
            out = transport.pixel_blend(blend_sources, target_images, alpha)
        elif m.kind == "embedding":
            out = transport.embedding_blend(rec.adapter, [p for p, _ in rec.units], targets, alpha,
                                            [s for _, s in rec.units], rec.num_inference_steps, batch_size, **pipe_kwargs)
        else:
            how = m.settings(stream, conditioning)
            out = transport.transport(rec, targets, alpha, mask=None if m.mask is None else masks[m.mask_rule][m.mask],
                                      stream=how["stream"], channels=None if m.channels == "all" else m.channels,
                                      steps=m.steps, batch_size=batch_size, target_images=target_images,
                                      conditioning=how["conditioning"], **pipe_kwargs).images
        yield m, alpha, out


def images_per_pair(methods: Sequence[Method], alphas: Sequence[float]) -> int:
    """The generations `compare` makes per pair: the source and the target, and every method that
    generates (channels, embedding) at each of its alphas but 0 (alpha 0 is the target itself)."""
    return 2 + sum(sum(1 for a in (alphas if m.alphas is None else m.alphas) if a != 0) for m in methods if m.kind != "pixel")


def _check_methods(methods: Sequence[Method]) -> None:
    if not methods or not all(isinstance(m, Method) for m in methods):
        raise ValueError("methods must be a non-empty list of Method")
    names = [(m.name, m.seed) for m in methods]
    if len(set(names)) != len(names):
        raise ValueError(f"methods must have distinct (name, seed); repeated: {sorted({n for n in names if names.count(n) > 1})}")


def _check_mask_at(adapter: Adapter, mask_at, mask_channels, num_inference_steps: int) -> tuple[str, int]:
    """The (image tap, step) the K-means masks are clustered at, checked."""
    if mask_at is None or mask_channels is None:
        raise ValueError("methods with a K-means mask need mask_at=(image tap, step) and mask_channels={tap: ints}")
    mask_tap, mask_step = str(probe.resolve(adapter, mask_at[0])), int(mask_at[1])
    if not mask_tap.endswith(".img") or mask_tap not in mask_channels:
        raise ValueError(f"mask_at needs an image tap with a channel set in mask_channels, got {mask_at!r}")
    if not 0 <= mask_step < num_inference_steps:
        raise ValueError(f"mask step {mask_step} outside the {num_inference_steps} steps")
    return mask_tap, mask_step


def _targets(adapter: Adapter, rec: transport.Record, targets: list[str], seeds: list[int], mask_at: tuple[str, int] | None,
             mask_channels: dict | None, rules: Sequence[str], num_inference_steps: int, batch_size: int,
             **pipe_kwargs) -> tuple[np.ndarray, dict[str, dict[str, torch.Tensor]]]:
    """(the unedited target images, the K-means masks {rule: {"source", "target", "union"}} for each
    of `rules`, or {} without mask_at). With masks, the targets are recorded at mask_at on
    mask_channels (their masks are clustered on those)."""
    if mask_at is None:
        return adapter.generate(list(zip(targets, seeds)), num_inference_steps, batch_size, **pipe_kwargs), {}
    tap, step = mask_at
    trec = transport.record(adapter, targets, taps=[tap], steps=[step], channels={tap: mask_channels[tap]},
                            unit_seeds=seeds, num_inference_steps=num_inference_steps, batch_size=batch_size, **pipe_kwargs)
    masks = {}
    for rule in rules:
        masks[rule] = {"source": transport.kmeans_mask(rec, tap, step, rule=rule, channels=mask_channels[tap]),
                       "target": transport.kmeans_mask(trec, tap, step, rule=rule)}
        masks[rule]["union"] = masks[rule]["source"] | masks[rule]["target"]
    return trec.images, masks


def compare(adapter: Adapter, pairs_by_kind: dict[str, Sequence[Pair]], methods: Sequence[Method],
            alphas: Sequence[float] = (0.5, 1.0), num_inference_steps: int = 20, batch_size: int = 16, chunk: int = 64,
            stream: str = "img", mask_at: tuple[str, int] | None = None, mask_channels: dict | None = None,
            first_seed: int = 0, conditioning: bool = False, **pipe_kwargs) -> Comparison:
    """Every method at every alpha on the same pairs; pair i of the k-th kind gets the noise of seed
    first_seed + 1000 k + i (so a prefix of the pairs gets the same noise in another comparison).

    stream, conditioning: what every channel method that leaves them None moves -- the image stream
    and not the AdaLN conditioning by default, the same for every method, "all" included
    (`Method.settings`; rows carry `stream`, `conditioning` and `mask_rule`).

    Per chunk of pairs: the sources are recorded once with every channel of every stream a method
    moves, and the conditioning (a record of all channels serves every channel set, as a subset);
    the targets are generated once (recorded at `mask_at` = (image tap, step) with
    `mask_channels[tap]` when a method needs K-means masks, which are then clustered on those
    channels, for each mask rule a method uses); then each method runs at each alpha
    (`method_outputs`). alpha = 0 is the unedited target for every method (`transport` and
    `embedding_blend` are bitwise exact there; tested), so it is copied, not regenerated.
    """
    start_time = time.perf_counter()
    if any(len(ps) > 1000 for ps in pairs_by_kind.values()):
        raise ValueError("at most 1000 pairs per kind (their seeds would collide)")
    flat = flatten(pairs_by_kind)
    seed_of = {(kind, i): first_seed + 1000 * k + i for k, (kind, ps) in enumerate(pairs_by_kind.items()) for i in range(len(ps))}
    _check_methods(methods)
    alphas = [transport.check_alpha(a) for a in alphas]
    transport.check_stream(stream)
    if not isinstance(conditioning, bool):
        raise ValueError(f"conditioning must be True or False (what every method that leaves it None does), got {conditioning!r}")
    settings = {(m.name, m.seed): m.settings(stream, conditioning) for m in methods}
    streams = sorted({s for m in methods if m.kind == "channels" for s in transport.check_stream(settings[(m.name, m.seed)]["stream"])},
                     key=transport.STREAMS.index) or ["img"]
    rules = list(dict.fromkeys(m.mask_rule for m in methods if m.mask is not None))
    mask_at = _check_mask_at(adapter, mask_at, mask_channels, num_inference_steps) if rules else None
    stream_taps = [str(t) for t in probe.taps(adapter, streams)]
    rows: list[dict] = []
    images: dict[tuple, list[np.ndarray]] = {}
    sources, targets, masks = [], [], {r: {side: [] for side in transport.MASKS} for r in rules}
    what = f"text transport, {len(flat)} pairs"
    with progress_.estimate(what, len(flat) * images_per_pair(methods, alphas), num_inference_steps):
        for c0 in progress_.bar(range(0, len(flat), chunk), "chunks of pairs", unit="chunk"):
            part = flat[c0:c0 + chunk]
            seeds = [seed_of[(kind, i)] for kind, i, _ in part]
            tgt_prompts = [p.target for _, _, p in part]
            # 1. the sources, every channel of the streams moved and the conditioning; 2. the targets (and the K-means masks)
            rec = transport.record(adapter, [p.source for _, _, p in part], taps=stream_taps, channels="all", conditioning=True,
                                   unit_seeds=seeds, num_inference_steps=num_inference_steps, batch_size=batch_size, **pipe_kwargs)
            target_images, chunk_masks = _targets(adapter, rec, tgt_prompts, seeds, mask_at, mask_channels, rules,
                                                  num_inference_steps, batch_size, **pipe_kwargs)
            for rule, by_side in chunk_masks.items():
                for side, mask in by_side.items():
                    masks[rule][side].append(mask)
            sources.append(rec.images)
            targets.append(target_images)
            # 3. every method at every alpha
            for m, alpha, out in method_outputs(methods, alphas, rec, tgt_prompts, target_images, rec.images, chunk_masks,
                                                stream, batch_size, conditioning, **pipe_kwargs):
                images.setdefault((m.name, m.seed, alpha), []).append(out)
                rows += score_rows(part, out, target_images, method=m.name, method_kind=m.kind, seed=m.seed, mask=m.mask,
                                   alpha=alpha, **settings[(m.name, m.seed)])
            for name, ims in (("source image", rec.images), ("target image", target_images)):
                rows += score_rows(part, ims, target_images, method=name, method_kind="reference", seed=None, mask=None,
                                   alpha=None, stream=None, conditioning=None, mask_rule=None)
    return Comparison(rows, {key: np.concatenate(v) for key, v in images.items()}, np.concatenate(sources),
                      np.concatenate(targets), {r: {side: torch.cat(v) for side, v in by.items()} for r, by in masks.items()},
                      flat, time.perf_counter() - start_time)
