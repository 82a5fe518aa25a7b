"""Train the organism from scratch: `python -m mabook.organism.train [--steps N] [--out PATH]`.

Recipe (rectified flow, as FLUX.1 / SD3):
  x_t = (1 - t) * x_0 + t * noise,  target velocity v = noise - x_0,  loss = MSE(v_pred, v)
with t drawn logit-normally (SD3's choice: more weight on mid-trajectory), captions dropped to ""
10% of the time (so that classifier-free guidance works at sampling), AdamW with warm-up and
cosine decay, and an exponential moving average (EMA) of the weights, which is what is saved.
The shapes world is generated on the fly, never showing a held-out caption.

Deterministic for a seed on a given machine and thread count.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from mabook import world
from mabook.organism import CHECKPOINT, OrganismConfig, build_pipeline, image_ids, patchify, save


@dataclass
class TrainConfig:
    steps: int = 4500
    batch_size: int = 32
    lr: float = 6e-4
    warmup: int = 200
    min_lr_fraction: float = 0.05  # cosine decays to this fraction of lr
    weight_decay: float = 0.01
    ema_decay: float = 0.999  # ~1000-step window: smooths the last sixth of training
    caption_dropout: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 50
    save_at: tuple[int, ...] = (500, 2000)  # extra snapshots, to watch massive activations emerge
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
    prompt_embeds, pooled = pipe.encode_prompt(captions)
    pred = pipe.transformer(
        hidden_states=xt,
        encoder_hidden_states=prompt_embeds,
        pooled_projections=pooled,
        timestep=t,
        img_ids=image_ids(cfg.grid),
        txt_ids=torch.zeros(cfg.max_text_length, 3),
        return_dict=False,
    )[0]
    return torch.nn.functional.mse_loss(pred, noise - x0)


def train(cfg: TrainConfig, out: Path = CHECKPOINT, organism_config: OrganismConfig = OrganismConfig(), verbose: bool = True):
    """Train and save; returns (pipeline with EMA weights, loss history)."""
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    pipe = build_pipeline(organism_config)
    params = list(pipe.transformer.parameters()) + list(pipe.text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    ema = copy.deepcopy(pipe)
    ema_params = list(ema.transformer.parameters()) + list(ema.text_encoder.parameters())
    pipe.transformer.train()
    pipe.text_encoder.train()

    history, t0, running = [], time.time(), []
    for step in range(cfg.steps):
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
        if (step + 1) % cfg.log_every == 0:
            history.append({"step": step + 1, "loss": float(np.mean(running)), "seconds": round(time.time() - t0, 1)})
            running = []
            if verbose:
                print(json.dumps(history[-1]), flush=True)
        if (step + 1) in cfg.save_at and (step + 1) < cfg.steps:
            snap = Path(out).with_name(f"{Path(out).stem}-step{step + 1}.safetensors")
            save(ema, snap, {"train_config": asdict(cfg), "step": step + 1})
    info = {"train_config": asdict(cfg), "step": cfg.steps, "history": history, "train_seconds": round(time.time() - t0, 1),
            "torch": torch.__version__, "device": "cpu", "threads": cfg.threads}
    save(ema, out, info)
    ema.transformer.eval()
    ema.text_encoder.eval()
    return ema, history


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = TrainConfig()
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--out", type=Path, default=CHECKPOINT)
    a = p.parse_args(argv)
    cfg = TrainConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed, threads=a.threads)
    train(cfg, a.out)
    print(f"saved {a.out}")


if __name__ == "__main__":
    main()
