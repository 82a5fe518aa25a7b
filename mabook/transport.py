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

Masks: `kmeans_mask(rec, tap, step)` is chapter 3's K-means clustering of each recorded unit's
tokens (on the recorded channels), with the foreground cluster chosen by a rule that never sees
the truth (`MASK_RULES`): "border" (default) calls background the cluster that holds the most of
the image's border tokens and foreground the rest (`border_foreground`); "oracle" matches the
clusters to the caption's rendered objects (`spatial.foreground_tokens`) -- it sees the answer, so
it is an upper bound, labelled as such wherever it is used. The target's mask comes from a record
of the targets, the union is `a | b` (`MASKS` names the three).

Baselines: `pixel_blend` (the two final images mixed at the same alpha), `embedding_blend` (the
two prompts' text embeddings mixed, same noise; organism), all-channel transport
(`record(..., channels="all")`), and `random_channels` (a random set of equal size per tap).

Memory. A record holds channels x tokens x taps x steps x guidance halves values, in the
transformer's dtype, in host memory. `record` needs the caller to name the channels and estimates
the bytes before generating (`record_memory.record_bytes`): every channel of a real model -- ~45 GB of bfloat16
per FLUX.1 image at 1024x1024 -- is refused unless `max_bytes` allows it; the organism's (128 wide,
32x32) are a few MB.

The AdaLN conditioning. Every block's modulation and the final `norm_out` read `temb` (timestep +
projected pooled text embedding), an input of the blocks, not a block output. `record(...,
conditioning=True)` also keeps it (all its channels, one vector per sample and step, through
`probe.conditioning_tap`; by default a record of channels="all" keeps it), and `transport(...,
conditioning=True)` then mixes it at the same alpha. Moving it is an explicit option, off by
default for every channel set, "all" included: the paper transports channels of the hidden
states, and a global conditioning vector would move the whole image whatever the mask. The one
place it is on is the exactness check below.

Streams. `transport(..., stream=)` moves the chosen channels of the image stream ("img", the
default), of the text stream ("txt": the text tokens' hidden states at every block output, which
the image tokens read through joint attention), or of both ("both").

Exactness. alpha = 0 edits nothing numerically (torch.lerp returns the target bitwise), on any
stream. alpha = 1 with every channel at every step and the conditioning reproduces the source's
image bitwise (the last block's image output and `temb` are all `norm_out` and `proj_out` read; the
image stream alone suffices, and both streams do too). Without the conditioning every block output
is still the source's, but the image is not: `norm_out` modulates the source's hidden states with
the target's pooled text. The tests pin all three facts.

Chapters 4 and 5 run this on shapes-world caption pairs: `mabook.text_transport` (pairs, methods,
scores, the comparison of text-conditioned transport) and `mabook.image_transport` (the same on
references brought onto a trajectory by `mabook.inversion`).

What this is not: image-conditioned transport (inversion of a reference image) -- `mabook.inversion`, chapter 5 --
nor a general hook library (it uses `probe.hooks` and `probe.edit` only).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Sequence

import numpy as np
import torch

from mabook import discovery, disruption, judge, probe, spatial, world
from mabook import progress as progress_
from mabook.models import Adapter, generators
from mabook.probe import Edit
from mabook.record_memory import check_memory

STREAMS = ("img", "txt", "both")
MASKS = ("source", "target", "union")  # whose K-means foreground (`kmeans_mask`): the source's, the target's, both
MASK_RULES = ("border", "oracle")  # which K-means cluster is foreground: truth-free (default), or matched to the truth
MASK_RULE_DEFINITIONS = {  # for tables and results files: what each rule calls foreground, and what it reads
    "border": "truth-free: the background is the K-means cluster holding the most of the image's border tokens (the "
              "outermost token cells), the foreground every other cluster; it reads the cluster labels and the grid only",
    "oracle": "sees the truth: the clusters matched to the caption's rendered objects (chapter 3's assignment); an upper "
              "bound for a mask of these clusters, not a method",
}
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


def check_stream(stream: str) -> list[str]:
    """"img", "txt" or "both" -> the streams it names."""
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
    if channels is None:
        raise ValueError("record needs channels: a list of ints (the same at every tap), {tap name: ints}, or 'all' "
                         "(every channel; on a model other than the organism also max_bytes=, the memory it may take)")
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
           steps: Sequence[int] | None = None, channels=None, token_mask=None, num_inference_steps: int = 20,
           batch_size: int = 16, *, conditioning: bool | None = None, unit_seeds: Sequence[int] | None = None,
           latents: torch.Tensor | None = None, max_bytes: int | None = None, **pipe_kwargs) -> Record:
    """Generate the source units and keep `channels` at taps x steps for both guidance halves.

    taps: tap names (default: every tap of both streams); steps: default all; channels (required):
    a list of ints (the same at every tap), {tap name: ints}, or "all" -- every channel, which on a
    real model is tens of GB per image (FLUX.1 at 1024x1024: ~45 GB of bfloat16 over 57 blocks x
    28 steps), so "all" on any model but the organism needs `max_bytes`, the host memory the caller
    allows; `max_bytes` also caps a record of any channels (`record_memory.record_bytes` is the estimate, made
    before generating). token_mask: None or (units, image tokens) bool -- image taps
    then keep only those tokens (text taps keep all). conditioning: also keep the AdaLN
    conditioning `temb` (all its channels; `probe.conditioning_tap`) -- default: only when
    channels is "all", the one case where it makes alpha = 1 reproduce the source exactly.
    unit_seeds: one seed per prompt (unit i = (prompts[i], unit_seeds[i])) instead of the units
    prompts x seeds -- pairs with their own noise each. latents: (units, ...) each unit's initial
    latents instead of its seed's noise (a reference image's inverted or noised trajectory,
    `mabook.inversion`); with them a prompt may be "" (unconditional), and `transport` starts the
    targets from the same latents.
    """
    units = _record_units(adapter, prompts, seeds, unit_seeds, latents, num_inference_steps, batch_size)
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
    check_memory(adapter, chosen, steps, mask, pipe_kwargs, all_channels=isinstance(channels, str), max_bytes=max_bytes)
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
    with hooks, progress_.estimate("record", len(units), num_inference_steps):
        for start in progress_.bar(range(0, len(units), batch_size), "record", unit="batch"):
            chunk_mask = mask[start:start + batch_size]
            images.append(adapter.generate(units[start:start + batch_size], num_inference_steps,
                                               batch_size, **_with_latents(pipe_kwargs, latents, start, start + batch_size)))
    hooks.check_steps_ran(steps, "record")
    values = {}
    for key in list(parts):  # joined one (tap, step) at a time: the record is never held twice
        values[key] = {role: torch.cat(v) for role, v in parts.pop(key).items()}
    return Record(adapter, units, np.concatenate(images), chosen, steps, values, mask, text_tokens,
                  num_inference_steps, dict(pipe_kwargs), conditioning, latents)


def _record_units(adapter: Adapter, prompts, seeds, unit_seeds, latents, num_inference_steps: int,
                  batch_size: int) -> list[tuple[str, int]]:
    """`record`'s units, checked: prompts x seeds, or (prompts[i], unit_seeds[i]); with latents a
    prompt may be "" (unconditional) and there must be one row of latents per unit."""
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
    return units


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
              target_images: np.ndarray | None = None, *, conditioning: bool = False, **pipe_kwargs) -> Transport:
    """Regenerate each target unit with the recorded source channels mixed in at strength alpha.

    target_prompts: one per source unit (pair i = source unit i; seeds default to the source's, so
    the noise is the same). mask: None (every recorded token) or (units, image tokens) bool within
    the record's token mask. stream: "img", "txt" or "both". channels: default every recorded
    channel; or a subset of them (a list for every tap, or {tap name: ints}) -- one record of all
    channels serves every set. steps: the window, default every recorded step. conditioning: also
    mix the AdaLN conditioning (default False, for every channel set; the record must have kept
    it); it is one vector per sample, so a mask does not restrict it. A mask needs the image
    stream ("img" or "both"): the text stream has no image tokens to select.
    target_images: the unedited targets if already generated (else generated here). A record made
    from `latents` starts every target from its unit's latents.
    """
    alpha = check_alpha(alpha)
    streams = check_stream(stream)
    conditioning = _check_conditioning(rec, conditioning)
    units, n_steps = _target_units(rec, target_prompts, target_seeds, num_inference_steps)
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
    subset = None if channels is None else _check_subset(rec, channels, taps)
    if conditioning:
        taps = taps + [str(probe.conditioning_tap(rec.adapter))]
    if mask is not None:
        if "img" not in streams:
            raise ValueError(f"mask selects image tokens; stream {stream!r} has none; allowed: mask=None with "
                             "stream 'txt', or stream 'img' or 'both'")
        mask = _check_mask(mask, len(units), rec.tokens, "mask")
        if (mask & ~rec.token_mask).any():
            raise ValueError("mask reaches tokens the record did not keep; use a mask within the record's token_mask")
    elif not rec.token_mask.all():
        mask = rec.token_mask  # the recorded tokens are all there is to transport
    images, starts = [], range(0, len(units), batch_size)
    with progress_.estimate("transport", len(units) * (1 if target_images is not None else 2), n_steps):
        if target_images is None:
            target_images = np.concatenate([  # a record made from latents (mabook.inversion) gives the targets its latents
                rec.adapter.generate(units[a:a + batch_size], n_steps, batch_size, **_with_latents(kwargs, rec.latents, a, a + batch_size))
                for a in starts])
        for start in progress_.bar(starts, "transport", unit="batch"):
            stop = min(start + batch_size, len(units))
            box: dict = {}
            editor = probe.edit(rec.adapter, _edits(rec, box, taps, window, alpha, mask, start, stop, subset), cfg="both")
            box["editor"] = editor
            with editor:
                images.append(rec.adapter.generate(units[start:stop], n_steps, batch_size,
                                                   **_with_latents(kwargs, rec.latents, start, stop)))
    images = np.concatenate(images)
    k = len((subset or rec.channels)[taps[0]])
    table = _table(rec, units, target_images, images, alpha, stream, mask, k, conditioning)
    return Transport(images, target_images, table, units)


def _check_conditioning(rec: Record, conditioning) -> bool:
    """`transport`'s conditioning: True or False, and True only on a record that kept it."""
    if not isinstance(conditioning, bool):
        raise ValueError(f"conditioning must be True or False, got {conditioning!r}")
    if conditioning and not rec.conditioning:
        raise ValueError("conditioning=True, but this record did not keep the conditioning; record with conditioning=True")
    return conditioning


def _target_units(rec: Record, target_prompts, target_seeds, num_inference_steps) -> tuple[list[tuple[str, int]], int]:
    """(the target units, one per source unit; the number of steps, the source's), checked."""
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
    return units, n_steps


def _check_subset(rec: Record, channels, taps: list[str]) -> dict[str, list[int]]:
    """`transport`'s channels: per tap, a subset of the recorded ones."""
    subset = _check_channels(rec.adapter, channels, taps)
    for t in taps:
        missing = [c for c in subset[t] if c not in rec.channels[t]]
        if missing:
            raise ValueError(f"channels {missing[:8]} at {t} were not recorded; allowed: a subset of the "
                             f"{len(rec.channels[t])} recorded channels (record with the set you want)")
    return subset


def _table(rec: Record, units, target_images, images, alpha, stream, mask, k, conditioning) -> list[dict]:
    """disruption's metrics against the unedited target, plus source/target attribute agreement:
    took_source_<a> (the output shows the source's value), kept_target_<a>, differs_<a>, and
    no_transport_took_source_<a> -- the unedited target judged against the source's caption, the
    rate took_source_<a> would have with no transport at all (the flip baseline)."""
    base = SimpleNamespace(adapter=rec.adapter, images=target_images, units=units, clip=None)  # what unit_metrics reads
    rows = disruption.unit_metrics(base, images)
    judged = judge.applies(rec.adapter, [p for p, _ in units] + [p for p, _ in rec.units])
    for i, row in enumerate(rows):
        row.update(source_prompt=rec.units[i][0], alpha=alpha, stream=stream, k=k, conditioning=conditioning,
                   masked_tokens=int(rec.tokens if mask is None else mask[i].sum()))
        if judged:
            src, tgt = judge.judge(images[i], rec.units[i][0]), judge.judge(images[i], units[i][0])
            unedited = judge.judge(target_images[i], rec.units[i][0])
            s_scene, t_scene = world.parse_caption(rec.units[i][0]), world.parse_caption(units[i][0])
            for a in ATTRIBUTES:
                row[f"took_source_{a}"] = float(np.mean([c[a] for c in src.correct]))
                row[f"no_transport_took_source_{a}"] = float(np.mean([c[a] for c in unedited.correct]))
                row[f"kept_target_{a}"] = float(np.mean([c[a] for c in tgt.correct]))
                row[f"differs_{a}"] = len(s_scene.objects) != len(t_scene.objects) or any(
                    getattr(o, a) != getattr(p, a) for o, p in zip(s_scene.objects, t_scene.objects))
    return rows


def border_foreground(labels: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(tokens,) bool: the foreground of one K-means labelling by the truth-free "border" rule.

    The background is the cluster holding the most of the image's border tokens (the outermost
    row and column of token cells on every side); foreground is every other cluster. Ties: the
    larger cluster is background, then the lower label. The rule reads the labels and the grid
    only -- never a caption, a render or the judge -- and rests on one assumption about
    images: the subject sits inside the frame and the background surrounds it, so the background
    owns the frame. It is not "the smaller cluster": a subject larger than its background is still
    foreground as long as the background holds more of the border. A single cluster (a constant
    map) is all background: an empty foreground."""
    labels = np.asarray(labels).ravel()
    h, w = grid
    if labels.shape != (h * w,):
        raise ValueError(f"labels has {labels.size} tokens; the {h}x{w} grid has {h * w}")
    border = np.zeros((h, w), dtype=bool)
    border[[0, -1], :] = border[:, [0, -1]] = True
    clusters = np.unique(labels)
    on_border = {int(c): int((labels[border.ravel()] == c).sum()) for c in clusters}
    size = {int(c): int((labels == c).sum()) for c in clusters}
    background = max(on_border, key=lambda c: (on_border[c], size[c], -c))
    return labels != background


def kmeans_mask(rec: Record, tap: str, step: int, n_clusters: int = 2, seed: int = 0, rule: str = "border",
                channels: Sequence[int] | None = None) -> torch.Tensor:
    """(units, image tokens) bool: chapter 3's K-means (K = n_clusters) of each recorded unit's
    tokens, clustered on the recorded channels (or the subset `channels` of them) of the conditional
    half at (tap, step) -- the source's mask; record the targets with the same channels for theirs,
    and `a | b` is the union.

    rule: which clusters are foreground (`MASK_RULES`) --
    "border"  (default) truth-free: background is the cluster holding the most border tokens,
              foreground the rest (`border_foreground`); it never sees a caption's truth and runs on
              any model;
    "oracle"  the clusters matched to the caption's rendered objects (`spatial.foreground_tokens`,
              source "rendered"): it sees the answer, so it is an upper bound for a mask, not a
              method; shapes-world captions only.
    A unit whose foreground is empty (a constant map) gets the whole image."""
    if rule not in MASK_RULES:
        raise ValueError(f"unknown mask rule {rule!r}; allowed: {list(MASK_RULES)}")
    if (tap, step) not in rec.values or not tap.endswith(".img"):
        raise ValueError(f"({tap!r}, {step}) is not a recorded image tap and step; recorded: "
                         f"{sorted({t for t, _ in rec.values if t.endswith('.img')})[:4]}..., steps {rec.steps}")
    if not rec.token_mask.all():
        raise ValueError("kmeans_mask needs every image token; this record kept a token mask")
    prompts = [p for p, _ in rec.units]
    if rule == "oracle" and not judge.applies(rec.adapter, prompts):
        raise ValueError("mask rule 'oracle' matches clusters to the truth, which only shapes-world captions on the organism "
                         "have; allowed here: rule 'border'")
    grid = rec.adapter.grid(rec.pipe_kwargs.get("height"), rec.pipe_kwargs.get("width"))
    x = rec.dense(tap, step, "cond", 0, len(rec.units)).float().cpu().numpy()
    if channels is not None:
        missing = [c for c in channels if c not in rec.channels[tap]]
        if missing or not len(channels):
            raise ValueError(f"kmeans_mask channels must be a non-empty subset of the {len(rec.channels[tap])} recorded at "
                             f"{tap}; not recorded: {missing[:8]}")
        x = x[..., [rec.channels[tap].index(int(c)) for c in channels]]
    if rule == "oracle":
        fg = spatial.foreground_tokens(x, prompts, grid, rec.images, n_clusters, seed, "rendered")
    else:
        fg = np.stack([border_foreground(spatial.kmeans(x[u], n_clusters, seed=seed), grid) for u in range(len(prompts))])
    fg[~fg.any(1)] = True  # a constant map: nothing to call foreground; the whole image stands in
    return torch.from_numpy(fg)


# ---------------------------------------------------------------------------------------------
# Baselines
# ---------------------------------------------------------------------------------------------


def pixel_blend(source_images: np.ndarray, target_images: np.ndarray, alpha: float) -> np.ndarray:
    """The two final images mixed at the same alpha: what transport must beat to be 'semantic'."""
    alpha = check_alpha(alpha)
    if source_images.shape != target_images.shape:
        raise ValueError(f"source images {source_images.shape} and target images {target_images.shape} differ in shape")
    return ((1 - alpha) * target_images + alpha * source_images).astype(np.float32)


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
        images = pipe(prompt_embeds=torch.lerp(t_embeds, s_embeds, alpha),
                      pooled_prompt_embeds=torch.lerp(t_pooled, s_pooled, alpha),
                      num_inference_steps=num_inference_steps, generator=generators(chunk), output_type="np",
                      **pipe_kwargs).images
        out.append(np.asarray(images))
    return np.concatenate(out).astype(np.float32)


def random_channels(adapter: Adapter, channels: dict[str, Sequence[int]], seed: int = 0) -> dict[str, list[int]]:
    """Per tap, a seeded random set of the same size excluding the given channels (the control)."""
    return {tap: [int(c) for c in discovery.random_k(adapter.width, len(cs), seed=seed, exclude=list(cs))]
            for tap, cs in channels.items()}
