"""Where do massive activations come from? The inference-time causal test of "timestep-driven".

Detail Guidance (arXiv 2510.11538) reads the massive channels as driven by the timestep
embedding. In a rectified-flow model the timestep reaches a block two ways: through the AdaLN
modulation (the embedding of t) and through the input itself (x_t = (1 - t) x_0 + t noise carries
its noise level). `timestep_swap` separates them: it feeds the transformer inputs noised to level
t_input while the AdaLN sees t_embed, over a grid of both, and reads the massive channel's value
(its mean over image tokens and samples) in every cell. A two-way decomposition of that table says
how much of the channel's variation follows the embedding, how much the input, and how much their
interaction.

`measure` runs every measurement the chapter's table of organisms shows on one checkpoint (the
channel, its LayerNorm share, damage of zeroing it vs mean-replacing it vs random channels, the
prompt vs timestep split, where the attention sinks sit, the timestep swap); `python -m
mabook.origins` measures the committed organism and the counterfactual ones into
`mabook/results/origins.json`.

What this is not: a test on a real model (the inputs are the shapes world's rendered images,
patchified as the organism's tokens); the counterfactual organisms (`mabook.organism.variants`)
test the same question by training.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mabook import attention, disruption, evaluate, files, organism, probe, sinks, world
from mabook import progress as progress_
from mabook.discovery import massive_channels, random_k
from mabook.models import Adapter, adapter_for
from mabook.organism import patchify, velocity
from mabook.stats import bootstrap_ci, paired_ratio_ci

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


# ---------------------------------------------------------------------------------------------
# One organism, every measurement (selection and evaluation on different held-out prompts)
# ---------------------------------------------------------------------------------------------

QUALITY_BARS = {"color": 0.95, "position": 0.95, "shape": 0.85, "size": 0.85}  # the organism's bars (issue 21)
SELECT_SEED, EVAL_SEED = 100, 0  # held-out caption draws: channels chosen on one, damage measured on the other
K = 2  # channels per set (the committed organism's top-2: the massive channel and the next)


def measure(pipe, n_prompts: int = 16, num_inference_steps: int = 10, k: int = K, n_random: int = 3,
            attention_layer: str = "single_transformer_blocks.0.attn") -> dict:
    """Every measurement of the origins table on one organism pipeline, as a JSON-able dict.

    1. top-k channels selected on `n_prompts` held-out captions (draw SELECT_SEED), evaluated on
       `n_prompts` others (draw EVAL_SEED), one seed each (one unit = one prompt: CIs resample prompts);
    2. per image layer: top channel, |mean| ratio to the median channel, max |x|, LayerNorm share;
    3. damage (pixel MSE and mean |diff| to the baseline) of zeroing the top-k, replacing them by
       their mean at each step (Sun et al.'s test: level or information?), and zeroing n_random
       random k-sets, with paired ratio CIs;
    4. prompt vs timestep share of the top channel's per-image mean (`disruption.decomposition`);
    5. where the top-1 attention sink sits at one layer (text / pad / image mass, top-1 mass vs uniform);
    6. the timestep swap's embedding / input / interaction shares per layer.
    """
    adapter = adapter_for(pipe)
    select = disruption.baseline(adapter, world.heldout_captions(n_prompts, 1, seed=SELECT_SEED), [0], num_inference_steps)
    base = disruption.baseline(adapter, world.heldout_captions(n_prompts, 1, seed=EVAL_SEED), [0], num_inference_steps)
    top = disruption.channel_set(select.stats, k, "top")
    conds = [disruption.Condition(f"top-{k} {op}", "top", k, op, tuple((t, tuple(c)) for t, c in top.items()))
             for op in ("zero", "mean")]
    for seed in range(n_random):
        sets = {t: random_k(adapter.width, k, seed=seed + i, exclude=c) for i, (t, c) in enumerate(top.items())}
        conds.append(disruption.Condition(f"random-{k}#{seed}", "random", k, "zero",
                                          tuple((t, tuple(int(x) for x in c)) for t, c in sets.items()), seed=seed))
    table = disruption.run(base, conds).table
    layers = [{"tap": r.tap, "top": r.top[0], "ratio": r.ratio_to_median, "max_abs": r.max_abs,
               "norm_share": r.norm_share, "norm_share_top_k": r.norm_share_top_k}
              for r in massive_channels(base.stats, k)]
    return {
        "k": k, "n_prompts": n_prompts, "num_inference_steps": num_inference_steps,
        "selection": {"captions_seed": SELECT_SEED, "top": top}, "evaluation_captions_seed": EVAL_SEED,
        "layers": layers,
        "damage": _damage(table, k),
        "decomposition": disruption.decomposition(base, {t: c[:1] for t, c in top.items()}),
        "sinks": _sinks(adapter, base, attention_layer),
        "timestep_swap": timestep_swap(pipe, adapter, n_captions=min(n_prompts, 8)).decomposition(),
    }


def _damage(table: list[dict], k: int) -> dict:
    """Per metric: mean damage of each treatment, and paired ratios (bootstrap over prompts)."""
    out = {}
    for metric in ("pixel_mse", "pixel_mae"):
        zero = disruption.damage(table, metric, kind="top", k=k, op="zero")
        mean = disruption.damage(table, metric, kind="top", k=k, op="mean")
        rand = disruption.damage(table, metric, kind="random", k=k, op="zero")  # averaged over the random sets
        units = sorted(set(zero) & set(mean) & set(rand))
        a, b, c = (np.array([d[u] for u in units]) for d in (zero, mean, rand))
        out[metric] = {
            "top_zero": float(a.mean()), "top_zero_ci": list(bootstrap_ci(a)),
            "top_mean": float(b.mean()), "top_mean_ci": list(bootstrap_ci(b)),
            "random_zero": float(c.mean()), "random_zero_ci": list(bootstrap_ci(c)),
            "zero_over_random": float(a.mean() / c.mean()), "zero_over_random_ci": list(paired_ratio_ci(a, c)),
            "zero_over_mean": float(a.mean() / b.mean()), "zero_over_mean_ci": list(paired_ratio_ci(a, b)),
            "n_prompts": len(units)}
    return out


def _sinks(adapter: Adapter, base, layer: str) -> dict:
    """Top-1 sink per (step, head) at one layer over the evaluation prompts' generations."""
    steps = list(range(0, base.num_inference_steps, max(1, base.num_inference_steps // 4)))
    with attention.capture(adapter, layers=[layer], steps=steps) as cap:
        adapter.generate(base.units, base.num_inference_steps, 16, **base.pipe_kwargs)
    rows = sinks.sinks(cap, 1)
    by_kind = sinks.mass_by_kind(cap)
    return {"layer": layer, "steps": steps,
            "top1_over_uniform": float(np.median([r["mass"] / r["uniform"] for r in rows])),
            "top1_kind": {kind: float(np.mean([r["kind"] == kind for r in rows])) for kind in ("text", "pad", "image")},
            "mass": {kind: float(np.mean([r[kind] for r in by_kind])) for kind in ("text", "pad", "image")}}


def quality(pipe, n_single: int = 256, n_double: int = 128) -> dict:
    """`mabook.evaluate` on held-out captions, and whether every attribute clears QUALITY_BARS for
    one- and two-object captions."""
    result = evaluate.evaluate(pipe, n_single, n_double)
    fails = [f"{group} {a} {result[group][a]:.3f} < {bar}" for group in ("1_object", "2_object")
             for a, bar in QUALITY_BARS.items() if result[group][a] < bar]
    return {"passes": not fails, "fails": fails, "bars": QUALITY_BARS,
            **{group: {a: result[group][a] for a in (*QUALITY_BARS, "all_correct", "cleanliness")}
               for group in ("1_object", "2_object")}}


def emergence(card: dict) -> list[dict]:
    """The training-time emergence log of a checkpoint card, per logged step (EMA weights): median over
    image layers of the LayerNorm share (where logged), the |mean| ratio, and the largest max |x|."""
    rows = []
    for entry in card.get("emergence", []):
        ema = entry["ema"]
        shares = [r["norm_share"] for r in ema if "norm_share" in r]
        rows.append({"step": entry["step"], "norm_share": float(np.median(shares)) if shares else None,
                     "ratio": float(np.median([r["ratio"] for r in ema])), "max_abs": float(max(r["max_abs"] for r in ema))})
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Measure organisms for the origins chapter into one JSON.")
    p.add_argument("checkpoints", nargs="+", help="NAME=PATH of each organism (NAME: a mabook.organism.variants name)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--n-prompts", type=int, default=16)
    p.add_argument("--num-inference-steps", type=int, default=10)
    p.add_argument("--add", action="store_true", help="keep the organisms already in --out; measure and add (or replace) these")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    command = files.command_line(argv, "python -m mabook.origins")
    organisms = json.loads(a.out.read_text())["organisms"] if a.add and a.out.is_file() else {}
    for item in progress_.bar(a.checkpoints, "organisms"):
        name, _, path = item.partition("=")
        pipe = organism.load(path)
        pipe.set_progress_bar_config(disable=True)
        organisms[name] = {"checkpoint_sha256": pipe.card["sha256"], "file": str(path),
                           "organism_config": pipe.card["organism_config"], "train_config": pipe.card.get("train_config"),
                           "emergence": emergence(pipe.card), "quality": quality(pipe),
                           **measure(pipe, a.n_prompts, a.num_inference_steps), "command": command}
        print(f"{name}: measured", flush=True)
    payload = {"checkpoint_sha256": organism.sha256(organism.CHECKPOINT), "organisms": organisms}
    files.write_json(a.out, files.with_provenance(payload, command))  # each organism also records its own command
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
