"""Images as arrays, in one place: float [0, 1] -> uint8, mosaics of rows, mask overlays, saved grids.

Every chapter and verb shows images the same way: (N, H, W, 3) floats in [0, 1] (what the
pipelines return with output_type="np") become uint8 by `to_uint8` (clip, x255, round half to
even), rows of them become one mosaic (`mosaic`), masks are tinted in (`overlay`) and a mosaic is
saved enlarged only as far as a reader needs (`save`: 4x for 32x32 images, 1x for 1024x1024).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from mabook import files

MAX_SIDE = 2048  # `save` enlarges (nearest neighbour, at most 4x) while the longer side stays within this


def to_uint8(images) -> np.ndarray:
    """uint8 (..., H, W, 3) of float images in [0, 1] (clipped), a (B, 3, H, W) tensor, or PIL images; uint8 as is."""
    if isinstance(images, list) and images and isinstance(images[0], Image.Image):
        return np.stack([np.asarray(im) for im in images])
    if isinstance(images, torch.Tensor):
        images = images.permute(0, 2, 3, 1).cpu().numpy()
    images = np.asarray(images)
    return images if images.dtype == np.uint8 else (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


def mosaic(rows: Sequence[np.ndarray], pad: int = 2, fill: int = 255) -> np.ndarray:
    """Rows of images (each (n, H, W, 3), floats in [0, 1] or uint8, one H and W) -> one uint8
    mosaic, `pad` pixels of `fill` between images (200, grey, keeps white backgrounds visible)."""
    n = max(len(r) for r in rows)
    H, W = np.asarray(rows[0]).shape[1:3]
    out = np.full((len(rows) * (H + pad) + pad, n * (W + pad) + pad, 3), fill, dtype=np.uint8)
    for i, images in enumerate(rows):
        for j, image in enumerate(to_uint8(images)):
            y, x = pad + i * (H + pad), pad + j * (W + pad)
            out[y:y + H, x:x + W] = image
    return out


def upsample(token_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) token map -> (H, W) pixels, each token a block (H, W multiples of h, w)."""
    h, w = token_map.shape
    return np.repeat(np.repeat(token_map, size[0] // h, axis=0), size[1] // w, axis=1)


def overlay(images: np.ndarray, masks: np.ndarray, color=(255, 0, 255), alpha: float = 0.55) -> np.ndarray:
    """(B, H, W, 3) images (uint8, or floats in [0, 1]) with (B, h, w) or (B, H, W) masks tinted in:
    uint8 (B, H, W, 3). Token masks are upsampled to pixels."""
    images = to_uint8(images)
    masks = np.asarray(masks, dtype=bool)
    if masks.shape[1:] != images.shape[1:3]:
        masks = np.stack([upsample(m, images.shape[1:3]) for m in masks])
    out = images.astype(np.float32)
    out[masks] = (1 - alpha) * out[masks] + alpha * np.asarray(color, np.float32)
    return out.round().astype(np.uint8)


def enlarged(image: np.ndarray, scale: int) -> Image.Image:
    """A uint8 (H, W, 3) array as a PIL image, `scale` times larger (nearest neighbour: pixels stay pixels)."""
    im = Image.fromarray(np.asarray(image, dtype=np.uint8))
    return im.resize((im.width * scale, im.height * scale), Image.NEAREST) if scale > 1 else im


def save(image: np.ndarray, path: str | Path, max_side: int = MAX_SIDE) -> Path:
    """A uint8 mosaic as a PNG, atomically: enlarged 4x for 32x32 images, not at all for large ones."""
    scale = max(1, min(4, max_side // max(np.asarray(image).shape[:2])))
    return files.save_image(enlarged(image, scale), path, "PNG")
