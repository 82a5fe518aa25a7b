"""The processor swap behind `mabook.attention`: which layers it covers, what their keys are, and
the processor that serves every capture and intervention stacked on a layer.

* `layers(adapter)` / `resolve_layers`: the softmax self-/joint-attention modules (the families
  whose `Family.attention` is "softmax"; cross-attention, linear attention and processors whose
  projections `mabook.softmax` does not copy are refused), `kind_of(module)` their key layout.
* `KeyLayout`: what each key position of a layer is (text, pad or image, and where in the grid).
* `Swap`: the base of `attention.Capture` and `attention.Intervention`. For the length of a `with`
  block it swaps a `Processor` in on each of its layers with diffusers' processor API
  (`module.set_processor`), follows the pipeline with `probe.Hooks` (step, guidance halves) and a
  pre-hook on the transformer (text length, image grid, prompts), and always puts the original
  processors back (in `finally`, also after an exception or a KeyboardInterrupt mid-generation).
  On a clean exit it refuses asked-for steps, and explicitly asked-for layers, that never ran.

Contexts nest: each `Processor` wraps the processor it found, and the outermost serves the whole
stack in one pass (`chain`): captures observe, interventions (`Swap.edits`) choose keys, and the
output is the stock processor's unless an intervention acts at this call.

What a call costs over the stock one: q, k and v are projected once (`softmax.qkv`) and serve both
the measurement and the output. A capture adds one score pass (the mass) and computes the output
with the stock processor's own attention call (`softmax.stock_attention`: bit-identical). An
intervention adds the same score pass (the mass its keys are chosen from, and each query's
logsumexp where its dose needs it) and computes the output with one SDPA call
(`softmax.edited_attention`); a capture nested in it adds a second score pass (the post-edit
probabilities it records).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import torch

from mabook import probe, softmax
from mabook.models import FAMILIES, Adapter

# families with softmax attention (a probability mass for a sink to hold), from the Family table
SOFTMAX_FAMILIES = tuple(f.name for f in FAMILIES.values() if f.attention == "softmax")


# ---------------------------------------------------------------------------------------------
# Layers: which attention modules have softmax attention over keys we can label
# ---------------------------------------------------------------------------------------------


def check_family(adapter: Adapter) -> None:
    """Refuse a family without softmax attention (`Family.attention`)."""
    family = adapter.family
    if family.attention == "linear":
        raise ValueError(f"family {family.name!r} has linear attention (no softmax, so no attention mass for a sink to hold): "
                         f"attention sinks apply only to softmax-attention families {list(SOFTMAX_FAMILIES)}")
    if family.name not in SOFTMAX_FAMILIES:
        raise ValueError(f"unsupported family {family.name!r}; allowed: {list(SOFTMAX_FAMILIES)}")


def kind_of(module) -> str:
    """How a module lays out its keys: "flux_double", "flux_single", "joint" (SD3) or "self" (PixArt attn1).

    Raises ValueError for cross-attention, linear attention and processors we do not copy."""
    processor = module.processor
    if isinstance(processor, Processor):  # capture() nested inside intervene()
        return processor.kind
    name = type(processor).__name__
    if type(module).__name__ == "FluxAttention":
        if name != "FluxAttnProcessor":
            raise ValueError(f"FluxAttention with processor {name} is not supported; allowed: FluxAttnProcessor")
        return "flux_double" if module.added_kv_proj_dim is not None else "flux_single"
    if "Linear" in name:
        raise ValueError(f"processor {name} is linear attention (no softmax): attention sinks do not apply")
    if getattr(module, "is_cross_attention", False):
        raise ValueError("cross-attention (queries from the image, keys from the text encoder) is not covered; "
                         "pick a self- or joint-attention layer")
    if name == "JointAttnProcessor2_0":
        return "joint"
    if name == "AttnProcessor2_0":
        return "self"
    raise ValueError(f"processor {name} is not supported; allowed: FluxAttnProcessor, JointAttnProcessor2_0, AttnProcessor2_0")


def layers(adapter: Adapter) -> list[str]:
    """Module paths of every softmax self-/joint-attention layer, in forward order."""
    check_family(adapter)
    out = []
    for path, module in adapter.attention_modules().items():
        try:
            kind_of(module)
        except ValueError:
            continue
        out.append(path)
    return out


def resolve_layers(adapter: Adapter, chosen) -> list[str]:
    check_family(adapter)
    allowed = layers(adapter)
    if chosen is None:
        return allowed
    if isinstance(chosen, str):
        chosen = [chosen]
    if not isinstance(chosen, (list, tuple)):
        raise TypeError(f"layers must be None (all), an attention module path or a list of them, got {chosen!r}")
    chosen = list(chosen)
    if not chosen:
        raise ValueError("layers must be None (all) or a non-empty list of attention module paths")
    modules = adapter.attention_modules()
    for path in chosen:
        if path not in allowed:
            why = "is not a softmax self-/joint-attention layer" if path in modules else "has no attention"
            shown = allowed if len(allowed) <= 8 else allowed[:4] + ["..."] + allowed[-4:]
            raise ValueError(f"layer {path!r} {why}; allowed: {shown}")
    return chosen


# ---------------------------------------------------------------------------------------------
# Keys: what each key position is
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyLayout:
    """The keys of one attention layer: `text` text keys and `image` image keys, in the layer's order.

    positions: (row, col) of each image key in the token grid (None if unknown).
    pad_from: text keys with index >= pad_from (counted within the text keys) are padding for every
    captured sample (None if unknown)."""

    text: int
    image: int
    text_first: bool
    positions: tuple[tuple[int, int], ...] | None = None
    pad_from: int | None = None

    @property
    def size(self) -> int:
        return self.text + self.image

    @property
    def image_slice(self) -> slice:
        return slice(self.text, self.size) if self.text_first else slice(0, self.image)

    def label(self, key: int) -> dict:
        """{"kind": "text" | "pad" | "image", "index": within its kind, "row", "col" (image keys)}."""
        if not 0 <= key < self.size:
            raise ValueError(f"key {key} out of range; this layer has {self.size} keys")
        image = self.image_slice
        if image.start <= key < image.stop:
            i = key - image.start
            row, col = self.positions[i] if self.positions is not None else (None, None)
            return {"kind": "image", "index": i, "row": row, "col": col}
        i = key - (0 if self.text_first else self.image)
        kind = "pad" if self.pad_from is not None and i >= self.pad_from else "text"
        return {"kind": kind, "index": i, "row": None, "col": None}

    def kinds(self) -> np.ndarray:
        """(keys,) array of "text", "pad", "image"."""
        return np.array([self.label(i)["kind"] for i in range(self.size)])


# ---------------------------------------------------------------------------------------------
# The processor and the swap (the one place that replaces and restores processors)
# ---------------------------------------------------------------------------------------------


def chain(processor) -> list["Processor"]:
    """The mabook processors stacked on one module, outermost (the module's processor) first."""
    out = []
    while isinstance(processor, Processor):
        out.append(processor)
        processor = processor.original
    return out


class Processor:
    """Stands in for one module's processor. Contexts nest: each wraps the processor it found, and
    the module's processor (the outermost) serves every context stacked under it in one pass: the
    captures record the mass before and after every active intervention's edit, and the output is
    the stock processor's unless an intervention is active at this call."""

    def __init__(self, swap: "Swap", layer: str, kind: str, original):
        self.swap, self.layer, self.kind, self.original = swap, layer, kind, original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        # FluxAttention passes image_rotary_emb positionally after attention_mask; Attention passes keywords
        image_rotary_emb = args[0] if args else kwargs.get("image_rotary_emb")
        stack = chain(self)
        stock = stack[-1].original
        active = [p for p in stack if p.swap.active(p.layer)]
        if not active:
            return stock(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        if attention_mask is not None:
            raise ValueError(f"attention masks are not supported by mabook.attention (one reached {self.layer})")
        captures = [p for p in active if not p.swap.edits]
        edits = [p for p in active if p.swap.edits]
        if not edits and not softmax.copies_stock(self.kind, attn, hidden_states):  # project twice rather than differ
            with torch.no_grad():
                query, key, value = softmax.qkv(self.kind, attn, hidden_states, encoder_hidden_states, image_rotary_emb)
                for p in active:
                    p.swap.observe(p.layer, p.swap.layout(self.kind, key.shape[2], encoder_hidden_states), query, key, value)
            return stock(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        with torch.no_grad():  # measurements and edits only: nothing here is meant to be differentiated
            # one projection serves the measurements and the output
            query, key, value = softmax.qkv(self.kind, attn, hidden_states, encoder_hidden_states, image_rotary_emb)
            layouts = [p.swap.layout(self.kind, key.shape[2], encoder_hidden_states) for p in active]
            image = layouts[0].image_slice
            if not edits:  # capturing only: the stock processor's attention, computed as it computes it (bit-identical)
                for p, layout in zip(active, layouts):
                    p.swap.observe(p.layer, layout, query, key, value)
                out = softmax.stock_attention(self.kind, stock, query, key, value)
                return softmax.finish(self.kind, attn, out, hidden_states, encoder_hidden_states)
            chunk_elements = min(p.swap.chunk_elements for p in active)
            if any(p.swap.needs_logsumexp for p in edits):  # every sample: sinks are per sample
                before, lse = softmax.image_query_mass(query, key, image, chunk_elements, lse=True)
            else:
                before, lse = softmax.image_query_mass(query, key, image, chunk_elements), None
            chosen = [p.swap.choose(p.layer, before) for p in edits]
            out = softmax.edited_attention(query, key, value, chosen, lse, chunk_elements)  # one score pass so far, then SDPA
            if captures:  # the post-edit probabilities, explicitly (a second score pass, for the captures only)
                keep = any(p.swap.keep_probabilities for p in captures)
                _, after, probs = softmax.attention(query, key, value, chosen, chunk_elements, image, keep, output=False)
                hit = torch.zeros_like(before, dtype=torch.bool)
                for e in chosen:
                    hit.scatter_(-1, e.chosen, True)
                for p, layout in zip(active, layouts):
                    if not p.swap.edits:
                        p.swap.record(p.layer, layout, before, after, probs, hit)
            return softmax.finish(self.kind, attn, out, hidden_states, encoder_hidden_states)


def overlap(a, b) -> bool:
    """Whether two step selections (None: all) share a step."""
    return a is None or b is None or bool(set(a) & set(b))


class Swap:
    """Swaps processors on `layers` for the length of a `with` block, and knows where the pipeline is.

    On a clean exit it refuses asked-for steps, and explicitly asked-for layers, that never ran.
    A subclass reads (`edits` False: `observe`, `record`, `keep_probabilities`; `attention.Capture`)
    or edits (`edits` True: `choose`; `attention.Intervention`) the attention of its layers."""

    verb = "swap"
    edits = False  # whether this context edits the attention (an intervention) or only reads it (a capture)
    needs_logsumexp = False  # whether its edit needs each query's logsumexp (`softmax.needs_logsumexp`)

    def __init__(self, adapter: Adapter, layers, steps, cfg: str, chunk_elements: int | None):
        if cfg not in probe.CFG_MODES:
            raise ValueError(f"unknown cfg {cfg!r}; allowed: {list(probe.CFG_MODES)}")
        self.adapter, self.cfg, self.chunk_elements = adapter, cfg, softmax.check_chunk_elements(chunk_elements)
        self.layers = resolve_layers(adapter, layers)
        self._layers_asked = layers is not None
        self.steps = probe.check_steps(steps)
        self.pad_from: int | None = None
        self.layers_ran: set[str] = set()  # layers whose attention ran at an asked step
        self._call: dict = {}
        self._installed: dict[str, Processor] = {}
        self._hooks: probe.Hooks | None = None
        self._handle = None
        self._token_counts: dict[str, int] = {}

    # where the pipeline is: probe.Hooks counts steps and decides which samples are conditional
    @property
    def step(self) -> int:
        return self._hooks.step

    def active(self, layer: str) -> bool:
        """Whether this context acts on `layer` at the current step (and note that it ran)."""
        if self.steps is not None and self.step not in self.steps:
            return False
        self.layers_ran.add(layer)
        return True

    def samples(self, batch_size: int) -> slice | None:
        """The samples of this call that `cfg` selects (None if it holds none)."""
        roles = self._hooks.roles  # set by probe.Hooks at every transformer call
        if self.cfg == "both":
            return slice(0, batch_size)
        if len(roles) == 1:
            return slice(0, batch_size) if roles[0] == self.cfg else None
        half = batch_size // 2
        return slice(half, batch_size) if self.cfg == "cond" else slice(0, half)

    # what the keys are: read from the transformer call (text length, image grid) and the prompts
    def _pre_transformer(self, module, args, kwargs):
        try:
            bound = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments
        except TypeError:
            bound = dict(kwargs)
        hidden_states, encoder_hidden_states = bound.get("hidden_states"), bound.get("encoder_hidden_states")
        positions = None
        img_ids = bound.get("img_ids")
        if isinstance(img_ids, torch.Tensor):  # FLUX: (tokens, 3) = (0, row, col)
            ids = img_ids[0] if img_ids.ndim == 3 else img_ids
            positions = tuple((int(r), int(c)) for r, c in ids[:, 1:3].round().long().tolist())
        elif isinstance(hidden_states, torch.Tensor) and hidden_states.ndim == 4:  # SD3, PixArt: latents (B, C, H, W)
            p = int(self.adapter.transformer.config.patch_size)
            h, w = hidden_states.shape[2] // p, hidden_states.shape[3] // p
            positions = tuple((r, c) for r in range(h) for c in range(w))  # patch embedding flattens row-major
        text = encoder_hidden_states.shape[1] if isinstance(encoder_hidden_states, torch.Tensor) else 0
        self._call = {"text": text, "positions": positions}
        count = self._prompt_tokens()
        if count is not None:
            self.pad_from = count if self.pad_from is None else max(self.pad_from, count)

    def _prompt_tokens(self) -> int | None:
        """Token count of the longest prompt of the running pipeline call (families with a
        `Family.text_tokenizer`: the organism and FLUX)."""
        if self.adapter.family.text_tokenizer is None or self.adapter.pipe is None:
            return None
        call = self.adapter.pipeline_call()
        if call is None:
            return None
        prompts = []
        for name in ("prompt", "negative_prompt"):
            value = call.get(name)
            prompts += [value] if isinstance(value, str) else [p for p in (value or []) if isinstance(p, str)]
        if not prompts:
            return None
        tokenizer, max_length = self.adapter.text_tokenizer(call)
        for p in prompts:
            if p not in self._token_counts:
                self._token_counts[p] = len(tokenizer(p, truncation=True, max_length=max_length)["input_ids"])
        return max(self._token_counts[p] for p in prompts)

    def layout(self, kind: str, num_keys: int, encoder_hidden_states) -> KeyLayout:
        if kind == "flux_double":
            text, text_first = encoder_hidden_states.shape[1], True
        elif kind == "flux_single":
            text, text_first = self._call.get("text", 0), True
        elif kind == "joint" and encoder_hidden_states is not None:
            text, text_first = encoder_hidden_states.shape[1], False
        else:
            text, text_first = 0, False
        positions = self._call.get("positions")
        if positions is not None and len(positions) != num_keys - text:
            positions = None  # not this call's image tokens (e.g. a transformer called without img_ids)
        return KeyLayout(text, num_keys - text, text_first, positions, self.pad_from if text else None)

    def check_nesting(self, modules) -> None:
        """Refuse what cannot be stacked on the processors already swapped in (see attention.Intervention)."""

    def __enter__(self):
        modules = self.adapter.attention_modules()
        self.check_nesting(modules)
        try:
            self._hooks = probe.Hooks(self.adapter, lambda *a: None, taps=[])
            self._hooks.__enter__()
            self._handle = self.adapter.transformer.register_forward_pre_hook(self._pre_transformer, with_kwargs=True)
            for path in self.layers:
                module = modules[path]
                processor = Processor(self, path, kind_of(module), module.processor)
                self._installed[path] = processor
                module.set_processor(processor)
        except BaseException:
            self.restore()
            raise
        return self

    def restore(self) -> None:
        """Take this context's processors out of every module (also from under a context entered
        later and still open) and remove the hooks (idempotent)."""
        modules = self.adapter.attention_modules()
        try:
            while self._installed:
                path, mine = self._installed.popitem()
                module = modules[path]
                if module.processor is mine:
                    module.set_processor(mine.original)
                    continue
                for p in chain(module.processor):
                    if p.original is mine:
                        p.original = mine.original
                        break
        finally:
            if self._handle is not None:
                self._handle.remove()
                self._handle = None
            if self._hooks is not None:
                self._hooks.remove()

    def check_ran(self) -> None:
        """Raise if an asked-for step, or an explicitly asked-for layer, never ran in the context."""
        if self.steps is not None:
            self._hooks.check_steps_ran(self.steps, self.verb)
        missing = [layer for layer in self.layers if layer not in self.layers_ran]
        if self._layers_asked and missing:
            at = "" if self.steps is None else f" at steps {sorted(self.steps)}"
            ran = (sorted(self.layers_ran) if self.layers_ran else "none" if self._hooks.steps_seen
                   else "none (was the pipeline called inside the context?)")
            raise ValueError(f"{self.verb} asked for layer(s) {missing}, but the layers that ran{at} were {ran}")

    def __exit__(self, exc_type, exc, tb):
        self.restore()  # processors are global state: always restored, also on errors and KeyboardInterrupt
        if exc_type is None:
            self.check_ran()
        return False

