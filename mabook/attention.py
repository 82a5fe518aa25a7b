"""Attention sinks: capture where attention goes, find the sink keys, and suppress them (chapter 6).

Two verbs, both context managers that swap attention processors in with diffusers' processor API
(`module.set_processor`) and always put the original ones back (in `finally`, also after an
exception or a KeyboardInterrupt in the middle of a generation):

* run and collect -- ``with attention.capture(adapter, layers=..., steps=...) as cap: pipe(prompt)``
  then ``cap.mass(layer, step)`` (`mabook.sinks` reads captures: ``sinks(cap, k)``, ``movement(cap, k)``);
* run with an intervention -- ``with attention.intervene(adapter, KeyIntervention("sink", k=1)): pipe(prompt)``;
  nest a capture inside it to see what the suppression removed: ``cap.mass(layer, step)`` before
  the edit, ``cap.mass_after(layer, step)`` after it, ``suppression(cap)`` per head. A score-path
  and a value-path intervention nest into one combined edit.

Both refuse, on a clean exit, asked-for steps and explicitly asked-for layers that never ran.

Glossary (probe's "step" and "call" apply; see `mabook.probe.Hooks`).
  layer  one softmax self- or joint-attention module, named by its module path, e.g.
         ``single_transformer_blocks.2.attn`` (`layers(adapter)` lists them).
  key    one position of the attention's key sequence. Joint attention concatenates text and image:
         FLUX double blocks put text first ([text; image]); FLUX single blocks receive [text; image]
         already concatenated; SD3 puts the image first ([image; text]); PixArt's self-attention
         (attn1) has image keys only (text enters through attn2, a cross-attention, not covered).
  mass   incoming attention mass of a key: its softmax probability averaged over the *image*
         queries, per head. Each head's masses sum to 1 over the keys.
  sink   one of the k keys with the largest mass, per (layer, step, head).
  pad    a text key at or beyond the longest prompt's token count (padding for every captured
         sample); found with the pipeline's tokenizer for the organism and FLUX, else text keys are
         all labelled "text".

Capturing never changes the output: it is computed from the same q, k, v with the stock
processor's own attention call (SDPA, bit-identical images; q, k, v are projected once, by the
copied projections), and the probabilities are recomputed on the side from the same q and k, only
at the layers and steps asked, chunked over queries and summed on the fly, so memory holds one
chunk of scores and one (heads, keys) accumulator per (layer, step). Intervening replaces the
processor's attention by SDPA over the same q, k, v (the projections are copied from diffusers'
FluxAttnProcessor, JointAttnProcessor2_0 and AttnProcessor2_0) with the chosen keys' logits
suppressed (`mabook.softmax.edited_attention`), so eta=1 is the stock output; the score pass that
finds the sinks is what it adds. The score path's dose is the paper's by default: a chosen key
keeps exactly eta * p and the other keys absorb the difference in proportion (`KeyIntervention.dose`).

This module holds the verbs and what they take and give (`KeyIntervention`, `Capture`,
`suppression`); the mechanism is `mabook.processors` (which layers, what their keys are, the
processor swap; `layers` and `resolve_layers` are re-exported here) and `mabook.softmax` (the
explicit, chunked softmax with key edits, and the projections copied from diffusers).

What this is not: the chapter's experiment (`mabook.sinks`: reading captures, interventions over
a baseline; `mabook.sink_links`: sinks <-> massive channels); nor a general attention-editing
library. SANA's self-attention is linear (no softmax, hence no probability mass to sink into): it
is refused with an error. Attention masks and cross-attention are refused too.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from mabook import probe, softmax
from mabook.models import Adapter
from mabook.processors import KeyLayout, Swap, chain, overlap
from mabook.processors import layers as layers  # re-exported: `attention.layers(adapter)` lists what the verbs accept
from mabook.processors import resolve_layers as resolve_layers

SELECTIONS = ("sink", "random", "bottom")  # which keys an intervention hits
PATHS = ("score", "value_zero", "value_mean")  # how it hits them
DOSES = ("redistribute", "renormalise")  # how the score path applies eta (see KeyIntervention)
CFG_MODES = probe.CFG_MODES  # which samples of a guidance batch a capture averages


# ---------------------------------------------------------------------------------------------
# Interventions
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyIntervention:
    """Suppress k keys per (sample, head) at the chosen layers and steps.

    keys: "sink" (top-k by incoming mass over image queries, recomputed at every call per sample and
      head, as the paper does), "random" (k keys drawn with `seed`, the same for every sample of a
      call, never one of that head's top-k sinks: an equal-budget control), "bottom" (lowest mass).
    path: "score" (scale the keys' probability by eta, see `dose`; eta=0 is the paper's -1e4 logit
      bias), "value_zero" / "value_mean" (replace the keys' value vectors by zero / by the mean value
      over all keys of that head; eta and dose are not used).
    dose: how the score path applies eta. "redistribute" (default, the paper's): each chosen key
      keeps exactly eta * p and the other keys absorb the difference in proportion to their own
      probability. "renormalise" (mabook before issue 19): multiply the chosen keys' probability by
      eta and renormalise the row, so a chosen key keeps eta * p / (1 - P + eta * P), P the chosen
      keys' total (more than eta * p when they hold much of the row). Both agree at eta = 0 and 1.
    layers: one attention module path, a list of them, or None for every softmax layer.
    steps: denoising steps (None: all). Every sample of a guidance batch is edited (as the paper's
      processor does): uncond and cond halves alike, each with its own sinks.
    """

    keys: str = "sink"
    k: int = 1
    path: str = "score"
    eta: float = 0.0
    layers: str | tuple[str, ...] | None = None
    steps: int | tuple[int, ...] | None = None
    seed: int = 0
    dose: str = "redistribute"

    def __post_init__(self):
        if self.keys not in SELECTIONS:
            raise ValueError(f"unknown keys {self.keys!r}; allowed: {list(SELECTIONS)}")
        if self.path not in PATHS:
            raise ValueError(f"unknown path {self.path!r}; allowed: {list(PATHS)}")
        if self.dose not in DOSES:
            raise ValueError(f"unknown dose {self.dose!r}; allowed: {list(DOSES)}")
        if not isinstance(self.k, (int, np.integer)) or isinstance(self.k, bool) or self.k < 1:
            raise ValueError(f"k must be an int >= 1, got {self.k!r}")
        if isinstance(self.eta, bool) or not isinstance(self.eta, (int, float)) or not 0 <= self.eta <= 1:
            raise ValueError(f"eta must be a number in [0, 1], got {self.eta!r}")
        if not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))
        probe.check_steps(self.steps)

    @property
    def name(self) -> str:
        what = f"{self.keys}-{self.k}" + (f"#{self.seed}" if self.keys == "random" else "")
        return what + " " + op_label(self)


def op_label(iv: KeyIntervention) -> str:
    """The table's "op" of an intervention: "score eta=0", "value_zero", "value_mean"; the score
    path under the old dose reads "score eta=0.1 renormalise"."""
    if iv.path != "score":
        return iv.path
    return f"score eta={iv.eta:g}" + ("" if iv.dose == "redistribute" else f" {iv.dose}")


def _choose(iv: KeyIntervention, mass: torch.Tensor, layer: str, step: int) -> torch.Tensor:
    """(batch_size, heads, k) key indices from the mass (batch_size, heads, keys)."""
    B, H, S = mass.shape
    limit = S // 2 if iv.keys == "random" else S - 1 if iv.path == "score" else S
    if iv.k > limit:
        why = (" (random keys exclude the top-k sinks)" if iv.keys == "random" else
               " (the score path gives the chosen keys' mass to the others: one must remain)" if iv.path == "score" else "")
        raise ValueError(f"k={iv.k} is larger than allowed at {layer}: it has {S} keys, so k <= {limit}{why}")
    if iv.keys == "sink":
        return mass.topk(iv.k, dim=-1).indices
    if iv.keys == "bottom":
        return mass.topk(iv.k, dim=-1, largest=False).indices
    # random: one draw per (seed, layer, step), shared by the samples of a call, so a sample's keys
    # do not depend on the batch it is generated in; the head's own sinks are excluded
    g = torch.Generator().manual_seed(zlib.crc32(f"{iv.seed}|{layer}|{step}".encode()))
    draw = torch.rand(H, S, generator=g).to(mass.device).expand(B, H, S).clone()
    draw.scatter_(-1, mass.topk(iv.k, dim=-1).indices, 2.0)  # above any draw in [0, 1)
    return draw.topk(iv.k, dim=-1, largest=False).indices


# ---------------------------------------------------------------------------------------------
# Capture: incoming mass per key, per (layer, step, head)
# ---------------------------------------------------------------------------------------------


class Capture(Swap):
    """`with capture(adapter, ...) as cap: pipe(...)`: incoming attention mass, output untouched.

    After the block: `cap.mass(layer, step)` (heads, keys), the mass the unedited probabilities give;
    `cap.mass_after(layer, step)`, the mass after the interventions of the contexts this capture is
    nested in (equal to `mass` where none acted); `cap.suppressed(layer, step)`, the mass on the
    intervened keys before and after; `cap.probabilities(layer, step)` (with keep_probabilities);
    `cap.keys(layer)` (a KeyLayout), `cap.samples_at(layer, step)`, `cap.steps_seen`, and
    `sinks(cap, k)`, `movement(cap, k)`, `mass_by_kind(cap)`, `suppression(cap)`."""

    verb = "capture"

    def __init__(self, adapter: Adapter, layers=None, steps=None, cfg: str = "cond", chunk_elements: int | None = None,
                 keep_probabilities: bool = False):
        super().__init__(adapter, layers, steps, cfg, chunk_elements)
        if not isinstance(keep_probabilities, bool):
            raise TypeError(f"keep_probabilities must be a bool, got {keep_probabilities!r}")
        self.keep_probabilities = keep_probabilities
        self._sum: dict[tuple[str, int], torch.Tensor] = {}  # (layer, step) -> (heads, keys) float64
        self._after: dict[tuple[str, int], torch.Tensor] = {}  # the same, after the interventions' edits
        self._hit: dict[tuple[str, int], torch.Tensor] = {}  # (2, heads): mass on the intervened keys before, after
        self._probs: dict[tuple[str, int], list[torch.Tensor]] = {}
        self._count: dict[tuple[str, int], int] = {}
        self._layouts: dict[str, KeyLayout] = {}
        self.steps_seen: list[int] = []

    def observe(self, layer: str, layout: KeyLayout, query, key, value) -> None:
        """A call no intervention edits: the mass of the selected samples (before = after)."""
        chosen = self.samples(query.shape[0])
        if chosen is None:
            return
        if self.keep_probabilities:
            _, mass, probs = softmax.attention(query[chosen], key[chosen], value[chosen], (), self.chunk_elements,
                                               layout.image_slice, keep=True)
        else:
            mass, probs = softmax.image_query_mass(query[chosen], key[chosen], layout.image_slice, self.chunk_elements), None
        self._add(layer, layout, mass, mass, probs, torch.zeros_like(mass, dtype=torch.bool))

    def record(self, layer: str, layout: KeyLayout, before, after, probs, hit) -> None:
        """A call that interventions edit: every sample's mass before and after, the intervened keys."""
        chosen = self.samples(before.shape[0])
        if chosen is None:
            return
        self._add(layer, layout, before[chosen], after[chosen], None if probs is None else probs[chosen], hit[chosen])

    def _add(self, layer: str, layout: KeyLayout, before, after, probs, hit) -> None:
        known = self._layouts.get(layer)
        if known is not None and (known.text, known.image) != (layout.text, layout.image):
            raise ValueError(f"{layer} had {known.text} text + {known.image} image keys, now {layout.text} + "
                             f"{layout.image}: capture one resolution and text length per context")
        self._layouts[layer] = layout
        key, step = (layer, self.step), self.step
        hit_mass = torch.stack([(before * hit).sum(-1), (after * hit).sum(-1)]).sum(1)  # (2, heads)
        for store, value in ((self._sum, before.sum(0)), (self._after, after.sum(0)), (self._hit, hit_mass)):
            value = value.double().cpu()
            store[key] = store[key] + value if key in store else value
        if probs is not None:
            self._probs.setdefault(key, []).append(probs.cpu())
        self._count[key] = self._count.get(key, 0) + before.shape[0]
        if step not in self.steps_seen:
            self.steps_seen.append(step)

    # -- reading ---------------------------------------------------------------------------------

    @property
    def captured(self) -> list[tuple[str, int]]:
        """(layer, step) pairs with data, in capture order."""
        return list(self._sum)

    def _check(self, layer: str, step: int | None = None) -> None:
        if layer not in self._layouts:
            raise ValueError(f"nothing captured at layer {layer!r}; captured: {sorted(self._layouts)}")
        if step is not None and (layer, step) not in self._sum:
            raise ValueError(f"nothing captured at step {step!r} of {layer}; captured steps: {sorted(self.steps_seen)}")

    def keys(self, layer: str) -> KeyLayout:
        """The layer's key layout (padding as known after every call of the context)."""
        self._check(layer)
        layout = self._layouts[layer]
        pad_from = self.pad_from if layout.text else None
        return KeyLayout(layout.text, layout.image, layout.text_first, layout.positions, pad_from)

    def mass(self, layer: str, step: int) -> torch.Tensor:
        """(heads, keys) float64: incoming mass of the unedited probabilities, averaged over image
        queries and captured samples (before any intervention this capture is nested in)."""
        self._check(layer, step)
        return self._sum[(layer, step)] / self._count[(layer, step)]

    def mass_after(self, layer: str, step: int) -> torch.Tensor:
        """(heads, keys) float64: incoming mass of the probabilities the output was computed with,
        after the interventions this capture is nested in (`mass` where none acted)."""
        self._check(layer, step)
        return self._after[(layer, step)] / self._count[(layer, step)]

    def suppressed(self, layer: str, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(before, after), each (heads,) float64: the mass on the keys the interventions chose
        (per sample and head), averaged over captured samples; zero where none acted."""
        self._check(layer, step)
        before, after = self._hit[(layer, step)] / self._count[(layer, step)]
        return before, after

    def probabilities(self, layer: str, step: int) -> torch.Tensor:
        """(samples, heads, queries, keys) float32: every post-intervention probability of the
        captured samples (all queries, text and image, in the layer's order). Needs
        keep_probabilities=True: at FLUX-1024^2 shapes that is ~2 GiB per sample, layer and step."""
        self._check(layer, step)
        if not self.keep_probabilities:
            raise ValueError("probabilities were not kept: pass keep_probabilities=True to capture()")
        return torch.cat(self._probs[(layer, step)])

    def samples_at(self, layer: str, step: int) -> int:
        self._check(layer, step)
        return self._count[(layer, step)]

    # -- shards: a capture written with a sweep's shard, and several merged -----------------------

    def to_tensors(self, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, JSON-able meta): the float64 sums, the counts and the key layouts (not kept probabilities)."""
        tensors, keys = {}, []
        for i, key in enumerate(self._sum):
            for name, store in (("sum", self._sum), ("after", self._after), ("hit", self._hit)):
                tensors[f"{prefix}{i}.{name}"] = store[key]
            keys.append([*key, self._count[key]])
        layouts = {layer: [lay.text, lay.image, lay.text_first, None if lay.positions is None else list(map(list, lay.positions))]
                   for layer, lay in self._layouts.items()}
        return tensors, {"keys": keys, "layouts": layouts, "pad_from": self.pad_from, "steps_seen": list(self.steps_seen)}

    @classmethod
    def from_tensors(cls, adapter: Adapter, parts: Sequence[tuple[dict, dict]], prefix: str = "") -> Capture:
        """One capture of every part ((tensors, meta) of `to_tensors`, in order): the sums added in that
        order, as one context that saw the parts' batches one after the other would have added them."""
        cap = cls(adapter)
        for tensors, meta in parts:
            for layer, (text, image, text_first, positions) in meta["layouts"].items():
                cap._layouts[layer] = KeyLayout(text, image, text_first, None if positions is None else tuple(map(tuple, positions)))
            for i, (layer, step, count) in enumerate(meta["keys"]):
                key = (layer, step)
                for name, store in (("sum", cap._sum), ("after", cap._after), ("hit", cap._hit)):
                    value = tensors[f"{prefix}{i}.{name}"]
                    store[key] = store[key] + value if key in store else value
                cap._count[key] = cap._count.get(key, 0) + count
            cap.steps_seen += [s for s in meta["steps_seen"] if s not in cap.steps_seen]
            if meta["pad_from"] is not None:
                cap.pad_from = meta["pad_from"] if cap.pad_from is None else max(cap.pad_from, meta["pad_from"])
        return cap


def capture(adapter: Adapter, layers: str | Sequence[str] | None = None, steps=None, cfg: str = "cond",
            chunk_elements: int | None = None, keep_probabilities: bool = False) -> Capture:
    """Context manager capturing incoming attention mass at `layers` (default all) and `steps` (default all).

    cfg: which samples of a guidance batch are averaged ("cond", "uncond" or "both"). chunk_elements:
    scores held at once (None: `softmax.CHUNK_ELEMENTS`). keep_probabilities: also keep every probability (small
    models only). Nested inside `intervene()`, it also records the mass after the edit
    (`Capture.mass_after`, `suppression`); `intervene()` cannot be entered inside a capture."""
    return Capture(adapter, layers, steps, cfg, chunk_elements, keep_probabilities)


# ---------------------------------------------------------------------------------------------
# Intervene
# ---------------------------------------------------------------------------------------------


class Intervention(Swap):
    """`with intervene(adapter, KeyIntervention(...)): pipe(...)`. `chosen[(layer, step)]` holds the
    last call's suppressed keys (batch_size, heads, k), for inspection.

    Nesting: one score-path and one value-path intervention combine (the paper's combination): at a
    layer and step where both act, the keys of each are chosen from the unedited mass, the value
    rows are replaced and the probabilities scaled in one attention. Two score-path (or two
    value-path) interventions on the same layer and step are refused, and so is an intervention
    entered inside a capture (enter the capture inside it: it then sees the mass before and after)."""

    verb = "intervene"
    edits = True

    def __init__(self, adapter: Adapter, intervention: KeyIntervention, chunk_elements: int | None = None):
        if not isinstance(intervention, KeyIntervention):
            raise TypeError(f"intervention must be a KeyIntervention, got {type(intervention).__name__}")
        super().__init__(adapter, intervention.layers, intervention.steps, "both", chunk_elements)
        self.intervention = intervention
        self.chosen: dict[tuple[str, int], torch.Tensor] = {}

    def check_nesting(self, modules) -> None:
        mine = "score" if self.intervention.path == "score" else "value"
        for path in self.layers:
            for p in chain(modules[path].processor):
                if isinstance(p.swap, Capture):
                    raise ValueError("enter attention.intervene() outside attention.capture(), not inside it")
                other = p.swap.intervention
                if ("score" if other.path == "score" else "value") == mine and overlap(self.steps, p.swap.steps):
                    raise ValueError(f"cannot nest two {mine}-path interventions on {path} at the same steps "
                                     f"({other.name} and {self.intervention.name}); one score-path and one value-path "
                                     "intervention combine")

    @property
    def needs_logsumexp(self) -> bool:
        iv = self.intervention
        return softmax.needs_logsumexp(iv.path, float(iv.eta), iv.dose)

    def choose(self, layer: str, mass: torch.Tensor) -> softmax.Edit:
        """This intervention's keys at this call from the unedited mass (batch_size, heads, keys)."""
        iv = self.intervention
        chosen = _choose(iv, mass, layer, self.step)
        self.chosen[(layer, self.step)] = chosen.cpu()
        return softmax.Edit(chosen, iv.path, float(iv.eta), iv.dose)


def intervene(adapter: Adapter, intervention: KeyIntervention, chunk_elements: int | None = None) -> Intervention:
    """Context manager suppressing keys as `intervention` says (its layers and steps).

    chunk_elements: scores held at once (None: `softmax.CHUNK_ELEMENTS`). Nest a score-path and a value-path
    intervention to combine them; nest `capture()` inside to see the mass before and after."""
    return Intervention(adapter, intervention, chunk_elements)


# ---------------------------------------------------------------------------------------------
# What an intervention removed (the sinks experiment itself is `mabook.sinks`)
# ---------------------------------------------------------------------------------------------


def suppression(cap: Capture) -> list[dict]:
    """One row per (layer, step, head) where an intervention acted: how much it removed. "before"
    and "after" are the incoming mass (over image queries) on the keys the interventions chose, per
    sample and head, before and after the edit, averaged over captured samples; "kept" = after /
    before (eta under the default dose, 1 on the value path), "removed" = before - after. Needs
    the capture nested inside `intervene()`."""
    rows = []
    for layer, step in cap.captured:
        before, after = cap.suppressed(layer, step)
        if not before.any():
            continue
        for h in range(before.shape[0]):
            b, a = float(before[h]), float(after[h])
            rows.append({"layer": layer, "step": step, "head": h, "before": b, "after": a,
                         "kept": a / b if b > 0 else float("nan"), "removed": b - a})
    return rows
