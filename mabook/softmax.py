"""Explicit softmax attention, chunked over queries, with key edits; the projections around it.

This is the arithmetic behind `mabook.attention` (capture and intervene), kept apart from the
processor swap so that it can be read, tested and timed on plain tensors (`mabook.bench attention`).

* `qkv` / `finish`: the part of each supported diffusers processor before and after attention,
  copied from diffusers 0.42 (FluxAttnProcessor, JointAttnProcessor2_0, AttnProcessor2_0); `kind`
  names the key layout ("flux_double", "flux_single", "joint", "self": `mabook.processors.kind_of`).
* `image_query_mass`: each key's incoming attention mass averaged over the image queries, chunked
  over queries and summed on the fly (memory holds one chunk of scores).
* `attention`: explicit softmax attention with at most one score-path `Edit` (the chosen keys'
  probabilities scaled by eta, `scaled_probabilities`) and one value-path `Edit` (the chosen keys'
  value rows replaced by zero or the mean value); eta=1 equals SDPA up to rounding. It gives every
  post-edit probability (what a capture nested in an intervention records).
* `edited_attention` / `attend`: the same output from one fused SDPA call: the chosen keys get a
  finite bias no logit survives (`suppress_bias`: the paper's -1e4 logit bias, made exact; finite,
  it cannot make a NaN) and, for 0 < eta < 1 under the paper's dose, their eta * p is added back
  from each query's logsumexp (`image_query_mass(..., lse=True)` gives it from the score pass the
  sinks are chosen with). What an intervention's output costs: that one score pass and SDPA
  (`mabook.processors`).
* `stock_attention`: SDPA called exactly as the copied processor calls it (bit-identical output).

Scores are float32 and scaled by 1/sqrt(head_dim), SDPA's default, as every copied processor uses.
Key and value are cast to float32 once per call, outside the chunk loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

# Scores held at once while computing probabilities: chunk of queries x keys x heads x batch. 2**23
# float32 elements is 32 MiB (a score pass holds two such buffers, `Scratch`): at FLUX-1024^2 shapes
# (4608 keys, 24 heads, CFG batch 2) ~75 queries a chunk, against 3.9 GiB for every probability at
# once. Read when a context or function is called (pass chunk_elements, or patch this constant).
# (2**24 before issue 23: on a CPU with a 32 MiB cache, 2**23 makes a score pass ~15% cheaper.)
CHUNK_ELEMENTS = 2**23


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


def copies_stock(kind: str, attn, hidden_states) -> bool:
    """Whether `qkv` and `finish` reproduce the stock processor at this call exactly (AttnProcessor2_0
    also has a spatial norm, a group norm and image-shaped inputs, which they do not copy)."""
    if kind != "self":
        return True
    return attn.spatial_norm is None and attn.group_norm is None and hidden_states.ndim == 3


def stock_attention(kind: str, processor, query, key, value) -> torch.Tensor:
    """The attention output (batch_size, heads, queries, head_dim) computed from q, k, v exactly as
    the stock `processor` computes it (so `finish` of it is the stock output, bit for bit): FLUX's
    through diffusers' attention dispatch with the processor's backend, the others through SDPA."""
    if kind in ("flux_double", "flux_single"):
        from diffusers.models.attention_dispatch import dispatch_attention_fn  # deferred, as apply_rotary_emb

        out = dispatch_attention_fn(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=None,
                                    backend=processor._attention_backend, parallel_config=processor._parallel_config)
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)


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


def logits(q_chunk: torch.Tensor, key: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """q k^T / sqrt(head_dim) in float32 (SDPA's default scale, as every copied processor uses):
    (batch_size, heads, queries of the chunk, keys), written into `out` if given (a `scratch` view),
    scaled in place. Callers looping over chunks pass `key` cast to float32 once (`.float()` of a
    float32 tensor is the tensor itself: no copy per chunk)."""
    scale = q_chunk.shape[-1] ** -0.5
    return torch.matmul(q_chunk.float(), key.float().transpose(-1, -2), out=out).mul_(scale)


class Scratch:
    """Float32 buffers for one chunk's scores and probabilities, allocated once per call and reused by
    every chunk: on the CPU a fresh 32 MiB tensor per chunk is a fresh mmap, paid in page faults (it
    doubled the cost of a score pass); on CUDA it spares the allocator. `view(i, shape)` is buffer i
    seen as a contiguous (batch_size, heads, queries, keys) tensor (a chunk may be shorter)."""

    def __init__(self, count: int, B: int, H: int, rows: int, S: int, device):
        self.buffers = [torch.empty(B * H * max(rows, 0) * S, dtype=torch.float32, device=device) for _ in range(count)]

    def view(self, i: int, shape: tuple[int, ...]) -> torch.Tensor:
        return self.buffers[i][: math.prod(shape)].view(shape)


def scaled_probabilities(scores: torch.Tensor, chosen: torch.Tensor, eta: float, dose: str,
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """Post-intervention probabilities (batch_size, heads, queries, keys) float32 from `scores` of
    the same shape (overwritten), with the chosen keys (batch_size, heads, k) scaled by eta.

    "redistribute" (the paper's rule): each chosen key keeps exactly eta * p; the other keys absorb
    the removed (1 - eta) * P_chosen in proportion to their probabilities, i.e. all are multiplied by
    one factor 1 + (1 - eta) * P_chosen / P_others, P_others taken from their own logsumexp (not
    1 - P_chosen: exact in float32 also when the chosen keys hold nearly the whole row).
    "renormalise": the chosen keys' probability is multiplied by eta and the row renormalised (a
    log(eta) logit bias): a chosen key keeps eta * p / (1 - P_chosen + eta * P_chosen).
    eta = 0 is the paper's -1e4 logit bias under both rules (-inf here: exactly 0, and never NaN,
    since at least one key is not chosen).

    A query with all its mass on the chosen keys (the others' probabilities underflow to 0, a
    logit gap above ~104 in float32): the others' shares among themselves come from their own
    softmax, which stays defined (their logits are finite), so the freed (1 - eta) * P_chosen goes
    to them in proportion to exp(logit), the limit of the exact rule, and equals what the -1e4 bias
    gives at eta = 0. Rows stay finite and sum to 1; nothing here divides by P_others."""
    if eta == 1:
        return torch.softmax(scores, -1, out=out)
    index = chosen[:, :, None, :].expand(*scores.shape[:3], chosen.shape[-1])
    if eta == 0 or dose == "renormalise":
        bias = math.log(eta) if eta > 0 else float("-inf")
        return torch.softmax(scores.scatter_(3, index, scores.gather(3, index) + bias), -1, out=out)
    total = torch.logsumexp(scores, -1, keepdim=True)
    kept = torch.exp(scores.gather(3, index) - total)  # the chosen keys' unedited probabilities
    scores.scatter_(3, index, float("-inf"))
    others = torch.exp(torch.logsumexp(scores, -1, keepdim=True) - total)  # P_others, from their own sum
    p = torch.softmax(scores, -1, out=out)  # the other keys' share among themselves; 0 at the chosen keys
    p *= others + (1 - eta) * kept.sum(-1, keepdim=True)
    return p.scatter_(3, index, eta * kept)


def image_query_mass(query: torch.Tensor, key: torch.Tensor, image: slice, chunk_elements: int | None = None,
                     lse: bool = False):
    """Incoming mass per key averaged over the image queries: (batch_size, heads, keys) float32.

    query, key: (batch_size, heads, tokens, head_dim); image: the image queries' positions.
    chunk_elements: scores held at once (None: CHUNK_ELEMENTS). lse: also return every query's
    logsumexp of its scores, (batch_size, heads, queries) float32 (then every query is scored, the
    text queries too; the mass is the same), read off the softmax (`row_logsumexp`)."""
    chunk_elements = check_chunk_elements(chunk_elements)
    B, H, S, _ = key.shape
    Q = query.shape[2]
    key = key.float()  # once, not per chunk
    total = torch.zeros(B, H, S, dtype=torch.float32, device=key.device)
    out = torch.empty(B, H, Q, dtype=torch.float32, device=key.device) if lse else None
    step = queries_per_chunk(query, S, chunk_elements)
    scratch = Scratch(2, B, H, min(step, max(image.stop - image.start, Q - image.stop + image.start if lse else 0)), S,
                      key.device)
    for start in range(image.start, image.stop, step):  # the image queries, chunked as without lse: the same mass
        stop = min(image.stop, start + step)
        shape = (B, H, stop - start, S)
        scores = logits(query[:, :, start:stop], key, scratch.view(0, shape))
        p = torch.softmax(scores, -1, out=scratch.view(1, shape))
        total += p.sum(2)
        if out is not None:
            out[:, :, start:stop] = row_logsumexp(scores, p)
    if out is not None:  # the other (text) queries: their logsumexp only
        query_logsumexp(query, key, chunk_elements, slice(0, image.start), out, scratch)
        query_logsumexp(query, key, chunk_elements, slice(image.stop, Q), out, scratch)
    mass = total / (image.stop - image.start)
    return (mass, out) if lse else mass


def row_logsumexp(scores: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Each row's logsumexp from its scores and their softmax p: p at the row's max is exp(0) / sum,
    so lse = max + log(sum) = max(scores) - log(max(p)) (two max passes: ~10x cheaper on the CPU than
    torch.logsumexp, which allocates two score-sized temporaries; within float32 rounding of it)."""
    return scores.amax(-1) - p.amax(-1).log()


def query_logsumexp(query: torch.Tensor, key: torch.Tensor, chunk_elements: int | None = None, rows: slice | None = None,
                    out: torch.Tensor | None = None, scratch: Scratch | None = None) -> torch.Tensor:
    """Each query's logsumexp of its float32 scores: (batch_size, heads, queries) float32, written
    into `out` at `rows` (default: every query into a new tensor), chunked over queries."""
    chunk_elements = check_chunk_elements(chunk_elements)
    B, H, S, _ = key.shape
    Q = query.shape[2]
    rows = slice(0, Q) if rows is None else rows
    out = torch.empty(B, H, Q, dtype=torch.float32, device=key.device) if out is None else out
    key = key.float()
    step = queries_per_chunk(query, S, chunk_elements)
    scratch = scratch or Scratch(2, B, H, min(step, rows.stop - rows.start), S, key.device)
    for start in range(rows.start, rows.stop, step):
        stop = min(rows.stop, start + step)
        shape = (B, H, stop - start, S)
        scores = logits(query[:, :, start:stop], key, scratch.view(0, shape))
        out[:, :, start:stop] = row_logsumexp(scores, torch.softmax(scores, -1, out=scratch.view(1, shape)))
    return out


@dataclass(frozen=True)
class Edit:
    """One intervention's keys at one attention call: chosen (batch_size, heads, k) on `path`."""

    chosen: torch.Tensor
    path: str
    eta: float = 0.0
    dose: str = "redistribute"


def split_edits(edits: Sequence[Edit]) -> tuple[Edit | None, Edit | None]:
    """(the score-path edit, the value-path edit), each None if absent; more than one of a kind is refused."""
    score = [e for e in edits if e.path == "score"]
    values = [e for e in edits if e.path != "score"]
    if len(score) > 1 or len(values) > 1:
        raise ValueError(f"at most one score-path and one value-path edit per attention call, got "
                         f"{[e.path for e in edits]}")
    return (score[0] if score else None), (values[0] if values else None)


def needs_logsumexp(path: str, eta: float, dose: str) -> bool:
    """Whether `edited_attention` needs each query's logsumexp for this edit: the paper's dose at 0 < eta < 1
    (it adds eta * p back to the chosen keys; eta = 0 and 1 and the value path are one SDPA call each)."""
    return path == "score" and dose == "redistribute" and 0 < eta < 1


def edited_values(value: torch.Tensor, edit: Edit | None) -> torch.Tensor:
    """value with the chosen keys' rows (only those) replaced by zero / the mean value over all keys of the head."""
    if edit is None:
        return value
    B, H, _, D = value.shape
    replacement = torch.zeros_like(value) if edit.path == "value_zero" else value.mean(2, keepdim=True).expand_as(value)
    index = edit.chosen[..., None].expand(B, H, edit.chosen.shape[-1], D)
    return value.scatter(2, index, replacement.gather(2, index))


def attention(query, key, value, edits: Sequence[Edit] = (), chunk_elements: int | None = None,
               image: slice | None = None, keep: bool = False, output: bool = True):
    """Explicit softmax attention with at most one score-path and one value-path edit.

    query, key, value: (batch_size, heads, tokens, head_dim). Value-path edits replace the chosen
    keys' value rows (only those) by zero / the mean value over all keys of the head; the
    score-path edit scales the chosen keys' probabilities (`scaled_probabilities`). Returns (out, mass, probs):
    out (batch_size, heads, queries, head_dim) in query's dtype (None when not `output`: the
    probabilities only); mass (batch_size, heads, keys) float32, the post-intervention probabilities
    averaged over the `image` queries (None without `image`); probs (batch_size, heads, queries, keys)
    float32, every post-intervention probability (None unless `keep`)."""
    chunk_elements = check_chunk_elements(chunk_elements)
    B, H, S, D = key.shape
    Q = query.shape[2]
    score, values = split_edits(edits)
    key = key.float()  # once, not per chunk
    value = edited_values(value, values).float() if output else None
    out = torch.empty(B, H, Q, D, dtype=torch.float32, device=query.device) if output else None
    mass = torch.zeros(B, H, S, dtype=torch.float32, device=key.device) if image is not None else None
    probs = torch.empty(B, H, Q, S, dtype=torch.float32, device=key.device) if keep else None
    step = queries_per_chunk(query, S, chunk_elements)
    scratch = Scratch(1 if keep else 2, B, H, min(step, Q), S, key.device)
    for start in range(0, Q, step):
        stop = min(Q, start + step)
        if not output and not keep and image is not None and (stop <= image.start or start >= image.stop):
            continue  # nothing of this chunk is asked for
        shape = (B, H, stop - start, S)
        scores = logits(query[:, :, start:stop], key, scratch.view(0, shape))
        p_out = None if keep else scratch.view(1, shape)  # kept probabilities are each chunk's own tensor
        p = (scaled_probabilities(scores, score.chosen, score.eta, score.dose, p_out) if score
             else torch.softmax(scores, -1, out=p_out))
        if out is not None:
            out[:, :, start:stop] = p @ value
        if mass is not None:
            lo, hi = max(start, image.start), min(stop, image.stop)
            if lo < hi:
                mass += p[:, :, lo - start:hi - start].sum(2)
        if probs is not None:
            probs[:, :, start:stop] = p
    if mass is not None:
        mass /= image.stop - image.start
    return (None if out is None else out.to(query.dtype)), mass, probs


def suppress_bias(dtype: torch.dtype) -> float:
    """The bias the chosen keys' logits get in SDPA's mask: the most negative finite value of `dtype`.
    exp(logit + bias - max) is exactly 0 for any logit (the paper's -1e4 gives 0 for logit gaps up to
    ~9900), and, finite, it cannot make a NaN, also where a kernel sees a block of suppressed keys
    only (-inf there would give exp(-inf + inf))."""
    return torch.finfo(dtype).min


def edited_attention(query, key, value, edits: Sequence[Edit] = (), lse: torch.Tensor | None = None,
                     chunk_elements: int | None = None) -> torch.Tensor:
    """What `attention` outputs, from one fused SDPA call (batch_size, heads, queries, head_dim) in query's dtype.

    The value-path edit replaces the chosen value rows. A score-path edit: eta = 1 is SDPA itself;
    eta = 0 (either dose) is SDPA with the chosen keys' logits biased by `suppress_bias`: the other
    keys' own softmax, the paper's -1e4 logit bias. The paper's dose at 0 < eta < 1 adds back what
    the chosen keys keep: out = (1 - eta P) * SDPA(chosen suppressed) + eta * sum_c p_c v_c, with
    p_c = exp(logit_c - lse) and P = sum_c p_c (exactly `scaled_probabilities`' rule: the others
    share 1 - eta P in proportion to their own softmax, also when their probabilities underflow).
    lse: each query's logsumexp (batch_size, heads, queries), from `image_query_mass(..., lse=True)`;
    None: computed here (one more score pass). The old dose ("renormalise") at 0 < eta < 1 runs the
    explicit `attention` (a log(eta) bias would be rounded to the query's dtype in SDPA's mask)."""
    score, values = split_edits(edits)
    if score is not None and score.dose == "renormalise" and 0 < score.eta < 1:
        return attention(query, key, value, edits, chunk_elements)[0]
    value = edited_values(value, values)
    if score is None or score.eta == 1:
        return F.scaled_dot_product_attention(query, key, value)
    B, H, S, D = key.shape
    chosen = score.chosen
    mask = torch.zeros(B, H, 1, S, dtype=query.dtype, device=query.device)
    mask.scatter_(-1, chosen[:, :, None, :], suppress_bias(query.dtype))
    others = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)  # the other keys' own softmax
    if score.eta == 0:
        return others
    if lse is None:
        lse = query_logsumexp(query, key, chunk_elements)
    chosen = chosen.sort(-1).values  # a key listed twice (padded key lists) counts once, as in the mask
    once = torch.ones_like(chosen, dtype=torch.float32)
    once[..., 1:] = (chosen[..., 1:] != chosen[..., :-1]).float()
    index = chosen[..., None].expand(B, H, chosen.shape[-1], D)
    p = torch.exp(logits(query, key.gather(2, index)) - lse[..., None]) * once[:, :, None, :]  # (B, H, queries, k): p_c
    kept = p @ value.gather(2, index).float()  # sum_c p_c v_c
    return ((1 - score.eta * p.sum(-1, keepdim=True)) * others.float() + score.eta * kept).to(query.dtype)


def attend(query, key, value, chosen: torch.Tensor, path: str, eta: float, chunk_elements: int | None = None,
           dose: str = "redistribute") -> torch.Tensor:
    """Attention with the chosen keys (batch_size, heads, k) suppressed on one path; (B, H, queries, D).
    `edited_attention` (one SDPA call; each query's logsumexp computed here where the dose needs it)."""
    return edited_attention(query, key, value, [Edit(chosen, path, float(eta), dose)], None, chunk_elements)
