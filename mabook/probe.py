"""Tap points, streaming per-channel statistics, and edits of hidden states during a pipeline call.

Two verbs cover the book:

* run and collect -- ``with probe.collect(adapter) as run: pipe(prompt)`` then ``run.stats``;
* run with these edits -- ``with probe.edit(adapter, [Edit(tap, channels, "zero")]): pipe(prompt)``.

Glossary.
  tap    a place where a hidden state can be read or written: the output of one transformer block
         on one stream, named like the module path, e.g. ``single_transformer_blocks.9.img``
         (`Tap(block_path, stream)`; `str(tap)` is the name).
  layer  a block, in forward order (`adapter.blocks`); each layer has one tap per stream.
  stream "img" (the image tokens, diffusers' `hidden_states`) or "txt" (`encoder_hidden_states`).
  step   the index of the denoising step: the transformer is called once per scheduler timestep,
         so step = number of earlier transformer calls in this generation. A call whose timestep is
         higher than the previous call's starts a new generation (step 0 again); a call with the
         same timestep is the same step (e.g. FLUX's "true CFG", which runs uncond separately).

Pitfalls handled here: classifier-free guidance doubles the batch as [uncond; cond] -- hooks see
the conditional half by default (`cfg="cond"`, or "uncond", "both"); FLUX single blocks
concatenate [text; image] internally, but in diffusers 0.42 they return the two streams separately,
as the adapter reports them.

One hook signature across the package (`HookFn`): ``fn(tap, step, hidden_states) -> Tensor | None``
with hidden_states (batch_size, sequence_length, channels) of the selected CFG half; returning a
tensor of the same shape replaces it, returning None leaves the model untouched.

What this is not: a general tracing library. Only block outputs are tapped; attention internals
need a custom attention processor (see `adapter.attention_modules()`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from mabook.models import Adapter

STREAMS = ("img", "txt")
CFG_MODES = ("cond", "uncond", "both")
STATISTICS = ("abs_mean", "mean", "std", "max_abs", "median_abs")


# ---------------------------------------------------------------------------------------------
# Taps
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tap:
    """The output of block `block_path` (a module path, e.g. "transformer_blocks.2") on one stream."""

    block_path: str
    stream: str = "img"

    def __post_init__(self):
        if not isinstance(self.block_path, str):
            raise TypeError(f"Tap.block_path must be a str, got {type(self.block_path).__name__}")
        if self.stream not in STREAMS:
            raise ValueError(f"unknown stream {self.stream!r}; allowed: {list(STREAMS)}")

    def __str__(self) -> str:
        return f"{self.block_path}.{self.stream}"


def taps(adapter: Adapter, streams: Sequence[str] = STREAMS) -> list[Tap]:
    """Every tap of the model on the given streams, in forward order (block by block)."""
    for s in streams:
        if s not in STREAMS:
            raise ValueError(f"unknown stream {s!r}; allowed: {list(STREAMS)}")
    return [Tap(b.path, s) for b in adapter.blocks for s in b.streams if s in streams]


_all_taps = taps  # for classes whose argument is also called `taps`


def resolve(adapter: Adapter, tap: Tap | str) -> Tap:
    """A Tap (or its printed name) checked against the model's taps."""
    known = {str(t): t for t in taps(adapter)}
    if not isinstance(tap, (Tap, str)):
        raise TypeError(f"a tap must be a Tap or its name (str), got {type(tap).__name__}")
    if str(tap) not in known:
        names = list(known)
        shown = names if len(names) <= 8 else names[:4] + ["..."] + names[-4:]
        raise ValueError(f"unknown tap {str(tap)!r} for this {adapter.family.name} model; allowed: {shown}")
    return known[str(tap)]


HookFn = Callable[[Tap, int, torch.Tensor], "torch.Tensor | None"]


def _check_cfg(cfg: str) -> None:
    if cfg not in CFG_MODES:
        raise ValueError(f"unknown cfg {cfg!r}; allowed: {list(CFG_MODES)}")


def _check_steps(steps) -> frozenset[int] | None:
    if steps is None:
        return None
    if isinstance(steps, int):
        steps = (steps,)
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
    cfg: which half of a guidance batch `fn` sees. guidance_batch: whether transformer calls batch
    [uncond; cond] (default: ask the adapter at each call). Inside the context, `step` and
    `steps_seen` say where the pipeline is; `observed_bytes` is what storing every tapped hidden
    state (full batch) would have cost.
    """

    def __init__(self, adapter: Adapter, fn: HookFn, taps: Iterable[Tap | str] | Tap | str | None = None, steps=None,
                 cfg: str = "cond", guidance_batch: bool | None = None):
        _check_cfg(cfg)
        if guidance_batch is not None and not isinstance(guidance_batch, bool):
            raise TypeError(f"guidance_batch must be a bool or None, got {guidance_batch!r}")
        self.adapter, self.fn, self.cfg, self.guidance_batch = adapter, fn, cfg, guidance_batch
        if isinstance(taps, (Tap, str)):
            taps = [taps]
        self.taps = _all_taps(adapter) if taps is None else [resolve(adapter, t) for t in taps]
        self.steps = _check_steps(steps)
        self.step = -1
        self.steps_seen: dict[int, float] = {}  # step -> timestep
        self.observed_bytes = 0
        self._last_timestep: float | None = None
        self._active, self._cfg_batch = True, False  # set per transformer call by _pre_transformer
        self._handles: list = []

    # 1. count steps: one transformer call per scheduler timestep
    def _pre_transformer(self, module, args, kwargs):
        t = kwargs.get("timestep")
        t = float(t.flatten()[0]) if isinstance(t, torch.Tensor) else (float(t) if t is not None else None)
        if t is None or self._last_timestep is None or t < self._last_timestep:
            self.step += 1
        elif t > self._last_timestep:
            self.step = 0
        self._last_timestep = t
        self.steps_seen[self.step] = t
        self._active = self.steps is None or self.step in self.steps
        self._cfg_batch = self.adapter.guidance_batch() if self.guidance_batch is None else self.guidance_batch

    # 2. at each block output, hand the chosen half of each chosen stream to fn
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
                half = self._select(hidden_states)
                result = self.fn(tap, self.step, half)
                if result is None or result is half:
                    continue
                if result.shape != half.shape:
                    raise ValueError(f"hook at {tap} step {self.step} returned shape {tuple(result.shape)}, expected {tuple(half.shape)}")
                new_output = self.adapter.replace(new_output, tap.stream, self._merge(hidden_states, result))
            return None if new_output is output else new_output

        return hook

    def _select(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not self._cfg_batch or self.cfg == "both":
            return hidden_states
        B = hidden_states.shape[0]
        if B % 2:
            raise ValueError(f"a guidance batch must be even ([uncond; cond]), got batch {B}; pass guidance_batch=False")
        return hidden_states[B // 2:] if self.cfg == "cond" else hidden_states[: B // 2]

    def _merge(self, hidden_states: torch.Tensor, half: torch.Tensor) -> torch.Tensor:
        if not self._cfg_batch or self.cfg == "both":
            return half.to(hidden_states.dtype)
        B = hidden_states.shape[0] // 2
        other = hidden_states[:B] if self.cfg == "cond" else hidden_states[B:]
        parts = (other, half) if self.cfg == "cond" else (half, other)
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


# ---------------------------------------------------------------------------------------------
# Statistics: per (step, tap, channel), streaming, memory independent of tokens and batch
# ---------------------------------------------------------------------------------------------


def channel_sums(hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel reductions of one call: a few fused ops, no loop over channels.

    hidden_states: (batch_size, sequence_length, channels). Returns sums (4, channels) float64 --
    [|token mean|, token mean, token mean of x^2] summed over samples, and the token median of |x|
    of the first sample only -- and max_abs (channels,) float64.
    The median is the one costly reduction (a selection per channel, ~30x a mean on CPU), so it is
    taken on one sample per call; averaged over calls it is an estimate, used as a normaliser.
    """
    x = hidden_states.detach().float()  # statistics never join an autograd graph
    mean = x.mean(1)  # (B, C)
    median = x[0].abs().median(0).values  # (C,)
    sums = torch.stack((mean.abs().sum(0), mean.sum(0), x.square().mean(1).sum(0), median))
    return sums.double(), x.abs().amax((0, 1)).double()


class Statistics:
    """Streaming per-channel statistics of hidden states, per (step, tap).

    Per sample and call, over the tokens of the stream: `abs_mean` = |mean over tokens| (the
    paper's statistic on the image stream), `mean`, `std` (pooled over tokens and samples),
    `max_abs` = max |x|, `median_abs` = median over tokens of |x|, computed exactly for the first
    sample of each call and averaged over calls (an estimate). Each (step, tap) holds one
    (5, channels) float64 tensor and two counts: memory does not grow with tokens or batch.
    """

    def __init__(self):
        self.taps: list[Tap] = []  # in the order first seen (forward order)
        self.timesteps: dict[int, float] = {}
        self._acc: dict[tuple[int, Tap], torch.Tensor] = {}
        self._count: dict[tuple[int, Tap], int] = {}  # samples
        self._calls: dict[tuple[int, Tap], int] = {}  # forward calls (one median sample each)

    # -- accumulation (called from the hook) ---------------------------------------------------

    def update(self, tap: Tap, step: int, hidden_states: torch.Tensor) -> None:
        sums, max_abs = channel_sums(hidden_states)
        key = (step, tap)
        acc = self._acc.get(key)
        if acc is None:
            if tap not in self.taps:
                self.taps.append(tap)
            acc = self._acc[key] = torch.zeros(5, sums.shape[1], dtype=torch.float64, device=sums.device)
            self._count[key] = self._calls[key] = 0
        acc[:4] += sums
        torch.maximum(acc[4], max_abs, out=acc[4])
        self._count[key] += hidden_states.shape[0]
        self._calls[key] += 1

    # -- reading ---------------------------------------------------------------------------------

    @property
    def steps(self) -> list[int]:
        return sorted({s for s, _ in self._acc})

    @property
    def nbytes(self) -> int:
        """Bytes held by the accumulators."""
        return sum(a.numel() * a.element_size() for a in self._acc.values())

    def layers(self, stream: str = "img") -> list[Tap]:
        return [t for t in self.taps if t.stream == stream]

    def _check(self, name: str, tap: Tap | str, step: int | None) -> Tap:
        if name not in STATISTICS:
            raise ValueError(f"unknown statistic {name!r}; allowed: {list(STATISTICS)}")
        found = next((t for t in self.taps if str(t) == str(tap)), None)
        if found is None:
            raise ValueError(f"no statistics for tap {str(tap)!r}; collected: {[str(t) for t in self.taps]}")
        if step is not None and (step, found) not in self._acc:
            raise ValueError(f"no statistics for step {step!r} at {found}; collected steps: {self.steps}")
        return found

    def get(self, name: str, tap: Tap | str, step: int | None = None) -> torch.Tensor:
        """One statistic (channels,) float64 at one tap, at `step` or pooled over all steps (None)."""
        tap = self._check(name, tap, step)
        keys = [(step, tap)] if step is not None else [(s, tap) for s in self.steps if (s, tap) in self._acc]
        if name == "max_abs":
            return torch.stack([self._acc[k][4] for k in keys]).amax(0)
        if name == "median_abs":
            return sum(self._acc[k][3] for k in keys) / sum(self._calls[k] for k in keys)
        total = sum(self._acc[k][:3] for k in keys) / sum(self._count[k] for k in keys)  # (3, C) per-sample averages
        if name == "abs_mean":
            return total[0]
        if name == "mean":
            return total[1]
        return (total[2] - total[1] ** 2).clamp_min(0).sqrt()  # std

    def array(self, name: str, stream: str = "img", step: int | None = None) -> np.ndarray:
        """(layers, channels) numpy array of a statistic for every layer of a stream."""
        return np.stack([self.get(name, t, step).cpu().numpy() for t in self.layers(stream)])

    def per_step(self, name: str, stream: str = "img") -> np.ndarray:
        """(steps, layers, channels) numpy array."""
        return np.stack([self.array(name, stream, s) for s in self.steps])

    @classmethod
    def merge(cls, runs: Sequence["Statistics"]) -> "Statistics":
        """Pool several runs (e.g. one per prompt) as if they had been collected in one."""
        if not runs or not all(isinstance(r, Statistics) for r in runs):
            raise TypeError("merge needs a non-empty sequence of Statistics")
        out = cls()
        for r in runs:
            for key, acc in r._acc.items():
                if key[1] not in out.taps:
                    out.taps.append(key[1])
                if key not in out._acc:
                    out._acc[key] = acc.clone()
                    out._count[key], out._calls[key] = r._count[key], r._calls[key]
                    continue
                out._acc[key][:4] += acc[:4]
                torch.maximum(out._acc[key][4], acc[4], out=out._acc[key][4])
                out._count[key] += r._count[key]
                out._calls[key] += r._calls[key]
            out.timesteps = {**r.timesteps, **out.timesteps}
        return out

    # -- files -------------------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """safetensors: one (5, C) tensor per "step/tap" key; counts and timesteps in the metadata."""
        from safetensors.torch import save_file

        tensors = {f"{s}/{t}": a.cpu().contiguous() for (s, t), a in self._acc.items()}
        meta = {
            "taps": [[t.block_path, t.stream] for t in self.taps],
            "counts": {f"{s}/{t}": c for (s, t), c in self._count.items()},
            "calls": {f"{s}/{t}": c for (s, t), c in self._calls.items()},
            "timesteps": {str(s): v for s, v in self.timesteps.items()},
            "rows": ["abs_mean_sum", "mean_sum", "sq_mean_sum", "median_abs_sum_first_sample", "max_abs"],
        }
        save_file(tensors, str(path), metadata={"mabook_statistics": json.dumps(meta)})

    @classmethod
    def load(cls, path: str | Path) -> "Statistics":
        from safetensors import safe_open

        stats = cls()
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["mabook_statistics"])
            stats.taps = [Tap(b, s) for b, s in meta["taps"]]
            by_name = {str(t): t for t in stats.taps}
            for key in f.keys():
                step, name = key.split("/", 1)
                k = (int(step), by_name[name])
                stats._acc[k] = f.get_tensor(key)
                stats._count[k] = int(meta["counts"][key])
                stats._calls[k] = int(meta["calls"][key])
        stats.timesteps = {int(s): v for s, v in meta["timesteps"].items()}
        return stats


class Probe(Hooks):
    """`collect`'s context: accumulates `stats` at every tap and step, and captures full hidden
    states for the requested (tap, step) pairs only (`captured[(tap_name, step)]`:
    (batch_size, sequence_length, channels), the selected CFG half, detached copies)."""

    def __init__(self, adapter: Adapter, taps=None, steps=None, cfg: str = "cond", guidance_batch: bool | None = None,
                 capture: Iterable[tuple[Tap | str, int]] = ()):
        super().__init__(adapter, self._record, taps, steps, cfg, guidance_batch)
        self.stats = Statistics()
        self.captured: dict[tuple[str, int], torch.Tensor] = {}
        self._capture: set[tuple[Tap, int]] = set()
        for item in capture:
            if not (isinstance(item, tuple) and len(item) == 2):
                raise TypeError(f"capture items must be (tap, step) pairs, got {item!r}")
            tap, step = item
            if not isinstance(step, (int, np.integer)) or isinstance(step, bool) or step < 0:
                raise ValueError(f"capture step must be a non-negative int, got {step!r}")
            self._capture.add((resolve(adapter, tap), int(step)))

    def _record(self, tap: Tap, step: int, hidden_states: torch.Tensor) -> None:
        self.stats.update(tap, step, hidden_states)
        if (tap, step) in self._capture:
            self.captured[(str(tap), step)] = hidden_states.detach().clone()
        return None

    def __exit__(self, exc_type, exc, tb):
        self.remove()
        self.stats.timesteps = dict(self.steps_seen)
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

    op: "zero"; "mean" (each channel set to its mean over this call's tokens, per sample: keeps its
    level, removes its spatial pattern); "set" (to `value`, a float or a (len(channels),) tensor,
    e.g. a mean from `Statistics`); "scale" (multiply by `value`); or a callable mapping the
    selected values (batch_size, sequence_length, len(channels)) to new ones of the same shape.
    token_mask: optional bool (sequence_length,) or (batch_size, sequence_length): edit only these tokens.
    """

    tap: Tap | str
    channels: Sequence[int]
    op: str | Callable[[torch.Tensor], torch.Tensor] = "zero"
    value: float | torch.Tensor | None = None
    steps: Sequence[int] | int | None = None
    token_mask: torch.Tensor | None = None

    def apply(self, hidden_states: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
        """(batch_size, sequence_length, C) -> edited copy."""
        selected = hidden_states[..., channels]  # (B, N, k), a copy
        if self.op == "zero":
            new = torch.zeros_like(selected)
        elif self.op == "mean":
            new = selected.mean(1, keepdim=True).expand_as(selected)
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
            mask = self.token_mask.to(selected.device)
            new = torch.where(mask[..., None] if mask.dim() == 2 else mask[None, :, None], new, selected)
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
    channels = list(e.channels) if not isinstance(e.channels, torch.Tensor) else e.channels.tolist()
    if not channels:
        raise ValueError(f"edit at {tap} has no channels")
    C = adapter.width
    for c in channels:
        if not isinstance(c, (int, np.integer)) or isinstance(c, bool) or not 0 <= c < C:
            raise ValueError(f"channel {c!r} at {tap} is out of range; allowed: ints in [0, {C})")
    if e.op == "set" and isinstance(e.value, torch.Tensor) and e.value.numel() not in (1, len(channels)):
        raise ValueError(f"edit value at {tap} has {e.value.numel()} elements, expected 1 or {len(channels)}")
    return tap, torch.tensor(channels, dtype=torch.long), _check_steps(e.steps)


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
