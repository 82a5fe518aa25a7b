"""Where do massive activations come from? The inference-time causal test of "timestep-driven".

Detail Guidance (arXiv 2510.11538) reads the massive channels as driven by the timestep
embedding. In a rectified-flow model the timestep reaches a block two ways: through the AdaLN
modulation (the embedding of t) and through the input itself (x_t = (1 - t) x_0 + t noise carries
its noise level). `timestep_swap` separates them: it feeds the transformer inputs noised to level
t_input while the AdaLN sees t_embed, over a grid of both, and reads the massive channel's value
(its mean over image tokens and samples) in every cell. A two-way decomposition of that table says
how much of the channel's variation follows the embedding, how much the input, and how much their
interaction.

What this is not: a test on a real model (the inputs are the shapes world's rendered images,
patchified as the organism's tokens); the counterfactual organisms (`mabook.organism.variants`)
test the same question by training.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mabook import probe, world
from mabook.models import Adapter
from mabook.organism import patchify, velocity

TIMESTEPS = (0.9, 0.7, 0.5, 0.3, 0.1)  # levels in [0, 1], high noise first (as sampling runs)


@dataclass
class TimestepSwap:
    """The massive channel's value with the AdaLN timestep and the input's noise level set apart.

    values: (taps, len(timesteps), len(timesteps)), [tap, i, j] = mean over image tokens and samples
    of the tap's channel, with the AdaLN fed timesteps[i] and the input noised to timesteps[j].
    """

    timesteps: tuple[float, ...]
    taps: list[str]
    channels: list[int]  # per tap: the top channel by |mean| over the matched cells (i == j)
    values: np.ndarray
    n_samples: int

    def decomposition(self) -> list[dict]:
        """Per tap: the shares of the table's sum of squares (about its grand mean) explained by the
        embedding (rows), by the input (columns) and by their interaction; the three add up to 1."""
        rows = []
        for tap, channel, v in zip(self.taps, self.channels, self.values):
            rows.append({"tap": tap, "channel": channel, **two_way_shares(v)})
        return rows


def two_way_shares(table: np.ndarray) -> dict[str, float]:
    """Two-way decomposition (one value per cell) of an (I, J) table: {"embedding", "input",
    "interaction"} shares of the total sum of squares about the grand mean (0 each for a constant table)."""
    v = np.asarray(table, np.float64)
    m = v.mean()
    row, col = v.mean(1) - m, v.mean(0) - m
    total = float(((v - m) ** 2).sum())
    if total == 0:
        return {"embedding": 0.0, "input": 0.0, "interaction": 0.0}
    ss_row = float(v.shape[1] * (row**2).sum())
    ss_col = float(v.shape[0] * (col**2).sum())
    return {"embedding": ss_row / total, "input": ss_col / total, "interaction": (total - ss_row - ss_col) / total}


@torch.no_grad()
def timestep_swap(pipe, adapter: Adapter, n_captions: int = 8, timesteps=TIMESTEPS, seed: int = 0) -> TimestepSwap:
    """Organism only: `n_captions` held-out captions rendered, noised with one fixed noise per caption
    to every level in `timesteps`, and run once per (embedding timestep, input level) pair."""
    if adapter.family.name != "organism":
        raise ValueError(f"timestep_swap needs the organism (it noises rendered shapes-world images), got {adapter.family.name!r}")
    timesteps = tuple(float(t) for t in timesteps)
    if len(timesteps) < 2 or not all(0 <= t <= 1 for t in timesteps):
        raise ValueError(f"timesteps must be at least two levels in [0, 1], got {timesteps!r}")
    if not isinstance(n_captions, int) or n_captions < 1:
        raise ValueError(f"n_captions must be an int >= 1, got {n_captions!r}")
    # 1. inputs: rendered held-out scenes and one fixed noise each
    cfg = pipe.organism_config
    samples = world.sample(n_captions, seed=seed, n_objects=1, split="heldout")
    captions = [s.caption for s in samples]
    x0 = patchify(world.to_tensor_batch(samples), cfg.patch_size)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    taps = probe.taps(adapter, ["img"])
    # 2. one transformer call per (embedding, input) cell, its statistics collected apart
    stats = {}
    for i, t_embed in enumerate(timesteps):
        for j, t_input in enumerate(timesteps):
            xt = (1 - t_input) * x0 + t_input * noise
            with probe.collect(adapter, taps=taps, cfg="both", guidance_batch=False) as run:
                velocity(pipe, xt, captions, torch.full((n_captions,), t_embed))
            stats[i, j] = run.stats
    # 3. the channel: top |mean| over the matched cells (the model as it runs in sampling)
    channels = [int(np.argmax(sum(stats[i, i].get("abs_mean", tap).numpy() for i in range(len(timesteps)))))
                for tap in taps]
    values = np.array([[[float(stats[i, j].get("mean", tap)[c]) for j in range(len(timesteps))]
                        for i in range(len(timesteps))] for tap, c in zip(taps, channels)])
    return TimestepSwap(timesteps, [str(t) for t in taps], channels, values, n_captions)
