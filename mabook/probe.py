"""Tap points, hooks, collecting runs and edits of hidden states during a pipeline call.

Two verbs cover the book:

* run and collect -- ``with probe.collect(adapter) as run: pipe(prompt)`` then ``run.stats`` (a
  `mabook.statistics.Statistics`: per (step, tap, channel), streaming);
* run with these edits -- ``with probe.edit(adapter, [Edit(tap, channels, "zero")]): pipe(prompt)``.

Glossary.
  tap    a place where a hidden state can be read or written: the output of one transformer block
         on one stream, named like the module path, e.g. ``single_transformer_blocks.9.img``
         (`Tap(block_path, stream)`; `str(tap)` is the name).
  layer  a block, in forward order (`adapter.blocks`); each layer has one tap per stream.
  stream "img" (the image tokens, diffusers' `hidden_states`) or "txt" (`encoder_hidden_states`);
         opt-in, "temb": the AdaLN conditioning (see below).
  step   the index of the denoising step in this generation, from 0: one scheduler position
         (`scheduler.step_index`, timestep). A new schedule (or, for a bare transformer, a rising
         timestep) starts a new generation; FLUX's "true CFG" makes two calls at one step; Heun's
         two evaluations per step are two steps. The full rule is in `Hooks`.
  call   one transformer call within a step.

Pitfalls handled here: classifier-free guidance doubles the batch as [uncond; cond], or (FLUX true
CFG) adds a separate unconditional call -- hooks see the conditional samples by default
(`cfg="cond"`, or "uncond", "both"), detected from what the transformer receives; FLUX single blocks
concatenate [text; image] internally, but in diffusers 0.42 they return the two streams separately,
as the adapter reports them.

One hook signature across the package (`HookFn`): ``fn(tap, step, hidden_states) -> Tensor | None``
with hidden_states (batch_size, sequence_length, channels) of the selected samples; returning a
tensor of the same shape replaces it, returning None leaves the model untouched.

The conditioning tap (opt-in). FLUX and SD3 modulate every block and the final `norm_out` with one
vector per sample, `temb` = timestep embedding + projected pooled text embedding, built by
`time_text_embed` -- an input of the blocks, not a block output. `conditioning_tap(adapter)` (named
``time_text_embed.temb``; also `taps(adapter, ["temb"])`) hands it to hooks and edits as
(batch_size, 1, channels): one token, so the one hook signature and `Edit` apply unchanged. It is
never among the default taps.

What this is not: a general tracing library. Only block outputs (and the conditioning) are tapped;
attention internals need a custom attention processor (see `adapter.attention_modules()`).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from mabook.models import FAMILIES, Adapter
from mabook.statistics import CONDITIONING, STREAMS, Statistics, Tap

CFG_MODES = ("cond", "uncond", "both")


# ---------------------------------------------------------------------------------------------
# Taps
# ---------------------------------------------------------------------------------------------


def taps(adapter: Adapter, streams: Sequence[str] = STREAMS) -> list[Tap]:
    """Every tap of the model on the given streams, in forward order (block by block; the
    conditioning tap, asked for with "temb", first: it is computed before the blocks)."""
    for s in streams:
        if s not in (*STREAMS, CONDITIONING):
            raise ValueError(f"unknown stream {s!r}; allowed: {[*STREAMS, CONDITIONING]}")
    first = [conditioning_tap(adapter)] if CONDITIONING in streams else []
    return first + [Tap(b.path, s) for b in adapter.blocks for s in b.streams if s in streams]


def conditioning_tap(adapter: Adapter) -> Tap:
    """The AdaLN conditioning `temb` (batch_size, channels), tapped as (batch_size, 1, channels):
    ``time_text_embed.temb`` for FLUX, SD3 and the organism."""
    path = adapter.family.conditioning
    if path is None:
        has = [f.name for f in FAMILIES.values() if f.conditioning is not None]
        raise ValueError(f"{adapter.family.name} models have no conditioning tap (their timestep embedding is not one "
                         f"tensor); allowed for: {has}")
    return Tap(path, CONDITIONING)


_all_taps = taps  # for classes whose argument is also called `taps`


def resolve(adapter: Adapter, tap: Tap | str) -> Tap:
    """A Tap (or its printed name) checked against the model's taps."""
    known = {str(t): t for t in taps(adapter)}
    if adapter.family.conditioning is not None:
        known[str(conditioning_tap(adapter))] = conditioning_tap(adapter)
    if not isinstance(tap, (Tap, str)):
        raise TypeError(f"a tap must be a Tap or its name (str), got {type(tap).__name__}")
    if str(tap) not in known:
        names = list(known)
        shown = names if len(names) <= 8 else names[:4] + ["..."] + names[-4:]
        raise ValueError(f"unknown tap {str(tap)!r} for this {adapter.family.name} model; allowed: {shown}")
    return known[str(tap)]


HookFn = Callable[[Tap, int, torch.Tensor], "torch.Tensor | None"]


def check_cfg(cfg: str) -> None:
    if cfg not in CFG_MODES:
        raise ValueError(f"unknown cfg {cfg!r}; allowed: {list(CFG_MODES)}")


def check_steps(steps) -> frozenset[int] | None:
    """None (every step), an int or ints -> a frozenset of steps; a clear error for anything else."""
    if steps is None:
        return None
    if isinstance(steps, (int, np.integer)):
        steps = (steps,)
    if isinstance(steps, str) or not isinstance(steps, Iterable):
        raise TypeError(f"steps must be an int, a list of ints or None (all), got {steps!r}")
    steps = tuple(steps)
    for s in steps:
        if not isinstance(s, (int, np.integer)) or isinstance(s, bool) or s < 0:
            raise ValueError(f"steps must be non-negative ints (or None for all), got {s!r}")
    return frozenset(int(s) for s in steps)


# ---------------------------------------------------------------------------------------------
# Hooks: the one place that registers and removes them
# ---------------------------------------------------------------------------------------------


class Hooks:
    """Context manager running `fn(tap, step, hidden_states)` at the chosen taps during any forward call.

    taps: Taps or names (default: all). steps: which denoising steps (default: all).
    cfg: which samples `fn` sees ("cond", "uncond" or "both"). guidance_batch: whether transformer
    calls batch [uncond; cond] (default: detected at each call, see below). Inside the context,
    `step`, `call` and `steps_seen` say where the pipeline is; `observed_bytes` is what storing every
    tapped hidden state (full batch) would have cost.

    Where the pipeline is -- the rule, for every family:

    * a *generation* starts when the pipeline's scheduler has a new schedule (`set_timesteps` makes
      a new `scheduler.timesteps` tensor), or when the timestep rises (a bare transformer);
    * a *step* is one position of the scheduler, (`scheduler.step_index`, timestep): steps count
      from 0 in each generation, so an img2img or truncated schedule starts at step 0 wherever it
      enters the schedule, and a sampler that evaluates the model twice per step (Heun) gives each
      evaluation its own step and timestep (`steps_seen`);
    * a *call* is one transformer call at a step: FLUX's "true CFG" makes two, the conditional one
      and then the unconditional one (the pipeline's order; `Family.separate_uncond_call`).

    Which samples are conditional: a call whose input `hidden_states` is two identical halves
    [x; x] -- how every diffusers pipeline batches classifier-free guidance -- is [uncond; cond]
    (unless the pipeline's `do_classifier_free_guidance` says False). Any other call has one role:
    unconditional for a separate unconditional call, conditional otherwise. `fn` is called only
    for the samples the `cfg` mode selects, and not at all for a call that has none of them.
    """

    def __init__(self, adapter: Adapter, fn: HookFn, taps: Iterable[Tap | str] | Tap | str | None = None, steps=None,
                 cfg: str = "cond", guidance_batch: bool | None = None):
        check_cfg(cfg)
        if guidance_batch is not None and not isinstance(guidance_batch, bool):
            raise TypeError(f"guidance_batch must be a bool or None, got {guidance_batch!r}")
        self.adapter, self.fn, self.cfg, self.guidance_batch = adapter, fn, cfg, guidance_batch
        if isinstance(taps, (Tap, str)):
            taps = [taps]
        if taps is not None and not isinstance(taps, Iterable):
            raise TypeError(f"taps must be a tap, a list of taps (Tap or name) or None (all), got {taps!r}")
        self.taps = _all_taps(adapter) if taps is None else [resolve(adapter, t) for t in taps]
        self.steps = check_steps(steps)
        self.step, self.call = -1, 0
        self.steps_seen: dict[int, float | None] = {}  # step -> timestep (of the current generation)
        self.observed_bytes = 0
        self._schedule = self._position = self._last_timestep = None
        self._active, self._roles = True, ("cond",)  # set per transformer call by _pre_transformer
        self._signature = inspect.signature(adapter.transformer.forward)
        self._handles: list = []

    # 1. where the pipeline is, and which samples of this call are conditional
    def _pre_transformer(self, module, args, kwargs):
        bound = self._arguments(args, kwargs)
        t = bound.get("timestep")
        t = float(t.flatten()[0]) if isinstance(t, torch.Tensor) else (float(t) if t is not None else None)
        scheduler = getattr(self.adapter.pipe, "scheduler", None)
        schedule = getattr(scheduler, "timesteps", None)
        position = (getattr(scheduler, "step_index", None), t)
        if (self.step < 0 or (schedule is not None and schedule is not self._schedule)
                or (t is not None and self._last_timestep is not None and t > self._last_timestep)):
            self.step, self.call = 0, 0  # a new generation
        elif position == (None, None) or position != self._position:
            self.step, self.call = self.step + 1, 0  # (nothing tells where we are: one call, one step)
        else:
            self.call += 1
        self._schedule, self._position, self._last_timestep = schedule, position, t
        self.steps_seen[self.step] = t
        self._active = self.steps is None or self.step in self.steps
        if self.guidance_batch is None:
            batched = self.adapter.guidance_batch(bound.get("hidden_states"))
        else:
            batched = self.guidance_batch
        if batched:
            self._roles = ("uncond", "cond")
        else:
            self._roles = ("uncond",) if self.call > 0 and self.adapter.family.separate_uncond_call else ("cond",)

    def _arguments(self, args, kwargs) -> dict:
        """The transformer call's arguments by name (a timestep may be passed positionally)."""
        try:
            bound = self._signature.bind_partial(*args, **kwargs).arguments
        except TypeError:  # a signature that does not describe the call: keywords only
            return dict(kwargs)
        for name, p in self._signature.parameters.items():  # a **kwargs catch-all holds the rest
            if p.kind is inspect.Parameter.VAR_KEYWORD and name in bound:
                bound = {**bound, **bound.pop(name)}
        return bound

    @property
    def roles(self) -> tuple[str, ...]:
        """The current transformer call's sample roles: ("uncond", "cond") for a guidance batch
        (its two halves, in order), else one role for the whole batch, ("cond",) or ("uncond",)."""
        return self._roles

    # 2. at each block output, hand the selected samples of each chosen stream to fn
    def _block_hook(self, block_taps: list[Tap]):
        def hook(module, args, output):
            if not self._active:
                return None
            streams = self.adapter.streams(output)
            new_output = output
            for tap in block_taps:
                hidden_states = streams.get(tap.stream)
                if hidden_states is None:  # SD3's last block has no text output
                    continue
                self.observed_bytes += hidden_states.numel() * hidden_states.element_size()
                part = self._select(hidden_states)
                if part is None:  # this call holds no sample of the selected kind
                    continue
                result = self.fn(tap, self.step, part)
                if result is None or result is part:
                    continue
                if result.shape != part.shape:
                    raise ValueError(f"hook at {tap} step {self.step} returned shape {tuple(result.shape)}, expected {tuple(part.shape)}")
                new_output = self.adapter.replace(new_output, tap.stream, self._merge(hidden_states, result))
            return None if new_output is output else new_output

        return hook

    # 2b. the conditioning tap (opt-in): temb (batch_size, channels) seen as one token
    def _conditioning_hook(self, tap: Tap):
        def hook(module, args, output):
            if not self._active:
                return None
            if not isinstance(output, torch.Tensor) or output.dim() != 2:
                got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
                raise ValueError(f"{tap.block_path} returned {got}; the conditioning tap needs (batch_size, channels)")
            hidden_states = output[:, None, :]  # (batch_size, 1, channels)
            self.observed_bytes += hidden_states.numel() * hidden_states.element_size()
            part = self._select(hidden_states)
            if part is None:
                return None
            result = self.fn(tap, self.step, part)
            if result is None or result is part:
                return None
            if result.shape != part.shape:
                raise ValueError(f"hook at {tap} step {self.step} returned shape {tuple(result.shape)}, expected {tuple(part.shape)}")
            return self._merge(hidden_states, result)[:, 0, :]

        return hook

    def _select(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        if self.cfg == "both":
            return hidden_states
        if len(self._roles) == 1:
            return hidden_states if self._roles[0] == self.cfg else None
        B = hidden_states.shape[0]
        if B % 2:
            raise ValueError(f"a guidance batch must be even ([uncond; cond]), got batch {B}; pass guidance_batch=False")
        return hidden_states[B // 2:] if self.cfg == "cond" else hidden_states[: B // 2]

    def _merge(self, hidden_states: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
        if self.cfg == "both" or len(self._roles) == 1:
            return part.to(hidden_states.dtype)
        B = hidden_states.shape[0] // 2
        other = hidden_states[:B] if self.cfg == "cond" else hidden_states[B:]
        parts = (other, part) if self.cfg == "cond" else (part, other)
        return torch.cat([p.to(hidden_states.dtype) for p in parts])

    def __enter__(self):
        by_block: dict[str, list[Tap]] = {}
        for tap in self.taps:
            by_block.setdefault(tap.block_path, []).append(tap)
        try:
            self._handles.append(self.adapter.transformer.register_forward_pre_hook(self._pre_transformer, with_kwargs=True))
            for block in self.adapter.blocks:
                if block.path in by_block:
                    self._handles.append(block.module.register_forward_hook(self._block_hook(by_block[block.path])))
            for tap in self.taps:
                if tap.stream == CONDITIONING:
                    module = self.adapter.transformer.get_submodule(tap.block_path)
                    self._handles.append(module.register_forward_hook(self._conditioning_hook(tap)))
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        """Remove every hook this context registered (idempotent)."""
        while self._handles:
            self._handles.pop().remove()

    def __exit__(self, exc_type, exc, tb):
        self.remove()  # hooks are global state: always removed, also on errors and KeyboardInterrupt
        return False

    def check_steps_ran(self, wanted: Iterable[int], what: str) -> None:
        """Raise if a requested step never ran (a typo would otherwise silently do nothing)."""
        missing = sorted(set(wanted) - set(self.steps_seen))
        if missing:
            ran = f"0..{max(self.steps_seen)}" if self.steps_seen else "none (was the pipeline called inside the context?)"
            raise ValueError(f"{what} asked for step(s) {missing}, but the steps that ran were {ran}")


hooks = Hooks  # the generic verb: `with probe.hooks(adapter, fn): pipe(...)`


class Probe(Hooks):
    """`collect`'s context: accumulates `stats` at every tap and step, and captures full hidden
    states for the requested (tap, step) pairs only (`captured[(tap_name, step)]`:
    (batch_size, sequence_length, channels) of the samples the cfg mode selects, detached copies;
    the last generation's, and [uncond; cond] where FLUX's true CFG makes two calls).

    Steps are pooled by index over the generations in one context, so they must share a schedule:
    a step that runs at another timestep than before (another num_inference_steps, an img2img
    strength) is refused.
    """

    def __init__(self, adapter: Adapter, taps=None, steps=None, cfg: str = "cond", guidance_batch: bool | None = None,
                 capture: Iterable[tuple[Tap | str, int]] = ()):
        super().__init__(adapter, self._record, taps, steps, cfg, guidance_batch)
        self.stats = Statistics()
        self.captured: dict[tuple[str, int], torch.Tensor] = {}
        self._capture: set[tuple[Tap, int]] = set()
        self._schedule_seen: dict[int, float | None] = {}
        for item in capture:
            if not (isinstance(item, tuple) and len(item) == 2):
                raise TypeError(f"capture items must be (tap, step) pairs, got {item!r}")
            tap, step = item
            if not isinstance(step, (int, np.integer)) or isinstance(step, bool) or step < 0:
                raise ValueError(f"capture step must be a non-negative int, got {step!r}")
            self._capture.add((resolve(adapter, tap), int(step)))

    def _pre_transformer(self, module, args, kwargs):
        super()._pre_transformer(module, args, kwargs)
        t, known = self.steps_seen[self.step], self._schedule_seen.setdefault(self.step, self.steps_seen[self.step])
        if t is not None and known is not None and not math.isclose(t, known, rel_tol=1e-5, abs_tol=1e-6):
            raise ValueError(
                f"step {self.step} ran at timestep {t:g} here but at {known:g} in an earlier generation of this collect: "
                "statistics pool steps by index, so collect each schedule (num_inference_steps, strength) separately "
                "and compare the runs")

    def _record(self, tap: Tap, step: int, hidden_states: torch.Tensor) -> None:
        self.stats.update(tap, step, hidden_states)
        if (tap, step) in self._capture:
            key, copy = (str(tap), step), hidden_states.detach().clone()
            if self.call > 0 and key in self.captured and self.cfg == "both":  # a separate unconditional call
                copy = torch.cat([copy, self.captured[key]] if self._roles == ("uncond",) else [self.captured[key], copy])
            self.captured[key] = copy
        return None

    def __exit__(self, exc_type, exc, tb):
        self.remove()
        self.stats.timesteps = dict(self._schedule_seen)
        if exc_type is None and self._capture:
            self.check_steps_ran([s for _, s in self._capture], "capture")
        return False


def collect(adapter: Adapter, taps: Iterable[Tap | str] | None = None, steps=None, cfg: str = "cond",
            guidance_batch: bool | None = None, capture: Iterable[tuple[Tap | str, int]] = ()) -> Probe:
    """Run and collect: ``with collect(adapter) as run: pipe(...)``; then `run.stats`, `run.captured`.

    taps: default every tap (both streams). steps: default all. cfg: "cond" (default), "uncond" or
    "both". capture: (tap, step) pairs whose full hidden states are kept.
    """
    return Probe(adapter, taps, steps, cfg, guidance_batch, capture)


# ---------------------------------------------------------------------------------------------
# Edits
# ---------------------------------------------------------------------------------------------

EDIT_OPS = ("zero", "mean", "set", "scale")


@dataclass(frozen=True, eq=False)
class Edit:
    """Replace `channels` of the hidden states at `tap`, at `steps` (None: every step).

    op: "zero"; "mean" (each channel set to its mean over the edited tokens -- all of them, or those
    in token_mask -- per sample: keeps its level, removes its spatial pattern); "set" (to `value`, a float or a (len(channels),) tensor,
    e.g. a mean from `Statistics`); "scale" (multiply by `value`); or a callable mapping the
    selected values (batch_size, sequence_length, len(channels)) to new ones of the same shape.
    token_mask: optional bool (sequence_length,) or (batch_size, sequence_length): edit only these tokens
    (a per-image mask applies to each guidance half alike when the edit sees both).
    """

    tap: Tap | str
    channels: Sequence[int]
    op: str | Callable[[torch.Tensor], torch.Tensor] = "zero"
    value: float | torch.Tensor | None = None
    steps: Sequence[int] | int | None = None
    token_mask: torch.Tensor | None = None

    def _mask(self, selected: torch.Tensor) -> torch.Tensor:
        """token_mask as (batch_size or 1, sequence_length, 1) bool on the hidden states' device."""
        mask = self.token_mask.to(selected.device, torch.bool)
        B, N = selected.shape[:2]
        if mask.dim() not in (1, 2) or mask.shape[-1] != N or (mask.dim() == 2 and B % mask.shape[0]):
            raise ValueError(f"token_mask at {self.tap} has shape {tuple(mask.shape)}; expected ({N},) or "
                             f"(batch, {N}) with batch dividing the {B} samples edited")
        if mask.dim() == 1:
            return mask[None, :, None]
        return mask.repeat(B // mask.shape[0], 1)[..., None]  # (B, N) per image repeats over [uncond; cond]

    def apply(self, hidden_states: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
        """(batch_size, sequence_length, C) -> edited copy."""
        selected = hidden_states[..., channels]  # (B, N, k), a copy
        if self.op == "zero":
            new = torch.zeros_like(selected)
        elif self.op == "mean":  # over the tokens being edited: a masked edit reads nothing outside its mask
            if self.token_mask is None:
                new = selected.mean(1, keepdim=True).expand_as(selected)
            else:
                w = self._mask(selected).to(selected.dtype)  # (B or 1, N, 1)
                new = ((selected * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1)).expand_as(selected)
        elif self.op == "set":
            new = torch.as_tensor(self.value, dtype=selected.dtype, device=selected.device).expand_as(selected)
        elif self.op == "scale":
            new = selected * self.value
        else:
            new = self.op(selected)
            if not isinstance(new, torch.Tensor) or new.shape != selected.shape:
                got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
                raise ValueError(f"edit callable at {self.tap} must return a tensor of shape {tuple(selected.shape)}, got {got}")
        if self.token_mask is not None:
            new = torch.where(self._mask(selected), new, selected)
        out = hidden_states.clone()
        out[..., channels] = new.to(out.dtype)
        return out


def _check_edit(adapter: Adapter, e: Edit) -> tuple[Tap, torch.Tensor, frozenset[int] | None]:
    if not isinstance(e, Edit):
        raise TypeError(f"edits must be Edit objects, got {type(e).__name__}")
    tap = resolve(adapter, e.tap)
    if not (isinstance(e.op, str) and e.op in EDIT_OPS) and not callable(e.op):
        raise ValueError(f"unknown edit op {e.op!r}; allowed: {list(EDIT_OPS)} or a callable")
    if e.op in ("set", "scale") and e.value is None:
        raise ValueError(f"edit op {e.op!r} at {tap} needs a value")
    if isinstance(e.channels, (int, np.integer)) and not isinstance(e.channels, bool):
        channels = [e.channels]
    elif isinstance(e.channels, torch.Tensor):
        channels = e.channels.flatten().tolist()
    elif isinstance(e.channels, str) or not isinstance(e.channels, Iterable):
        raise TypeError(f"edit channels at {tap} must be an int or a list of ints, got {e.channels!r}")
    else:
        channels = list(e.channels)
    if not channels:
        raise ValueError(f"edit at {tap} has no channels")
    C = adapter.width
    for c in channels:
        if not isinstance(c, (int, np.integer)) or isinstance(c, bool) or not 0 <= c < C:
            raise ValueError(f"channel {c!r} at {tap} is out of range; allowed: ints in [0, {C})")
    if e.op == "set" and isinstance(e.value, torch.Tensor) and e.value.numel() not in (1, len(channels)):
        raise ValueError(f"edit value at {tap} has {e.value.numel()} elements, expected 1 or {len(channels)}")
    return tap, torch.tensor(channels, dtype=torch.long), check_steps(e.steps)


class Editor(Hooks):
    """`edit`'s context: applies the edits, in order, at their taps and steps."""

    def __init__(self, adapter: Adapter, edits: Sequence[Edit], cfg: str = "both", guidance_batch: bool | None = None):
        if isinstance(edits, Edit):
            edits = [edits]
        checked = [(e, *_check_edit(adapter, e)) for e in edits]
        self._by_tap: dict[Tap, list] = {}
        for e, tap, channels, steps in checked:
            self._by_tap.setdefault(tap, []).append((e, channels, steps))
        self._wanted_steps = {s for *_, steps in checked if steps for s in steps}
        super().__init__(adapter, self._edit, list(self._by_tap), None, cfg, guidance_batch)

    def _edit(self, tap: Tap, step: int, hidden_states: torch.Tensor) -> torch.Tensor | None:
        out = hidden_states
        for e, channels, steps in self._by_tap[tap]:
            if steps is None or step in steps:
                out = e.apply(out, channels.to(out.device))
        return out

    def __exit__(self, exc_type, exc, tb):
        self.remove()
        if exc_type is None and self._wanted_steps:
            self.check_steps_ran(self._wanted_steps, "edit")
        return False


def edit(adapter: Adapter, edits: Edit | Sequence[Edit], cfg: str = "both", guidance_batch: bool | None = None) -> Editor:
    """Run with these edits: ``with edit(adapter, [Edit("transformer_blocks.2.img", [7], "zero")]): pipe(...)``.

    cfg defaults to "both": an edit applied to one half only would be amplified by the guidance
    difference cond - uncond rather than measured.
    """
    return Editor(adapter, edits, cfg, guidance_batch)
