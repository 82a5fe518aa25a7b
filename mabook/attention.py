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

Capturing never changes the output: the original processor computes it (SDPA, bit-identical
images) and the probabilities are recomputed on the side from the same q and k, only at the layers
and steps asked, chunked over queries and summed on the fly, so memory holds one chunk of scores
and one (heads, keys) accumulator per (layer, step). Intervening replaces the processor's
attention by an explicit softmax over the same q, k, v (the projections are copied from diffusers'
FluxAttnProcessor, JointAttnProcessor2_0 and AttnProcessor2_0), so eta=1 equals the stock output
up to float rounding. The score path's dose is the paper's by default: a chosen key keeps exactly
eta * p and the other keys absorb the difference in proportion (`KeyIntervention.dose`).

What this is not: the chapter's experiment (`mabook.sinks`: reading captures, interventions over
a baseline, sinks <-> massive channels); nor a general attention-editing library. SANA's self-attention is linear (no
softmax, hence no probability mass to sink into): it is refused with an error. Attention masks
and cross-attention are refused too.
"""

from __future__ import annotations

import inspect
import math
import zlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from mabook import probe
from mabook.models import Adapter

SELECTIONS = ("sink", "random", "bottom")  # which keys an intervention hits
PATHS = ("score", "value_zero", "value_mean")  # how it hits them
DOSES = ("redistribute", "renormalise")  # how the score path applies eta (see KeyIntervention)
CFG_MODES = probe.CFG_MODES
SOFTMAX_FAMILIES = ("organism", "flux", "sd3", "pixart")
# Scores held at once while computing probabilities: chunk of queries x keys x heads x batch. 2**24
# float32 elements is 64 MiB (the softmax holds two or three such buffers): at FLUX-1024^2 shapes
# (4608 keys, 24 heads, CFG batch 2) ~150 queries a chunk, against 3.9 GiB for every probability at
# once. Read when a context or function is called (pass chunk_elements, or patch this constant).
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


def resolve_layers(adapter: Adapter, chosen) -> list[str]:
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
        from diffusers.models.embeddings import apply_rotary_emb  # deferred: diffusers' models take ~5 s to import; only FLUX needs it

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


def _chunk_elements(chunk_elements: int | None) -> int:
    """The chunk size to use: `chunk_elements`, or the module's CHUNK_ELEMENTS read now (patchable)."""
    chunk_elements = CHUNK_ELEMENTS if chunk_elements is None else chunk_elements
    if not isinstance(chunk_elements, (int, np.integer)) or isinstance(chunk_elements, bool) or chunk_elements < 1:
        raise ValueError(f"chunk_elements must be an int >= 1 (or None: CHUNK_ELEMENTS), got {chunk_elements!r}")
    return int(chunk_elements)


def _chunk(q: torch.Tensor, num_keys: int, chunk_elements: int) -> int:
    """Queries per chunk: as many as fit in `chunk_elements` scores (at least one)."""
    B, H = q.shape[:2]
    return max(1, chunk_elements // max(1, B * H * num_keys))


def _scores(q_chunk: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """q k^T / sqrt(head_dim) in float32 (SDPA's default scale, as every copied processor uses):
    (batch_size, heads, queries of the chunk, keys)."""
    scale = q_chunk.shape[-1] ** -0.5
    return (q_chunk.float() @ key.float().transpose(-1, -2)) * scale


def _scaled(scores: torch.Tensor, chosen: torch.Tensor, eta: float, dose: str) -> torch.Tensor:
    """Post-intervention probabilities (batch_size, heads, queries, keys) float32 from `scores` of
    the same shape (overwritten), with the chosen keys (batch_size, heads, k) scaled by eta.

    "redistribute" (the paper's rule): each chosen key keeps exactly eta * p; the other keys absorb
    the removed (1 - eta) * P_chosen in proportion to their probabilities, i.e. all are multiplied by
    one factor 1 + (1 - eta) * P_chosen / P_others, P_others taken from their own logsumexp (not
    1 - P_chosen: exact in float32 also when the chosen keys hold nearly the whole row).
    "renormalise": the chosen keys' probability is multiplied by eta and the row renormalised (a
    log(eta) logit bias): a chosen key keeps eta * p / (1 - P_chosen + eta * P_chosen).
    eta = 0 is the paper's -1e4 logit bias under both rules (-inf here: exactly 0, and never NaN,
    since at least one key is not chosen)."""
    if eta == 1:
        return torch.softmax(scores, -1)
    index = chosen[:, :, None, :].expand(*scores.shape[:3], chosen.shape[-1])
    if eta == 0 or dose == "renormalise":
        bias = math.log(eta) if eta > 0 else float("-inf")
        return torch.softmax(scores.scatter_(3, index, scores.gather(3, index) + bias), -1)
    total = torch.logsumexp(scores, -1, keepdim=True)
    kept = torch.exp(scores.gather(3, index) - total)  # the chosen keys' unedited probabilities
    scores.scatter_(3, index, float("-inf"))
    others = torch.exp(torch.logsumexp(scores, -1, keepdim=True) - total)  # P_others, from their own sum
    p = torch.softmax(scores, -1)  # the other keys' share among themselves; 0 at the chosen keys
    p *= others + (1 - eta) * kept.sum(-1, keepdim=True)
    return p.scatter_(3, index, eta * kept)


def image_query_mass(query: torch.Tensor, key: torch.Tensor, image: slice, chunk_elements: int | None = None) -> torch.Tensor:
    """Incoming mass per key averaged over the image queries: (batch_size, heads, keys) float32.

    query, key: (batch_size, heads, tokens, head_dim); image: the image queries' positions.
    chunk_elements: scores held at once (None: CHUNK_ELEMENTS)."""
    chunk_elements = _chunk_elements(chunk_elements)
    B, H, S, _ = key.shape
    total = torch.zeros(B, H, S, dtype=torch.float32, device=key.device)
    step = _chunk(query, S, chunk_elements)
    for start in range(image.start, image.stop, step):
        total += torch.softmax(_scores(query[:, :, start:min(image.stop, start + step)], key), -1).sum(2)
    return total / (image.stop - image.start)


@dataclass(frozen=True)
class _Edit:
    """One intervention's keys at one attention call: chosen (batch_size, heads, k) on `path`."""

    chosen: torch.Tensor
    path: str
    eta: float = 0.0
    dose: str = "redistribute"


def _attention(query, key, value, edits: Sequence[_Edit] = (), chunk_elements: int | None = None,
               image: slice | None = None, keep: bool = False):
    """Explicit softmax attention with at most one score-path and one value-path edit.

    query, key, value: (batch_size, heads, tokens, head_dim). Value-path edits replace the chosen
    keys' value rows (only those) by zero / the mean value over all keys of the head; the
    score-path edit scales the chosen keys' probabilities (`_scaled`). Returns (out, mass, probs):
    out (batch_size, heads, queries, head_dim) in query's dtype; mass (batch_size, heads, keys)
    float32, the post-intervention probabilities averaged over the `image` queries (None without
    `image`); probs (batch_size, heads, queries, keys) float32, every post-intervention probability
    (None unless `keep`)."""
    chunk_elements = _chunk_elements(chunk_elements)
    B, H, S, D = key.shape
    Q = query.shape[2]
    score = [e for e in edits if e.path == "score"]
    values = [e for e in edits if e.path != "score"]
    if len(score) > 1 or len(values) > 1:
        raise ValueError(f"at most one score-path and one value-path edit per attention call, got "
                         f"{[e.path for e in edits]}")
    for e in values:  # the chosen keys still receive their attention, but carry zero / the mean value
        replacement = torch.zeros_like(value) if e.path == "value_zero" else value.mean(2, keepdim=True).expand_as(value)
        index = e.chosen[..., None].expand(B, H, e.chosen.shape[-1], D)
        value = value.scatter(2, index, replacement.gather(2, index))
    value = value.float()
    out = torch.empty(B, H, Q, D, dtype=torch.float32, device=query.device)
    mass = torch.zeros(B, H, S, dtype=torch.float32, device=key.device) if image is not None else None
    probs = torch.empty(B, H, Q, S, dtype=torch.float32, device=key.device) if keep else None
    step = _chunk(query, S, chunk_elements)
    for start in range(0, Q, step):
        stop = min(Q, start + step)
        scores = _scores(query[:, :, start:stop], key)
        p = _scaled(scores, score[0].chosen, score[0].eta, score[0].dose) if score else torch.softmax(scores, -1)
        out[:, :, start:stop] = p @ value
        if mass is not None:
            lo, hi = max(start, image.start), min(stop, image.stop)
            if lo < hi:
                mass += p[:, :, lo - start:hi - start].sum(2)
        if probs is not None:
            probs[:, :, start:stop] = p
    if mass is not None:
        mass /= image.stop - image.start
    return out.to(query.dtype), mass, probs


def attend(query, key, value, chosen: torch.Tensor, path: str, eta: float, chunk_elements: int | None = None,
           dose: str = "redistribute") -> torch.Tensor:
    """Attention with the chosen keys (batch_size, heads, k) suppressed on one path; (B, H, queries, D)."""
    return _attention(query, key, value, [_Edit(chosen, path, float(eta), dose)], chunk_elements)[0]


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
# The processor and the swap (the one place that replaces and restores processors)
# ---------------------------------------------------------------------------------------------


def _chain(processor) -> list["_Processor"]:
    """The mabook processors stacked on one module, outermost (the module's processor) first."""
    out = []
    while isinstance(processor, _Processor):
        out.append(processor)
        processor = processor.original
    return out


class _Processor:
    """Stands in for one module's processor. Contexts nest: each wraps the processor it found, and
    the module's processor (the outermost) serves every context stacked under it in one pass: the
    captures record the mass before and after every active intervention's edit, and the output is
    the stock processor's unless an intervention is active at this call."""

    def __init__(self, swap: "_Swap", layer: str, kind: str, original):
        self.swap, self.layer, self.kind, self.original = swap, layer, kind, original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        # FluxAttention passes image_rotary_emb positionally after attention_mask; Attention passes keywords
        image_rotary_emb = args[0] if args else kwargs.get("image_rotary_emb")
        chain = _chain(self)
        stock = chain[-1].original
        active = [p for p in chain if p.swap.active(p.layer)]
        if not active:
            return stock(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        if attention_mask is not None:
            raise ValueError(f"attention masks are not supported by mabook.attention (one reached {self.layer})")
        captures = [p for p in active if isinstance(p.swap, Capture)]
        edits = [p for p in active if isinstance(p.swap, Intervention)]
        with torch.no_grad():  # measurements and edits only: nothing here is meant to be differentiated
            query, key, value = _qkv(self.kind, attn, hidden_states, encoder_hidden_states, image_rotary_emb)
            layouts = [p.swap.layout(self.kind, key.shape[2], encoder_hidden_states) for p in active]
            image = layouts[0].image_slice
            if not edits:  # capturing only: the stock processor computes the output
                for p, layout in zip(active, layouts):
                    p.swap.observe(p.layer, layout, query, key, value)
                return stock(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
            chunk_elements = min(p.swap.chunk_elements for p in active)
            before = image_query_mass(query, key, image, chunk_elements)  # every sample: sinks are per sample
            chosen = [p.swap.choose(p.layer, before) for p in edits]
            keep = any(p.swap.keep_probabilities for p in captures)
            out, after, probs = _attention(query, key, value, chosen, chunk_elements, image if captures else None, keep)
            hit = torch.zeros_like(before, dtype=torch.bool)
            for e in chosen:
                hit.scatter_(-1, e.chosen, True)
            for p, layout in zip(active, layouts):
                if isinstance(p.swap, Capture):
                    p.swap.record(p.layer, layout, before, after, probs, hit)
            return _finish(self.kind, attn, out, hidden_states, encoder_hidden_states)


def _overlap(a, b) -> bool:
    """Whether two step selections (None: all) share a step."""
    return a is None or b is None or bool(set(a) & set(b))


class _Swap:
    """Swaps processors on `layers` for the length of a `with` block, and knows where the pipeline is.

    On a clean exit it refuses asked-for steps, and explicitly asked-for layers, that never ran."""

    verb = "swap"

    def __init__(self, adapter: Adapter, layers, steps, cfg: str, chunk_elements: int | None):
        if cfg not in CFG_MODES:
            raise ValueError(f"unknown cfg {cfg!r}; allowed: {list(CFG_MODES)}")
        self.adapter, self.cfg, self.chunk_elements = adapter, cfg, _chunk_elements(chunk_elements)
        self.layers = resolve_layers(adapter, layers)
        self._layers_asked = layers is not None
        self.steps = probe.check_steps(steps)
        self.pad_from: int | None = None
        self.layers_ran: set[str] = set()  # layers whose attention ran at an asked step
        self._call: dict = {}
        self._installed: dict[str, _Processor] = {}
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

    def _check_nesting(self, modules) -> None:
        """Refuse what cannot be stacked on the processors already swapped in (see Intervention)."""

    def __enter__(self):
        modules = self.adapter.attention_modules()
        self._check_nesting(modules)
        try:
            self._hooks = probe.Hooks(self.adapter, lambda *a: None, taps=[])
            self._hooks.__enter__()
            self._handle = self.adapter.transformer.register_forward_pre_hook(self._pre_transformer, with_kwargs=True)
            for path in self.layers:
                module = modules[path]
                processor = _Processor(self, path, _kind(module), module.processor)
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
                for p in _chain(module.processor):
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


# ---------------------------------------------------------------------------------------------
# Capture: incoming mass per key, per (layer, step, head)
# ---------------------------------------------------------------------------------------------


class Capture(_Swap):
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
            _, mass, probs = _attention(query[chosen], key[chosen], value[chosen], (), self.chunk_elements,
                                        layout.image_slice, keep=True)
        else:
            mass, probs = image_query_mass(query[chosen], key[chosen], layout.image_slice, self.chunk_elements), None
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
    scores held at once (None: CHUNK_ELEMENTS). keep_probabilities: also keep every probability (small
    models only). Nested inside `intervene()`, it also records the mass after the edit
    (`Capture.mass_after`, `suppression`); `intervene()` cannot be entered inside a capture."""
    return Capture(adapter, layers, steps, cfg, chunk_elements, keep_probabilities)


# ---------------------------------------------------------------------------------------------
# Intervene
# ---------------------------------------------------------------------------------------------


class Intervention(_Swap):
    """`with intervene(adapter, KeyIntervention(...)): pipe(...)`. `chosen[(layer, step)]` holds the
    last call's suppressed keys (batch_size, heads, k), for inspection.

    Nesting: one score-path and one value-path intervention combine (the paper's combination): at a
    layer and step where both act, the keys of each are chosen from the unedited mass, the value
    rows are replaced and the probabilities scaled in one attention. Two score-path (or two
    value-path) interventions on the same layer and step are refused, and so is an intervention
    entered inside a capture (enter the capture inside it: it then sees the mass before and after)."""

    verb = "intervene"

    def __init__(self, adapter: Adapter, intervention: KeyIntervention, chunk_elements: int | None = None):
        if not isinstance(intervention, KeyIntervention):
            raise TypeError(f"intervention must be a KeyIntervention, got {type(intervention).__name__}")
        super().__init__(adapter, intervention.layers, intervention.steps, "both", chunk_elements)
        self.intervention = intervention
        self.chosen: dict[tuple[str, int], torch.Tensor] = {}

    def _check_nesting(self, modules) -> None:
        mine = "score" if self.intervention.path == "score" else "value"
        for path in self.layers:
            for p in _chain(modules[path].processor):
                if isinstance(p.swap, Capture):
                    raise ValueError("enter attention.intervene() outside attention.capture(), not inside it")
                other = p.swap.intervention
                if ("score" if other.path == "score" else "value") == mine and _overlap(self.steps, p.swap.steps):
                    raise ValueError(f"cannot nest two {mine}-path interventions on {path} at the same steps "
                                     f"({other.name} and {self.intervention.name}); one score-path and one value-path "
                                     "intervention combine")

    def choose(self, layer: str, mass: torch.Tensor) -> _Edit:
        """This intervention's keys at this call from the unedited mass (batch_size, heads, keys)."""
        iv = self.intervention
        chosen = _choose(iv, mass, layer, self.step)
        self.chosen[(layer, self.step)] = chosen.cpu()
        return _Edit(chosen, iv.path, float(iv.eta), iv.dose)


def intervene(adapter: Adapter, intervention: KeyIntervention, chunk_elements: int | None = None) -> Intervention:
    """Context manager suppressing keys as `intervention` says (its layers and steps).

    chunk_elements: scores held at once (None: CHUNK_ELEMENTS). Nest a score-path and a value-path
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
