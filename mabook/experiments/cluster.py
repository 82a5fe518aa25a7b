"""`mabook cluster`: K-means masks of the image tokens on the top channels at one (tap, step) (chapter 3).

Writes into --out: masks.png (rows: images, foreground overlaid, cluster label maps), mask_NN.png
(each image's pixel foreground mask) and iou.json (settings, provenance, the channels, one row per
image and the mean IoU with a bootstrap 95 % CI; no IoU for prompts outside the shapes world;
written last).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import numpy as np

from mabook import discovery, files, images, judge, spatial
from mabook.config import Units, check_choice, check_positive, option
from mabook.disruption import check_generation

COLORS = np.array([[0, 0, 0], [255, 255, 255], [230, 40, 40], [40, 190, 60], [50, 90, 235], [240, 220, 40],
                   [220, 50, 220], [40, 220, 230]], np.uint8)  # the label maps' palette


@dataclass
class Config(Units):
    NAME: ClassVar[str] = "cluster"

    tap: str | None = option(None, "an image tap, e.g. single_transformer_blocks.1.img (default: the middle one)", type=str)
    step: int | None = option(None, "denoising step (default: the middle one)", type=int)
    k: int = option(2, "K, the number of K-means clusters")
    n_channels: int = option(4, "channels in the set (the top-k massive by default)")
    kind: str = option("top", f"channel set: {', '.join(spatial.KINDS)}")
    seed: int = option(0, "K-means and random-set seed")

    def check(self) -> None:
        super().check()
        check_positive(self, "n_channels")
        check_choice(self, "kind", spatial.KINDS)
        if not 0 <= self.mask_step < self.num_inference_steps:
            raise ValueError(f"step {self.mask_step} never runs: --num-inference-steps {self.num_inference_steps} runs "
                             f"steps 0..{self.num_inference_steps - 1}")

    @property
    def mask_step(self) -> int:
        return self.num_inference_steps // 2 if self.step is None else self.step

    def check_adapter(self, adapter) -> None:
        check_generation(adapter, self.prompt_list, self.seeds, self.num_inference_steps, self.batch_size, "cluster")
        spatial.image_tap(adapter, self.tap)
        h, w = adapter.grid()
        spatial.check_clusters(self.k, h * w)
        if self.kind != "all":
            discovery.check_k(self.n_channels, adapter.width)


def run(config: Config, adapter) -> SimpleNamespace:
    """Generate once keeping the hidden states at (tap, step); cluster; IoU for world captions."""
    config.check_adapter(adapter)
    tap, step, prompts = spatial.image_tap(adapter, config.tap), config.mask_step, config.prompt_list
    cap = spatial.capture(adapter, prompts, config.seeds, config.num_inference_steps, taps=[tap], steps=[step],
                          batch_size=config.batch_size)
    name, spec = next(iter(spatial.channel_sets(cap.stats, config.n_channels, [config.kind], n_random=1,
                                                seed=config.seed).items()))
    channels = spec["channels"][tap]
    # masks: matched to the objects for world captions, else the smallest cluster is the foreground
    judged = judge.applies(adapter, prompts)
    fg = spatial.foreground_maps(cap, tap, step, channels, config.k, config.seed, "rendered" if judged else None)
    x = cap.features(tap, step, channels)
    labels = np.stack([spatial.label_map(spatial.kmeans(x[u], config.k, config.seed), cap.grid)
                       for u in range(len(cap.units))])
    rows, summary = [], {}
    if judged:  # IoU against the caption's rendering and the judge's mask of the generated image
        rows = spatial.measure(cap, {name: spec}, [tap], [step], [config.k], thresholds=(), chance=False, seed=config.seed)
        metrics = ("token_iou", "pixel_iou", "object_iou")
        for source in spatial.SOURCES:
            (s,) = spatial.summary(rows, by=("set",), source=source)
            summary[source] = {m: s[m] for m in metrics} | {f"{m}_ci": s[f"{m}_ci"] for m in metrics} | {"n_units": s["n_units"]}
    return SimpleNamespace(cap=cap, tap=tap, step=step, set=name, channels=channels, foreground=fg, labels=labels,
                           rows=rows, summary=summary, judged=judged, units=cap.units)


def write(config: Config, result: SimpleNamespace, out: Path, record: dict) -> list[str]:
    cap, size = result.cap, result.cap.images.shape[1:3]
    pictures = images.to_uint8(cap.images)
    label_images = np.stack([COLORS[images.upsample(m, size) % len(COLORS)] for m in result.labels])
    images.save(images.mosaic([pictures, images.overlay(pictures, result.foreground), label_images], fill=200),
                out / "masks.png")
    for u in range(len(cap.units)):
        files.save_image(images.enlarged(images.upsample(result.foreground[u], size).astype(np.uint8) * 255, 1),
                         out / f"mask_{u:02d}.png", "PNG")
    record["settings"] |= {"tap": result.tap, "step": result.step}
    files.write_json(out / "iou.json", {**record, "set": result.set, "channels": result.channels, "grid": list(cap.grid),
                                        "summary": result.summary, "rows": result.rows}, default=float)
    lines = [f"{result.set} channels {result.channels} at {result.tap}, step {result.step}; K={config.k}"]
    for source, s in result.summary.items():
        lo, hi = s["token_iou_ci"]
        lines.append(f"IoU vs {source:8s} token {s['token_iou']:.3f} (95% CI {lo:.3f}-{hi:.3f})  pixel {s['pixel_iou']:.3f}")
    if not result.judged:
        lines.append("prompts are not shapes-world captions: masks only, no IoU")
    return lines
