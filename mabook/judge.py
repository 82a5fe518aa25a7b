"""An exact scorer for shapes-world images: did the image draw what the caption asked for?

Given an image and its caption, the judge

1. finds the background (median colour of the border, snapped to the background palette),
2. finds objects: foreground pixels snapped to the nearest object colour, split into connected
   components per colour (scipy.ndimage.label),
3. names each object's shape, size and position by matching its mask against the world's own
   templates (every shape x size x position is drawn at a fixed place, so the best-IoU template
   *is* the reading),
4. pairs detected objects with the caption's objects (Hungarian assignment on attribute
   agreement, scipy.optimize.linear_sum_assignment) and scores each attribute.

It also returns the foreground mask, its IoU against a rendering of the caption, and
"cleanliness": the fraction of pixels that are near a palette colour (background or object), so a
smeared or noisy image scores low even when its objects are legible.

What this is not: a learned metric. On the world's own renders it is exact (tested); on
generated images it is as good as the rendering is clean.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from mabook import world
from mabook.images import to_uint8
from mabook.stats import bootstrap_ci

FOREGROUND_DISTANCE = 60.0  # RGB distance from the background beyond which a pixel is foreground
PALETTE_DISTANCE = 90.0  # a foreground pixel farther than this from every object colour is "other"
CLEAN_DISTANCE = 40.0  # a pixel this close to a palette colour counts as clean
MIN_AREA = 10  # pixels; the smallest world object (a small triangle) has ~40

_COLOR_NAMES = list(world.COLORS)
_COLOR_RGB = np.array([world.COLORS[c] for c in _COLOR_NAMES], np.float32)
_BG_NAMES = list(world.BACKGROUNDS)
_BG_RGB = np.array([world.BACKGROUNDS[b] for b in _BG_NAMES], np.float32)


@lru_cache(maxsize=1)
def _templates():
    """All shape x size x position masks: (n_templates, H*W) bool and their attribute tuples."""
    keys, masks = [], []
    for shape in world.SHAPES:
        for size in world.SIZES:
            for position in world.POSITIONS:
                keys.append((shape, size, position))
                masks.append(world.object_mask(world.ObjectSpec("red", shape, size, position)).ravel())
    return keys, np.stack(masks)


@dataclass
class DetectedObject:
    color: str
    shape: str
    size: str
    position: str
    area: int
    template_iou: float  # how well the best template fits: low means a malformed object


@dataclass
class Judgement:
    """The judge's reading of one image against one caption."""

    caption: str
    scene: world.Scene
    correct: list[dict[str, bool]]  # per caption object: {"color": …, "shape": …, "size": …, "position": …}
    detected: list[DetectedObject]
    background_correct: bool
    foreground: np.ndarray = field(repr=False)  # (H, W) bool
    mask_iou: float
    cleanliness: float

    @property
    def count_correct(self) -> bool:
        return len(self.detected) == len(self.scene.objects)

    @property
    def all_correct(self) -> bool:
        return all(all(c.values()) for c in self.correct) and self.background_correct and self.count_correct


def _as_uint8_rgb(image) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"image must be (H, W, 3), got shape {img.shape}")
    if img.dtype != np.uint8:
        if img.min() < -1e-3 or img.max() > 1 + 1e-3:
            raise ValueError(f"float images must lie in [0, 1], got range [{img.min():.3f}, {img.max():.3f}]")
        img = to_uint8(img)
    if img.shape[:2] != (world.IMAGE_SIZE, world.IMAGE_SIZE):
        raise ValueError(f"image must be {world.IMAGE_SIZE}x{world.IMAGE_SIZE}, got {img.shape[:2]}")
    return img


def _distance(pixels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """(..., 3) x (P, 3) -> (..., P) Euclidean RGB distances."""
    return np.linalg.norm(pixels[..., None, :] - palette, axis=-1)


def detect(image) -> tuple[str, np.ndarray, list[DetectedObject], float]:
    """-> (background name, foreground mask (H, W), detected objects, cleanliness)."""
    img = _as_uint8_rgb(image).astype(np.float32)
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg_rgb = np.median(border, axis=0)
    bg_name = _BG_NAMES[int(np.argmin(_distance(bg_rgb, _BG_RGB)))]

    foreground = np.linalg.norm(img - bg_rgb, axis=-1) > FOREGROUND_DISTANCE
    d_color = _distance(img, _COLOR_RGB)  # (H, W, n_colors)
    nearest = d_color.argmin(-1)
    near_palette = d_color.min(-1) < PALETTE_DISTANCE

    d_clean = np.minimum(d_color.min(-1), np.linalg.norm(img - world.BACKGROUNDS[bg_name], axis=-1))
    cleanliness = float((d_clean < CLEAN_DISTANCE).mean())

    keys, templates = _templates()
    objects = []
    for ci, color in enumerate(_COLOR_NAMES):
        labels, n = ndimage.label(foreground & near_palette & (nearest == ci))
        for lab in range(1, n + 1):
            mask = (labels == lab).ravel()
            area = int(mask.sum())
            if area < MIN_AREA:
                continue
            inter = (templates & mask).sum(1)
            iou = inter / (templates.sum(1) + area - inter)
            best = int(iou.argmax())
            shape, size, position = keys[best]
            objects.append(DetectedObject(color, shape, size, position, area, float(iou[best])))
    objects.sort(key=lambda o: -o.area)
    return bg_name, foreground, objects, cleanliness


def applies(adapter, prompts) -> bool:
    """Whether the judge can score what `adapter`'s model draws for these prompts: only the organism
    draws the shapes world (32x32 renderings of a caption), and only for world captions. A real
    model asked for "a red circle" makes a 1024x1024 photo the judge cannot read: never judged."""
    if getattr(getattr(adapter, "family", None), "name", None) != "organism":
        return False
    try:
        for p in prompts:
            world.parse_caption(p)
    except ValueError:
        return False
    return True


def judge(image, caption: str) -> Judgement:
    """Score one image (H, W, 3) (uint8, or float in [0, 1]) against its caption."""
    scene = world.parse_caption(caption)
    bg_name, foreground, detected, cleanliness = detect(image)

    # Pair caption objects with detections, maximising the number of agreeing attributes.
    correct = [{a: False for a in world.ATTRIBUTES} for _ in scene.objects]
    if detected:
        agree = np.array([[sum(getattr(o, a) == getattr(d, a) for a in world.ATTRIBUTES) + 1e-3 * d.template_iou
                           for d in detected] for o in scene.objects])
        rows, cols = linear_sum_assignment(-agree)
        for i, j in zip(rows, cols):
            correct[i] = {a: getattr(scene.objects[i], a) == getattr(detected[j], a) for a in world.ATTRIBUTES}

    truth = world.render(scene).foreground
    union = (truth | foreground).sum()
    mask_iou = float((truth & foreground).sum() / union) if union else 1.0
    return Judgement(caption, scene, correct, detected, bg_name == scene.background, foreground, mask_iou, cleanliness)


def summarize(judgements: list[Judgement]) -> dict:
    """Accuracy per attribute (over caption objects), grouped by number of objects in the caption.

    Each group also has "ci95": a bootstrap 95% interval for every attribute's accuracy.
    """
    out = {}
    for n in sorted({len(j.scene.objects) for j in judgements}):
        group = [j for j in judgements if len(j.scene.objects) == n]
        objs = [c for j in group for c in j.correct]
        out[f"{n}_object"] = {
            "n_images": len(group),
            **{a: float(np.mean([c[a] for c in objs])) for a in world.ATTRIBUTES},
            "background": float(np.mean([j.background_correct for j in group])),
            "object_count": float(np.mean([j.count_correct for j in group])),
            "all_correct": float(np.mean([j.all_correct for j in group])),
            "mask_iou": float(np.mean([j.mask_iou for j in group])),
            "cleanliness": float(np.mean([j.cleanliness for j in group])),
            "ci95": {a: bootstrap_ci([c[a] for c in objs]) if len(objs) > 1 else (np.nan, np.nan) for a in world.ATTRIBUTES},
        }
    return out
