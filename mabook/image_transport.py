"""Chapter 5's experiment on the shapes world: references brought onto a trajectory, transported.

Image-conditioned transport measured where the truth is known: the reference is a pair's source
caption drawn by the world (`render_references`), brought onto the pipeline's schedule by
`mabook.inversion` (inverted, or noised), recorded once along it, and its channels moved into the
generation of the pair's target caption, which starts from the same noise. `compare` runs
trajectories x methods x alphas; the pairs, methods, scores and the method x alpha loop are chapter
4's (`mabook.text_transport`), so the two chapters' tables read the same.

What this is not: the mechanism (`mabook.inversion`, `mabook.transport`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from mabook import inversion, probe, transport, world
from mabook import progress as progress_
from mabook.inversion import Trajectory
from mabook.models import Adapter
from mabook.text_transport import Method, Pair, flatten, images_per_pair, method_outputs, score_rows


def render_references(pairs: Sequence[Pair]) -> np.ndarray:
    """(pairs, 32, 32, 3) float32 in [0, 1]: each pair's source caption drawn by the world -- the reference."""
    return np.stack([world.render(world.parse_caption(p.source)).image for p in pairs]).astype(np.float32) / 255


@dataclass
class Comparison:
    """`compare`'s result: `rows` (one per pair x trajectory x method x alpha, and per pair x trajectory
    the "reference image", its "reconstruction" (the record's own image) and the "target image"),
    `images[(trajectory, method name, seed, alpha)]` (pairs, H, W, 3), the `references`, and per
    trajectory the unedited `targets`, the `reconstructions` and the `trajectories` (one per chunk);
    `pairs` is [(kind, index, Pair)]."""

    rows: list[dict]
    images: dict[tuple, np.ndarray]
    references: np.ndarray
    targets: dict[str, np.ndarray]
    reconstructions: dict[str, np.ndarray]
    trajectories: dict[str, list[Trajectory]]
    pairs: list[tuple[str, int, Pair]]
    seconds: float = 0.0


def _targets(adapter: Adapter, units, latents: torch.Tensor, num_inference_steps: int, batch_size: int) -> np.ndarray:
    return np.concatenate([adapter.generate(units[a:a + batch_size], num_inference_steps, batch_size,
                                           latents=latents[a:a + batch_size])
                           for a in range(0, len(units), batch_size)])


def _check(methods: Sequence[Method], trajectories: Sequence[str]) -> None:
    if not methods:
        raise ValueError("methods must be a non-empty list of text_transport.Method")
    for m in methods:
        if m.kind not in ("channels", "pixel") or m.mask is not None:
            raise ValueError(f"method {m.name!r}: chapter 5 runs channel transport and the pixel blend, without masks "
                             f"(kind {m.kind!r}, mask {m.mask!r}); a reference has no text to blend")
        if m.stream not in (None, "img"):
            raise ValueError(f"method {m.name!r}: stream {m.stream!r}; allowed: None or 'img' (a reference's record keeps "
                             "the image stream only)")
    bad = [t for t in trajectories if t not in inversion.METHODS]
    if bad or not trajectories:
        raise ValueError(f"unknown trajectories {bad}; allowed: {list(inversion.METHODS)}")


def compare(adapter: Adapter, pairs_by_kind: dict[str, Sequence[Pair]], methods: Sequence[Method],
            trajectories: Sequence[str] = inversion.METHODS, alphas: Sequence[float] = (1.0,), num_inference_steps: int = 20,
            fixed_point_iterations: int = 20, tolerance: float = 1e-3, batch_size: int = 16, chunk: int = 64,
            first_seed: int = 0) -> Comparison:
    """Image-conditioned transport on shapes-world pairs: the reference is the pair's source caption
    drawn by the world (`render_references`), the target its target caption; pair i's noising uses
    seed first_seed + i.

    Per chunk of pairs and trajectory ("invert", "noise"): the references are brought onto the
    trajectory, recorded once with every image-stream channel and the conditioning (a record of all
    channels serves every channel set, as a subset), the targets are generated once from the same
    noise, then every `text_transport.Method` ("channels" or "pixel"; no masks, no text embeddings)
    runs at every alpha (or at its own `alphas`; `text_transport.method_outputs`; the AdaLN
    conditioning moves only for a method that sets `conditioning=True`). Rows carry
    `text_transport.score(pair, output, target image)` (took_source: the output shows the
    reference's attributes) and the trajectory."""
    start_time = time.perf_counter()
    flat = flatten(pairs_by_kind)
    _check(methods, trajectories)
    alphas = [transport.check_alpha(a) for a in alphas]
    taps = [str(t) for t in probe.taps(adapter, ["img"])]
    rows: list[dict] = []
    images: dict[tuple, list[np.ndarray]] = {}
    references = render_references([p for _, _, p in flat])
    targets: dict[str, list] = {t: [] for t in trajectories}
    reconstructions: dict[str, list] = {t: [] for t in trajectories}
    kept: dict[str, list[Trajectory]] = {t: [] for t in trajectories}
    per_pair = sum(images_per_pair(methods, alphas) + (fixed_point_iterations + 1 if t == "invert" else 0)
                   for t in trajectories)  # an inversion counted at its iteration cap
    with progress_.estimate(f"image transport, {len(flat)} pairs", len(flat) * per_pair, num_inference_steps):
        for c0 in progress_.bar(range(0, len(flat), chunk), "chunks of pairs", unit="chunk"):
            part = flat[c0:c0 + chunk]
            refs, seeds = references[c0:c0 + len(part)], [first_seed + c0 + j for j in range(len(part))]
            units = [(p.target, s) for (_, _, p), s in zip(part, seeds)]
            for name in trajectories:
                # 1. the references on their trajectory, recorded once; 2. the targets from the same noise
                if name == "invert":
                    traj = inversion.invert(adapter, refs, num_inference_steps=num_inference_steps,
                                            fixed_point_iterations=fixed_point_iterations, tolerance=tolerance, batch_size=batch_size)
                else:
                    traj = inversion.noise(adapter, refs, seeds, num_inference_steps=num_inference_steps)
                rec = inversion.record(traj, taps=taps, channels="all", conditioning=True, batch_size=batch_size,
                                       captions=[p.source for _, _, p in part])
                # the targets on the trajectory's sampler (SANA: its Euler twin), as transport generates the outputs
                target_images = _targets(traj.adapter, units, traj.noise, num_inference_steps, batch_size)
                kept[name].append(traj)
                targets[name].append(target_images)
                reconstructions[name].append(rec.images)
                # 3. every method at every alpha
                for m, alpha, out in method_outputs(methods, alphas, rec, [u for u, _ in units], target_images, refs,
                                                    batch_size=batch_size):
                    images.setdefault((name, m.name, m.seed, alpha), []).append(out)
                    rows += score_rows(part, out, target_images, trajectory=name, method=m.name, method_kind=m.kind,
                                       seed=m.seed, alpha=alpha, **m.settings("img", False))
                for label, ims in (("reference image", refs), ("reconstruction", rec.images), ("target image", target_images)):
                    rows += score_rows(part, ims, target_images, trajectory=name, method=label, method_kind="reference",
                                       seed=None, alpha=None)
    return Comparison(rows, {k: np.concatenate(v) for k, v in images.items()}, references,
                      {t: np.concatenate(v) for t, v in targets.items()},
                      {t: np.concatenate(v) for t, v in reconstructions.items()}, kept, flat, time.perf_counter() - start_time)
