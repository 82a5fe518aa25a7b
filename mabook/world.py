"""The shapes world: procedural, captioned 32x32 images whose ground truth is known.

A scene is one or two flat-coloured objects (colour, shape, size, position from small
vocabularies) on a plain background. Every sample carries its caption, the rendered image and
one pixel mask per object, so that any claim about "the subject" can be checked against truth.

What this is not: a photo-realistic dataset. It is small on purpose, so that a miniature FLUX can
learn it on a CPU in an hour and every experiment in the book can be scored exactly
(see `mabook.judge`).

Caption grammar (one sentence, lower case)::

    caption  := object [" and " object] " on a " BACKGROUND " background"
    object   := "a " SIZE " " COLOR " " SHAPE " at the " POSITION

e.g. ``"a large red circle at the top left on a black background"``.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

IMAGE_SIZE = 32  # pixels per side; 8x8 tokens of 4x4 pixels in the organism

# Palettes are RGB uint8. Object colours are chosen far apart so that a judge can name them exactly.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (240, 220, 40),
    "magenta": (220, 50, 220),
    "cyan": (40, 220, 230),
    "orange": (245, 140, 30),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "gray": (120, 120, 120),
    "white": (255, 255, 255),
}
SHAPES = ("circle", "square", "triangle")
# Half-extent in pixels. Large objects span ~4 tokens, small ones ~2-3: enough for spatial maps.
SIZES: dict[str, float] = {"small": 4.5, "large": 7.0}
# 3x3 grid of object centres (x, y) in pixel coordinates (pixel i covers [i, i+1)).
_GRID = (8.0, 16.0, 24.0)
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (_GRID[0], _GRID[0]),
    "top": (_GRID[1], _GRID[0]),
    "top right": (_GRID[2], _GRID[0]),
    "left": (_GRID[0], _GRID[1]),
    "center": (_GRID[1], _GRID[1]),
    "right": (_GRID[2], _GRID[1]),
    "bottom left": (_GRID[0], _GRID[2]),
    "bottom": (_GRID[1], _GRID[2]),
    "bottom right": (_GRID[2], _GRID[2]),
}
ATTRIBUTES = ("color", "shape", "size", "position")
HELDOUT_FRACTION = 4  # one caption in 4 is held out of training (by a stable hash of the caption)


@dataclass(frozen=True)
class ObjectSpec:
    """One object's attributes, each a word from its vocabulary."""

    color: str
    shape: str
    size: str
    position: str

    def __post_init__(self):
        for name, vocab in (("color", COLORS), ("shape", SHAPES), ("size", SIZES), ("position", POSITIONS)):
            value = getattr(self, name)
            if value not in vocab:
                raise ValueError(f"unknown {name} {value!r}; allowed: {sorted(vocab)}")

    @property
    def phrase(self) -> str:
        return f"a {self.size} {self.color} {self.shape} at the {self.position}"


@dataclass(frozen=True)
class Scene:
    """A caption's meaning: 1-2 objects on a background."""

    objects: tuple[ObjectSpec, ...]
    background: str = "black"

    def __post_init__(self):
        if not 1 <= len(self.objects) <= 2:
            raise ValueError(f"a scene has 1 or 2 objects, got {len(self.objects)}")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}; allowed: {sorted(BACKGROUNDS)}")

    @property
    def caption(self) -> str:
        return " and ".join(o.phrase for o in self.objects) + f" on a {self.background} background"


@dataclass
class Sample:
    """A rendered scene with its ground truth.

    image: (H, W, 3) uint8; masks: (n_objects, H, W) bool, one visible-pixel mask per object.
    """

    scene: Scene
    image: np.ndarray
    masks: np.ndarray

    @property
    def caption(self) -> str:
        return self.scene.caption

    @property
    def foreground(self) -> np.ndarray:
        return self.masks.any(0)


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


def shape_mask(shape: str, cx: float, cy: float, r: float, size: int = IMAGE_SIZE) -> np.ndarray:
    """Boolean (size, size) mask of a shape centred at (cx, cy) with half-extent r.

    A pixel is inside when its centre is (hard edges: every pixel has an exact palette colour).
    """
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":  # slightly smaller than the circle's box so areas stay comparable
        h = 0.85 * r
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if shape == "triangle":  # upright isosceles: apex at the top, base at the bottom
        top, bottom = cy - r, cy + 0.85 * r
        frac = (dy - (top - cy)) / (bottom - top)  # 0 at apex, 1 at base
        return (frac >= 0) & (frac <= 1) & (np.abs(dx) <= frac * r)
    raise ValueError(f"unknown shape {shape!r}; allowed: {list(SHAPES)}")


def object_mask(obj: ObjectSpec, size: int = IMAGE_SIZE) -> np.ndarray:
    cx, cy = POSITIONS[obj.position]
    return shape_mask(obj.shape, cx, cy, SIZES[obj.size], size)


def overlaps(a: ObjectSpec, b: ObjectSpec, margin: float = 1.0) -> bool:
    """True if the two objects' bounding boxes (plus a margin) intersect."""
    (ax, ay), (bx, by) = POSITIONS[a.position], POSITIONS[b.position]
    reach = SIZES[a.size] + SIZES[b.size] + margin
    return abs(ax - bx) < reach and abs(ay - by) < reach


def render(scene: Scene) -> Sample:
    """Draw a scene: background, then objects in caption order."""
    image = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    image[:] = BACKGROUNDS[scene.background]
    masks = np.zeros((len(scene.objects), IMAGE_SIZE, IMAGE_SIZE), bool)
    for i, obj in enumerate(scene.objects):
        m = object_mask(obj)
        masks[:i, m] = False  # later objects occlude earlier ones
        masks[i] = m
        image[m] = COLORS[obj.color]
    return Sample(scene, image, masks)


# ---------------------------------------------------------------------------------------------
# Captions: parse, split, sample
# ---------------------------------------------------------------------------------------------

_alt = lambda words: "|".join(sorted(map(re.escape, words), key=len, reverse=True))  # noqa: E731
_OBJECT_RE = (
    rf"a (?P<size{{i}}>{_alt(SIZES)}) (?P<color{{i}}>{_alt(COLORS)}) (?P<shape{{i}}>{_alt(SHAPES)})"
    rf" at the (?P<position{{i}}>{_alt(POSITIONS)})"
)
_CAPTION_RE = re.compile(
    "^" + _OBJECT_RE.format(i=0) + "(?: and " + _OBJECT_RE.format(i=1) + ")?"
    + rf" on a (?P<background>{_alt(BACKGROUNDS)}) background$"
)


def parse_caption(caption: str) -> Scene:
    """Caption -> intended Scene. Raises ValueError naming the caption and the grammar."""
    if not isinstance(caption, str):
        raise TypeError(f"caption must be a str, got {type(caption).__name__}")
    m = _CAPTION_RE.match(caption.strip().lower())
    if m is None:
        raise ValueError(
            f"cannot parse caption {caption!r}; expected e.g. "
            "'a large red circle at the top left on a black background' "
            f"(sizes {list(SIZES)}, colors {list(COLORS)}, shapes {list(SHAPES)}, "
            f"positions {list(POSITIONS)}, backgrounds {list(BACKGROUNDS)})"
        )
    objects = [
        ObjectSpec(m[f"color{i}"], m[f"shape{i}"], m[f"size{i}"], m[f"position{i}"])
        for i in (0, 1)
        if m[f"shape{i}"] is not None
    ]
    return Scene(tuple(objects), m["background"])


def is_heldout(caption: str) -> bool:
    """Stable 1-in-4 split by caption hash: held-out captions are never used in training."""
    digest = hashlib.blake2b(caption.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % HELDOUT_FRACTION == 0


def vocabulary() -> list[str]:
    """Every word a caption can contain, in a fixed order (the tokenizer's vocabulary)."""
    words = ["a", "at", "the", "and", "on", "background"]
    for vocab in (SIZES, COLORS, SHAPES, POSITIONS, BACKGROUNDS):
        for phrase in vocab:
            for w in phrase.split():
                if w not in words:
                    words.append(w)
    return words


def _random_object(rng: np.random.Generator) -> ObjectSpec:
    return ObjectSpec(
        color=rng.choice(list(COLORS)),
        shape=rng.choice(SHAPES),
        size=rng.choice(list(SIZES)),
        position=rng.choice(list(POSITIONS)),
    )


_SPLITS = ("train", "heldout", "any")


def sample_scene(rng: np.random.Generator, n_objects: int | None = None, split: str = "any") -> Scene:
    """Draw one random scene.

    n_objects: 1, 2, or None. With None a pair is proposed 40% of the time, but a pair that overlaps
    (or repeats a colour) is redrawn from scratch, one object or two: so about 17% of scenes have
    two objects, which is the mix the organism was trained on. split: "train" (never a held-out caption),
    "heldout" (only held-out captions) or "any".
    """
    if split not in _SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {list(_SPLITS)}")
    if n_objects not in (None, 1, 2):
        raise ValueError(f"n_objects must be 1, 2 or None, got {n_objects!r}")
    while True:
        n = n_objects or (1 if rng.random() < 0.6 else 2)
        objs = [_random_object(rng) for _ in range(n)]
        # two objects must be apart and of different colours (objects in the center never are)
        if n == 2 and (overlaps(*objs) or objs[0].color == objs[1].color):
            continue
        background = rng.choice(list(BACKGROUNDS))
        scene = Scene(tuple(objs), background)
        if split == "any" or is_heldout(scene.caption) == (split == "heldout"):
            return scene


def sample(n: int, seed: int = 0, n_objects: int | None = None, split: str = "any") -> list[Sample]:
    """n rendered samples, deterministic for a seed."""
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    rng = np.random.default_rng(seed)
    return [render(sample_scene(rng, n_objects, split)) for _ in range(n)]


def heldout_captions(n: int, n_objects: int, seed: int = 0) -> list[str]:
    """n distinct held-out captions with n_objects objects each, in a seeded order."""
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if n_objects not in (None, 1, 2):
        raise ValueError(f"n_objects must be 1, 2 or None, got {n_objects!r}")
    rng = np.random.default_rng(seed)
    seen: dict[str, None] = {}
    tries = 0
    while len(seen) < n:
        seen.setdefault(sample_scene(rng, n_objects, "heldout").caption)
        tries += 1
        if tries > 200 * n + 10_000:
            raise ValueError(f"only {len(seen)} distinct held-out captions with {n_objects} objects exist")
    return list(seen)


def to_tensor_batch(samples: Sequence[Sample]):
    """Samples -> float tensor (batch_size, 3, H, W) in [-1, 1], the organism's pixel space."""
    x = np.stack([s.image for s in samples]).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
