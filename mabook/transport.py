"""Semantic transport: copy selected channels of a source trajectory into a target one (chapters 4-5).

The paper's third claim (arXiv 2605.13974): replace the massive channels of a target generation with
those of a source generation started from the same noise, inside a channel x spatial mask, and the
image moves toward the source while keeping the target's content. Two steps:

1. `record(adapter, prompts, seeds, ...)` generates the SOURCE units and keeps, at the chosen taps x
   steps, only the chosen channels (and optionally only the tokens of a per-unit mask) of both
   guidance halves -- so a record grows with k x masked tokens, not with the model's width;
2. `transport(rec, target_prompts, alpha, ...)` regenerates every TARGET unit with the noise of its
   source unit (pair i shares seed i) and sets the recorded channels to
   lerp(target, source, alpha) inside a mask, at every recorded (or a chosen window of) tap x step,
   through `probe.edit` with a callable op (it reads the current step and guidance roles from the
   editor). The table compares each output with the unedited target (`disruption.unit_metrics`) and, for
   organism captions, says per attribute whether it took the source's value (`took_source_<a>`)
   and kept the target's (`kept_target_<a>`).

Masks: `kmeans_mask(rec, tap, step)` is chapter 3's K-means foreground of each recorded unit (from
`spatial.kmeans`, on the recorded channels); the target's comes from a record of the targets, the
union is `a | b`.

Baselines: `pixel_blend` (the two final images mixed at the same alpha), `embedding_blend` (the
two prompts' text embeddings mixed, same noise; organism), all-channel transport
(`record(..., channels="all")`), and `random_channels` (a random set of equal size per tap).

The AdaLN conditioning. Every block's modulation and the final `norm_out` read `temb` (timestep +
projected pooled text embedding), an input of the blocks, not a block output. `record(...,
conditioning=True)` also keeps it (all its channels, one vector per sample and step, through
`probe.conditioning_tap`), and `transport` then mixes it at the same alpha. Default: on for
channels="all", off for channel sets -- the paper transports channels of the hidden states, and a
global conditioning vector would move the whole image whatever the mask.

Exactness. alpha = 0 edits nothing numerically (torch.lerp returns the target bitwise). alpha = 1
with every channel at every step and the conditioning reproduces the source's image bitwise (the
last block's image output and `temb` are all `norm_out` and `proj_out` read; the image stream
alone suffices). Without the conditioning every block output is still the source's, but the image
is not: `norm_out` modulates the source's hidden states with the target's pooled text. The tests
pin all three facts.

Chapter 4 on the shapes world: `pairs(kind, n)` draws caption pairs (one attribute differs, two
differ, or one object of a two-object scene differs); `compare` runs a list of `Method`s (channel
sets, masks, step windows, the baselines) at several alphas on them; `score` judges one output
against both captions (took the source's attributes? kept the target's others? changed pixels
outside the region the captions disagree on?); `summary` gives means with bootstrap 95 % CIs.

What this is not: image-conditioned transport (inversion of a reference image) -- `mabook.inversion`, chapter 5 --
nor a general hook library (it uses `probe.hooks` and `probe.edit` only).
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import NamedTuple, Sequence

import numpy as np
import torch
from scipy import ndimage

from mabook import discovery, disruption, judge, probe, spatial, world
from mabook.models import Adapter
from mabook.probe import Edit
from mabook.stats import bootstrap_ci

STREAMS = ("img", "txt", "both")
ATTRIBUTES = world.ATTRIBUTES


@dataclass
class Record:
    """A source generation's chosen channels at taps x steps, both guidance halves.

    values[(tap name, step)][role] is (masked tokens of all units, k) -- image taps keep only the
    tokens in `token_mask` (units, tokens), packed unit after unit; text taps keep every text token.
    """

    adapter: Adapter
    units: list[tuple[str, int]]  # (prompt, seed)
    images: np.ndarray  # (units, H, W, 3) float in [0, 1]
    channels: dict[str, list[int]]  # tap name -> recorded channels
    steps: list[int]
    values: dict[tuple[str, int], dict[str, torch.Tensor]]
    token_mask: torch.Tensor  # (units, image tokens) bool; all True when recorded unmasked
    text_tokens: int
    num_inference_steps: int
    pipe_kwargs: dict = field(default_factory=dict)
    conditioning: bool = False  # the AdaLN conditioning (probe.conditioning_tap) is among the taps, all channels
    latents: torch.Tensor | None = None  # (units, ...) each unit's initial latents when given (mabook.inversion)

    @property
    def tokens(self) -> int:
        return int(self.token_mask.shape[1])

    @property
    def nbytes(self) -> int:
        """Bytes held by the recorded values (what grows with k x masked tokens)."""
        return sum(v.numel() * v.element_size() for by_role in self.values.values() for v in by_role.values())

    def dense(self, tap: str, step: int, role: str, start: int, stop: int) -> torch.Tensor:
        """(stop - start, tokens, k) values of units [start, stop); zeros at unrecorded tokens."""
        packed = self.values[(tap, step)][role]
        k = packed.shape[-1]
        if tap.endswith(".txt"):
            return packed.reshape(len(self.units), self.text_tokens, k)[start:stop]
        if tap.endswith("." + probe.CONDITIONING):  # one token per unit
            return packed.reshape(len(self.units), 1, k)[start:stop]
        counts = self.token_mask.sum(1)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
        mask = self.token_mask[start:stop]
        out = packed.new_zeros(stop - start, self.tokens, k)
        out[mask] = packed[offsets[start]:offsets[stop]]
        return out


def check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating, np.integer)) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    return float(alpha)


def _check_stream(stream: str) -> list[str]:
    if stream not in STREAMS:
        raise ValueError(f"unknown stream {stream!r}; allowed: {list(STREAMS)}")
    return ["img", "txt"] if stream == "both" else [stream]


def _check_mask(mask, n_units: int, tokens: int, what: str) -> torch.Tensor:
    """(units, tokens) bool with at least one token per unit."""
    mask = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask)
    if mask.dtype != torch.bool:
        raise ValueError(f"{what} must be bool, got dtype {mask.dtype}")
    if mask.dim() == 3:  # (units, h, w) as spatial.foreground_maps gives
        mask = mask.reshape(mask.shape[0], -1)
    if tuple(mask.shape) != (n_units, tokens):
        raise ValueError(f"{what} has shape {tuple(mask.shape)}; expected (units, tokens) = ({n_units}, {tokens})")
    empty = [i for i in range(n_units) if not mask[i].any()]
    if empty:
        raise ValueError(f"{what} is empty for unit(s) {empty}; every unit needs at least one token (None = whole image)")
    return mask.cpu()


def _check_channels(adapter: Adapter, channels, taps: list[str]) -> dict[str, list[int]]:
    """"all", a list of ints (the same at every tap) or {tap name: ints} -> {tap name: ints}."""
    if isinstance(channels, str):
        if channels != "all":
            raise ValueError(f"channels must be 'all', a list of ints or {{tap: ints}}, got {channels!r}")
        return {t: list(range(adapter.width)) for t in taps}
    if isinstance(channels, dict):
        missing = [t for t in taps if t not in channels]
        if missing:
            raise ValueError(f"channels has no set for tap(s) {missing[:4]}; give one per tap or one list for all")
        per_tap = {t: channels[t] for t in taps}
    else:
        per_tap = {t: channels for t in taps}
    out = {}
    for t, cs in per_tap.items():
        cs = [int(c) for c in (cs.tolist() if isinstance(cs, (torch.Tensor, np.ndarray)) else cs)]
        if not cs or len(set(cs)) != len(cs) or not all(0 <= c < adapter.width for c in cs):
            raise ValueError(f"channels at {t} must be distinct ints in [0, {adapter.width}), at least one; got {cs[:8]}")
        out[t] = cs
    return out


def record(adapter: Adapter, prompts: Sequence[str], seeds: Sequence[int] = (0,), taps: Sequence[str] | None = None,
           steps: Sequence[int] | None = None, channels="all", token_mask=None, num_inference_steps: int = 20,
           batch_size: int = 16, *, conditioning: bool | None = None, unit_seeds: Sequence[int] | None = None,
           latents: torch.Tensor | None = None, **pipe_kwargs) -> Record:
    """Generate the source units and keep `channels` at taps x steps for both guidance halves.

    taps: tap names (default: every tap of both streams); steps: default all; channels: "all", a
    list of ints, or {tap name: ints}; token_mask: None or (units, image tokens) bool -- image taps
    then keep only those tokens (text taps keep all). conditioning: also keep the AdaLN
    conditioning `temb` (all its channels; `probe.conditioning_tap`) -- default: only when
    channels is "all", the one case where it makes alpha = 1 reproduce the source exactly.
    unit_seeds: one seed per prompt (unit i = (prompts[i], unit_seeds[i])) instead of the units
    prompts x seeds -- pairs with their own noise each. latents: (units, ...) each unit's initial
    latents instead of its seed's noise (a reference image's inverted or noised trajectory,
    `mabook.inversion`); with them a prompt may be "" (unconditional), and `transport` starts the
    targets from the same latents.
    """
    given = list(prompts) if latents is not None and isinstance(prompts, (list, tuple)) else None
    checked = prompts if given is None else [p if p != "" else "(unconditional)" for p in given]
    if unit_seeds is None:
        units = disruption.check_generation(adapter, checked, seeds, num_inference_steps, batch_size, "transport")
    else:
        units = _paired_units(adapter, checked, unit_seeds, num_inference_steps, batch_size)
    if given is not None:  # units follow the prompts' order (seed-major): put "" back
        units = [(p, s) for p, (_, s) in zip(given * len(units), units)]
        if len(latents) != len(units):
            raise ValueError(f"latents has {len(latents)} rows; expected one per unit ({len(units)})")
    tap_names = [str(t) for t in probe.taps(adapter)] if taps is None else [str(probe.resolve(adapter, t)) for t in taps]
    if any(t.endswith("." + probe.CONDITIONING) for t in tap_names):
        raise ValueError("the conditioning tap is not one of `taps`: pass conditioning=True (it is kept whole)")
    conditioning = (isinstance(channels, str) and channels == "all") if conditioning is None else conditioning
    if not isinstance(conditioning, bool):
        raise ValueError(f"conditioning must be True, False or None, got {conditioning!r}")
    steps = list(range(num_inference_steps)) if steps is None else sorted(probe.check_steps(steps))
    if any(s >= num_inference_steps for s in steps):
        raise ValueError(f"steps {steps} outside the {num_inference_steps} steps; allowed: 0..{num_inference_steps - 1}")
    chosen = _check_channels(adapter, channels, tap_names)
    if conditioning:
        cond = str(probe.conditioning_tap(adapter))  # raises for families without one
        tap_names.append(cond)
        chosen[cond] = list(range(adapter.width))
    grid = adapter.grid(pipe_kwargs.get("height"), pipe_kwargs.get("width"))
    tokens = grid[0] * grid[1]
    mask = torch.ones(len(units), tokens, dtype=torch.bool) if token_mask is None else \
        _check_mask(token_mask, len(units), tokens, "token_mask")
    index = {t: torch.tensor(c) for t, c in chosen.items()}
    parts: dict[tuple[str, int], dict[str, list[torch.Tensor]]] = {}
    text_tokens, images, chunk_mask = 0, [], None

    def keep(tap, step, hidden_states):  # hidden_states: the call's whole batch (cfg="both")
        nonlocal text_tokens
        name = str(tap)
        x = hidden_states[..., index[name].to(hidden_states.device)].detach()
        roles = hooks.roles
        halves = x.chunk(len(roles)) if len(roles) > 1 else (x,)
        for role, half in zip(roles, halves):
            if tap.stream == "img":
                if half.shape[1] != tokens:
                    raise ValueError(f"{half.shape[1]} image tokens at {name} do not fill the {grid[0]}x{grid[1]} grid")
                half = half[chunk_mask.to(half.device)]
            elif tap.stream == "txt":
                text_tokens = half.shape[1]
                half = half.reshape(-1, half.shape[-1])
            else:  # the conditioning: one token per unit
                half = half.reshape(-1, half.shape[-1])
            parts.setdefault((name, step), {}).setdefault(role, []).append(half.cpu().clone())
        return None

    hooks = probe.hooks(adapter, keep, taps=tap_names, steps=steps, cfg="both")
    with hooks:
        for start in range(0, len(units), batch_size):
            chunk_mask = mask[start:start + batch_size]
            images.append(adapter.generate(units[start:start + batch_size], num_inference_steps,
                                               batch_size, **_with_latents(pipe_kwargs, latents, start, start + batch_size)))
    hooks.check_steps_ran(steps, "record")
    values = {key: {role: torch.cat(v) for role, v in by_role.items()} for key, by_role in parts.items()}
    return Record(adapter, units, np.concatenate(images), chosen, steps, values, mask, text_tokens,
                  num_inference_steps, dict(pipe_kwargs), conditioning, latents)


def _with_latents(pipe_kwargs: dict, latents: torch.Tensor | None, start: int, stop: int) -> dict:
    """The pipeline arguments of units [start, stop): their rows of `latents` when given."""
    return pipe_kwargs if latents is None else {**pipe_kwargs, "latents": latents[start:stop]}


def _paired_units(adapter: Adapter, prompts, unit_seeds, num_inference_steps, batch_size) -> list[tuple[str, int]]:
    """(prompts[i], unit_seeds[i]) units, checked as `disruption.check_generation` checks the rest."""
    disruption.check_generation(adapter, prompts, [0], num_inference_steps, batch_size, "transport")
    seeds = list(unit_seeds) if not isinstance(unit_seeds, (str, bytes)) else None
    if seeds is None or len(seeds) != len(prompts) or not all(
            isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise ValueError(f"unit_seeds must be one non-negative int per prompt ({len(prompts)}), got {unit_seeds!r:.80}")
    return [(p, int(s)) for p, s in zip(prompts, seeds)]


@dataclass
class Transport:
    images: np.ndarray  # (units, H, W, 3) transported
    target: np.ndarray  # (units, H, W, 3) unedited targets (same noise)
    table: list[dict]  # one row per unit
    target_units: list[tuple[str, int]]


def _edits(rec: Record, editor_box: dict, taps: list[str], steps: list[int], alpha: float, mask, start: int, stop: int,
           channels: dict[str, list[int]] | None = None):
    """One Edit per tap; its callable picks the current step's source values and the call's roles.
    channels: per tap, a subset of the recorded channels (None: all of them)."""
    edits = []
    for tap in taps:
        recorded = rec.channels[tap]
        chosen = recorded if channels is None or tap not in channels else channels[tap]
        idx = None if chosen == recorded else torch.tensor([recorded.index(c) for c in chosen])

        def op(selected, tap=tap, idx=idx):
            editor = editor_box["editor"]
            src = torch.cat([rec.dense(tap, editor.step, role, start, stop) for role in editor.roles])
            if idx is not None:
                src = src[..., idx]
            if src.shape != selected.shape:
                raise ValueError(f"source values at {tap} step {editor.step} have shape {tuple(src.shape)}, the target "
                                 f"{tuple(selected.shape)}: different token grids or batches")
            return torch.lerp(selected, src.to(selected), alpha)  # exact at both ends: target at 0, source at 1

        token_mask = None if mask is None or not tap.endswith(".img") else mask[start:stop]
        edits.append(Edit(tap, chosen, op, steps=steps, token_mask=token_mask))
    return edits


def transport(rec: Record, target_prompts: Sequence[str], alpha: float = 1.0, mask=None, stream: str = "img",
              channels: dict[str, Sequence[int]] | Sequence[int] | None = None, steps: Sequence[int] | None = None,
              target_seeds: Sequence[int] | None = None, num_inference_steps: int | None = None, batch_size: int = 16,
              target_images: np.ndarray | None = None, *, conditioning: bool | None = None, **pipe_kwargs) -> Transport:
    """Regenerate each target unit with the recorded source channels mixed in at strength alpha.

    target_prompts: one per source unit (pair i = source unit i; seeds default to the source's, so
    the noise is the same). mask: None (every recorded token) or (units, image tokens) bool within
    the record's token mask. stream: "img", "txt" or "both". channels: default every recorded
    channel; or a subset of them (a list for every tap, or {tap name: ints}) -- one record of all
    channels serves every set. steps: the window, default every recorded step. conditioning: also
    mix the AdaLN conditioning (default: if the record has it and no channel subset is given, the
    rule `record` follows); it is one vector per sample, so a mask does not restrict it.
    target_images: the unedited targets if already generated (else generated here). A record made
    from `latents` starts every target from its unit's latents.
    """
    alpha = check_alpha(alpha)
    streams = _check_stream(stream)
    if conditioning is None:
        conditioning = rec.conditioning and (channels is None or (isinstance(channels, str) and channels == "all"))
    if not isinstance(conditioning, bool):
        raise ValueError(f"conditioning must be True, False or None, got {conditioning!r}")
    if conditioning and not rec.conditioning:
        raise ValueError("conditioning=True, but this record did not keep the conditioning; record with conditioning=True")
    if isinstance(target_prompts, str):
        target_prompts = [target_prompts]
    seeds = [s for _, s in rec.units] if target_seeds is None else list(target_seeds)
    if len(target_prompts) != len(rec.units) or len(seeds) != len(rec.units):
        raise ValueError(f"need one target prompt and seed per source unit ({len(rec.units)}), got "
                         f"{len(target_prompts)} prompts and {len(seeds)} seeds")
    for p in target_prompts:
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"every target prompt must be a non-empty str, got {p!r}")
    units = [(p, int(s)) for p, s in zip(target_prompts, seeds)]
    n_steps = rec.num_inference_steps if num_inference_steps is None else num_inference_steps
    if n_steps != rec.num_inference_steps:
        raise ValueError(f"num_inference_steps {n_steps!r} differs from the source's {rec.num_inference_steps}; "
                         "source and target must share the schedule")
    kwargs = {**rec.pipe_kwargs, **pipe_kwargs}
    grid = rec.adapter.grid(kwargs.get("height"), kwargs.get("width"))
    if grid[0] * grid[1] != rec.tokens:
        raise ValueError(f"the target's token grid {grid[0]}x{grid[1]} ({grid[0] * grid[1]} tokens) differs from the "
                         f"source's {rec.tokens} tokens")
    window = rec.steps if steps is None else sorted(probe.check_steps(steps))
    outside = [s for s in window if s not in rec.steps]
    if outside:
        raise ValueError(f"steps {outside} were not recorded; allowed: {rec.steps}")
    taps = [t for t in rec.channels if t.rsplit(".", 1)[1] in streams]
    if not taps:
        raise ValueError(f"the record has no tap on stream {stream!r}; recorded taps: {list(rec.channels)[:4]}...")
    subset = None
    if channels is not None:
        subset = _check_channels(rec.adapter, channels, taps)
        for t in taps:
            missing = [c for c in subset[t] if c not in rec.channels[t]]
            if missing:
                raise ValueError(f"channels {missing[:8]} at {t} were not recorded; allowed: a subset of the "
                                 f"{len(rec.channels[t])} recorded channels (record with the set you want)")
    if conditioning:
        taps = taps + [str(probe.conditioning_tap(rec.adapter))]
    if mask is not None:
        mask = _check_mask(mask, len(units), rec.tokens, "mask")
        if (mask & ~rec.token_mask).any():
            raise ValueError("mask reaches tokens the record did not keep; use a mask within the record's token_mask")
    elif not rec.token_mask.all():
        mask = rec.token_mask  # the recorded tokens are all there is to transport
    if target_images is None:
        target_images = np.concatenate([  # a record made from latents (mabook.inversion) gives the targets its latents
            rec.adapter.generate(units[a:a + batch_size], n_steps, batch_size, **_with_latents(kwargs, rec.latents, a, a + batch_size))
            for a in range(0, len(units), batch_size)])
    images = []
    for start in range(0, len(units), batch_size):
        stop = min(start + batch_size, len(units))
        box: dict = {}
        editor = probe.edit(rec.adapter, _edits(rec, box, taps, window, alpha, mask, start, stop, subset), cfg="both")
        box["editor"] = editor
        with editor:
            images.append(rec.adapter.generate(units[start:stop], n_steps, batch_size, **_with_latents(kwargs, rec.latents, start, stop)))
    images = np.concatenate(images)
    k = len((subset or rec.channels)[taps[0]])
    table = _table(rec, units, target_images, images, alpha, stream, mask, k, conditioning)
    return Transport(images, target_images, table, units)


def _table(rec: Record, units, target_images, images, alpha, stream, mask, k, conditioning) -> list[dict]:
    """disruption's metrics against the unedited target, plus source/target attribute agreement."""
    base = SimpleNamespace(adapter=rec.adapter, images=target_images, units=units, clip=None)  # what unit_metrics reads
    rows = disruption.unit_metrics(base, images)
    judged = judge.applies(rec.adapter, [p for p, _ in units] + [p for p, _ in rec.units])
    for i, row in enumerate(rows):
        row.update(source_prompt=rec.units[i][0], alpha=alpha, stream=stream, k=k, conditioning=conditioning,
                   masked_tokens=int(rec.tokens if mask is None else mask[i].sum()))
        if judged:
            src, tgt = judge.judge(images[i], rec.units[i][0]), judge.judge(images[i], units[i][0])
            s_scene, t_scene = world.parse_caption(rec.units[i][0]), world.parse_caption(units[i][0])
            for a in ATTRIBUTES:
                row[f"took_source_{a}"] = float(np.mean([c[a] for c in src.correct]))
                row[f"kept_target_{a}"] = float(np.mean([c[a] for c in tgt.correct]))
                row[f"differs_{a}"] = len(s_scene.objects) != len(t_scene.objects) or any(
                    getattr(o, a) != getattr(p, a) for o, p in zip(s_scene.objects, t_scene.objects))
    return rows


def kmeans_mask(rec: Record, tap: str, step: int, n_clusters: int = 2, seed: int = 0,
                source: str | None = "rendered", channels: Sequence[int] | None = None) -> torch.Tensor:
    """(units, image tokens) bool: chapter 3's K-means foreground of each recorded unit, clustered on
    the recorded channels (or the subset `channels` of them) of the conditional half at (tap, step)
    -- the source's mask; record the targets with the same channels for theirs, and `a | b` is the
    union.

    source: "rendered" or "judge" match clusters to the caption's objects (`spatial.truth`); None
    calls the smallest cluster foreground (real models: no truth)."""
    if (tap, step) not in rec.values or not tap.endswith(".img"):
        raise ValueError(f"({tap!r}, {step}) is not a recorded image tap and step; recorded: "
                         f"{sorted({t for t, _ in rec.values if t.endswith('.img')})[:4]}..., steps {rec.steps}")
    if not rec.token_mask.all():
        raise ValueError("kmeans_mask needs every image token; this record kept a token mask")
    grid = rec.adapter.grid(rec.pipe_kwargs.get("height"), rec.pipe_kwargs.get("width"))
    x = rec.dense(tap, step, "cond", 0, len(rec.units)).float().cpu().numpy()
    if channels is not None:
        missing = [c for c in channels if c not in rec.channels[tap]]
        if missing or not len(channels):
            raise ValueError(f"kmeans_mask channels must be a non-empty subset of the {len(rec.channels[tap])} recorded at "
                             f"{tap}; not recorded: {missing[:8]}")
        x = x[..., [rec.channels[tap].index(int(c)) for c in channels]]
    out = []
    for u, (prompt, _) in enumerate(rec.units):
        labels = spatial.kmeans(x[u], n_clusters, seed=seed)
        if source is None:
            counts = np.bincount(labels, minlength=n_clusters).astype(float)
            counts[counts == 0] = np.inf  # an empty cluster is not the smallest
            fg = labels == int(np.argmin(counts))
        else:
            t = spatial.truth(prompt, grid, rec.images[u], source)
            fg = spatial.assign(labels, t.tokens.reshape(len(t.tokens), -1))[labels] >= 1
        if not fg.any():  # a constant map: nothing to call foreground; the whole image stands in
            fg = np.ones_like(fg)
        out.append(torch.from_numpy(np.asarray(fg, dtype=bool)))
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------
# Baselines
# ---------------------------------------------------------------------------------------------


def pixel_blend(source_images: np.ndarray, target_images: np.ndarray, alpha: float) -> np.ndarray:
    """The two final images mixed at the same alpha: what transport must beat to be 'semantic'."""
    alpha = check_alpha(alpha)
    if source_images.shape != target_images.shape:
        raise ValueError(f"source images {source_images.shape} and target images {target_images.shape} differ in shape")
    return ((1 - alpha) * target_images + alpha * source_images).astype(np.float32)


def random_channels(adapter: Adapter, channels: dict[str, Sequence[int]], seed: int = 0) -> dict[str, list[int]]:
    """Per tap, a seeded random set of the same size excluding the given channels (the control)."""
    return {tap: [int(c) for c in discovery.random_k(adapter.width, len(cs), seed=seed, exclude=list(cs))]
            for tap, cs in channels.items()}


def bytes_recorded(blocks: int, tokens: int, steps: int, k: int, bytes_per_value: int = 2, halves: int = 2) -> int:
    """What a record of k channels costs at `blocks` image taps x `tokens` x `steps`, both CFG halves."""
    return blocks * tokens * steps * k * bytes_per_value * halves


# ---------------------------------------------------------------------------------------------
# Text-conditioned transport on the shapes world (chapter 4): pairs, baselines, scores, summary
# ---------------------------------------------------------------------------------------------

PAIR_KINDS = ("one_attribute", "two_attributes", "one_object_of_two")
_VOCABULARY = {"color": list(world.COLORS), "shape": list(world.SHAPES), "size": list(world.SIZES),
               "position": list(world.POSITIONS)}


class Pair(NamedTuple):
    """A source and a target caption that differ only in `differs` (attributes of one object)."""

    source: str
    target: str
    differs: tuple[str, ...]


def pairs(kind: str, n: int, seed: int = 0, split: str = "any") -> list[Pair]:
    """n distinct caption pairs of one kind, seeded. The target is a random scene (`world.sample_scene`);
    the source is the same scene with the `differs` attributes of one object redrawn:

    one_attribute      one object; one attribute differs, the attributes in turn (color, shape, size, position, color, ...)
    two_attributes     one object; two differ, the six attribute pairs in turn
    one_object_of_two  two objects; one attribute of one of them differs (attributes in turn), the other is identical

    The background is shared; two-object scenes keep the world's rules (apart, different colours).
    split: "any", "train" or "heldout" (both captions on that side of the held-out split).
    """
    if kind not in PAIR_KINDS:
        raise ValueError(f"unknown pair kind {kind!r}; allowed: {list(PAIR_KINDS)}")
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    combos = list(itertools.combinations(ATTRIBUTES, 2)) if kind == "two_attributes" else [(a,) for a in ATTRIBUTES]
    rng = np.random.default_rng(seed)
    out: list[Pair] = []
    seen: set[tuple[str, str]] = set()
    for _ in range(1000 * n):
        if len(out) == n:
            break
        differs = combos[len(out) % len(combos)]
        target = world.sample_scene(rng, 2 if kind == "one_object_of_two" else 1, split)
        i = int(rng.integers(len(target.objects)))
        obj = target.objects[i]
        new = dataclasses.replace(obj, **{a: str(rng.choice([v for v in _VOCABULARY[a] if v != getattr(obj, a)]))
                                          for a in differs})
        objects = list(target.objects)
        objects[i] = new
        if len(objects) == 2 and (world.overlaps(*objects) or objects[0].color == objects[1].color):
            continue
        source = world.Scene(tuple(objects), target.background)
        if split != "any" and world.is_heldout(source.caption) != (split == "heldout"):
            continue
        if (source.caption, target.caption) not in seen:
            seen.add((source.caption, target.caption))
            out.append(Pair(source.caption, target.caption, tuple(differs)))
    if len(out) < n:
        raise ValueError(f"found only {len(out)} distinct {kind} pairs in split {split!r}; ask for fewer")
    return out


def changed_objects(pair: Pair) -> list[int]:
    """Indices (caption order) of the objects whose attributes differ between source and target."""
    s, t = world.parse_caption(pair.source), world.parse_caption(pair.target)
    if len(s.objects) != len(t.objects) or s.background != t.background:
        raise ValueError(f"source and target must describe the same objects on the same background: {pair}")
    return [i for i, (a, b) in enumerate(zip(s.objects, t.objects)) if a != b]


SCORES = ("took_source", "kept_target", "outside_change", "other_kept", "other_change", "cleanliness", "pixel_mae")


def score(pair: Pair, image: np.ndarray, target_image: np.ndarray) -> dict:
    """What one output image (H, W, 3) in [0, 1] took from each side of a pair, judged exactly
    (`mabook.judge`) against both captions, and how far it moved from the unedited target image:

    took_source     share of the differing attributes (of the changed object) at the source's value
    kept_target     share of the other attributes (of every object) still at the target's value
    took_<a>, kept_<a>  the same per attribute (NaN where the attribute is not in that group)
    outside_change  mean |image - target_image| over the pixels outside the region the captions
                    disagree on (the changed object's rendered masks in source and target, grown
                    by one pixel for edges): a local edit leaves it near 0
    other_kept      two-object pairs: the unchanged object still has all four of its attributes
    other_change    two-object pairs: mean |image - target_image| over the unchanged object's mask
    cleanliness     the judge's share of pixels near a palette colour: a ghosted, half-and-half image is
                    not clean, whatever it resembles
    pixel_mae       mean |image - target_image| over the whole image
    """
    image, target_image = np.asarray(image, np.float32), np.asarray(target_image, np.float32)
    if image.shape != target_image.shape:
        raise ValueError(f"image {image.shape} and target image {target_image.shape} differ in shape")
    changed = changed_objects(pair)
    js, jt = judge.judge(image, pair.source), judge.judge(image, pair.target)
    s_masks, t_masks = world.render(world.parse_caption(pair.source)).masks, world.render(world.parse_caption(pair.target)).masks
    row = {"took_source": float(np.mean([js.correct[i][a] for i in changed for a in pair.differs])),
           "kept_target": float(np.mean([jt.correct[j][a] for j in range(len(jt.correct)) for a in ATTRIBUTES
                                         if not (j in changed and a in pair.differs)]))}
    for a in ATTRIBUTES:
        row[f"took_{a}"] = float(np.mean([js.correct[i][a] for i in changed])) if a in pair.differs else float("nan")
        others = [jt.correct[j][a] for j in range(len(jt.correct)) if not (j in changed and a in pair.differs)]
        row[f"kept_{a}"] = float(np.mean(others)) if others else float("nan")
    change = np.abs(image - target_image).mean(-1)  # (H, W)
    region = ndimage.binary_dilation(s_masks[changed].any(0) | t_masks[changed].any(0))
    row["outside_change"] = float(change[~region].mean()) if (~region).any() else float("nan")
    unchanged = [j for j in range(len(t_masks)) if j not in changed]
    if unchanged:
        row["other_kept"] = float(all(all(jt.correct[j].values()) for j in unchanged))
        other = t_masks[unchanged].any(0)
        row["other_change"] = float(change[other].mean()) if other.any() else float("nan")
    else:
        row["other_kept"] = row["other_change"] = float("nan")
    row["cleanliness"] = float(jt.cleanliness)
    row["pixel_mae"] = float(change.mean())
    return row


def summary(rows: Sequence[dict], by: Sequence[str] = ("kind", "method", "alpha"),
            metrics: Sequence[str] = SCORES) -> list[dict]:
    """One row per group of `by`: each metric's mean over pairs with a bootstrap 95 % CI.

    Rows of one pair within a group (a random set's seeds) are averaged first, so pairs stay the
    independent draws; NaN values (a metric that does not apply) are left out, `n_<metric>` says
    how many pairs remain."""
    if not rows:
        raise ValueError("summary needs at least one row")
    missing = [b for b in by if b not in rows[0]]
    if missing:
        raise ValueError(f"rows have no column(s) {missing}; they have {sorted(rows[0])}")
    groups: dict[tuple, dict[tuple, list[dict]]] = {}
    for r in rows:
        groups.setdefault(tuple(r[b] for b in by), {}).setdefault((r["kind"], r["pair"]), []).append(r)
    out = []
    for key, by_pair in groups.items():
        entry = dict(zip(by, key))
        for m in metrics:
            values = [float(np.nanmean(v)) for v in ([r.get(m, np.nan) for r in rs] for rs in by_pair.values())
                      if not np.all(np.isnan(v))]
            entry[m] = float(np.mean(values)) if values else float("nan")
            entry[f"{m}_ci"] = bootstrap_ci(values) if len(values) > 1 else (float("nan"), float("nan"))
            entry[f"n_{m}"] = len(values)
        entry["n_pairs"] = len(by_pair)
        out.append(entry)
    return out


def paired_difference(rows: Sequence[dict], a: dict, b: dict, metric: str = "took_source") -> dict:
    """Mean over pairs of metric(rows matching a) - metric(rows matching b), pairs matched by (kind,
    pair), with a bootstrap 95 % CI; e.g. a={"method": "top-16", "alpha": 1.0}, b={"method":
    "random-16", "alpha": 1.0}. Rows of one pair on a side (random seeds) are averaged first; pairs
    where the metric is NaN on either side are left out."""

    def per_pair(where):
        acc: dict[tuple, list[float]] = {}
        for r in rows:
            if all(r.get(k) == v for k, v in where.items()):
                acc.setdefault((r["kind"], r["pair"]), []).append(r.get(metric, np.nan))
        return {key: float(np.nanmean(v)) for key, v in acc.items() if not np.all(np.isnan(v))}

    pa, pb = per_pair(a), per_pair(b)
    common = [key for key in pa if key in pb]
    if not common:
        raise ValueError(f"no pair has {metric!r} under both {a} and {b}")
    d = np.array([pa[key] - pb[key] for key in common])
    ci = bootstrap_ci(d) if len(d) > 1 else (float("nan"), float("nan"))
    return {"metric": metric, "a": a, "b": b, "difference": float(d.mean()), "ci": ci, "n_pairs": len(d)}


def embedding_blend(adapter: Adapter, sources: Sequence[str], targets: Sequence[str], alpha: float,
                    seeds: Sequence[int], num_inference_steps: int = 20, batch_size: int = 16, **pipe_kwargs) -> np.ndarray:
    """The text baseline: generate with lerp(target, source, alpha) of both text embeddings (token
    sequence and pooled vector; the unconditional half stays the empty prompt's), unit i with seed
    i's noise. (units, H, W, 3) in [0, 1]. alpha = 0 is the target's image, 1 the source's, bitwise.

    The organism only: its pipeline takes `prompt_embeds` and `pooled_prompt_embeds`."""
    alpha = check_alpha(alpha)
    if adapter.family.name != "organism":
        raise NotImplementedError(f"embedding_blend runs on the organism only, not {adapter.family.name!r}: for a "
                                  "diffusers pipeline, blend the outputs of its encode_prompt and pass them as prompt_embeds")
    units = _paired_units(adapter, list(sources), seeds, num_inference_steps, batch_size)
    if isinstance(targets, str) or len(targets) != len(units) or not all(isinstance(t, str) and t.strip() for t in targets):
        raise ValueError(f"need one non-empty target prompt per source ({len(units)}), got {targets!r:.80}")
    pipe, out = adapter.pipe, []
    for start in range(0, len(units), batch_size):
        chunk = units[start:start + batch_size]
        with torch.no_grad():
            s_embeds, s_pooled = pipe.encode_prompt([p for p, _ in chunk])
            t_embeds, t_pooled = pipe.encode_prompt(list(targets[start:start + batch_size]))
        generators = [torch.Generator("cpu").manual_seed(seed) for _, seed in chunk]
        images = pipe(prompt_embeds=torch.lerp(t_embeds, s_embeds, alpha),
                      pooled_prompt_embeds=torch.lerp(t_pooled, s_pooled, alpha),
                      num_inference_steps=num_inference_steps, generator=generators, output_type="np",
                      **pipe_kwargs).images
        out.append(np.asarray(images))
    return np.concatenate(out).astype(np.float32)


MASKS = ("source", "target", "union")
METHOD_KINDS = ("channels", "pixel", "embedding")


@dataclass(frozen=True)
class Method:
    """One way of moving a target toward its source at strength alpha (a row label of chapter 4).

    kind "channels": `transport` of `channels` ({tap: ints}, or "all") -- optionally inside a
    K-means `mask` ("source", "target" or their "union"), in a step window `steps`, with or without
    the AdaLN `conditioning` (None: only with "all"); "pixel": `pixel_blend`; "embedding":
    `embedding_blend`. Methods sharing a `name` (random sets, `seed`) are pooled per pair. alphas:
    this method's own alphas (e.g. a sweep at alpha = 1 only); None: `compare`'s."""

    name: str
    kind: str = "channels"
    channels: dict | str | None = None
    seed: int | None = None
    mask: str | None = None
    steps: tuple[int, ...] | None = None
    conditioning: bool | None = None
    alphas: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.kind not in METHOD_KINDS:
            raise ValueError(f"unknown method kind {self.kind!r}; allowed: {list(METHOD_KINDS)}")
        if self.alphas is not None:
            object.__setattr__(self, "alphas", tuple(check_alpha(a) for a in self.alphas))
        if self.kind == "channels" and self.channels is None:
            raise ValueError(f"method {self.name!r} transports channels: give channels ({{tap: ints}} or 'all')")
        if self.mask is not None and self.mask not in MASKS:
            raise ValueError(f"unknown mask {self.mask!r}; allowed: None (whole image) or {list(MASKS)}")


@dataclass
class Comparison:
    """`compare`'s result: `rows` (one per pair x method x alpha, plus the unedited source and target
    as methods "source image" / "target image"), `images[(method name, seed, alpha)]` (pairs, H, W, 3),
    the unedited `sources` and `targets`, the K-means `masks` {"source", "target", "union"}
    (pairs, image tokens) when a method used them, and the flat `pairs` [(kind, index, Pair)]."""

    rows: list[dict]
    images: dict[tuple, np.ndarray]
    sources: np.ndarray
    targets: np.ndarray
    masks: dict[str, torch.Tensor]
    pairs: list[tuple[str, int, Pair]]
    seconds: float = 0.0


def compare(adapter: Adapter, pairs_by_kind: dict[str, Sequence[Pair]], methods: Sequence[Method],
            alphas: Sequence[float] = (0.5, 1.0), num_inference_steps: int = 20, batch_size: int = 16, chunk: int = 64,
            stream: str = "img", mask_at: tuple[str, int] | None = None, mask_channels: dict | None = None,
            first_seed: int = 0, **pipe_kwargs) -> Comparison:
    """Every method at every alpha on the same pairs; pair i of the k-th kind gets the noise of seed
    first_seed + 1000 k + i (so a prefix of the pairs gets the same noise in another comparison).

    Per chunk of pairs: the sources are recorded once with every channel of `stream` and the
    conditioning (a record of all channels serves every channel set, as a subset); the targets are
    generated once (recorded at `mask_at` = (image tap, step) with `mask_channels[tap]` when a
    method needs K-means masks, which are then clustered on those channels); then each method runs
    at each alpha. alpha = 0 is the unedited target for every method (`transport` and
    `embedding_blend` are bitwise exact there; tested), so it is copied, not regenerated.
    """
    start_time = time.perf_counter()
    flat = [(kind, i, p) for kind, ps in pairs_by_kind.items() for i, p in enumerate(ps)]
    if any(len(ps) > 1000 for ps in pairs_by_kind.values()):
        raise ValueError("at most 1000 pairs per kind (their seeds would collide)")
    seed_of = {(kind, i): first_seed + 1000 * k + i for k, (kind, ps) in enumerate(pairs_by_kind.items()) for i in range(len(ps))}
    if not flat:
        raise ValueError("pairs_by_kind holds no pair")
    if not methods or not all(isinstance(m, Method) for m in methods):
        raise ValueError("methods must be a non-empty list of Method")
    names = [(m.name, m.seed) for m in methods]
    if len(set(names)) != len(names):
        raise ValueError(f"methods must have distinct (name, seed); repeated: {sorted({n for n in names if names.count(n) > 1})}")
    alphas = [check_alpha(a) for a in alphas]
    streams = _check_stream(stream)
    needs_masks = any(m.mask is not None for m in methods)
    if needs_masks:
        if mask_at is None or mask_channels is None:
            raise ValueError("methods with a K-means mask need mask_at=(image tap, step) and mask_channels={tap: ints}")
        mask_tap, mask_step = str(probe.resolve(adapter, mask_at[0])), int(mask_at[1])
        if not mask_tap.endswith(".img") or mask_tap not in mask_channels:
            raise ValueError(f"mask_at needs an image tap with a channel set in mask_channels, got {mask_at!r}")
        if not 0 <= mask_step < num_inference_steps:
            raise ValueError(f"mask step {mask_step} outside the {num_inference_steps} steps")
    stream_taps = [str(t) for t in probe.taps(adapter, streams)]
    rows: list[dict] = []
    images: dict[tuple, list[np.ndarray]] = {}
    sources, targets, masks = [], [], {m: [] for m in MASKS}
    for c0 in range(0, len(flat), chunk):
        part = flat[c0:c0 + chunk]
        seeds = [seed_of[(kind, i)] for kind, i, _ in part]
        src_prompts, tgt_prompts = [p.source for _, _, p in part], [p.target for _, _, p in part]
        # 1. the sources, every channel and the conditioning; 2. the targets (and the K-means masks)
        rec = record(adapter, src_prompts, taps=stream_taps, channels="all", conditioning=True, unit_seeds=seeds,
                     num_inference_steps=num_inference_steps, batch_size=batch_size, **pipe_kwargs)
        if needs_masks:
            trec = record(adapter, tgt_prompts, taps=[mask_tap], steps=[mask_step], channels={mask_tap: mask_channels[mask_tap]},
                          unit_seeds=seeds, num_inference_steps=num_inference_steps, batch_size=batch_size, **pipe_kwargs)
            target_images = trec.images
            chunk_masks = {"source": kmeans_mask(rec, mask_tap, mask_step, channels=mask_channels[mask_tap]),
                           "target": kmeans_mask(trec, mask_tap, mask_step)}
            chunk_masks["union"] = chunk_masks["source"] | chunk_masks["target"]
            for m in MASKS:
                masks[m].append(chunk_masks[m])
        else:
            target_images = adapter.generate(list(zip(tgt_prompts, seeds)), num_inference_steps, batch_size, **pipe_kwargs)
        sources.append(rec.images)
        targets.append(target_images)
        # 3. every method at every alpha
        for m in methods:
            for alpha in (alphas if m.alphas is None else m.alphas):
                if alpha == 0:
                    out = target_images
                elif m.kind == "pixel":
                    out = pixel_blend(rec.images, target_images, alpha)
                elif m.kind == "embedding":
                    out = embedding_blend(adapter, src_prompts, tgt_prompts, alpha, seeds, num_inference_steps,
                                          batch_size, **pipe_kwargs)
                else:
                    out = transport(rec, tgt_prompts, alpha, mask=None if m.mask is None else chunk_masks[m.mask],
                                    stream=stream, channels=None if m.channels == "all" else m.channels,
                                    steps=m.steps, batch_size=batch_size, target_images=target_images,
                                    conditioning=(m.channels == "all") if m.conditioning is None else m.conditioning,
                                    **pipe_kwargs).images
                images.setdefault((m.name, m.seed, alpha), []).append(out)
                for j, (kind, i, pair) in enumerate(part):
                    rows.append({"kind": kind, "pair": i, "method": m.name, "method_kind": m.kind, "seed": m.seed,
                                 "mask": m.mask, "alpha": alpha, **score(pair, out[j], target_images[j])})
        for name, ims in (("source image", rec.images), ("target image", target_images)):
            for j, (kind, i, pair) in enumerate(part):
                rows.append({"kind": kind, "pair": i, "method": name, "method_kind": "reference", "seed": None,
                             "mask": None, "alpha": None, **score(pair, ims[j], target_images[j])})
    return Comparison(rows, {key: np.concatenate(v) for key, v in images.items()}, np.concatenate(sources),
                      np.concatenate(targets), {m: torch.cat(v) for m, v in masks.items() if v}, flat,
                      time.perf_counter() - start_time)
