"""Score the organism on held-out captions: `python -m mabook.evaluate [--n-single 256]`.

Generates one image per caption for seeded sets of held-out captions (never seen in training,
see `mabook.world.is_heldout`), judges each with `mabook.judge`, and prints JSON: per-attribute
accuracy for one- and two-object captions, cleanliness, mask IoU and seconds per image.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from mabook import judge, world
from mabook.files import write_text
from mabook.images import to_uint8
from mabook.organism import load


def generate(pipe, captions: list[str], num_inference_steps: int = 20, guidance_scale: float = 4.0,
             seed: int = 0, batch_size: int = 64):
    """uint8 images (N, H, W, 3), one per caption; image i uses generator seed `seed + i // batch_size`."""
    out = []
    for start in range(0, len(captions), batch_size):
        g = torch.Generator().manual_seed(seed + start // batch_size)
        res = pipe(captions[start:start + batch_size], num_inference_steps=num_inference_steps,
                   guidance_scale=guidance_scale, generator=g, output_type="np")
        out.append(to_uint8(res.images))
    return np.concatenate(out)


def evaluate(pipe, n_single: int = 256, n_double: int = 128, num_inference_steps: int = 20,
             guidance_scale: float = 4.0, seed: int = 0) -> dict:
    captions = world.heldout_captions(n_single, 1, seed) + world.heldout_captions(n_double, 2, seed)
    pipe.set_progress_bar_config(disable=True)
    t0 = time.perf_counter()
    images = generate(pipe, captions, num_inference_steps, guidance_scale, seed)
    seconds = time.perf_counter() - t0
    scores = judge.summarize([judge.judge(im, c) for im, c in zip(images, captions)])
    return {
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "seed": seed,
        **scores,
        "seconds_per_image": seconds / len(captions),
        "checkpoint_sha256": getattr(pipe, "card", {}).get("sha256"),
        "threads": torch.get_num_threads(),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=None)
    p.add_argument("--n-single", type=int, default=256)
    p.add_argument("--n-double", type=int, default=128)
    p.add_argument("--num-inference-steps", type=int, default=20)
    p.add_argument("--guidance-scale", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    a = p.parse_args(argv)
    pipe = load(a.checkpoint)
    result = evaluate(pipe, a.n_single, a.n_double, a.num_inference_steps, a.guidance_scale, a.seed)
    text = json.dumps(result, indent=1)
    print(text)
    if a.out:
        write_text(a.out, text + "\n")  # atomic: an interrupted run leaves the previous file


if __name__ == "__main__":
    main()
