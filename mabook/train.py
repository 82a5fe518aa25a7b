"""Train the organism from scratch: `python -m mabook.train [--steps N] [--out PATH]`.

Recipe (rectified flow, as FLUX.1 / SD3):
  x_t = (1 - t) * x_0 + t * noise,  target velocity v = noise - x_0,  loss = MSE(v_pred, v)
with t drawn logit-normally (SD3's choice: more weight on mid-trajectory), captions dropped to ""
10% of the time (so that classifier-free guidance works at sampling), AdamW with warm-up and
cosine decay, and an exponential moving average (EMA) of the weights, which is what is saved.
The shapes world is generated on the fly, never showing a held-out caption.

Emergence of massive activations is logged while training (`emergence`): every `probe_every`
steps, a fixed probe batch (held-out images noised at three fixed timesteps) goes through the
raw and the EMA weights under `mabook.probe.collect`, and the per-layer top channel, its
|mean| / median-channel ratio, max |x| and the top-k set's Jaccard with the previous measurement
go into the checkpoint card. Weight-only fp16 snapshots are kept at log-spaced steps.

Resumable: with `--state DIR`, the full training state (weights, EMA, optimizer moments, every
random generator, logs) is written there every `state_every` steps as safetensors + JSON, and a
run started with the same DIR and config continues from it, bit-identically to an uninterrupted
run. Deterministic for a seed on a given machine and thread count.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mabook import discovery, files, probe, world
from mabook.models import adapter_for
from mabook.organism import CHECKPOINT, OrganismConfig, build_pipeline, load, patchify, save, snapshots, variants, velocity


def log_spaced(first: int = 250, last: int = 64000) -> tuple[int, ...]:
    """250, 500, 1000, 2000, ...: snapshot steps, doubling (enough points for an emergence curve)."""
    out, s = [], first
    while s <= last:
        out.append(s)
        s *= 2
    return tuple(out)


@dataclass
class TrainConfig:
    steps: int = 8000
    batch_size: int = 32
    lr: float = 6e-4
    warmup: int = 200
    min_lr_fraction: float = 0.05  # cosine decays to this fraction of lr
    weight_decay: float = 0.01
    ema_decay: float = 0.999  # ~1000-step window: smooths the last eighth of training
    caption_dropout: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 50
    save_at: tuple[int, ...] = log_spaced()  # weight-only snapshots (those < steps), for the emergence curve
    probe_every: int = 250  # emergence measurement period (0: never); ~0.3 s each on one thread
    probe_k: int = 4  # size of the top-k set whose Jaccard with the previous measurement is logged
    state_every: int = 500  # resumable-state period when a state directory is given
    threads: int = 1  # one thread: reproducible, and robust to a busy second core


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_fraction + (1 - cfg.min_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


def flow_matching_loss(pipe, images: torch.Tensor, captions: list[str], generator: torch.Generator) -> torch.Tensor:
    """Rectified-flow loss for a batch of images (batch_size, 3, H, W) in [-1, 1]."""
    cfg = pipe.organism_config
    x0 = patchify(images, cfg.patch_size)
    B = x0.shape[0]
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.sigmoid(torch.randn(B, generator=generator))  # logit-normal(0, 1)
    xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
    return torch.nn.functional.mse_loss(velocity(pipe, xt, captions, t), noise - x0)


# ---------------------------------------------------------------------------------------------
# Emergence: massive-activation statistics of the weights being trained, on a fixed probe batch
# ---------------------------------------------------------------------------------------------

PROBE_TIMESTEPS = (0.75, 0.5, 0.25)  # descending, as in sampling: the probe counts them as steps 0, 1, 2


@dataclass
class ProbeBatch:
    """Fixed inputs for emergence measurements: held-out images, their captions, fixed noise."""

    captions: list[str]
    x0: torch.Tensor  # (n, tokens, in_channels)
    noise: torch.Tensor  # same shape

    @classmethod
    def make(cls, organism_config: OrganismConfig, n: int = 8, seed: int = 1234) -> "ProbeBatch":
        samples = world.sample(n, seed=seed, n_objects=1, split="heldout")
        x0 = patchify(world.to_tensor_batch(samples), organism_config.patch_size)
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
        return cls([s.caption for s in samples], x0, noise)


@torch.no_grad()
def measure_emergence(pipe, batch: ProbeBatch, k: int = 4) -> list[dict]:
    """Per image-stream layer: top channel by |mean over image tokens|, ratio to the median channel,
    max |x|, and the top-k channels; pooled over the probe batch and PROBE_TIMESTEPS."""
    adapter = adapter_for(pipe)
    was_training = pipe.transformer.training
    pipe.transformer.eval()
    pipe.text_encoder.eval()
    try:
        with probe.collect(adapter, cfg="both", guidance_batch=False) as run:
            for t in PROBE_TIMESTEPS:
                xt = (1 - t) * batch.x0 + t * batch.noise
                velocity(pipe, xt, batch.captions, torch.full((len(batch.captions),), t))
    finally:
        pipe.transformer.train(was_training)
        pipe.text_encoder.train(was_training)
    return [
        {"tap": r.tap, "top": r.top[0], "top_k": r.top, "ratio": r.ratio_to_median, "max_abs": r.max_abs,
         "norm_share": r.norm_share, "norm_share_top_k": r.norm_share_top_k}
        for r in discovery.massive_channels(run.stats, k)
    ]


def emergence_row(step: int, raw: list[dict], ema: list[dict], previous: dict | None) -> dict:
    """One emergence-log entry; jaccard = overlap of each layer's top-k with the previous entry's."""
    row = {"step": step, "raw": raw, "ema": ema}
    for which in ("raw", "ema"):
        for i, layer in enumerate(row[which]):
            layer["jaccard_prev"] = discovery.jaccard(layer["top_k"], previous[which][i]["top_k"]) if previous else None
    return row


def measure_run(checkpoint: Path, k: int = 4) -> dict:
    """The emergence log measured after the fact on a checkpoint and its snapshots (saved EMA
    weights), e.g. for a run trained before the log existed: {"checkpoint_sha256", "train_config",
    "emergence": [{"step", "ema": per-layer rows}]}, comparable with a training-time log's "ema"."""
    rows, card = [], None
    for step, path in snapshots(checkpoint).items():
        pipe = load(path)
        card = pipe.card if Path(path) == Path(checkpoint) else card
        rows.append({"step": step, "ema": measure_emergence(pipe, ProbeBatch.make(pipe.organism_config), k)})
    if card is None:
        raise FileNotFoundError(f"no checkpoint at {checkpoint}")
    return {"checkpoint_sha256": card["sha256"], "train_config": card.get("train_config"), "emergence": rows}


# ---------------------------------------------------------------------------------------------
# Resumable state: safetensors for tensors, JSON for the rest (no pickle)
# ---------------------------------------------------------------------------------------------


def _state_tensors(pipe, ema, opt, gen) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, model in (("model", pipe), ("ema", ema)):
        for part in ("transformer", "text_encoder"):
            for k, v in getattr(model, part).state_dict().items():
                tensors[f"{name}.{part}.{k}"] = v.detach().contiguous()
    for i, s in opt.state_dict()["state"].items():
        for k, v in s.items():
            tensors[f"opt.{i}.{k}"] = torch.as_tensor(v).detach().contiguous()
    tensors["rng.generator"] = gen.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    return tensors


def save_state(directory: Path, step: int, cfg: TrainConfig, pipe, ema, opt, gen, rng, logs: dict) -> None:
    """Write the full training state atomically (a killed run leaves the previous state intact)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / "state.safetensors.tmp"
    save_file(_state_tensors(pipe, ema, opt, gen), str(tmp))
    meta = {"step": step, "train_config": asdict(cfg), "organism_config": asdict(pipe.organism_config),
            "numpy_rng": rng.bit_generator.state, **logs}
    meta_tmp = directory / "state.json.tmp"
    meta_tmp.write_text(json.dumps(meta))
    os.replace(tmp, directory / "state.safetensors")
    os.replace(meta_tmp, directory / "state.json")  # written last: its step names a complete state


def load_state(directory: Path, cfg: TrainConfig, pipe, ema, opt, gen, rng) -> tuple[int, dict]:
    """Restore a state written by `save_state`; returns (step, logs). Refuses another config."""
    directory = Path(directory)
    meta = json.loads((directory / "state.json").read_text())
    saved = meta["train_config"]
    mine = json.loads(json.dumps(asdict(cfg)))
    if saved != mine:
        diff = {k: (saved.get(k), mine[k]) for k in mine if saved.get(k) != mine[k]}
        raise ValueError(f"the state in {directory} was written with another config (saved, now): {diff}")
    organism = json.loads(json.dumps(asdict(pipe.organism_config)))
    if meta.get("organism_config", organism) != organism:
        raise ValueError(f"the state in {directory} was written for another organism: {meta['organism_config']}, now {organism}")
    tensors = load_file(str(directory / "state.safetensors"))
    for name, model in (("model", pipe), ("ema", ema)):
        for part in ("transformer", "text_encoder"):
            prefix = f"{name}.{part}."
            getattr(model, part).load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    opt_state = opt.state_dict()
    state = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, i, k = key.split(".", 2)
            state.setdefault(int(i), {})[k] = v
    opt_state["state"] = state
    opt.load_state_dict(opt_state)
    gen.set_state(tensors["rng.generator"])
    torch.set_rng_state(tensors["rng.torch"])
    rng.bit_generator.state = meta["numpy_rng"]
    return meta["step"], {k: meta[k] for k in ("history", "emergence", "running", "elapsed")}


# ---------------------------------------------------------------------------------------------
# Training loop
# ---------------------------------------------------------------------------------------------


def snapshot_path(out: Path, step: int) -> Path:
    return Path(out).with_name(f"{Path(out).stem}-step{step}.safetensors")


def train(cfg: TrainConfig, out: Path = CHECKPOINT, organism_config: OrganismConfig = OrganismConfig(),
          verbose: bool = True, state_dir: Path | None = None, stop_after: int | None = None):
    """Train and save; returns (pipeline with EMA weights, loss history).

    state_dir: resumable state (continued from if present). stop_after: stop (saving the state,
    not the checkpoint) once this many steps are done -- for tests of resuming, and for budgets.
    """
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    pipe = build_pipeline(organism_config)
    params = list(pipe.transformer.parameters()) + list(pipe.text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    ema = copy.deepcopy(pipe)
    ema_params = list(ema.transformer.parameters()) + list(ema.text_encoder.parameters())
    probe_batch = ProbeBatch.make(organism_config) if cfg.probe_every else None

    start, logs = 0, {"history": [], "emergence": [], "running": [], "elapsed": 0.0}
    if state_dir is not None and (Path(state_dir) / "state.json").is_file():
        start, logs = load_state(state_dir, cfg, pipe, ema, opt, gen, rng)
        if verbose:
            print(f"resumed from {state_dir} at step {start}", flush=True)
    history, emergence = logs["history"], logs["emergence"]
    pipe.transformer.train()
    pipe.text_encoder.train()

    t0, running = time.time() - logs["elapsed"], logs["running"]
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    for step in range(start, end):
        samples = [world.render(world.sample_scene(rng, split="train")) for _ in range(cfg.batch_size)]
        captions = [s.caption if rng.random() >= cfg.caption_dropout else "" for s in samples]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        loss = flow_matching_loss(pipe, world.to_tensor_batch(samples), captions, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        with torch.no_grad():
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))  # short warm-up for the average
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        running.append(loss.item())
        done = step + 1
        if done % cfg.log_every == 0:
            history.append({"step": done, "loss": float(np.mean(running)), "seconds": round(time.time() - t0, 1)})
            running = []
            if verbose:
                print(json.dumps(history[-1]), flush=True)
        if cfg.probe_every and (done % cfg.probe_every == 0 or done == 1):
            row = emergence_row(done, measure_emergence(pipe, probe_batch, cfg.probe_k),
                                measure_emergence(ema, probe_batch, cfg.probe_k), emergence[-1] if emergence else None)
            emergence.append(row)
            if verbose:
                top = max(row["ema"], key=lambda r: r["ratio"])
                print(json.dumps({"step": done, "ema_top": top["top"], "ema_ratio": round(top["ratio"], 1),
                                  "ema_share": round(float(np.median([r["norm_share"] for r in row["ema"]])), 3),
                                  "ema_max_abs": round(max(r["max_abs"] for r in row["ema"]), 2)}), flush=True)
        if done in cfg.save_at and done < cfg.steps:
            save(ema, snapshot_path(out, done), {"train_config": asdict(cfg), "step": done, "emergence": emergence})
        if state_dir is not None and (done % cfg.state_every == 0 or done == end):
            logs = {"history": history, "emergence": emergence, "running": running, "elapsed": round(time.time() - t0, 1)}
            save_state(state_dir, done, cfg, pipe, ema, opt, gen, rng, logs)
    if end < cfg.steps:
        return ema, history
    info = {"train_config": asdict(cfg), "step": cfg.steps, "history": history, "emergence": emergence,
            "train_seconds": round(time.time() - t0, 1), "torch": torch.__version__, "device": "cpu",
            "threads": cfg.threads}
    save(ema, out, info)
    ema.transformer.eval()
    ema.text_encoder.eval()
    return ema, history


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = TrainConfig()
    for f in fields(TrainConfig):
        if f.name == "save_at":
            continue
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(getattr(d, f.name)), default=getattr(d, f.name))
    p.add_argument("--variant", default=None,
                   help="a counterfactual organism of mabook.organism.variants (sets its fields and steps=6000)")
    p.add_argument("--no-timestep", action="store_true",
                   help="counterfactual organism: the AdaLN modulation sees one constant timestep")
    p.add_argument("--norm-affine", action="store_true",
                   help="counterfactual organism: LayerNorms with a learnable scale and bias")
    p.add_argument("--num-layers", type=int, default=OrganismConfig.num_layers, help="double-stream blocks")
    p.add_argument("--num-single-layers", type=int, default=OrganismConfig.num_single_layers, help="single-stream blocks")
    p.add_argument("--out", type=Path, default=CHECKPOINT)
    p.add_argument("--state", type=Path, default=None, help="resumable-state directory (continued from if present)")
    p.add_argument("--stop-after", type=int, default=None, help="stop after this many steps (state kept)")
    p.add_argument("--measure", type=Path, default=None,
                   help="train nothing: measure the emergence log of this checkpoint and its snapshots, write it to --out")
    a = p.parse_args(argv)
    if a.measure is not None:
        if a.out == CHECKPOINT:
            raise SystemExit("--measure needs --out FILE.json (the checkpoint itself is never overwritten)")
        command = files.command_line(argv, "python -m mabook.train")
        files.write_json(a.out, files.with_provenance(measure_run(a.measure), command))  # atomic; version + command
        print(f"wrote {a.out}")
        return
    cfg = TrainConfig(**{f.name: getattr(a, f.name) for f in fields(TrainConfig) if f.name != "save_at"})
    organism_config = OrganismConfig(timestep_conditioning=not a.no_timestep, norm_affine=a.norm_affine,
                                     num_layers=a.num_layers, num_single_layers=a.num_single_layers)
    if a.variant is not None:
        v = variants.check(a.variant)
        cfg = replace(cfg, **{"steps": variants.CONTROL_STEPS, **v.train})
        organism_config = replace(organism_config, **v.organism)
    train(cfg, a.out, organism_config, state_dir=a.state, stop_after=a.stop_after)
    print(f"saved {a.out}" if a.stop_after is None or a.stop_after >= cfg.steps else f"state saved in {a.state}")


if __name__ == "__main__":
    main()
