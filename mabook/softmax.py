"""Explicit softmax attention, chunked over queries, with key edits; the projections around it.

This is the arithmetic behind `mabook.attention` (capture and intervene), kept apart from the
processor swap so that it can be read, tested and timed on plain tensors (`mabook.bench attention`).

* `qkv` / `finish`: the part of each supported diffusers processor before and after attention,
  copied from diffusers 0.42 (FluxAttnProcessor, JointAttnProcessor2_0, AttnProcessor2_0); `kind`
  names the key layout ("flux_double", "flux_single", "joint", "self": `mabook.processors.kind_of`).
* `image_query_mass`: each key's incoming attention mass averaged over the image queries, chunked
  over queries and summed on the fly (memory holds one chunk of scores).
* `attention` / `attend`: explicit softmax attention with at most one score-path `Edit` (the
  chosen keys' probabilities scaled by eta, `scaled_probabilities`) and one value-path `Edit` (the
  chosen keys' value rows replaced by zero or the mean value); eta=1 equals SDPA up to rounding.

Scores are float32 and scaled by 1/sqrt(head_dim), SDPA's default, as every copied processor uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

# Scores held at once while computing probabilities: chunk of queries x keys x heads x batch. 2**24
# float32 elements is 64 MiB (the softmax holds two or three such buffers): at FLUX-1024^2 shapes
# (4608 keys, 24 heads, CFG batch 2) ~150 queries a chunk, against 3.9 GiB for every probability at
# once. Read when a context or function is called (pass chunk_elements, or patch this constant).
CHUNK_ELEMENTS = 2**24


# ---------------------------------------------------------------------------------------------
# Projections copied from diffusers 0.42 (the part of each processor before and after attention)
# ---------------------------------------------------------------------------------------------


def qkv(kind: str, attn, hidden_states, encoder_hidden_states, image_rotary_emb):
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


def finish(kind: str, attn, out, hidden_states, encoder_hidden_states):
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


def check_chunk_elements(chunk_elements: int | None) -> int:
    """The chunk size to use: `chunk_elements`, or the module's CHUNK_ELEMENTS read now (patchable)."""
    chunk_elements = CHUNK_ELEMENTS if chunk_elements is None else chunk_elements
    if not isinstance(chunk_elements, (int, np.integer)) or isinstance(chunk_elements, bool) or chunk_elements < 1:
        raise ValueError(f"chunk_elements must be an int >= 1 (or None: CHUNK_ELEMENTS), got {chunk_elements!r}")
    return int(chunk_elements)


def queries_per_chunk(q: torch.Tensor, num_keys: int, chunk_elements: int) -> int:
    """Queries per chunk: as many as fit in `chunk_elements` scores (at least one)."""
    B, H = q.shape[:2]
    return max(1, chunk_elements // max(1, B * H * num_keys))


def logits(q_chunk: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """q k^T / sqrt(head_dim) in float32 (SDPA's default scale, as every copied processor uses):
    (batch_size, heads, queries of the chunk, keys)."""
    scale = q_chunk.shape[-1] ** -0.5
    return (q_chunk.float() @ key.float().transpose(-1, -2)) * scale


def scaled_probabilities(scores: torch.Tensor, chosen: torch.Tensor, eta: float, dose: str) -> torch.Tensor:
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
    chunk_elements = check_chunk_elements(chunk_elements)
    B, H, S, _ = key.shape
    total = torch.zeros(B, H, S, dtype=torch.float32, device=key.device)
    step = queries_per_chunk(query, S, chunk_elements)
    for start in range(image.start, image.stop, step):
        total += torch.softmax(logits(query[:, :, start:min(image.stop, start + step)], key), -1).sum(2)
    return total / (image.stop - image.start)


@dataclass(frozen=True)
class Edit:
    """One intervention's keys at one attention call: chosen (batch_size, heads, k) on `path`."""

    chosen: torch.Tensor
    path: str
    eta: float = 0.0
    dose: str = "redistribute"


def attention(query, key, value, edits: Sequence[Edit] = (), chunk_elements: int | None = None,
               image: slice | None = None, keep: bool = False):
    """Explicit softmax attention with at most one score-path and one value-path edit.

    query, key, value: (batch_size, heads, tokens, head_dim). Value-path edits replace the chosen
    keys' value rows (only those) by zero / the mean value over all keys of the head; the
    score-path edit scales the chosen keys' probabilities (`scaled_probabilities`). Returns (out, mass, probs):
    out (batch_size, heads, queries, head_dim) in query's dtype; mass (batch_size, heads, keys)
    float32, the post-intervention probabilities averaged over the `image` queries (None without
    `image`); probs (batch_size, heads, queries, keys) float32, every post-intervention probability
    (None unless `keep`)."""
    chunk_elements = check_chunk_elements(chunk_elements)
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
    step = queries_per_chunk(query, S, chunk_elements)
    for start in range(0, Q, step):
        stop = min(Q, start + step)
        scores = logits(query[:, :, start:stop], key)
        p = scaled_probabilities(scores, score[0].chosen, score[0].eta, score[0].dose) if score else torch.softmax(scores, -1)
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
    return attention(query, key, value, [Edit(chosen, path, float(eta), dose)], chunk_elements)[0]

