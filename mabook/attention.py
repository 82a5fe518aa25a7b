"""Attention sinks: capture where attention goes, find the sink keys, and suppress them (chapter 6).

Two verbs, both context managers that swap attention processors in with diffusers' processor API
(`module.set_processor`) and always put the original ones back (in `finally`, also after an
exception or a KeyboardInterrupt in the middle of a generation):

* run and collect -- ``with attention.capture(adapter, layers=..., steps=...) as cap: pipe(prompt)``
  then ``cap.mass(layer, step)``, ``sinks(cap, k)``, ``movement(cap, k)``;
* run with an intervention -- ``with attention.intervene(adapter, KeyIntervention("sink", k=1)): pipe(prompt)``.

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

Capturing never changes the output: the original processor computes it (SDPA, bit-identical
images) and the probabilities are recomputed on the side from the same q and k, only at the layers
and steps asked, chunked over queries and summed on the fly, so memory holds one chunk of scores
and one (heads, keys) accumulator per (layer, step). Intervening replaces the processor's
attention by an explicit softmax over the same q, k, v (the projections are copied from diffusers'
FluxAttnProcessor, JointAttnProcessor2_0 and AttnProcessor2_0), so eta=1 equals the stock output
up to float rounding.

What this is not: a general attention-editing library. SANA's self-attention is linear (no
softmax, hence no probability mass to sink into): it is refused with an error. Attention masks
and cross-attention are refused too.
"""

from __future__ import annotations

import inspect
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from mabook import probe
from mabook.models import Adapter

SELECTIONS = ("sink", "random", "bottom")  # which keys an intervention hits
PATHS = ("score", "value_zero", "value_mean")  # how it hits them
CFG_MODES = probe.CFG_MODES
SOFTMAX_FAMILIES = ("organism", "flux", "sd3", "pixart")
# Scores held at once while computing probabilities: chunk of queries x keys x heads x batch. 2**24
# float32 elements is 64 MiB (the softmax holds two such buffers): at FLUX-1024^2 shapes (4608 keys,
# 24 heads, CFG batch 2) ~150 queries a chunk, against 3.9 GiB for every probability at once.
CHUNK_ELEMENTS = 2**24


# ---------------------------------------------------------------------------------------------
# Layers: which attention modules have softmax attention over keys we can label
# ---------------------------------------------------------------------------------------------


def _check_family(adapter: Adapter) -> None:
    if adapter.family.name == "sana":
        raise ValueError("family 'sana' has linear attention (no softmax, so no attention mass for a sink to hold): "
                         f"attention sinks apply only to softmax-attention families {list(SOFTMAX_FAMILIES)}")
    if adapter.family.name not in SOFTMAX_FAMILIES:
        raise ValueError(f"unsupported family {adapter.family.name!r}; allowed: {list(SOFTMAX_FAMILIES)}")


def _kind(module) -> str:
    """How a module lays out its keys: "flux_double", "flux_single", "joint" (SD3) or "self" (PixArt attn1).

    Raises ValueError for cross-attention, linear attention and processors we do not copy."""
    processor = module.processor
    if isinstance(processor, _Processor):  # capture() nested inside intervene()
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
    _check_family(adapter)
    out = []
    for path, module in adapter.attention_modules().items():
        try:
            _kind(module)
        except ValueError:
            continue
        out.append(path)
    return out


def _resolve_layers(adapter: Adapter, chosen) -> list[str]:
    _check_family(adapter)
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
# Projections copied from diffusers 0.42 (the part of each processor before and after attention)
# ---------------------------------------------------------------------------------------------


def _qkv(kind: str, attn, hidden_states, encoder_hidden_states, image_rotary_emb):
    """-> q, k, v, each (batch_size, heads, keys, head_dim), in the order the processor attends."""
    if kind in ("flux_double", "flux_single"):  # FluxAttnProcessor
        from diffusers.models.embeddings import apply_rotary_emb

        if attn.fused_projections:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if attn.added_kv_proj_dim is not None:
            if attn.fused_projections:
                eq, ek, ev = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
            else:
                eq, ek, ev = (attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states),
                              attn.add_v_proj(encoder_hidden_states))
            eq = attn.norm_added_q(eq.unflatten(-1, (-1, attn.head_dim)))
            ek = attn.norm_added_k(ek.unflatten(-1, (-1, attn.head_dim)))
            ev = ev.unflatten(-1, (-1, attn.head_dim))
            query, key, value = torch.cat([eq, query], 1), torch.cat([ek, key], 1), torch.cat([ev, value], 1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        return query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)

    # JointAttnProcessor2_0 and AttnProcessor2_0 (self-attention: encoder_hidden_states is None)
    B = hidden_states.shape[0]
    query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    D = key.shape[-1] // attn.heads
    query, key, value = (t.view(B, -1, attn.heads, D).transpose(1, 2) for t in (query, key, value))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    if kind == "joint" and encoder_hidden_states is not None:
        eq, ek, ev = (p(encoder_hidden_states).view(B, -1, attn.heads, D).transpose(1, 2)
                      for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if attn.norm_added_q is not None:
            eq = attn.norm_added_q(eq)
        if attn.norm_added_k is not None:
            ek = attn.norm_added_k(ek)
        query, key, value = torch.cat([query, eq], 2), torch.cat([key, ek], 2), torch.cat([value, ev], 2)
    return query, key, value


def _finish(kind: str, attn, out, hidden_states, encoder_hidden_states):
    """The processor's output from the attention output `out` (batch_size, heads, queries, head_dim)."""
    B, H, S, D = out.shape
    out = out.transpose(1, 2).reshape(B, S, H * D)
    if kind in ("flux_double", "flux_single"):
        if encoder_hidden_states is None:
            return out
        encoder_out, out = out.split_with_sizes([encoder_hidden_states.shape[1], S - encoder_hidden_states.shape[1]], dim=1)
        out = attn.to_out[1](attn.to_out[0](out.contiguous()))
        return out, attn.to_add_out(encoder_out.contiguous())
    if kind == "joint" and encoder_hidden_states is not None:
        n = hidden_states.shape[1]
        out, encoder_out = out[:, :n], out[:, n:]
        if not attn.context_pre_only:
            encoder_out = attn.to_add_out(encoder_out)
        return attn.to_out[1](attn.to_out[0](out)), encoder_out
    out = attn.to_out[1](attn.to_out[0](out))
    if kind == "self":
        if attn.residual_connection:
            out = out + hidden_states
        out = out / attn.rescale_output_factor
    return out


# ---------------------------------------------------------------------------------------------
# Explicit softmax attention, chunked over queries
# ---------------------------------------------------------------------------------------------


def _chunk(q: torch.Tensor, num_keys: int, chunk_elements: int) -> int:
    B, H = q.shape[:2]
    return max(1, chunk_elements // max(1, B * H * num_keys))


def _probs(q_chunk: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim)) in float32 (SDPA's default scale, as every copied processor uses)."""
    scale = q_chunk.shape[-1] ** -0.5
    return torch.softmax((q_chunk.float() @ key.float().transpose(-1, -2)) * scale, dim=-1)


def image_query_mass(query: torch.Tensor, key: torch.Tensor, image: slice, chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Incoming mass per key averaged over the image queries: (batch_size, heads, keys) float32.

    query, key: (batch_size, heads, tokens, head_dim); image: the image queries' positions."""
    B, H, S, _ = key.shape
    total = torch.zeros(B, H, S, dtype=torch.float32, device=key.device)
    step = _chunk(query, S, chunk_elements)
    for start in range(image.start, image.stop, step):
        total += _probs(query[:, :, start:min(image.stop, start + step)], key).sum(2)
    return total / (image.stop - image.start)


def _attend(query, key, value, chosen: torch.Tensor, path: str, eta: float, chunk_elements: int) -> torch.Tensor:
    """Attention with the chosen keys (batch_size, heads, k) suppressed on one path; (B, H, queries, D)."""
    B, H, S, D = key.shape
    if path != "score":
        # value path: the chosen keys still receive their attention, but carry zero / the mean value
        replacement = torch.zeros_like(value) if path == "value_zero" else value.mean(2, keepdim=True).expand_as(value)
        index = chosen[..., None].expand(B, H, chosen.shape[-1], D)
        value = value.scatter(2, index, replacement.gather(2, index))
    weight = None
    if path == "score":
        # eta scales the chosen keys' probability before renormalising; eta=0 is the paper's -1e4
        # logit bias (exp(-1e4) underflows to exactly 0 in float32)
        weight = torch.ones(B, H, 1, S, dtype=torch.float32, device=key.device)
        weight.scatter_(3, chosen[:, :, None, :], eta)
    out = torch.empty(B, H, query.shape[2], D, dtype=torch.float32, device=query.device)
    step = _chunk(query, S, chunk_elements)
    for start in range(0, query.shape[2], step):
        p = _probs(query[:, :, start:start + step], key)
        if weight is not None:
            p = p * weight
            p = p / p.sum(-1, keepdim=True)
        out[:, :, start:start + step] = p @ value.float()
    return out.to(query.dtype)


# ---------------------------------------------------------------------------------------------
# Interventions
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyIntervention:
    """Suppress k keys per (sample, head) at the chosen layers and steps.

    keys: "sink" (top-k by incoming mass over image queries, recomputed at every call per sample and
      head, as the paper does), "random" (k keys drawn with `seed`, the same for every sample of a
      call, never one of that head's top-k sinks: an equal-budget control), "bottom" (lowest mass).
    path: "score" (multiply the keys' probability by eta and renormalise each query's row; eta=0 is
      the paper's -1e4 logit bias), "value_zero" / "value_mean" (replace the keys' value vectors by
      zero / by the mean value over all keys of that head; eta is not used).
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

    def __post_init__(self):
        if self.keys not in SELECTIONS:
            raise ValueError(f"unknown keys {self.keys!r}; allowed: {list(SELECTIONS)}")
        if self.path not in PATHS:
            raise ValueError(f"unknown path {self.path!r}; allowed: {list(PATHS)}")
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
        return what + (f" score eta={self.eta:g}" if self.path == "score" else f" {self.path}")


def _choose(iv: KeyIntervention, mass: torch.Tensor, layer: str, step: int) -> torch.Tensor:
    """(batch_size, heads, k) key indices from the mass (batch_size, heads, keys)."""
    B, H, S = mass.shape
    if iv.k > S or (iv.keys == "random" and 2 * iv.k > S):
        limit = S if iv.keys != "random" else S // 2
        raise ValueError(f"k={iv.k} is larger than allowed at {layer}: it has {S} keys, so k <= {limit}"
                         + (" (random keys exclude the top-k sinks)" if iv.keys == "random" else ""))
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
# The processor and the swap (the one place that replaces and restores processors)
# ---------------------------------------------------------------------------------------------


class _Processor:
    """Stands in for one module's processor; calls the original unless this call intervenes."""

    def __init__(self, swap: "_Swap", layer: str, kind: str, original):
        self.swap, self.layer, self.kind, self.original = swap, layer, kind, original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        # FluxAttention passes image_rotary_emb positionally after attention_mask; Attention passes keywords
        image_rotary_emb = args[0] if args else kwargs.get("image_rotary_emb")
        swap = self.swap
        if not swap.active(self.layer):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        if attention_mask is not None:
            raise ValueError(f"attention masks are not supported by mabook.attention (one reached {self.layer})")
        with torch.no_grad():  # measurements and edits only: nothing here is meant to be differentiated
            query, key, value = _qkv(self.kind, attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        layout = swap.layout(self.kind, key.shape[2], encoder_hidden_states)
        return swap.handle(self, attn, layout, (query, key, value),
                           lambda: self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs),
                           hidden_states, encoder_hidden_states)


class _Swap:
    """Swaps processors on `layers` for the length of a `with` block, and knows where the pipeline is."""

    def __init__(self, adapter: Adapter, layers, steps, cfg: str, chunk_elements: int):
        if cfg not in CFG_MODES:
            raise ValueError(f"unknown cfg {cfg!r}; allowed: {list(CFG_MODES)}")
        if not isinstance(chunk_elements, int) or chunk_elements < 1:
            raise ValueError(f"chunk_elements must be an int >= 1, got {chunk_elements!r}")
        self.adapter, self.cfg, self.chunk_elements = adapter, cfg, chunk_elements
        self.layers = _resolve_layers(adapter, layers)
        self.steps = probe.check_steps(steps)
        self.pad_from: int | None = None
        self._call: dict = {}
        self._originals: dict[str, object] = {}
        self._hooks: probe.Hooks | None = None
        self._handle = None
        self._token_counts: dict[str, int] = {}

    # where the pipeline is: probe.Hooks counts steps and decides which samples are conditional
    @property
    def step(self) -> int:
        return self._hooks.step

    def active(self, layer: str) -> bool:
        return self.steps is None or self.step in self.steps

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
        """Token count of the longest prompt of the running pipeline call (organism and FLUX only)."""
        family, pipe = self.adapter.family.name, self.adapter.pipe
        if family not in ("organism", "flux") or pipe is None:
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
        if family == "organism":
            tokenizer, max_length = pipe.tokenizer, pipe.organism_config.max_text_length
        else:  # FLUX's encoder_hidden_states are T5's, padded to max_sequence_length
            tokenizer, max_length = pipe.tokenizer_2, int(call.get("max_sequence_length") or 512)
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

    def handle(self, processor, attn, layout, qkv, original, hidden_states, encoder_hidden_states):
        raise NotImplementedError

    def __enter__(self):
        modules = self.adapter.attention_modules()
        if any(isinstance(modules[p].processor, _Processor) for p in self.layers) and isinstance(self, Intervention):
            raise ValueError("enter attention.intervene() outside attention.capture(), not inside it")
        try:
            self._hooks = probe.Hooks(self.adapter, lambda *a: None, taps=[])
            self._hooks.__enter__()
            self._handle = self.adapter.transformer.register_forward_pre_hook(self._pre_transformer, with_kwargs=True)
            for path in self.layers:
                module = modules[path]
                kind = _kind(module)
                self._originals[path] = module.processor
                module.set_processor(_Processor(self, path, kind, module.processor))
        except BaseException:
            self.restore()
            raise
        return self

    def restore(self) -> None:
        """Put every original processor back and remove the hooks (idempotent)."""
        modules = self.adapter.attention_modules()
        try:
            while self._originals:
                path, original = self._originals.popitem()
                modules[path].set_processor(original)
        finally:
            if self._handle is not None:
                self._handle.remove()
                self._handle = None
            if self._hooks is not None:
                self._hooks.remove()

    def __exit__(self, exc_type, exc, tb):
        self.restore()  # processors are global state: always restored, also on errors and KeyboardInterrupt
        return False


# ---------------------------------------------------------------------------------------------
# Capture: incoming mass per key, per (layer, step, head)
# ---------------------------------------------------------------------------------------------


class Capture(_Swap):
    """`with capture(adapter, ...) as cap: pipe(...)`: incoming attention mass, output untouched.

    After the block: `cap.mass(layer, step)` (heads, keys), `cap.keys(layer)` (a KeyLayout),
    `cap.samples(layer, step)`, `cap.steps_seen`, and `sinks(cap, k)`, `movement(cap, k)`,
    `mass_by_kind(cap)`."""

    def __init__(self, adapter: Adapter, layers=None, steps=None, cfg: str = "cond", chunk_elements: int = CHUNK_ELEMENTS):
        super().__init__(adapter, layers, steps, cfg, chunk_elements)
        self._sum: dict[tuple[str, int], torch.Tensor] = {}  # (layer, step) -> (heads, keys) float64
        self._count: dict[tuple[str, int], int] = {}
        self._layouts: dict[str, KeyLayout] = {}
        self.steps_seen: list[int] = []

    def handle(self, processor, attn, layout, qkv, original, hidden_states, encoder_hidden_states):
        query, key, _ = qkv
        chosen = self.samples(query.shape[0])
        if chosen is not None:
            with torch.no_grad():
                mass = image_query_mass(query[chosen], key[chosen], layout.image_slice, self.chunk_elements)
                self._add(processor.layer, self.step, layout, mass)
        return original()  # the stock processor computes the output: capturing changes nothing

    def _add(self, layer: str, step: int, layout: KeyLayout, mass: torch.Tensor) -> None:
        known = self._layouts.get(layer)
        if known is not None and (known.text, known.image) != (layout.text, layout.image):
            raise ValueError(f"{layer} had {known.text} text + {known.image} image keys, now {layout.text} + "
                             f"{layout.image}: capture one resolution and text length per context")
        self._layouts[layer] = layout
        key = (layer, step)
        total = mass.sum(0).double().cpu()
        self._sum[key] = self._sum[key] + total if key in self._sum else total
        self._count[key] = self._count.get(key, 0) + mass.shape[0]
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
        """(heads, keys) float64: incoming mass averaged over image queries and captured samples."""
        self._check(layer, step)
        return self._sum[(layer, step)] / self._count[(layer, step)]

    def samples_at(self, layer: str, step: int) -> int:
        self._check(layer, step)
        return self._count[(layer, step)]


def capture(adapter: Adapter, layers: str | Sequence[str] | None = None, steps=None, cfg: str = "cond",
            chunk_elements: int = CHUNK_ELEMENTS) -> Capture:
    """Context manager capturing incoming attention mass at `layers` (default all) and `steps` (default all).

    cfg: which samples of a guidance batch are averaged ("cond", "uncond" or "both")."""
    return Capture(adapter, layers, steps, cfg, chunk_elements)


# ---------------------------------------------------------------------------------------------
# Intervene
# ---------------------------------------------------------------------------------------------


class Intervention(_Swap):
    """`with intervene(adapter, KeyIntervention(...)): pipe(...)`. `chosen[(layer, step)]` holds the
    last call's suppressed keys (batch_size, heads, k), for inspection."""

    def __init__(self, adapter: Adapter, intervention: KeyIntervention, chunk_elements: int = CHUNK_ELEMENTS):
        if not isinstance(intervention, KeyIntervention):
            raise TypeError(f"intervention must be a KeyIntervention, got {type(intervention).__name__}")
        super().__init__(adapter, intervention.layers, intervention.steps, "both", chunk_elements)
        self.intervention = intervention
        self.chosen: dict[tuple[str, int], torch.Tensor] = {}

    def handle(self, processor, attn, layout, qkv, original, hidden_states, encoder_hidden_states):
        iv = self.intervention
        query, key, value = qkv
        with torch.no_grad():
            mass = image_query_mass(query, key, layout.image_slice, self.chunk_elements)
            chosen = _choose(iv, mass, processor.layer, self.step)
            self.chosen[(processor.layer, self.step)] = chosen.cpu()
            out = _attend(query, key, value, chosen, iv.path, float(iv.eta), self.chunk_elements)
            return _finish(processor.kind, attn, out, hidden_states, encoder_hidden_states)


def intervene(adapter: Adapter, intervention: KeyIntervention, chunk_elements: int = CHUNK_ELEMENTS) -> Intervention:
    """Context manager suppressing keys as `intervention` says (its layers and steps)."""
    return Intervention(adapter, intervention, chunk_elements)


# ---------------------------------------------------------------------------------------------
# Reading a capture: sinks, where they sit, how they move
# ---------------------------------------------------------------------------------------------


def sinks(cap: Capture, k: int = 1) -> list[dict]:
    """One row per (layer, step, head, rank): the top-k keys by mass and where they sit."""
    rows = []
    for layer, step in cap.captured:
        mass = cap.mass(layer, step)
        H, S = mass.shape
        if not isinstance(k, (int, np.integer)) or k < 1 or k > S:
            raise ValueError(f"k must be an int in [1, {S}] (the keys at {layer}), got {k!r}")
        layout = cap.keys(layer)
        top = mass.topk(k, dim=-1)
        for h in range(H):
            for rank in range(k):
                i = int(top.indices[h, rank])
                rows.append({"layer": layer, "step": step, "head": h, "rank": rank, "key": i, **layout.label(i),
                             "mass": float(top.values[h, rank]), "uniform": 1 / S})
    return rows


def mass_by_kind(cap: Capture) -> list[dict]:
    """One row per (layer, step, head): total mass on text, pad and image keys (sums to 1)."""
    rows = []
    for layer, step in cap.captured:
        mass, kinds = cap.mass(layer, step).numpy(), cap.keys(layer).kinds()
        for h in range(mass.shape[0]):
            rows.append({"layer": layer, "step": step, "head": h,
                         **{kind: float(mass[h, kinds == kind].sum()) for kind in ("text", "pad", "image")}})
    return rows


def movement(cap: Capture, k: int = 1) -> list[dict]:
    """Per (layer, head) over the captured steps in order: how often the top-1 key stays put between
    consecutive steps, the mean Jaccard overlap of consecutive top-k sets, the share of steps whose
    top-1 is key 0 (the paper: < 0.2 % in SD3), and the top-1's most common kind."""
    rows = []
    for layer in dict.fromkeys(layer for layer, _ in cap.captured):
        steps = sorted(step for l, step in cap.captured if l == layer)
        top = torch.stack([cap.mass(layer, s).topk(k, dim=-1).indices for s in steps])  # (steps, heads, k)
        layout = cap.keys(layer)
        for h in range(top.shape[1]):
            sets = [set(top[i, h].tolist()) for i in range(len(steps))]
            pairs = list(zip(sets, sets[1:]))
            first = top[:, h, 0].tolist()
            rows.append({
                "layer": layer, "head": h, "steps": len(steps),
                "top1_stays": float(np.mean([a == b for a, b in zip(first, first[1:])])) if pairs else float("nan"),
                "topk_jaccard": float(np.mean([len(a & b) / len(a | b) for a, b in pairs])) if pairs else float("nan"),
                "top1_is_key0": float(np.mean([f == 0 for f in first])),
                "top1_kind": Counter(layout.label(f)["kind"] for f in first).most_common(1)[0][0],
            })
    return rows


# ---------------------------------------------------------------------------------------------
# Chapter 6's experiments: interventions over a disruption.Baseline, and sinks <-> massive channels
# ---------------------------------------------------------------------------------------------

CONTROLS = ("random", "bottom")  # the equal-budget controls of a sink intervention


def op_label(iv: KeyIntervention) -> str:
    """The table's "op" of an intervention: "score eta=0", "value_zero", "value_mean"."""
    return f"score eta={iv.eta:g}" if iv.path == "score" else iv.path


def window_label(iv: KeyIntervention) -> str:
    """The table's "window": which layers and steps, e.g. "all layers, all steps"."""
    if iv.layers is None:
        where = "all layers"
    elif isinstance(iv.layers, str) or len(iv.layers) == 1:
        where = iv.layers if isinstance(iv.layers, str) else iv.layers[0]
    else:
        where = f"{len(iv.layers)} layers"
    steps = probe.check_steps(iv.steps)
    when = "all steps" if steps is None else "steps " + ",".join(str(s) for s in sorted(steps))
    return f"{where}, {when}"


def run(base, interventions: Sequence[KeyIntervention], batch_size: int = 16, keep_images: int = 4):
    """Regenerate every unit of `base` (a `disruption.Baseline`) under each intervention.

    Returns a `disruption.Result` whose table has disruption's metric columns (pixel MSE and SSIM
    to the unit's baseline; the judge's attributes, cleanliness and mask IoU on organism captions;
    CLIP-T if the baseline has a CLIP) and condition = the intervention's name, kind = "sink" /
    "random" / "bottom", k, op = `op_label`, window = `window_label`: `disruption.summary` and
    `paired_ratios` below read it as they read chapter 2's; seed_keys is the random draw's seed.
    Baseline rows are included."""
    from mabook import disruption

    if not interventions:
        raise ValueError("interventions must be a non-empty list of KeyIntervention")
    for iv in interventions:
        if not isinstance(iv, KeyIntervention):
            raise TypeError(f"interventions must be KeyIntervention objects, got {type(iv).__name__}")
    labels = [f"{iv.name} | {window_label(iv)}" for iv in interventions]
    if len(set(labels)) != len(labels):
        raise ValueError("interventions must be distinct (keys, k, seed, path, eta, window); got duplicates")
    for iv in interventions:  # fail before generating: unknown layers, unsupported family
        _resolve_layers(base.adapter, iv.layers)
    table = [{**m, "condition": "baseline", "kind": "baseline", "k": 0, "op": "none", "window": "none"}
             for m in base.metrics]
    kept = {"baseline": base.images[:keep_images]}
    for iv, label in zip(interventions, labels):
        with intervene(base.adapter, iv):
            images = disruption._generate(base.adapter, base.units, base.num_inference_steps, batch_size, base.pipe_kwargs)
        for m in disruption._metrics(base, images):
            table.append({**m, "condition": iv.name, "kind": iv.keys, "k": iv.k, "op": op_label(iv),
                          "window": window_label(iv), "seed_keys": iv.seed})
        kept[label] = images[:keep_images]
    return disruption.Result(table, kept, list(interventions))


def paired_ratios(table: Sequence[dict], metric: str = "pixel_mse", controls: Sequence[str] = CONTROLS) -> list[dict]:
    """Per (op, window, k, control): mean sink damage / mean control damage over the same units,
    with a paired bootstrap 95 % CI (`disruption.paired_ratios` with treated="sink"; random key
    sets are averaged per unit first). Rows as disruption's, plus "op" and "window"."""
    from mabook import disruption

    out = []
    for op, win in dict.fromkeys((r["op"], r["window"]) for r in table if r["kind"] == "sink"):
        for r in disruption.paired_ratios(table, metric, controls, op=op, window=win, treated="sink"):
            out.append({**r, "op": op, "window": win})
    return out


def feeding_tap(adapter: Adapter, layer: str) -> probe.Tap:
    """The image-stream tap whose output enters attention `layer`: the previous block's output.

    The first block's attention reads the patch embedding, which no tap holds: refused."""
    _resolve_layers(adapter, [layer])
    index = next(i for i, b in enumerate(adapter.blocks) if layer.startswith(b.path + "."))
    if index == 0:
        raise ValueError(f"{layer} is in the first block: its input is the patch embedding, not a block output; "
                         "pick a later layer")
    return probe.Tap(adapter.blocks[index - 1].path, "img")


@dataclass
class SinkLink:
    """Per image token of each unit at one (layer, step): the massive channels' magnitude at the
    block output feeding the layer, and the token's incoming attention mass (mean over heads)."""

    layer: str
    tap: str
    step: int
    channels: list[int]
    magnitude: np.ndarray  # (units, image tokens): L2 norm over `channels` (|h| for one channel)
    mass: np.ndarray  # (units, image tokens): incoming mass on each image key, averaged over heads
    pearson: np.ndarray  # (units,) per-image correlations over tokens (nan if one side is constant)
    spearman: np.ndarray

    def summary(self) -> dict:
        """Mean per-image Pearson and Spearman with bootstrap 95 % CIs over images, and how often the
        image key with the most mass is the token with the largest magnitude (chance: 1 / tokens)."""
        from mabook.stats import bootstrap_ci

        out = {"layer": self.layer, "tap": self.tap, "step": self.step, "channels": list(self.channels)}
        for name in ("pearson", "spearman"):
            v = getattr(self, name)
            v = v[np.isfinite(v)]
            out[name] = float(v.mean()) if v.size else float("nan")
            out[f"{name}_ci"] = bootstrap_ci(v) if v.size > 1 else (float("nan"), float("nan"))
        match = self.mass.argmax(1) == self.magnitude.argmax(1)
        out["argmax_match"] = float(match.mean())
        out["chance"] = 1 / self.mass.shape[1]
        out["n_units"] = int(self.mass.shape[0])
        return out


def sink_activation_link(base, layers: str | Sequence[str] | None = None, step: int | None = None,
                         k_channels: int = 1, channels: dict[str, Sequence[int]] | None = None) -> dict[str, SinkLink]:
    """Sinks <-> massive activations, per layer: does an image token's incoming attention mass follow
    the magnitude of the massive channels in the hidden state that enters the attention?

    base: a `disruption.Baseline` (its units are regenerated one at a time, unedited, with the
    block outputs captured by `probe.collect(capture=...)` and the mass by `capture`, both on the
    conditional sample). layers: default every softmax layer with a feeding block (not the first).
    step: default the middle step. channels: {layer: channels}; default the top-`k_channels` by
    |mean over image tokens| of `base.stats` at the feeding tap."""
    from scipy.stats import pearsonr, spearmanr

    from mabook import disruption

    adapter = base.adapter
    chosen = _resolve_layers(adapter, layers)
    if layers is None:  # every layer but the first block's (no block output feeds it)
        chosen = [l for l in chosen if not l.startswith(adapter.blocks[0].path + ".")]
    step = base.num_inference_steps // 2 if step is None else step
    if not isinstance(step, (int, np.integer)) or isinstance(step, bool) or not 0 <= step < base.num_inference_steps:
        raise ValueError(f"step must be an int in [0, {base.num_inference_steps}), got {step!r}")
    taps = {l: feeding_tap(adapter, l) for l in chosen}
    picked = {}
    for l, tap in taps.items():
        if channels is not None and l in channels:
            picked[l] = [int(c) for c in channels[l]]
        else:
            abs_mean = base.stats.get("abs_mean", tap).cpu().numpy()
            picked[l] = [int(c) for c in np.argsort(-abs_mean, kind="stable")[:k_channels]]
    magnitude = {l: [] for l in chosen}
    mass = {l: [] for l in chosen}
    wanted = list(dict.fromkeys(taps.values()))
    for unit in base.units:
        with probe.collect(adapter, taps=wanted, steps=[step], capture=[(t, step) for t in wanted]) as run_, \
                capture(adapter, layers=chosen, steps=[step]) as cap:
            disruption._generate(adapter, [unit], base.num_inference_steps, 1, base.pipe_kwargs)
        for l in chosen:
            layout = cap.keys(l)
            h = run_.captured[(str(taps[l]), step)][-1].float()  # (image tokens, channels), the conditional sample
            if h.shape[0] != layout.image:
                raise ValueError(f"{taps[l]} has {h.shape[0]} tokens but {l} has {layout.image} image keys")
            magnitude[l].append(h[:, picked[l]].norm(dim=-1).numpy())
            mass[l].append(cap.mass(l, step)[:, layout.image_slice].mean(0).numpy())
    out = {}
    for l in chosen:
        m, a = np.stack(magnitude[l]).astype(np.float64), np.stack(mass[l]).astype(np.float64)
        pr, sr = [], []
        for x, y in zip(m, a):
            if np.ptp(x) == 0 or np.ptp(y) == 0:
                pr.append(np.nan), sr.append(np.nan)
                continue
            pr.append(float(pearsonr(x, y)[0]))
            sr.append(float(spearmanr(x, y)[0]))
        out[l] = SinkLink(l, str(taps[l]), int(step), picked[l], m, a, np.array(pr), np.array(sr))
    return out


def sink_shift(base, edits: dict[str, Sequence], layers: str | Sequence[str] | None = None, steps=None) -> list[dict]:
    """Do the sinks move when hidden-state channels are edited? For each unit of `base`, the top-1
    sink per (layer, step, head) is captured without edits and under each named list of
    `probe.Edit`s (e.g. zeroing the massive channels, or a random control).

    One row per (edit, unit, layer): top1_same (share of (step, head) whose top-1 key is unchanged),
    kind_same (its kind -- text / pad / image -- unchanged), sink_mass (the unedited top-1 mass),
    old_sink_mass (the mass the edited run gives the unedited top-1 key), edited_sink_mass."""
    from mabook import disruption

    if not isinstance(edits, dict) or not edits:
        raise ValueError("edits must be a non-empty dict {name: list of probe.Edit}")
    adapter = base.adapter
    chosen = _resolve_layers(adapter, layers)

    def top1(unit, edit_list):
        with capture(adapter, layers=chosen, steps=steps) as cap:
            if edit_list:
                with probe.edit(adapter, list(edit_list)):
                    disruption._generate(adapter, [unit], base.num_inference_steps, 1, base.pipe_kwargs)
            else:
                disruption._generate(adapter, [unit], base.num_inference_steps, 1, base.pipe_kwargs)
        return cap

    rows = []
    for unit in base.units:
        ref = top1(unit, None)
        for name, edit_list in edits.items():
            cap = top1(unit, edit_list)
            for l in chosen:
                kinds = ref.keys(l).kinds()
                same, kind_same, m0, m_old, m1 = [], [], [], [], []
                for l_, s in ref.captured:
                    if l_ != l:
                        continue
                    a, b = ref.mass(l, s), cap.mass(l, s)
                    ia, ib = a.argmax(-1), b.argmax(-1)
                    same.append((ia == ib).double().mean().item())
                    kind_same.append(float(np.mean(kinds[ia.numpy()] == kinds[ib.numpy()])))
                    m0.append(a.max(-1).values.mean().item())
                    m_old.append(b.gather(-1, ia[:, None]).mean().item())
                    m1.append(b.max(-1).values.mean().item())
                rows.append({"edit": name, "prompt": unit[0], "seed": unit[1], "layer": l,
                             "top1_same": float(np.mean(same)), "kind_same": float(np.mean(kind_same)),
                             "sink_mass": float(np.mean(m0)), "old_sink_mass": float(np.mean(m_old)),
                             "edited_sink_mass": float(np.mean(m1))})
    return rows
